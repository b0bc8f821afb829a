"""Held-out evaluation: response-token loss, Rouge-L F of greedy generations, and
exact match of the final number for math-style answers (`... #### 42`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedinstruct.data import TokenizedExample, pad_batch

_FINAL_NUMBER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


@dataclass
class EvalResult:
    loss: float
    rouge_l: float
    accuracy: float | None  # only when every reference ends in "#### <number>"
    generations: list[str]

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """`{prefix}_loss`, `{prefix}_rougeL` (and `{prefix}_accuracy`) for a metrics row."""
        metrics = {f"{prefix}_loss": self.loss, f"{prefix}_rougeL": self.rouge_l}
        if self.accuracy is not None:
            metrics[f"{prefix}_accuracy"] = self.accuracy
        return metrics


@torch.no_grad()
def response_loss(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    *,
    pad_token_id: int,
    batch_size: int = 8,
) -> float:
    """Token-mean cross-entropy over response tokens (prompt tokens are masked)."""
    model.eval()
    model_device = next(model.parameters()).device
    total, count = 0.0, 0
    for first in range(0, len(examples), batch_size):
        batch = pad_batch(examples[first : first + batch_size], pad_token_id)
        batch = {k: v.to(model_device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += loss.item()
        count += int((shift_labels != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Greedy generations, batched with left padding."""
    model.eval()
    model_device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for first in tqdm(starts, desc="generating", leave=False, disable=not progress):
            enc = tokenizer(
                list(prompts[first : first + batch_size]), return_tensors="pt", padding=True
            )
            enc = {k: v.to(model_device) for k, v in enc.items()}
            generated = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
            )
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
    return [text.strip() for text in outputs]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean Rouge-L F-measure (rouge-score, stemmed), as FedIT and FedHDS report it."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure
        for pred, ref in zip(predictions, references, strict=True)
    ]
    return sum(scores) / max(len(scores), 1)


def final_number(text: str) -> str | None:
    match = _FINAL_NUMBER.search(text)
    if match:
        return match.group(1).replace(",", "")
    numbers = re.findall(r"-?[\d,]*\.?\d+", text)
    return numbers[-1].replace(",", "") if numbers else None


def final_number_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Exact match of the final number; None unless every reference is math-style."""
    if not references or not all(_FINAL_NUMBER.search(ref) for ref in references):
        return None
    hits = [
        final_number(p) == final_number(r) for p, r in zip(predictions, references, strict=True)
    ]
    return sum(hits) / len(hits)


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TokenizedExample],
    prompts: Sequence[str],
    references: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
) -> EvalResult:
    loss = response_loss(
        model, examples, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size
    )
    generations = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return EvalResult(
        loss=loss,
        rouge_l=rouge_l(generations, references),
        accuracy=final_number_accuracy(generations, references),
        generations=generations,
    )
