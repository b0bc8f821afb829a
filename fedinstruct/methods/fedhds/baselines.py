"""Baseline data selections: every sample (``all``) and a uniform random subset (``random``),
of a fixed size or matched to another run's sample counts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedinstruct.server.output import METRICS_FILE, read_metrics


def _check_size(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")


def random_indices(
    n: int, *, ratio: float | None = None, count: int | None = None, seed: int = 0
) -> list[int]:
    """A uniform sample without replacement, sorted; give exactly one of ``ratio`` or ``count``.

    ``ratio`` in (0, 1] keeps ``ceil(n * ratio)`` samples (at least one of a non-empty set);
    ``count`` keeps that many, or all of them when ``count > n``.
    """
    _check_size(n)
    if (ratio is None) == (count is None):
        raise ValueError("give exactly one of ratio or count for random selection")
    if ratio is not None:
        if isinstance(ratio, bool) or not (0.0 < float(ratio) <= 1.0):
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        size = math.ceil(n * float(ratio))
    else:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        size = int(count)
    if size >= n:
        return list(range(n))
    chosen = np.random.default_rng(seed).choice(n, size=size, replace=False)
    return sorted(int(i) for i in chosen)


def matched_counts(run: str | Path, num_rounds: int) -> dict[int, list[int]]:
    """Per round, the rows each partition trained on in a previous run (its ``metrics.jsonl``).

    The paper's Random baseline draws as many samples as FedHDS selected: point ``run`` at a
    FedHDS run and a random selection can match it client by client, round by round. The list
    of a round is indexed by partition id; -1 marks a partition that did not train then.
    """
    path = Path(run).expanduser()
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{run}: neither a run folder with {METRICS_FILE} nor that file")
    per_round: dict[int, dict[str, int]] = {
        int(row["round"]): row["train_samples_per_client"]
        for row in read_metrics(path)
        if "train_samples_per_client" in row
    }
    schedule: dict[int, list[int]] = {}
    for server_round in range(1, num_rounds + 1):
        if server_round not in per_round:
            raise ValueError(
                f"{path} has no train_samples_per_client for round {server_round} "
                f"(rounds there: {sorted(per_round) or 'none'})"
            )
        counts = {int(p): int(c) for p, c in per_round[server_round].items()}
        row = [-1] * (max(counts, default=-1) + 1)
        for partition, count in counts.items():
            row[partition] = count
        schedule[server_round] = row
    return schedule
