"""Baseline data selections: every sample (``all``) and a uniform random subset (``random``)."""

from __future__ import annotations

import math

import numpy as np


def _check_size(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")


def all_indices(n: int) -> list[int]:
    """Every sample of a client's dataset: the full-data baseline."""
    _check_size(n)
    return list(range(n))


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
