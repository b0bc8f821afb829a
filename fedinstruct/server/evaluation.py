"""The server's held-out set: the rows every global adapter is scored on, prepared once.

For `choice_accuracy` each held-out row needs its options: a column (`eval.choices_column`,
default `choices`) of the held-out source, read here from the raw file(s) since the loader keeps
only the instruction columns. A row's options are a list of strings (JSON, JSONL, Parquet) or a
string holding a JSON array (CSV); its response names the correct option by text, 0-based index
or letter (`fedinstruct.metrics.choice_index`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from fedinstruct.config import ConfigError, RunConfig
from fedinstruct.data import DatasetError, build_prompt, tokenize_dataset
from fedinstruct.data.federated import test_dataset
from fedinstruct.data.loading import LOCAL_SUFFIXES
from fedinstruct.metrics import EvalResult, choice_index, evaluate_model, final_number

PREPARTITIONED_TEST = "global_test.json"  # fedinstruct.data.loading's default test file
_MISSING = object()


class HeldOutSet:
    """The rows, prompts and references of one held-out set and the metrics it is scored on
    (`eval.metrics`). `data` (and `sources`, the files it came from) replaces the run's own
    held-out rows, e.g. a file given to `fedinstruct eval --data`."""

    def __init__(self, cfg: RunConfig, tokenizer, data: Dataset | None = None,
                 sources: Sequence[str] | None = None) -> None:
        self.cfg = cfg
        self.metrics = tuple(cfg.eval.metrics)
        if data is None:
            data = test_dataset(cfg)
        self.options, self.answers = check_held_out(cfg, data, sources)
        self.examples, self.stats = [], {}
        if "loss" in self.metrics:
            self.examples, self.stats = tokenize_dataset(
                data, tokenizer, template=cfg.train.template,
                max_length=cfg.train.max_length, mask_prompt=True)
        self.prompts = [build_prompt(row, cfg.train.template, tokenizer) for row in data]
        self.references = list(data["response"])

    def evaluate(self, model: torch.nn.Module, tokenizer) -> EvalResult:
        return evaluate_model(
            model,
            tokenizer,
            self.examples,
            self.prompts,
            self.references,
            max_new_tokens=self.cfg.eval.max_new_tokens,
            batch_size=self.cfg.eval.batch_size,
            metrics=self.metrics,
            options=self.options,
            answers=self.answers,
            generate_rows=self.cfg.eval.generate_samples,
        )


def check_held_out(cfg: RunConfig, data: Dataset, sources: Sequence[str] | None = None
                   ) -> tuple[list[list[str]] | None, list[int] | None]:
    """Check that the held-out rows allow the chosen metrics, before any model loads; return
    each row's options and answer index for choice_accuracy (else None, None)."""
    metrics = cfg.eval.metrics
    if "numeric_match" in metrics and not any(final_number(r) is not None
                                              for r in data["response"]):
        raise ConfigError("eval.metrics has numeric_match, but no held-out response holds a "
                          "number")
    if "choice_accuracy" not in metrics:
        return None, None
    if sources is None:
        sources = held_out_sources(cfg)
    column = cfg.eval.choices_column
    options, answers = [], []
    for (file, row, choices), answer in zip(row_options(data, sources, column),
                                            data["response"], strict=True):
        index = choice_index(answer, choices)
        if index is None:
            raise DatasetError(file, f"the response {answer!r:.60} is none of the "
                               f"{len(choices)} options in '{column}' (by text, 0-based index "
                               "or letter)", row=row)
        options.append(choices)
        answers.append(index)
    return options, answers


def held_out_sources(cfg: RunConfig) -> list[str]:
    """The file(s), folder or hub id the run's held-out rows come from."""
    settings = cfg.dataset
    if settings.name == "synthetic":
        raise ConfigError("eval.metrics has choice_accuracy, but the synthetic dataset has no "
                          "options: use a dataset with a choices column")
    if settings.partitioner == "prepartitioned":
        return [str(Path(settings.source) / PREPARTITIONED_TEST)]
    return [settings.test_source or settings.source]


def row_options(data: Dataset, sources: Sequence[str], column: str
                ) -> list[tuple[str, int, list[str]]]:
    """Each row's (file, row in the file, options), found in the raw records of `sources` by
    the row's instruction, context and response text (the loader keeps only those columns,
    and the held-out rows may be a shuffled subset)."""
    index: dict[str, set[int]] = {}
    records: list[tuple[str, int, Any]] = []  # (file, row in it, options cell)
    for file, row, record in _raw_records(sources):
        position = len(records)
        records.append((file, row, record.get(column, _MISSING)))
        for value in record.values():
            if isinstance(value, str):
                index.setdefault(value, set()).add(position)
    if all(cell is _MISSING for _, _, cell in records):
        raise DatasetError(", ".join(sources), f"no row has a '{column}' column (the options "
                           "of eval.metrics=choice_accuracy; eval.choices_column names it)",
                           field=column)
    found = []
    for row in data.select_columns(["instruction", "context", "response"]).to_list():
        texts = [row["instruction"], row["context"], row["response"]]
        candidates = sorted(set.intersection(*(index.get(t, set()) for t in texts if t)))
        parsed = {json.dumps(_options(*records[c], column)) for c in candidates}
        if len(parsed) != 1:
            why = "no row of the source matches it" if not parsed else (
                "rows with its instruction and response disagree on the options")
            raise DatasetError(", ".join(sources), f"cannot find the options of held-out row "
                               f"{texts[0]!r:.60}: {why}", field=column)
        file, source_row, _ = records[candidates[0]]
        found.append((file, source_row, json.loads(parsed.pop())))
    return found


def _options(file: str, row: int, cell: Any, column: str) -> list[str]:
    if cell is _MISSING:
        raise DatasetError(file, "missing field (the options of choice_accuracy)", row=row,
                           field=column)
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError:
            raise DatasetError(file, "expected a JSON array of option strings, got "
                               f"{cell!r:.60}", row=row, field=column) from None
    if (not isinstance(cell, list) or len(cell) < 2
            or not all(isinstance(o, str) and o.strip() for o in cell)):
        raise DatasetError(file, f"expected a list of at least 2 non-empty option strings, got "
                           f"{cell!r:.60}", row=row, field=column)
    return list(cell)


def _raw_records(sources: Sequence[str]):
    """(file, row, record) of every row of the sources: local files, folders or hub ids."""
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
        elif path.is_file():
            files = [path]
        else:  # a hub dataset, as the loader reads it
            import datasets

            for row, record in enumerate(datasets.load_dataset(source, split="train")):
                yield source, row, record
            continue
        for file in files:
            for row, record in enumerate(_read_records(file)):
                if isinstance(record, dict):
                    yield str(file), row, record


def _read_records(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as handle:
            return list(csv.DictReader(handle))
    if suffix == ".parquet":
        return Dataset.from_parquet(str(path), keep_in_memory=True).to_list()
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass  # JSON Lines under a .json name, as the loader accepts
    return [json.loads(line) for line in text.splitlines() if line.strip()]
