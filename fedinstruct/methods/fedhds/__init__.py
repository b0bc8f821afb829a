"""Data selection for federated instruction tuning: FedHDS and the ``all`` / ``random`` baselines.

The clustering side (``fedhds``) needs only numpy and scikit-learn, so a server can import this
package without torch; the feature extractors (``features``) load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .baselines import matched_counts, random_indices
from .centroid_privacy import privatize_centroids
from .clustering import (
    LocalClustering,
    cluster_client,
    cluster_points,
    coreset_indices,
    empty_clustering,
    reduce_features,
    select_global,
)

_FEATURE_NAMES = (
    "SentenceEmbedder",
    "cached_features",
    "fingerprint_of",
    "last_token_hidden_states",
)

__all__ = [
    "LocalClustering",
    "cluster_client",
    "cluster_points",
    "coreset_indices",
    "empty_clustering",
    "matched_counts",
    "privatize_centroids",
    "random_indices",
    "reduce_features",
    "select_global",
    *_FEATURE_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _FEATURE_NAMES:
        return getattr(import_module(".features", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
