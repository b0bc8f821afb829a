"""Means, 95% t-intervals and paired differences over seeds, and the JSONL the studies append to.

A study appends one JSON object per finished federation to its results file (so seeds can run
in separate processes, on separate machines, and be merged by concatenating files); its
``--report`` step reads them back and prints markdown tables through the helpers here.

- ``interval(values)``: mean and the half-width of the two-sided 95% interval of the mean, with
  Student's t at n - 1 degrees of freedom (``nan`` half-width for fewer than 2 values);
- ``paired(a, b)``: the same for the per-seed differences a - b over the seeds both hold, the
  comparison a claim "A beats B" needs (same seeds, so the seed-to-seed noise both share cancels).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# two-sided 95% quantiles of Student's t, df 1..30 (scipy.stats.t.ppf(0.975, df)); beyond: normal
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        return math.nan
    return _T975[df - 1] if df <= len(_T975) else 1.960


def interval(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t-interval of the mean, n)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t975(n - 1) * sd / math.sqrt(n), n


def paired(a: Mapping[Any, float], b: Mapping[Any, float]) -> tuple[float, float, int]:
    """Mean per-seed difference a - b over the seeds both have, its 95% half-width, n."""
    seeds = sorted(set(a) & set(b))
    return interval([a[s] - b[s] for s in seeds])


def fmt(mean: float, half: float, digits: int = 4) -> str:
    """`mean ± half` (or just the mean when there is no interval)."""
    if math.isnan(mean):
        return "n/a"
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def verdict(mean: float, half: float, higher_is_better: bool = True) -> str:
    """What a paired interval shows: a difference only when it excludes 0."""
    if math.isnan(half):
        return "one seed: no interval"
    if mean - half > 0:
        return "A higher" + (" (A better)" if higher_is_better else " (A worse)")
    if mean + half < 0:
        return "A lower" + (" (A worse)" if higher_is_better else " (A better)")
    return "interval holds 0: no difference shown"


# -- the results file ---------------------------------------------------------------------------
def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def setting_key(settings: Mapping[str, Any], ignore: Iterable[str] = ("seed",)) -> str:
    """Records with the same key ran the same study settings (seed aside) and can be pooled."""
    skip = set(ignore)
    return json.dumps({k: v for k, v in sorted(settings.items()) if k not in skip})


def by_seed(records: Iterable[Mapping[str, Any]], measure: str) -> dict[Any, float]:
    """{seed: value of `measure`} (the last record wins when a seed ran twice)."""
    out: dict[Any, float] = {}
    for r in records:
        value = r["metrics"].get(measure)
        if value is not None:
            out[r["seed"]] = float(value)
    return out


def mean_table(rows: Mapping[str, Sequence[Mapping[str, Any]]], measures: Sequence[str],
               labels: Sequence[str] | None = None,
               digits: int | Sequence[int] = 4) -> list[str]:
    """Markdown: one line per row label, mean ± 95% half-width of each measure (`digits`: one
    for all, or one per measure), and the number of seeds."""
    labels = list(labels or measures)
    places = [digits] * len(measures) if isinstance(digits, int) else list(digits)
    lines = ["| variant | " + " | ".join(labels) + " | seeds |",
             "|---" * (len(labels) + 2) + "|"]
    for name, records in rows.items():
        cells = []
        seeds: set[Any] = set()
        for measure, place in zip(measures, places, strict=True):
            values = by_seed(records, measure)
            seeds |= set(values)
            mean, half, _ = interval(list(values.values()))
            cells.append(fmt(mean, half, place))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(seeds)} |")
    return lines


def paired_table(comparisons: Sequence[tuple[str, Sequence[Mapping[str, Any]],
                                             Sequence[Mapping[str, Any]]]],
                 measures: Sequence[tuple[str, bool]], digits: int = 4) -> list[str]:
    """Markdown: per comparison "A - B" and measure (name, higher is better), the mean paired
    difference ± 95% half-width over shared seeds and what it shows."""
    lines = ["| A - B | measure | mean difference ± 95% | seeds | shows |",
             "|---|---|---|---|---|"]
    for label, a, b in comparisons:
        for measure, higher in measures:
            mean, half, n = paired(by_seed(a, measure), by_seed(b, measure))
            if n == 0:
                continue
            lines.append(f"| {label} | {measure} | {fmt(mean, half, digits)} | {n} "
                         f"| {verdict(mean, half, higher)} |")
    return lines
