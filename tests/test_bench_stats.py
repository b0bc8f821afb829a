"""bench/stats.py: the intervals and paired differences the study reports print."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import stats  # noqa: E402


def test_interval_is_the_t_interval_of_the_mean():
    mean, half, n = stats.interval([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.303
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.303 / math.sqrt(3), abs=1e-9)
    assert math.isnan(stats.interval([5.0])[1])  # one value: no interval
    assert stats.t975(40) == 1.960


def test_paired_difference_uses_the_shared_seeds_only():
    a = {1: 3.0, 2: 5.0, 3: 4.0, 4: 100.0}  # seed 4 has no partner in b
    b = {1: 1.0, 2: 2.0, 3: 3.0}
    mean, half, n = stats.paired(a, b)  # differences 2, 3, 1
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(2.4843, abs=1e-4)
    assert stats.verdict(mean, half) == "interval holds 0: no difference shown"  # 2 ± 2.48
    assert stats.verdict(2.0, 1.0) == "A higher (A better)"
    assert stats.verdict(-1.0, 0.5, higher_is_better=False) == "A lower (A better)"


def test_records_round_trip_and_tables(tmp_path):
    path = tmp_path / "r.jsonl"
    for seed, (x, y) in enumerate([(1.0, 0.5), (2.0, 1.5), (3.0, 1.0)], start=1):
        stats.append_jsonl(path, {"seed": seed, "variant": "A", "metrics": {"loss": x}})
        stats.append_jsonl(path, {"seed": seed, "variant": "B", "metrics": {"loss": y}})
    records = stats.read_jsonl(path)
    a = [r for r in records if r["variant"] == "A"]
    b = [r for r in records if r["variant"] == "B"]
    table = stats.mean_table({"A": a}, ["loss"], digits=2)
    assert table[-1] == "| A | 2.00 ± 2.48 | 3 |"
    rows = stats.paired_table([("A - B", a, b)], [("loss", False)])
    # differences 0.5, 0.5, 2.0: mean 1, sd 0.866, half-width 4.303 * 0.866 / sqrt(3) = 2.1515
    assert rows[-1] == ("| A - B | loss | 1.0000 ± 2.1515 | 3 "
                        "| interval holds 0: no difference shown |")
