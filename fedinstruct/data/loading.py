"""Load instruction datasets from the hub or local files into one validated schema.

Every loader returns a `datasets.Dataset` with the string columns `instruction`, `context`,
`response` and `category`. Rows are validated before anything is returned, so a bad row fails
here with its file, row and field named, instead of as a shape error deep inside training.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, Features, Value

CONTRACT_COLUMNS: tuple[str, ...] = ("instruction", "context", "response", "category")
CONTRACT_FEATURES = Features({name: Value("string") for name in CONTRACT_COLUMNS})
LOCAL_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".csv", ".parquet")
FORMATS: tuple[str, ...] = ("auto", "dolly", "alpaca", "generic")

# Fields that must hold non-blank text; the others may be empty or null.
_REQUIRED_TEXT = ("instruction", "response")


class DatasetError(ValueError):
    """A dataset file or row that cannot be used, with the file, row and field it concerns."""

    def __init__(
        self,
        source: str,
        problem: str,
        row: int | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.source, self.problem = str(source), problem
        self.row, self.field, self.line = row, field, line
        where = [self.source]
        if line is not None:
            where.append(f"line {line}")
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(", ".join(where) + ": " + problem)

    def __reduce__(self):  # keeps the error intact across process boundaries (Ray, pickling)
        return (type(self), (self.source, self.problem, self.row, self.field, self.line))


@dataclass(frozen=True)
class FieldMap:
    """Source column names for each contract column; None means absent (filled with "")."""

    instruction: str = "instruction"
    context: str | None = "context"
    response: str = "response"
    category: str | None = "category"

    def items(self) -> Iterable[tuple[str, str | None]]:
        return ((name, getattr(self, name)) for name in CONTRACT_COLUMNS)


DOLLY_FIELDS = FieldMap()
ALPACA_FIELDS = FieldMap(instruction="instruction", context="input", response="output",
                         category=None)


def _resolve_fields(fmt: str, fields: FieldMap | None, columns: set[str]) -> FieldMap:
    """Pick the column mapping: explicit `fields` and "dolly" are strict, the rest adapt.

    Adapting means an optional column (context, category) that no row has is mapped to None,
    so an Alpaca file without `input` or a generic file without `category` still loads.
    A FieldMap equal to the default counts as not given, so a config can always pass one.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if fields is not None and fields != DOLLY_FIELDS:
        return fields
    if fmt == "dolly":
        return DOLLY_FIELDS
    alpaca_like = "output" in columns and "response" not in columns
    mapping = ALPACA_FIELDS if fmt == "alpaca" or (fmt == "auto" and alpaca_like) else DOLLY_FIELDS
    if mapping.context not in columns:
        mapping = replace(mapping, context=None)
    if mapping.category not in columns:
        mapping = replace(mapping, category=None)
    return mapping


def _check_value(value: Any, source: str, row: int, name: str, src: str) -> str:
    """Return the cell as text, or raise naming the row and source field."""
    if value is None and name not in _REQUIRED_TEXT:
        return ""  # a null context/category (e.g. an empty CSV cell) means "none"
    if not isinstance(value, str):
        raise DatasetError(source, f"expected a string, got {type(value).__name__} ({value!r:.60})",
                           row=row, field=src)
    if name in _REQUIRED_TEXT and not value.strip():
        raise DatasetError(source, f"{name} is empty", row=row, field=src)
    return value


def _records_to_columns(records: Sequence[Any], source: str, fmt: str,
                        fields: FieldMap | None) -> dict[str, list[str]]:
    """Validate JSON records (dicts) and turn them into contract columns."""
    keys: set[str] = set()
    for rec in records:
        if isinstance(rec, dict):
            keys.update(rec)
    mapping = _resolve_fields(fmt, fields, keys)
    columns: dict[str, list[str]] = {name: [] for name in CONTRACT_COLUMNS}
    for row, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DatasetError(source, f"expected a JSON object, got {type(rec).__name__}",
                               row=row)
        for name, src in mapping.items():
            if src is None:
                columns[name].append("")
                continue
            if src not in rec:
                raise DatasetError(source, f"missing field (row has: {', '.join(rec) or 'none'})",
                                   row=row, field=src)
            columns[name].append(_check_value(rec[src], source, row, name, src))
    return columns


def _table_to_columns(table: Dataset, source: str, fmt: str,
                      fields: FieldMap | None) -> dict[str, list[str]]:
    """Validate an Arrow-backed dataset (CSV, Parquet, hub) column by column."""
    mapping = _resolve_fields(fmt, fields, set(table.column_names))
    columns: dict[str, list[str]] = {}
    for name, src in mapping.items():
        if src is None:
            columns[name] = [""] * table.num_rows
            continue
        if src not in table.column_names:
            raise DatasetError(source, f"missing field (columns: {', '.join(table.column_names)})",
                               row=0, field=src)
        columns[name] = [_check_value(v, source, row, name, src)
                         for row, v in enumerate(table[src][:])]
    return columns


def _read_json(path: Path) -> list[Any]:
    """Parse a JSON array file (or JSON Lines saved as .json) with precise error positions."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(path)  # JSON Lines under a .json name, common on the hub
        raise DatasetError(path, f"invalid JSON at column {err.colno} (char {err.pos}): "
                                 f"{err.msg}", line=err.lineno) from err
    if not isinstance(data, list):
        raise DatasetError(path, f"expected a JSON array of objects, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[Any]:
    """Parse JSON Lines, one object per non-blank line; errors name the line and row."""
    records: list[Any] = []
    with path.open(encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DatasetError(path, f"invalid JSON at column {err.colno}: {err.msg}",
                                   row=len(records), line=line_no) from err
    return records


def _read_csv(path: Path) -> Dataset:
    """Read every CSV column as text: numeric-looking answers ("85") must stay strings."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise DatasetError(path, "empty CSV file (no header row)")
    features = Features({name: Value("string") for name in header})
    return Dataset.from_csv(str(path), features=features, keep_default_na=False,
                            keep_in_memory=True)


def _load_file(path: Path, fmt: str, fields: FieldMap | None) -> dict[str, list[str]]:
    suffix = path.suffix.lower()
    source = str(path)
    if suffix == ".json":
        return _records_to_columns(_read_json(path), source, fmt, fields)
    if suffix == ".jsonl":
        return _records_to_columns(_read_jsonl(path), source, fmt, fields)
    try:
        table = _read_csv(path) if suffix == ".csv" else Dataset.from_parquet(
            str(path), keep_in_memory=True)
    except DatasetError:
        raise
    except Exception as err:  # pandas/pyarrow parse errors: re-raise with the file named
        raise DatasetError(source, f"cannot read {suffix[1:]} file: {err}") from err
    return _table_to_columns(table, source, fmt, fields)


def _to_dataset(columns: dict[str, list[str]], source: str) -> Dataset:
    if not columns["instruction"]:
        raise DatasetError(source, "no rows")
    return Dataset.from_dict(columns, features=CONTRACT_FEATURES)


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.lower().endswith(LOCAL_SUFFIXES)


def load_instruction_dataset(source: str, *, fmt: str = "auto", split: str = "train",
                             fields: FieldMap | None = None) -> Dataset:
    """Load a hub id, a local file or a folder of files as a validated instruction dataset.

    `fmt` picks the column mapping ("dolly" as-is, "alpaca" input->context and
    output->response, "generic"/"auto" adapt to the columns present); `fields` overrides it.
    `split` applies to hub datasets; a local file is one split. Source files are only read.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
        if not files:
            raise DatasetError(source, f"folder holds no {'/'.join(LOCAL_SUFFIXES)} files")
        merged: dict[str, list[str]] = {name: [] for name in CONTRACT_COLUMNS}
        for file in files:
            for name, values in _load_file(file, fmt, fields).items():
                merged[name].extend(values)
        return _to_dataset(merged, source)
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise DatasetError(source, f"unsupported file type {path.suffix!r}; "
                                       f"use one of {', '.join(LOCAL_SUFFIXES)}")
        return _to_dataset(_load_file(path, fmt, fields), source)
    if _looks_local(source):
        raise FileNotFoundError(f"dataset file or folder not found: {source}")
    try:
        table = datasets.load_dataset(source, split=split)
    except Exception as err:  # network, offline mode, unknown id: say which dataset failed
        raise DatasetError(source, f"cannot load split {split!r} from the hub: {err}") from err
    return _to_dataset(_table_to_columns(table, source, fmt, fields), source)


# --- datasets shipped already split per client (e.g. FedIT's local_training_{id}.json) ---

def _pattern_regex(train_pattern: str) -> re.Pattern[str]:
    if "{id}" not in train_pattern:
        raise ValueError(f"train_pattern {train_pattern!r} must contain '{{id}}'")
    return re.compile("^" + re.escape(train_pattern).replace(re.escape("{id}"), r"(\d+)") + "$")


def _partition_ids(folder: Path, train_pattern: str) -> list[int]:
    if not folder.is_dir():
        raise FileNotFoundError(f"pre-partitioned dataset folder not found: {folder}")
    regex = _pattern_regex(train_pattern)
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := regex.match(p.name)))


def count_prepartitions(folder: str, train_pattern: str = "local_training_{id}.json") -> int:
    """Number of client files in `folder`; ids must run 0..n-1 without gaps."""
    ids = _partition_ids(Path(folder), train_pattern)
    if not ids:
        raise FileNotFoundError(f"no files matching {train_pattern!r} in {folder}")
    missing = sorted(set(range(max(ids) + 1)) - set(ids))
    if missing:
        names = ", ".join(train_pattern.format(id=i) for i in missing[:5])
        raise FileNotFoundError(f"{folder}: partition files are not numbered 0..{max(ids)}; "
                                f"missing {names}")
    return len(ids)


def load_prepartitioned(folder: str, partition_id: int, *,
                        train_pattern: str = "local_training_{id}.json",
                        test_file: str = "global_test.json") -> Dataset:
    """Load client `partition_id`'s training file from a pre-split folder.

    `test_file` is accepted so one dataset config can feed both this and
    `load_prepartitioned_test`; it is checked not to be the training file itself.
    """
    count = count_prepartitions(folder, train_pattern)
    if not 0 <= partition_id < count:
        raise ValueError(f"partition_id={partition_id} is out of range: {folder} holds "
                         f"{count} partitions (ids 0..{count - 1})")
    name = train_pattern.format(id=partition_id)
    if name == test_file:
        raise ValueError(f"train_pattern {train_pattern!r} names the test file {test_file!r}")
    return load_instruction_dataset(str(Path(folder) / name))


def load_prepartitioned_test(folder: str, test_file: str = "global_test.json") -> Dataset:
    """Load the held-out test file shared by all clients of a pre-split folder."""
    path = Path(folder) / test_file
    if not path.is_file():
        raise FileNotFoundError(f"test file not found: {path}")
    return load_instruction_dataset(str(path))

