"""The client's local training loop: LoRA on a frozen (quantized) base.

A plain loop instead of `transformers.Trainer`: a round is a few dozen steps, and the Trainer's
per-call setup (accelerator, callbacks, checkpoint folders) would cost more than the steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fedinstruct.config import TrainSettings
from fedinstruct.data import TokenizedExample, pad_batch


@dataclass
class TrainResult:
    steps: int
    examples_seen: int  # draws, with repeats
    distinct_examples: int  # samples actually trained on
    tokens: int
    loss: float  # mean training loss over the round
    seconds: float


def sample_order(num_examples: int, draws: int, seed: int) -> list[int]:
    """Indices for `draws` samples: shuffled passes over the data, a fresh permutation per pass.

    The seed should change every round (the caller mixes in the round number) so that a
    fixed-step budget does not draw the same batches every round.
    """
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < draws:
        order.extend(torch.randperm(num_examples, generator=generator).tolist())
    return order[:draws]


def planned_steps(settings: TrainSettings, num_examples: int) -> int:
    if settings.local_steps > 0:
        return settings.local_steps
    per_step = settings.batch_size * settings.grad_accum
    return max(1, math.ceil(settings.local_epochs * num_examples / per_step))


def train_lora(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    settings: TrainSettings,
    *,
    pad_token_id: int,
    seed: int,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the model's trainable (LoRA) parameters on `examples` for one round.

    `extra_loss` is added to every step's loss (FedBiOT's proximal term).
    """
    if not examples:
        return TrainResult(0, 0, 0, 0, float("nan"), 0.0)
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters: was LoRA attached?")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps = planned_steps(settings, len(examples))
    per_step = settings.batch_size * settings.grad_accum
    order = sample_order(len(examples), steps * per_step, seed)
    model_device = next(model.parameters()).device

    model.train()
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    losses: list[float] = []
    tokens = 0
    bar = tqdm(range(steps), desc="local training", unit="step", leave=False, disable=not progress)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(settings.grad_accum):
            first = (step * settings.grad_accum + micro) * settings.batch_size
            batch_examples = [examples[i] for i in order[first : first + settings.batch_size]]
            batch = {
                k: v.to(model_device) for k, v in pad_batch(batch_examples, pad_token_id).items()
            }
            loss = model(**batch).loss
            if extra_loss is not None:
                loss = loss + extra_loss()
            (loss / settings.grad_accum).backward()
            step_loss += loss.item() / settings.grad_accum
            tokens += int(batch["attention_mask"].sum())
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.3f}")
    model.eval()
    return TrainResult(
        steps=steps,
        examples_seen=len(order),
        distinct_examples=len(set(order)),
        tokens=tokens,
        loss=sum(losses) / len(losses),
        seconds=time.perf_counter() - start,
    )


NamedParams = torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def _named(params: NamedParams) -> list[tuple[str, torch.Tensor]]:
    if isinstance(params, torch.nn.Module):
        return list(params.named_parameters())
    if isinstance(params, Mapping):
        return list(params.items())
    return list(params)


def snapshot(params: NamedParams) -> dict[str, torch.Tensor]:
    """Detached clones of the given tensors (of a module: its trainable parameters)."""
    if isinstance(params, torch.nn.Module):
        pairs = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    else:
        pairs = _named(params)
    return {name: tensor.detach().clone() for name, tensor in pairs}


def proximal_term(model_or_named_params: NamedParams, reference: Mapping[str, torch.Tensor]):
    """Sum over trainable parameters present in ``reference`` of ||theta - theta_ref||^2.

    Differentiable w.r.t. theta. Raises when no trainable parameter matches a reference name,
    since a silent zero would disable the regularizer.
    """
    terms = []
    for name, param in _named(model_or_named_params):
        if not param.requires_grad or name not in reference:
            continue
        ref = reference[name]
        if ref.shape != param.shape:
            raise ValueError(
                f"reference[{name!r}] has shape {tuple(ref.shape)}, parameter has "
                f"{tuple(param.shape)}"
            )
        ref = ref.to(device=param.device, dtype=torch.float32)
        terms.append((param.float() - ref).pow(2).sum())
    if not terms:
        sample = sorted(reference)[:3]
        raise ValueError(
            f"no trainable parameter matches the reference names (e.g. {sample}); take the "
            "reference with snapshot() of the same model's named parameters"
        )
    return torch.stack(terms).sum()
