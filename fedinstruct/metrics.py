"""Held-out evaluation: response-token loss, greedy generation, and the scores chosen with
`eval.metrics`: Rouge-L, exact match (SQuAD normalization), numeric match (the last number,
GSM8K's `#### 42` first) and multiple-choice accuracy (each option scored by log-likelihood).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from fedinstruct.data import IGNORE_INDEX, TokenizedExample, pad_batch, tokenize_example

if TYPE_CHECKING:  # the CLI checks data with this module before transformers is needed
    from transformers import PreTrainedTokenizerBase

DEFAULT_METRICS = ("loss", "rougeL")
GENERATION_METRICS = ("rougeL", "exact_match", "numeric_match")  # scored on greedy generations

# A number: 1,234.5 (commas only as thousands separators), 42, -3.5; the "-" of "3-4" is none
_NUMBER = r"(?:(?<!\d)-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_GSM8K_ANSWER = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass
class EvalResult:
    loss: float | None  # None: "loss" is not among the metrics
    rouge_l: float | None
    generations: list[str]
    scores: dict[str, float] = field(default_factory=dict)  # the task metrics, by name

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """`{prefix}_loss`, `{prefix}_rougeL` and `{prefix}_<metric>` for a metrics row."""
        metrics = {f"{prefix}_loss": self.loss, f"{prefix}_rougeL": self.rouge_l}
        metrics.update({f"{prefix}_{name}": value for name, value in self.scores.items()})
        return {key: value for key, value in metrics.items() if value is not None}


# -- scores of text --------------------------------------------------------------------------
def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean Rouge-L F-measure (rouge-score, stemmed), as FedIT and FedHDS report it."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure
        for pred, ref in zip(predictions, references, strict=True)
    ]
    return sum(scores) / max(len(scores), 1)


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lowercase, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference once both are normalized."""
    hits = [normalize_answer(p) == normalize_answer(r)
            for p, r in zip(predictions, references, strict=True)]
    return sum(hits) / max(len(hits), 1)


def final_number(text: str) -> Decimal | None:
    """The answer number of a text: after GSM8K's last `####`, else the last number in it
    (commas as thousands separators dropped); None if it holds no number."""
    answers = _GSM8K_ANSWER.findall(text)
    found = answers or re.findall(_NUMBER, text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the pattern only matches numbers
        return None


def numeric_match(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Share of rows whose prediction's final number equals the reference's (42.0 == 42).

    Rows whose reference holds no number are left out; None when no reference holds one.
    """
    scored = [(final_number(p), final_number(r))
              for p, r in zip(predictions, references, strict=True)]
    hits = [pred is not None and pred == ref for pred, ref in scored if ref is not None]
    return sum(hits) / len(hits) if hits else None


def choice_index(answer: str, options: Sequence[str]) -> int | None:
    """Which option `answer` names: its text (stripped), else its 0-based index ("2"), else
    its letter ("C", "c)", "(C)"); None if it names none. Text wins: with options ["1", "2"]
    the answer "1" is the first option."""
    answer = answer.strip()
    texts = [option.strip() for option in options]
    if answer in texts:
        return texts.index(answer)
    if answer.isdigit() and int(answer) < len(options):
        return int(answer)
    letter = answer.strip("().: ").upper()
    if len(letter) == 1 and "A" <= letter < chr(ord("A") + min(len(options), 26)):
        return ord(letter) - ord("A")
    return None


# -- model passes ----------------------------------------------------------------------------
@torch.no_grad()
def _token_nll(model: torch.nn.Module, examples: Sequence[TokenizedExample], pad_token_id: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed cross-entropy over its labelled tokens, and their count."""
    model_device = next(model.parameters()).device
    batch = {k: v.to(model_device) for k, v in pad_batch(examples, pad_token_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
        reduction="none")
    return nll.sum(dim=1).cpu(), (labels != IGNORE_INDEX).sum(dim=1).cpu()


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
    total, count = 0.0, 0
    for first in range(0, len(examples), batch_size):
        nll, tokens = _token_nll(model, examples[first : first + batch_size], pad_token_id)
        total += float(nll.sum())
        count += int(tokens.sum())
    return total / max(count, 1)


@torch.no_grad()
def option_log_likelihoods(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    options: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    max_length: int = 2048,
) -> list[list[float]]:
    """log P(option | prompt) for each row's options: the summed log-probabilities of the
    option's tokens right after the prompt, tokenized as in training (prompt and response
    apart; no end token scored). Over-long sequences lose prompt tokens from the left."""
    model.eval()
    examples: list[TokenizedExample] = []
    for prompt, row_options in zip(prompts, options, strict=True):
        for option in row_options:
            ex = tokenize_example(tokenizer, prompt, option, max_length=1 << 30)
            assert ex is not None
            ids, labels = ex.input_ids[:-1], ex.labels[:-1]  # drop the end token
            examples.append(TokenizedExample(ids[-max_length:], labels[-max_length:], False))
    scores: list[float] = []
    for first in range(0, len(examples), batch_size):
        nll, _ = _token_nll(model, examples[first : first + batch_size], tokenizer.pad_token_id)
        scores.extend((-nll).tolist())
    grouped, start = [], 0
    for row_options in options:
        grouped.append(scores[start : start + len(row_options)])
        start += len(row_options)
    return grouped


def choice_accuracy(log_likelihoods: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Share of rows whose most likely option is the answer (ties: the first option)."""
    hits = [max(range(len(s)), key=s.__getitem__) == answer
            for s, answer in zip(log_likelihoods, answers, strict=True)]
    return sum(hits) / max(len(hits), 1)


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


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TokenizedExample],
    prompts: Sequence[str],
    references: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    metrics: Sequence[str] = DEFAULT_METRICS,
    options: Sequence[Sequence[str]] | None = None,
    answers: Sequence[int] | None = None,
    generate_rows: int = 0,
) -> EvalResult:
    """The `metrics` of `model` on one held-out set; generations only when a metric needs
    them (on the first `generate_rows` rows when > 0, else on all), option scoring only for
    choice_accuracy (`options` and `answers` per row)."""
    loss = None
    if "loss" in metrics:
        loss = response_loss(model, examples, pad_token_id=tokenizer.pad_token_id,
                             batch_size=batch_size)
    generations: list[str] = []
    generated = slice(0, generate_rows or len(prompts))
    references = list(references)
    if any(name in metrics for name in GENERATION_METRICS):
        generations = generate(model, tokenizer, list(prompts)[generated],
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    gen_references = references[generated]
    scores: dict[str, float] = {}
    if "exact_match" in metrics:
        scores["exact_match"] = exact_match(generations, gen_references)
    if "numeric_match" in metrics and (
            value := numeric_match(generations, gen_references)) is not None:
        scores["numeric_match"] = value
    if "choice_accuracy" in metrics:
        if options is None or answers is None:
            raise ValueError("choice_accuracy needs each row's options and answer index")
        likelihoods = option_log_likelihoods(model, tokenizer, prompts, options,
                                             batch_size=batch_size)
        scores["choice_accuracy"] = choice_accuracy(likelihoods, answers)
    return EvalResult(
        loss=loss,
        rouge_l=rouge_l(generations, gen_references) if "rougeL" in metrics else None,
        generations=generations,
        scores=scores,
    )
