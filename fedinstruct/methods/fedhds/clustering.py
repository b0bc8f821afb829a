"""FedHDS data selection: client-side and server-side clustering (numpy + scikit-learn only).

Follows Qin et al., "Federated Data-Efficient Instruction Tuning for Large Language Models"
(ACL Findings 2025) and its reference code, with two deliberate differences:

* local cluster ids are the enumeration of the clusters, so id ``i`` always names the cluster
  whose centroid is row ``i`` (the reference zips per-sample labels with centroids instead);
* features are expected in dataset order (see ``features.py``), so a representative index is an
  index into the client's own dataset (the reference extracts features through a shuffled loader).

Flow of one selection step::

    client: features -> reduce_features (t-SNE, 2-D) -> HDBSCAN -> weighted centroids
            (or, centroid_dp: private_centroids; -> privatize_centroids if noise_sigma > 0)
            -> (cluster_ids, centroids, weights) sent to the server
    server: select_global over all clients' centroids -> {client: winning cluster ids}
    client: coreset_indices(clustering, winning ids) -> the samples it trains on

"Weighted centroid" is HDBSCAN's ``weighted_cluster_centroid``: the mean of a cluster's members
weighted by their membership probability (``probabilities_``), both on clients and on the server.

HDBSCAN noise: locally, noise samples belong to no cluster and are never selected (as in the
reference code); a client whose samples are all noise sends no centroid and trains on nothing.
On the server, centroids labelled noise are dropped unless ``keep_noise=True``.

Privacy of the centroids: ``centroid_privacy.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

# scikit-learn's HDBSCAN rather than the `hdbscan` package of the reference code: scikit-learn is
# already a dependency and needs no extra compiled package. scikit-learn counts a point as its own
# first neighbour and `hdbscan` does not, so `min_samples = min_cluster_size + 1` reproduces
# `hdbscan.HDBSCAN(min_cluster_size=m)`: the same labels as its exact Prim's algorithm, and the
# same minimum spanning tree as its default Boruvka, whose labels can differ only where tied
# mutual-reachability edges are condensed in another order.
from sklearn.cluster import HDBSCAN
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

REDUCERS = ("tsne", "pca")


@dataclass
class LocalClustering:
    """One client's clustering of its own samples; only ids, centroids and weights leave it.

    ``embedding`` holds the reduced coordinates of every sample (for plots and diagnostics).
    """

    cluster_ids: np.ndarray  # int64 [k], 0..k-1
    centroids: np.ndarray  # float32 [k, d_reduced]
    weights: np.ndarray  # int64 [k], cluster sizes
    representatives: np.ndarray  # int64 [k], dataset index of the sample nearest each centroid
    labels: np.ndarray  # int64 [n], cluster id per sample, -1 for noise
    embedding: np.ndarray | None = None  # float32 [n, d_reduced]

    @property
    def num_clusters(self) -> int:
        return int(self.cluster_ids.shape[0])


def as_feature_matrix(features: np.ndarray, name: str = "features") -> np.ndarray:
    array = np.asarray(features)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n_samples, n_features], got {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    if array.size and not np.isfinite(array).all():
        bad_row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise ValueError(f"{name} has a non-finite value in row {bad_row}")
    return array


def _check_min_cluster_size(min_cluster_size: int) -> None:
    if isinstance(min_cluster_size, bool) or not isinstance(min_cluster_size, (int, np.integer)):
        raise ValueError(f"min_cluster_size must be an int >= 2, got {min_cluster_size!r}")
    if min_cluster_size < 2:
        raise ValueError(f"min_cluster_size must be >= 2, got {min_cluster_size}")


def reduce_features(
    features: np.ndarray,
    *,
    method: str = "tsne",
    dim: int = 2,
    seed: int = 0,
    pca_dims: int | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Project features to ``dim`` dimensions with t-SNE (the paper) or PCA; seeded.

    t-SNE uses perplexity ``min(30, n - 1)`` like the reference code. ``pca_dims`` first reduces
    very wide features (e.g. 30 layers x 576) with PCA, standard practice before t-SNE that
    mostly speeds up its neighbour search; ``None`` keeps the paper's setting (t-SNE on raw
    features). Tiny inputs never fail: n=0 gives [0, dim], n=1 gives a zero row.
    ``threads`` caps BLAS/OpenMP threads: t-SNE's OpenMP loops slow down several-fold when
    several clients share the cores (e.g. parallel simulated clients); ``None`` leaves it open.
    Returns float32 [n, dim].
    """
    limit = threadpool_limits(limits=threads) if threads is not None else nullcontext()
    with limit:
        return _reduce(features, method=method, dim=dim, seed=seed, pca_dims=pca_dims)


def _reduce(
    features: np.ndarray, *, method: str, dim: int, seed: int, pca_dims: int | None
) -> np.ndarray:
    if method not in REDUCERS:
        raise ValueError(f"method must be one of {REDUCERS}, got {method!r}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    array = as_feature_matrix(features).astype(np.float32, copy=False)
    n_samples, n_features = array.shape
    if n_samples <= 1 or n_features == 0:
        return np.zeros((n_samples, dim), dtype=np.float32)
    if method == "pca":
        return _pca(array, dim, seed)
    if pca_dims is not None and n_features > pca_dims:
        array = _pca(array, pca_dims, seed)
    init = "pca" if dim <= min(n_samples, array.shape[1]) else "random"
    tsne = TSNE(
        n_components=dim,
        perplexity=float(min(30, n_samples - 1)),
        init=init,
        method="barnes_hut" if dim < 4 else "exact",
        random_state=seed,
    )
    return tsne.fit_transform(array).astype(np.float32)


def _pca(array: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """PCA to ``dim`` columns, zero-padded when the data have fewer components than that."""
    n_components = min(dim, array.shape[0], array.shape[1])
    reduced = PCA(n_components=n_components, random_state=seed).fit_transform(array)
    out = np.zeros((array.shape[0], dim), dtype=np.float32)
    out[:, :n_components] = reduced
    return out


def _hdbscan(points: np.ndarray, min_cluster_size: int) -> tuple[np.ndarray, np.ndarray]:
    """HDBSCAN labels and membership probabilities; fewer than 2 points are all noise."""
    n_points = points.shape[0]
    if n_points < 2:
        return np.full(n_points, -1, dtype=np.int64), np.zeros(n_points)
    clusterer = HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=min(min_cluster_size + 1, n_points),
        allow_single_cluster=False,
        algorithm="kd_tree",
        copy=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        clusterer.fit(points.astype(np.float64))
    return clusterer.labels_.astype(np.int64), clusterer.probabilities_.astype(np.float64)


def _weighted_centroid(points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """HDBSCAN's weighted centroid; plain mean when every weight is zero (duplicate points)."""
    if weights.sum() <= 0:
        return points.mean(axis=0)
    return np.average(points, axis=0, weights=weights)


def _nearest(points: np.ndarray, target: np.ndarray) -> int:
    """Row of ``points`` nearest ``target``; ties go to the first row."""
    return int(np.argmin(np.linalg.norm(points - target, axis=1)))


def empty_clustering(n_samples: int = 0, dim: int = 2) -> LocalClustering:
    """A clustering with no clusters: every one of ``n_samples`` samples is noise."""
    return LocalClustering(
        cluster_ids=np.zeros(0, dtype=np.int64),
        centroids=np.zeros((0, dim), dtype=np.float32),
        weights=np.zeros(0, dtype=np.int64),
        representatives=np.zeros(0, dtype=np.int64),
        labels=np.full(n_samples, -1, dtype=np.int64),
        embedding=np.zeros((n_samples, dim), dtype=np.float32),
    )


def cluster_points(points: np.ndarray, *, min_cluster_size: int = 2) -> LocalClustering:
    """HDBSCAN on already-reduced points, then weighted centroids and their representatives."""
    _check_min_cluster_size(min_cluster_size)
    points = as_feature_matrix(points, "points").astype(np.float32, copy=False)
    labels, probabilities = _hdbscan(points, min_cluster_size)
    n_clusters = int(labels.max()) + 1 if labels.size else 0
    if n_clusters == 0:
        clustering = empty_clustering(points.shape[0], points.shape[1])
        clustering.embedding = points
        return clustering
    centroids = np.zeros((n_clusters, points.shape[1]), dtype=np.float32)
    weights = np.zeros(n_clusters, dtype=np.int64)
    representatives = np.zeros(n_clusters, dtype=np.int64)
    for cluster_id in range(n_clusters):
        members = np.flatnonzero(labels == cluster_id)
        centroid = _weighted_centroid(points[members], probabilities[members])
        centroids[cluster_id] = centroid
        weights[cluster_id] = members.size
        representatives[cluster_id] = members[_nearest(points[members], centroid)]
    return LocalClustering(
        cluster_ids=np.arange(n_clusters, dtype=np.int64),
        centroids=centroids,
        weights=weights,
        representatives=representatives,
        labels=labels,
        embedding=points,
    )


def cluster_client(
    features: np.ndarray,
    *,
    reducer: str = "tsne",
    min_cluster_size: int = 2,
    seed: int = 0,
    dim: int = 2,
    pca_dims: int | None = None,
    threads: int | None = None,
) -> LocalClustering:
    """Client side of FedHDS: reduce, cluster with HDBSCAN, one representative per cluster.

    ``features`` rows must be in dataset order: ``representatives`` index that order. The
    representative of a cluster is its member nearest the cluster's weighted centroid in the
    reduced space, as in the reference code. Noise samples are never representatives.
    """
    _check_min_cluster_size(min_cluster_size)
    array = as_feature_matrix(features)
    if array.shape[0] == 0:
        return empty_clustering(0, dim)
    reduced = reduce_features(
        array, method=reducer, dim=dim, seed=seed, pca_dims=pca_dims, threads=threads
    )
    return cluster_points(reduced, min_cluster_size=min_cluster_size)


def _validate_client_payload(
    client: int, payload: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        ids, centroids, weights = payload
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"client {client}: expected (cluster_ids, centroids, weights), got {type(payload)}"
        ) from err
    ids = np.asarray(ids).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"client {client}: cluster_ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size == 0:
        return ids, np.zeros((0, 0)), np.zeros(0)
    centroids = as_feature_matrix(
        np.asarray(centroids, dtype=np.float64), f"client {client} centroids"
    )
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if not (ids.shape[0] == centroids.shape[0] == weights.shape[0]):
        raise ValueError(
            f"client {client}: cluster_ids, centroids and weights disagree in length "
            f"({ids.shape[0]}, {centroids.shape[0]}, {weights.shape[0]})"
        )
    if np.unique(ids).size != ids.size:
        raise ValueError(f"client {client}: duplicate cluster_ids {ids.tolist()}")
    if weights.size and (not np.isfinite(weights).all() or (weights < 0).any()):
        raise ValueError(f"client {client}: weights must be finite and >= 0")
    return ids, centroids, weights


def select_global(
    client_centroids: Mapping[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    min_cluster_size: int = 2,
    keep_noise: bool = False,
    size_weighted: bool = False,
) -> dict[int, list[int]]:
    """Server side of FedHDS: cluster all clients' centroids, keep one per global cluster.

    For every global HDBSCAN cluster the weighted global centroid is computed (membership
    probabilities, like the reference; times the clients' ``weights`` when ``size_weighted``)
    and the member centroid nearest it wins. Noise centroids are dropped, or with
    ``keep_noise`` each is its own group and wins. With fewer than two centroids in total, or
    too few to form a cluster, everything is noise: nothing is selected unless ``keep_noise``.
    Returns every client key with its winning local cluster ids (ascending, possibly empty).
    """
    _check_min_cluster_size(min_cluster_size)
    owners: list[tuple[int, int]] = []
    blocks: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    dims: set[int] = set()
    for client in sorted(client_centroids):
        ids, centroids, weights = _validate_client_payload(client, client_centroids[client])
        if ids.size == 0:
            continue
        dims.add(centroids.shape[1])
        if len(dims) > 1:
            raise ValueError(f"client {client}: centroid dimension differs from other clients")
        owners.extend((client, int(cluster_id)) for cluster_id in ids)
        blocks.append(centroids)
        sizes.append(weights)
    selected: dict[int, list[int]] = {client: [] for client in client_centroids}
    if not owners:
        return selected
    points = np.concatenate(blocks)
    cluster_sizes = np.concatenate(sizes)
    labels, probabilities = _hdbscan(points, min_cluster_size)
    winners: list[int] = []
    for global_id in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == global_id)
        strength = probabilities[members]
        if size_weighted:
            strength = strength * cluster_sizes[members]
        centroid = _weighted_centroid(points[members], strength)
        winners.append(int(members[_nearest(points[members], centroid)]))
    if keep_noise:
        winners.extend(int(i) for i in np.flatnonzero(labels == -1))
    for row in winners:
        client, cluster_id = owners[row]
        selected[client].append(cluster_id)
    return {client: sorted(ids) for client, ids in selected.items()}


def coreset_indices(clustering: LocalClustering, selected_ids: Sequence[int]) -> list[int]:
    """Dataset indices of the representatives of ``selected_ids``, ascending."""
    position = {int(cluster_id): row for row, cluster_id in enumerate(clustering.cluster_ids)}
    unknown = [cluster_id for cluster_id in selected_ids if int(cluster_id) not in position]
    if unknown:
        raise ValueError(
            f"selected cluster id(s) {unknown} not in this client's clustering, "
            f"which has {len(position)} cluster(s)"
        )
    rows = {position[int(cluster_id)] for cluster_id in selected_ids}
    return sorted(int(clustering.representatives[row]) for row in rows)
