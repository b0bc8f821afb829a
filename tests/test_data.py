"""Data layer: loading and validation, synthetic tasks, partitioning (prompts: test_prompts.py)."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset

from fedinstruct.data import (
    SYNTHETIC_FAMILIES,
    DatasetError,
    FieldMap,
    count_prepartitions,
    holdout_per_category,
    load_instruction_dataset,
    load_prepartitioned,
    load_prepartitioned_test,
    make_synthetic_dataset,
    partition_dataset,
)

COLUMNS = ["instruction", "context", "response", "category"]
ROWS = [
    {"instruction": "What is 2 + 2?", "context": "", "response": "4", "category": "math"},
    {"instruction": "Summarize.", "context": "A long, long text.\nTwo lines.",
     "response": "A text.", "category": "summarization"},
    {"instruction": "Name a color.", "context": "", "response": "Blue", "category": "open_qa"},
]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, rows: object) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def test_load_json_array_keeps_rows_and_source(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "data.json", ROWS)
    before = _digest(path)
    ds = load_instruction_dataset(str(path))
    assert ds.column_names == COLUMNS
    assert ds.to_list() == ROWS
    assert _digest(path) == before


def test_load_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n" + json.dumps(ROWS[2]))
    assert load_instruction_dataset(str(path)).to_list() == ROWS
    disguised = tmp_path / "lines.json"  # JSON Lines under a .json name, as on the hub
    disguised.write_text(path.read_text())
    assert load_instruction_dataset(str(disguised)).to_list() == ROWS


def test_load_csv_keeps_numeric_answers_as_text(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    Dataset.from_list(ROWS).to_csv(str(path), index=False)
    ds = load_instruction_dataset(str(path))
    assert ds.to_list() == ROWS  # "4" stays a string, empty context stays "", newlines kept


def test_load_parquet(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    Dataset.from_list(ROWS).to_parquet(str(path))
    assert load_instruction_dataset(str(path)).to_list() == ROWS


def test_load_alpaca_maps_input_and_output(tmp_path: Path) -> None:
    alpaca = [{"instruction": "Add.", "input": "1 and 2", "output": "3"},
              {"instruction": "Say hi.", "input": "", "output": "Hi"}]
    path = _write_json(tmp_path / "alpaca.json", alpaca)
    expected = [{"instruction": "Add.", "context": "1 and 2", "response": "3", "category": ""},
                {"instruction": "Say hi.", "context": "", "response": "Hi", "category": ""}]
    assert load_instruction_dataset(str(path)).to_list() == expected
    assert load_instruction_dataset(str(path), fmt="alpaca").to_list() == expected
    assert load_instruction_dataset(str(path), fields=FieldMap()).to_list() == expected


def test_load_folder_concatenates_files_in_name_order(tmp_path: Path) -> None:
    _write_json(tmp_path / "a.json", ROWS[:1])
    (tmp_path / "b.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    Dataset.from_list(ROWS[2:]).to_csv(str(tmp_path / "c.csv"), index=False)
    (tmp_path / "notes.txt").write_text("not data")
    assert load_instruction_dataset(str(tmp_path)).to_list() == ROWS


def test_custom_field_map(tmp_path: Path) -> None:
    rows = [{"question": "Capital of Peru?", "answer": "Lima", "topic": "geo"}]
    path = _write_json(tmp_path / "qa.json", rows)
    fields = FieldMap(instruction="question", context=None, response="answer", category="topic")
    ds = load_instruction_dataset(str(path), fields=fields)
    assert ds.to_list() == [{"instruction": "Capital of Peru?", "context": "", "response": "Lima",
                             "category": "geo"}]


def test_prepartitioned_dolly_folder(tmp_path: Path) -> None:
    """The FedIT split's layout: local_training_<i>.json per client, global_test.json."""
    for client in range(3):
        _write_json(tmp_path / f"local_training_{client}.json", ROWS[client:] + ROWS[:client])
    _write_json(tmp_path / "global_test.json", ROWS * 2)
    folder = str(tmp_path)
    assert count_prepartitions(folder) == 3
    train = load_prepartitioned(folder, 1)
    assert train.column_names == COLUMNS
    assert train["instruction"][:] == [row["instruction"] for row in ROWS[1:] + ROWS[:1]]
    test = load_prepartitioned_test(folder)
    assert len(test) == 6
    assert Counter(test["category"][:]) == {row["category"]: 2 for row in ROWS}
    with pytest.raises(ValueError, match="3 partitions"):
        load_prepartitioned(folder, 3)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_prepartitioned_test(folder, test_file="nope.json")


def test_prepartition_gap_and_missing_folder(tmp_path: Path) -> None:
    _write_json(tmp_path / "local_training_0.json", ROWS)
    _write_json(tmp_path / "local_training_2.json", ROWS)
    with pytest.raises(FileNotFoundError, match="local_training_1.json"):
        count_prepartitions(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        load_prepartitioned(str(tmp_path / "missing_dir"), 0)


@pytest.mark.parametrize(
    ("bad_row", "field", "problem"),
    [
        ({"instruction": "Hi", "context": "", "category": "x"}, "response", "missing field"),
        ({"instruction": "Hi", "context": "", "response": "  \n", "category": "x"},
         "response", "empty"),
        ({"instruction": "", "context": "", "response": "ok", "category": "x"},
         "instruction", "empty"),
        ({"instruction": "Hi", "context": "", "response": 7, "category": "x"},
         "response", "expected a string"),
    ],
)
def test_bad_row_names_file_row_and_field(tmp_path: Path, bad_row: dict, field: str,
                                          problem: str) -> None:
    path = _write_json(tmp_path / "broken_rows.json", [ROWS[0], ROWS[1], bad_row])
    before = _digest(path)
    with pytest.raises(DatasetError) as caught:
        load_instruction_dataset(str(path))
    message = str(caught.value)
    assert "broken_rows.json" in message
    assert "row 2" in message
    assert f"field '{field}'" in message
    assert problem in message
    assert (caught.value.row, caught.value.field) == (2, field)
    assert _digest(path) == before


def test_invalid_json_and_jsonl_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad_syntax.json"
    path.write_text('[\n {"instruction": "a", "response": "b"},\n {"instruction": "c" "x"}\n]')
    before = _digest(path)
    with pytest.raises(DatasetError, match=r"bad_syntax\.json, line 3: invalid JSON"):
        load_instruction_dataset(str(path))
    assert _digest(path) == before
    path = tmp_path / "bad_lines.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n{oops\n")
    with pytest.raises(DatasetError, match=r"bad_lines\.jsonl, line 3, row 1: invalid JSON"):
        load_instruction_dataset(str(path))


def test_csv_error_names_row_and_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("instruction,context,response,category\nA,,yes,x\nB,,,x\n")
    with pytest.raises(DatasetError, match=r"bad\.csv, row 1, field 'response': response is empty"):
        load_instruction_dataset(str(path))
    path.write_text("instruction,answer\nA,yes\n")
    with pytest.raises(DatasetError, match=r"row 0, field 'response': missing field"):
        load_instruction_dataset(str(path))


def test_non_object_row_and_bad_arguments(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "mixed.json", [ROWS[0], ["not", "an", "object"]])
    with pytest.raises(DatasetError, match=r"mixed\.json, row 1: expected a JSON object"):
        load_instruction_dataset(str(path))
    with pytest.raises(ValueError, match="fmt='yaml'"):
        load_instruction_dataset(str(_write_json(tmp_path / "ok.json", ROWS)), fmt="yaml")
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_instruction_dataset(str(tmp_path / "absent.jsonl"))


def test_dataset_error_survives_pickling() -> None:
    error = DatasetError("file.json", "response is empty", row=4, field="response")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) == "file.json, row 4, field 'response': response is empty"
    assert (copy.row, copy.field) == (4, "response")


def test_synthetic_is_deterministic_and_covers_families() -> None:
    first = make_synthetic_dataset(70, seed=3)
    assert first.to_list() == make_synthetic_dataset(70, seed=3).to_list()
    assert first["instruction"][:] != make_synthetic_dataset(70, seed=4)["instruction"][:]
    assert len(SYNTHETIC_FAMILIES) >= 5
    assert Counter(first["category"][:]) == {family: 10 for family in SYNTHETIC_FAMILIES}
    assert all(text.strip() for text in first["instruction"][:] + first["response"][:])
    only = make_synthetic_dataset(6, families=["add", "uppercase"], seed=0)
    assert set(only["category"][:]) == {"add", "uppercase"}
    with pytest.raises(ValueError, match="divide"):
        make_synthetic_dataset(5, families=["divide"])


def test_synthetic_answers_are_correct() -> None:
    ds = make_synthetic_dataset(140, seed=11)
    checked = Counter()
    for row in ds:
        family, answer, context = row["category"], row["response"], row["context"]
        numbers = [int(n) for n in re.findall(r"\d+", row["instruction"])]
        if family == "add":
            assert int(answer) == numbers[0] + numbers[1]
        elif family == "subtract":
            assert int(answer) == max(numbers) - min(numbers) >= 0
        elif family == "sort_numbers":
            values = [int(n) for n in context.split(", ")]
            descending = "largest to smallest" in row["instruction"]
            assert [int(n) for n in answer.split(", ")] == sorted(values, reverse=descending)
        elif family == "reverse_words":
            assert answer.split() == context.split()[::-1]
        elif family == "uppercase":
            assert answer == context.upper() != context
        elif family == "count_letters":
            letter = re.search(r'letter "(\w)"', row["instruction"]).group(1)
            assert int(answer) == context.count(letter) >= 1
        else:
            assert family == "country_capital" and answer[0].isupper()
        checked[family] += 1
    assert set(checked) == set(SYNTHETIC_FAMILIES)


def _with_ids(ds: Dataset) -> Dataset:
    return ds.add_column("uid", list(range(len(ds))))


def _all_parts(ds: Dataset, num: int, **kwargs) -> list[Dataset]:
    return [partition_dataset(ds, num_partitions=num, partition_id=i, **kwargs)
            for i in range(num)]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_and_cover_the_data(scheme: str) -> None:
    ds = _with_ids(make_synthetic_dataset(350, seed=0))
    parts = _all_parts(ds, 5, scheme=scheme, seed=7)
    ids = [uid for part in parts for uid in part["uid"][:]]
    assert sorted(ids) == list(range(len(ds)))
    assert all(len(part) > 0 for part in parts)
    rebuilt = ds.select(range(len(ds)))  # same rows, new fingerprint: computed afresh
    assert rebuilt._fingerprint != ds._fingerprint
    again = _all_parts(rebuilt, 5, scheme=scheme, seed=7)
    assert [p["uid"][:] for p in parts] == [p["uid"][:] for p in again]


def test_iid_sizes_are_balanced_and_seeded() -> None:
    ds = _with_ids(make_synthetic_dataset(103, seed=0))
    sizes = [len(part) for part in _all_parts(ds, 4, scheme="iid")]
    assert sum(sizes) == 103 and max(sizes) - min(sizes) <= 1
    first = partition_dataset(ds, num_partitions=4, partition_id=0, seed=1)["uid"][:]
    assert first != partition_dataset(ds, num_partitions=4, partition_id=0, seed=2)["uid"][:]
    assert first != sorted(first)  # shuffled, not a contiguous block of the source


def test_pathological_gives_each_client_two_categories() -> None:
    families = list(SYNTHETIC_FAMILIES[:4])
    ds = _with_ids(make_synthetic_dataset(200, families=families, seed=0))  # 50 per family
    parts = _all_parts(ds, 4, scheme="pathological", shards_per_partition=2, seed=3)
    assert all(len(set(part["category"][:])) <= 2 for part in parts)
    assert [len(part) for part in parts] == [50, 50, 50, 50]
    other = _all_parts(ds, 4, scheme="pathological", shards_per_partition=2, seed=4)
    assert [p["uid"][:] for p in parts] != [p["uid"][:] for p in other]


def test_dirichlet_alpha_controls_skew() -> None:
    ds = make_synthetic_dataset(700, seed=0)

    def mean_top_share(alpha: float) -> float:
        parts = _all_parts(ds, 5, scheme="dirichlet", alpha=alpha, seed=5)
        shares = [Counter(p["category"][:]).most_common(1)[0][1] / len(p) for p in parts]
        return sum(shares) / len(shares)

    skewed, uniform = mean_top_share(0.2), mean_top_share(1000.0)
    assert skewed > 0.5
    assert uniform < 0.25  # 7 equal families: about 1/7 each


def test_partition_errors_name_the_field() -> None:
    ds = make_synthetic_dataset(20)
    with pytest.raises(ValueError, match="scheme='zipf'"):
        partition_dataset(ds, num_partitions=2, partition_id=0, scheme="zipf")
    with pytest.raises(ValueError, match="partition_id=2"):
        partition_dataset(ds, num_partitions=2, partition_id=2)
    with pytest.raises(ValueError, match="label_column='task'"):
        partition_dataset(ds, num_partitions=2, partition_id=0, scheme="dirichlet",
                          label_column="task")


def test_holdout_per_category() -> None:
    ds = _with_ids(make_synthetic_dataset(140, seed=2))
    train, test = holdout_per_category(ds, per_category=3, seed=42)
    assert Counter(test["category"][:]) == {family: 3 for family in SYNTHETIC_FAMILIES}
    assert sorted(train["uid"][:] + test["uid"][:]) == list(range(140))
    assert train["uid"][:] == sorted(train["uid"][:])
    assert test["uid"][:] == holdout_per_category(ds, per_category=3, seed=42)[1]["uid"][:]
    assert test["uid"][:] != holdout_per_category(ds, per_category=3, seed=1)[1]["uid"][:]
    with pytest.raises(ValueError, match="fewer than per_category=50"):
        holdout_per_category(ds, per_category=50)
