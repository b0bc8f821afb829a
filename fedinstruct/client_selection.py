"""The client's side of data selection: which local rows to train on this round.

`all` and `random` decide locally. FedHDS decides in two messages: `train.select` clusters the
local samples and sends centroids up (`summarize_local_data`); the following `train` message
carries the winning cluster ids, which map to local rows kept in the node's context state.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from peft import set_peft_model_state_dict

from fedinstruct import modeling
from fedinstruct.config import RunConfig
from fedinstruct.selection import (
    LocalClustering,
    all_indices,
    cluster_client,
    coreset_indices,
    privatize_centroids,
    random_indices,
)

log = logging.getLogger(__name__)

SELECTED_KEY = "selected-clusters"  # train config: this node's winning local cluster ids
RANDOM_COUNTS_KEY = "random-counts"  # train config: rows to draw, indexed by partition id
STATE_KEY = "fedhds-clustering"  # context.state: the last local clustering
ROWS_KEY = "selected-rows"  # context.state: rows chosen at the last selection


def _store_rows(context: Context, rows: list[int]) -> None:
    context.state[ROWS_KEY] = ConfigRecord({"rows": rows or [-1]})


def _stored_rows(context: Context) -> list[int] | None:
    if ROWS_KEY not in context.state:
        return None
    return [r for r in context.state[ROWS_KEY]["rows"] if r >= 0]


def select_rows(
    cfg: RunConfig, client, context: Context, config: ConfigRecord, server_round: int
) -> list[int]:
    """Dataset rows to train on this round."""
    selection = cfg.selection
    n = len(client.dataset)
    if selection.name == "all":
        return all_indices(n)
    reselect = (server_round - 1) % selection.reselect_every == 0
    selection_round = server_round - (server_round - 1) % selection.reselect_every
    if selection.name == "random":
        if reselect or _stored_rows(context) is None:
            ratio, count = selection.random.ratio, selection.random.count
            if RANDOM_COUNTS_KEY in config:  # match_run: this round's count of that run
                ratio, count = None, _matched_count(config, client.partition_id, server_round)
            rows = random_indices(
                n,
                ratio=ratio,
                count=count,
                # seeded by the round of the selection, so a resumed run draws the same rows
                seed=cfg.seed * 7919 + selection_round * 31 + client.partition_id,
            )
            _store_rows(context, rows)
        return _stored_rows(context) or []
    # FedHDS: the server sent this node's winning cluster ids (or none on a non-selection round).
    if SELECTED_KEY in config:
        ids = [int(i) for i in config[SELECTED_KEY] if int(i) >= 0]
        rows = coreset_indices(_load_clustering(context), ids)
        _store_rows(context, rows)
        log.info("partition %d: coreset of %d / %d samples", client.partition_id, len(rows), n)
    rows = _stored_rows(context)
    if rows is None:
        raise RuntimeError(
            "FedHDS: no selection has reached this node yet (train before train.select)"
        )
    return rows


def _matched_count(config: ConfigRecord, partition_id: int, server_round: int) -> int:
    counts = [int(c) for c in config[RANDOM_COUNTS_KEY]]
    if not 0 <= partition_id < len(counts) or counts[partition_id] < 0:
        raise ValueError(
            f"selection.random.match_run: partition {partition_id} did not train in round "
            f"{server_round} of that run, so there is no count to match"
        )
    return counts[partition_id]


def _features(
    cfg: RunConfig, client, loaded, global_state: dict[str, torch.Tensor], rows: list[int]
) -> np.ndarray:
    settings = cfg.selection.fedhds
    texts = client.texts(loaded.tokenizer, rows)
    if settings.feature_model == "global":
        from fedinstruct.selection import last_token_hidden_states

        set_peft_model_state_dict(loaded.model, global_state)
        return last_token_hidden_states(
            loaded.model,
            loaded.tokenizer,
            texts,
            batch_size=settings.feature_batch_size,
            max_length=cfg.train.max_length,
        )
    from fedinstruct.selection import SentenceEmbedder, cached_features, fingerprint_of

    fingerprint = fingerprint_of(settings.feature_model, texts)
    path = modeling.cache_root() / "features" / f"{fingerprint[:16]}.npy"

    def compute() -> np.ndarray:
        embedder = SentenceEmbedder.load(settings.feature_model)
        return embedder.encode(texts, batch_size=settings.feature_batch_size)

    return cached_features(path, compute, fingerprint=fingerprint)


def summarize_local_data(
    cfg: RunConfig,
    client,
    context: Context,
    loaded,
    global_state: dict[str, torch.Tensor],
    server_round: int,
) -> ArrayRecord:
    """Cluster the local samples; keep the clustering here, return centroids and ids only."""
    settings = cfg.selection.fedhds
    rows = client.trainable_rows()
    features = _features(cfg, client, loaded, global_state, rows)
    clustering = cluster_client(
        features,
        reducer=settings.reducer,
        min_cluster_size=settings.min_cluster_size,
        seed=cfg.seed + server_round,
        pca_dims=settings.pca_dims,
        threads=torch.get_num_threads(),
    )
    # representatives index `rows`; map them back to dataset rows
    clustering.representatives = np.asarray(rows, dtype=np.int64)[clustering.representatives]
    _save_clustering(context, clustering)
    centroids = clustering.centroids.astype(np.float32)
    if settings.noise_sigma > 0:
        rng = np.random.default_rng(cfg.seed * 1_000_003 + server_round * 101 + client.partition_id)
        centroids = privatize_centroids(centroids, sigma=settings.noise_sigma, rng=rng).astype(
            np.float32
        )
    log.info(
        "partition %d: %d samples -> %d local clusters",
        client.partition_id,
        len(features),
        len(centroids),
    )
    return numpy_record(
        centroids=centroids,
        cluster_ids=clustering.cluster_ids.astype(np.int64),
        weights=clustering.weights.astype(np.float32),
    )


def numpy_record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def _save_clustering(context: Context, clustering: LocalClustering) -> None:
    context.state[STATE_KEY] = numpy_record(
        cluster_ids=clustering.cluster_ids,
        centroids=clustering.centroids,
        weights=clustering.weights,
        representatives=clustering.representatives,
        labels=clustering.labels,
    )


def _load_clustering(context: Context) -> LocalClustering:
    if STATE_KEY not in context.state:
        raise RuntimeError("FedHDS: the server selected clusters but this node has no clustering")
    arrays = {k: v.numpy() for k, v in context.state[STATE_KEY].items()}
    return LocalClustering(**arrays)
