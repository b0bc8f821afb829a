"""Prompt templates and tokenization for causal-LM instruction tuning.

The loss is computed on the response only (prompt positions get label -100), as FedIT does.
Samples whose response does not fit in `max_length` are dropped and counted, never hidden:
the counts travel into the training metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm

IGNORE_INDEX = -100
TEMPLATES: tuple[str, ...] = ("alpaca", "chat")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

_PROGRESS_THRESHOLD = 1000  # rows; below this a progress bar is noise
_ENCODE_CHUNK = 512


def build_prompt(example: Mapping[str, Any], template: str = "alpaca",
                 tokenizer: Any = None) -> str:
    """Render the prompt (everything before the response) for one row.

    "alpaca": FedIT's Alpaca template, with the input section only when `context` is non-blank.
    "chat": the tokenizer's own chat template, one user turn of instruction + context.
    """
    instruction = str(example.get("instruction") or "")
    context = str(example.get("context") or example.get("input") or "")
    if template == "alpaca":
        if context.strip():
            return ALPACA_PROMPT.format(instruction=instruction, input=context)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs a tokenizer with a chat_template; "
                             "use template='alpaca' for base models")
        content = f"{instruction}\n\n{context}" if context.strip() else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)
    raise ValueError(f"template={template!r} is unknown; choose one of {', '.join(TEMPLATES)}")


@dataclass
class TokenizedExample:
    """One training sequence: labels are -100 where no loss is taken.

    `source_row` is the dataset row it came from (set by `tokenize_dataset`, -1 otherwise), so
    callers can map rows to examples when some rows were dropped.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    source_row: int = field(default=-1, compare=False)


def _special_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts before the text on its own (BOS, BERT's [CLS]...)."""
    probe = "hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def _end_token(tokenizer: Any) -> int:
    for name in ("eos_token_id", "sep_token_id"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            return int(token)
    raise ValueError("the tokenizer has no eos_token (nor sep_token) to end responses with")


def _assemble(prefix: list[int], prompt_ids: list[int], response_ids: list[int], end_id: int,
              max_length: int, mask_prompt: bool) -> TokenizedExample | None:
    if prefix and prompt_ids[:len(prefix)] != prefix:  # chat templates may already hold BOS
        prompt_ids = prefix + prompt_ids
    input_ids = prompt_ids + response_ids + [end_id]
    labels = ([IGNORE_INDEX] * len(prompt_ids) if mask_prompt else list(prompt_ids))
    labels += response_ids + [end_id]
    truncated = len(input_ids) > max_length
    if len(prompt_ids) >= max_length:
        return None  # not one response token would remain: nothing to learn from
    return TokenizedExample(input_ids[:max_length], labels[:max_length], truncated)


def _check_max_length(max_length: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")


def tokenize_example(tokenizer: Any, prompt: str, response: str, *, max_length: int,
                     mask_prompt: bool = True) -> TokenizedExample | None:
    """Tokenize prompt + response + EOS, truncated to `max_length`.

    Returns None when the prompt alone fills `max_length` (the caller counts the drop).
    """
    _check_max_length(max_length)
    prompt_ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]
    return _assemble(_special_prefix(tokenizer), list(prompt_ids), list(response_ids),
                     _end_token(tokenizer), max_length, mask_prompt)


def tokenize_dataset(ds: Dataset, tokenizer: Any, *, template: str = "alpaca",
                     max_length: int = 256, mask_prompt: bool = True
                     ) -> tuple[list[TokenizedExample], dict[str, int]]:
    """Tokenize every row in order; stats = examples kept, truncated, dropped, tokens kept."""
    _check_max_length(max_length)
    prefix, end_id = _special_prefix(tokenizer), _end_token(tokenizer)
    examples: list[TokenizedExample] = []
    stats = {"examples": 0, "truncated": 0, "dropped": 0, "tokens": 0}
    with tqdm(total=len(ds), desc="tokenizing", leave=False,
              disable=len(ds) <= _PROGRESS_THRESHOLD) as progress:
        for start in range(0, len(ds), _ENCODE_CHUNK):
            rows = ds[start:start + _ENCODE_CHUNK]
            count = len(rows["instruction"])
            prompts = [build_prompt({name: rows[name][i] for name in rows}, template, tokenizer)
                       for i in range(count)]
            # verbose=False: over-long rows are handled (truncated or dropped) and counted here
            prompt_ids = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
            response_ids = tokenizer(list(rows["response"]), add_special_tokens=False,
                                     verbose=False)["input_ids"]
            for offset, (p_ids, r_ids) in enumerate(zip(prompt_ids, response_ids, strict=True)):
                example = _assemble(prefix, list(p_ids), list(r_ids), end_id, max_length,
                                    mask_prompt)
                if example is None:
                    stats["dropped"] += 1
                    continue
                example.source_row = start + offset
                examples.append(example)
                stats["truncated"] += int(example.truncated)
                stats["tokens"] += len(example.input_ids)
            progress.update(count)
    stats["examples"] = len(examples)
    return examples, stats


def pad_batch(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: padding gets attention 0 and label -100."""
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
