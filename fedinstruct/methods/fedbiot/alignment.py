"""Server-side FedBiOT alignment: make emulator + adapter imitate full model + adapter.

Both models carry the same adapter LoRA. Only the emulator's LoRA is trained, on public data,
so that the clients' adapter updates transfer to the full model. The loss is a normalized MSE
between hidden states at the emulator/adapter boundary plus a KL term on next-token
distributions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedinstruct.methods.fedbiot.split import SplitPlan, decoder_layers, lora_parameter_groups

logger = logging.getLogger(__name__)


@contextmanager
def _capture_outputs(layers: torch.nn.ModuleList, indices: Iterable[int]) -> Iterator[dict]:
    """Record the hidden-state output of the chosen decoder layers during one forward."""
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for i in indices:

        def hook(_module, _args, output, i=i):
            outputs[i] = output[0] if isinstance(output, tuple) else output

        handles.append(layers[i].register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _normalized_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor):
    """sum ||s - t||^2 / sum ||t||^2 over non-padding tokens (scale-free across layers)."""
    student, teacher = student.float(), teacher.float()
    err = (student - teacher).pow(2).sum(-1)
    norm = teacher.pow(2).sum(-1)
    return (err * mask).sum() / (norm * mask).sum().clamp_min(1e-12)


def _token_kl(full_logits: torch.Tensor, comp_logits: torch.Tensor, mask: torch.Tensor):
    """Token-mean KL(full || compressed) of next-token distributions over non-padding tokens."""
    log_p = F.log_softmax(full_logits.float(), dim=-1)
    log_q = F.log_softmax(comp_logits.float(), dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1.0)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def alignment_loss(
    full_model: torch.nn.Module,
    compressed_model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    plan: SplitPlan,
    *,
    kl_weight: float = 1.0,
    layerwise: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Alignment loss of the compressed model against the full model on one batch.

    hidden: normalized MSE between the emulator output and the hidden state entering full layer
    ``plan.adapter_layers[0]``; layerwise (optional): the mean of the same measure over the other
    kept emulator layers; kl: token-mean KL(full || compressed). The full model runs without grad.
    """
    if "input_ids" not in batch:
        raise ValueError(f"batch needs 'input_ids', got keys {sorted(batch)}")
    device = _device_of(compressed_model)
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch.get("attention_mask")
    attention_mask = (
        torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    )
    mask = attention_mask.float()
    n_emu = len(plan.emulator_layers)
    full_layers, comp_layers = decoder_layers(full_model), decoder_layers(compressed_model)
    if len(full_layers) != plan.num_layers or len(comp_layers) != plan.num_compressed_layers:
        raise ValueError(
            f"models have {len(full_layers)} and {len(comp_layers)} decoder layers, plan expects "
            f"{plan.num_layers} (full) and {plan.num_compressed_layers} (compressed)"
        )
    student_idx = range(n_emu) if layerwise else [n_emu - 1]
    teacher_idx = [plan.emulator_layers[j] for j in student_idx]
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}

    with torch.no_grad(), _capture_outputs(full_layers, teacher_idx) as teacher:
        full_logits = full_model(**inputs).logits
    with _capture_outputs(comp_layers, student_idx) as student:
        comp_logits = compressed_model(**inputs).logits

    # Emulator's last layer output == input of the first adapter layer; its teacher is the
    # output of full layer emulator_layers[-1] == adapter_layers[0] - 1 (always kept).
    hidden = _normalized_mse(student[n_emu - 1], teacher[plan.emulator_layers[-1]], mask)
    kl = _token_kl(full_logits, comp_logits, mask)
    loss = hidden + kl_weight * kl
    parts = {"hidden_mse": hidden.item(), "kl": kl.item()}
    if layerwise and n_emu > 1:
        inner = [
            _normalized_mse(student[j], teacher[plan.emulator_layers[j]], mask)
            for j in range(n_emu - 1)
        ]
        layer_term = torch.stack(inner).mean()
        loss = loss + layer_term
        parts["layerwise_mse"] = layer_term.item()
    parts["loss"] = loss.item()
    return loss, parts


def _next_batch(iterator: Iterator, batches: Iterable, step: int) -> tuple[dict, Iterator]:
    """Next batch, restarting re-iterable sources (lists, DataLoaders) when they run out."""
    try:
        return next(iterator), iterator
    except StopIteration:
        iterator = iter(batches)
        try:
            return next(iterator), iterator
        except StopIteration:
            raise ValueError(
                f"batches ran out at step {step}: pass a re-iterable (list, DataLoader) "
                "or at least `steps` batches"
            ) from None


def align(
    full_model: torch.nn.Module,
    compressed_model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    plan: SplitPlan,
    *,
    steps: int,
    lr: float,
    kl_weight: float,
    layerwise: bool = False,
    progress: bool = True,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
) -> list[float]:
    """Train only the emulator-layer LoRA of the compressed peft model; return per-step losses.

    Every other parameter is frozen for the duration and its requires_grad restored afterwards.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    emulator_names, _ = lora_parameter_groups(compressed_model, plan)
    if not emulator_names:
        raise ValueError("compressed_model has no LoRA in its emulator layers: nothing to align")
    named = dict(compressed_model.named_parameters())
    saved_flags = {name: p.requires_grad for name, p in named.items()}
    trainable = [named[name] for name in emulator_names]
    was_training = compressed_model.training, full_model.training
    losses: list[float] = []
    try:
        for p in named.values():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        still_trainable = {n for n, p in named.items() if p.requires_grad}
        if still_trainable != set(emulator_names):
            raise RuntimeError("only emulator LoRA parameters may be trainable during alignment")
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
        compressed_model.train()
        full_model.eval()
        iterator = iter(batches)
        bar = tqdm(range(steps), desc="FedBiOT alignment", disable=not progress, leave=False)
        for step in bar:
            batch, iterator = _next_batch(iterator, batches, step)
            loss, parts = alignment_loss(
                full_model, compressed_model, batch, plan, kl_weight=kl_weight, layerwise=layerwise
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            optimizer.step()
            losses.append(parts["loss"])
            bar.set_postfix(loss=f"{parts['loss']:.4f}", kl=f"{parts['kl']:.4f}")
        if losses:
            logger.info("alignment: %d steps, loss %.4f -> %.4f", steps, losses[0], losses[-1])
    finally:
        for p in trainable:
            p.grad = None
        for name, p in named.items():
            p.requires_grad_(saved_flags[name])
        compressed_model.train(was_training[0])
        full_model.train(was_training[1])
    return losses


@torch.no_grad()
def evaluate_alignment(
    full_model: torch.nn.Module,
    compressed_model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    plan: SplitPlan,
    kl_weight: float = 1.0,
    *,
    layerwise: bool = False,
) -> float:
    """Mean alignment loss over ``batches`` (both models in eval mode, no grad)."""
    was_training = compressed_model.training, full_model.training
    compressed_model.eval()
    full_model.eval()
    try:
        values = [
            alignment_loss(
                full_model, compressed_model, b, plan, kl_weight=kl_weight, layerwise=layerwise
            )[1]["loss"]
            for b in batches
        ]
    finally:
        compressed_model.train(was_training[0])
        full_model.train(was_training[1])
    if not values:
        raise ValueError("evaluate_alignment got no batches")
    return sum(values) / len(values)
