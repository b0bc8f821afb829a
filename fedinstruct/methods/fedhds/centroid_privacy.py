"""FedHDS: the privacy of the centroids a client sends (two options, both on the client).

``privacy.centroid_dp=true``: a Gaussian mechanism with a stated guarantee
(``private_centroids``). The reduced features are centred and scaled to unit RMS norm
(``unit_rms``, part of the reduction), each sample's reduced feature ``x_i`` is clipped to L2
norm ``C = privacy.centroid_clip``, and per local cluster ``j`` the client releases::

    S~_j = sum_{i in j} clip(x_i)  +  N(0, (z C)^2 I_d)      # noisy sum
    n~_j = |j|                     +  N(0, z^2)               # noisy count (sent as `weights`)
    centroid_j = S~_j / max(n~_j, 1)                          # post-processing

with ``z = privacy.centroid_noise_multiplier``. The counts are released too (they were always
sent as ``weights``, and dividing by the true count would itself leak it), so they are noised.
Sensitivity, sample-level add/remove with the cluster assignment fixed: one sample moves one
cluster's ``(S_j / C, n_j)`` by ``(x / C, 1)``, of L2 norm at most ``sqrt(2)``; every
coordinate of ``(S / C, n)`` has noise std ``z``. One selection round is therefore one Gaussian
mechanism with noise multiplier ``z / sqrt(2)`` (``effective_noise_multiplier``), and ``k``
selection rounds compose as ``k`` such releases (the server charges them to an RDP accountant
and reports ``dp_centroid_epsilon`` at ``privacy.delta``). The noise comes from the operating
system's entropy, never from ``cfg.seed``, which the server knows.

What this does NOT cover (the standard caveat of releasing cluster statistics): the reduction
(t-SNE/PCA and the unit-RMS scaling) and the HDBSCAN assignment are functions of all local
samples, and the guarantee holds for the released sums and counts *given* the reduced features
and the assignment. The number of local clusters (the length of the reply), which samples are
representatives (they stay local, but the client then trains on them) and other fields of the
reply (e.g. an exact sample count in its metrics) are not covered either. It is a
sample-level guarantee within one client, a different unit from the client-level DP of the
adapter updates (``privacy.dp``); the two epsilons do not add up into one number.

``selection.fedhds.noise_sigma > 0``: the paper's variant, heuristic, no guarantee
(``privatize_centroids``): tanh of each coordinate of the (unclipped, weighted) centroid plus
N(0, sigma^2) noise. Nothing bounds one sample's influence on a centroid relative to sigma,
and the noise is seeded from the run's seed. Applied after ``centroid_dp`` when both are set
(post-processing: the guarantee stands).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedinstruct.methods.fedhds.clustering import as_feature_matrix


@dataclass
class PrivateCentroids:
    """What ``privatize`` releases for one client's local clusters (``centroid_dp``)."""

    centroids: np.ndarray  # float32 [k, d]: noisy sum / max(noisy count, 1)
    counts: np.ndarray  # float32 [k]: noisy cluster sizes, clamped at >= 0 (sent as weights)
    sums: np.ndarray  # float64 [k, d]: noisy sums of the clipped features


def effective_noise_multiplier(noise_multiplier: float) -> float:
    """The Gaussian multiplier one ``private_centroids`` release is accounted with: noise std
    ``z`` on every coordinate of ``(sums / clip, counts)``, whose L2 sensitivity to adding or
    removing one sample is ``sqrt(2)`` (one sum moves by at most ``clip``, one count by 1)."""
    return noise_multiplier / math.sqrt(2.0)


def unit_rms(points: np.ndarray) -> np.ndarray:
    """Centre ``points`` and scale them to unit RMS norm (float64), so that a clip bound is in
    units of the data's spread whatever the reducer's scale (t-SNE's grows with n). A function
    of all samples, like the reduction before it; points without spread are only centred."""
    array = as_feature_matrix(points, "points").astype(np.float64)
    if array.shape[0] == 0:
        return array
    centred = array - array.mean(axis=0)
    rms = float(np.sqrt((centred**2).sum(axis=1).mean()))
    return centred / rms if rms > 0 else centred


def clip_rows(points: np.ndarray, clip: float) -> np.ndarray:
    """Each row scaled down to L2 norm at most ``clip`` (rows within the bound unchanged)."""
    if not np.isfinite(clip) or clip <= 0:
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    array = as_feature_matrix(points, "points").astype(np.float64)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    scale = np.minimum(1.0, clip / np.maximum(norms, np.finfo(np.float64).tiny))
    return array * scale


def private_centroids(
    points: np.ndarray,
    labels: np.ndarray,
    num_clusters: int,
    *,
    clip: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> PrivateCentroids:
    """The Gaussian mechanism of ``centroid_dp`` (module docstring): clip each sample's reduced
    feature to L2 norm ``clip``, sum per cluster (label ``-1``, HDBSCAN noise, counts nowhere),
    add N(0, (noise_multiplier * clip)^2) to every sum coordinate and N(0, noise_multiplier^2)
    to every count, and return ``noisy sum / max(noisy count, 1)``.

    With ``noise_multiplier=0`` the centroids are the exact means of the clipped features.
    ``rng`` must be secret to the client (``np.random.default_rng()``: OS entropy).
    """
    if not np.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    clipped = clip_rows(points, clip)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.shape[0] != clipped.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {clipped.shape[0]} points")
    if labels.size and (labels.max() >= num_clusters or labels.min() < -1):
        raise ValueError(
            f"labels must lie in [-1, {num_clusters}), got {labels.min()}..{labels.max()}"
        )
    dim = clipped.shape[1]
    member = labels >= 0
    sums = np.zeros((num_clusters, dim))
    np.add.at(sums, labels[member], clipped[member])
    counts = np.bincount(labels[member], minlength=num_clusters).astype(np.float64)
    if noise_multiplier > 0:
        sums = sums + rng.normal(0.0, noise_multiplier * clip, size=sums.shape)
        counts = counts + rng.normal(0.0, noise_multiplier, size=counts.shape)
    centroids = sums / np.maximum(counts, 1.0)[:, None]
    return PrivateCentroids(
        centroids=centroids.astype(np.float32),
        counts=np.maximum(counts, 0.0).astype(np.float32),
        sums=sums,
    )


def privatize_centroids(
    centroids: np.ndarray, *, sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """Heuristic, no guarantee: tanh of each coordinate, then N(0, sigma^2) noise (the paper's
    variant, ``selection.fedhds.noise_sigma``). See ``private_centroids`` for the one with a
    stated epsilon.

    tanh bounds each coordinate of a centroid, not one sample's influence on it relative to
    sigma, so no epsilon follows. tanh is always applied: ``sigma=0`` gives the
    deterministic tanh-only transform. Callers with privacy disabled send raw centroids and do
    not call this (as the reference code does when ``dp_noise == 0``). Negative sigma is an error.
    """
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    array = as_feature_matrix(centroids, "centroids")
    dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.float64
    bounded = np.tanh(array.astype(np.float64))
    if sigma > 0:
        bounded = bounded + rng.normal(0.0, sigma, size=bounded.shape)
    return bounded.astype(dtype)
