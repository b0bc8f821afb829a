"""The client's side of data selection: which local rows to train on this round.

`all` and `random` decide locally. FedHDS decides in two messages: `train.select` clusters the
local samples and sends centroids up (`FedHDSRows.summarize`); the following `train` message
carries the winning cluster ids, which map to local rows kept in the node's context state.
With `privacy.centroid_dp` the centroids and cluster sizes sent up are those of the Gaussian
mechanism in `clustering.py` (its docstring states the guarantee and what it does not cover);
the local clustering and its representatives stay as they are, noise-free.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fedinstruct.client.local import LoadedModel, LocalClient
from fedinstruct.methods.base import ClientSelection
from fedinstruct.methods.fedhds.baselines import random_indices
from fedinstruct.methods.fedhds.centroid_privacy import (
    private_centroids,
    privatize_centroids,
    unit_rms,
)
from fedinstruct.methods.fedhds.clustering import LocalClustering, cluster_client, coreset_indices
from fedinstruct.model import cache_root
from fedinstruct.protocol import RANDOM_COUNTS, SELECTED_CLUSTERS, Instruction, layout_of

log = logging.getLogger(__name__)

STATE_KEY = "fedhds-clustering"  # context.state: the last local clustering
ROWS_KEY = "selected-rows"  # context.state: rows chosen at the last selection


def _store_rows(context: Context, rows: list[int]) -> None:
    context.state[ROWS_KEY] = ConfigRecord({"rows": rows or [-1]})


def _stored_rows(context: Context) -> list[int] | None:
    if ROWS_KEY not in context.state:
        return None
    return [r for r in context.state[ROWS_KEY]["rows"] if r >= 0]


class RandomRows(ClientSelection):
    """A random subset, redrawn every `reselect_every` rounds (the paper's Random baseline)."""

    def rows(self, client: LocalClient, context: Context, instruction: Instruction) -> list[int]:
        selection, server_round = self.cfg.selection, instruction.server_round
        if (server_round - 1) % selection.reselect_every == 0 or _stored_rows(context) is None:
            selection_round = server_round - (server_round - 1) % selection.reselect_every
            ratio, count = selection.random.ratio, selection.random.count
            counts = instruction.ints(RANDOM_COUNTS)
            if counts is not None:  # match_run: this round's count of that run
                ratio, count = None, _matched_count(counts, client.partition_id, server_round)
            rows = random_indices(
                len(client.dataset),
                ratio=ratio,
                count=count,
                # seeded by the round of the selection, so a resumed run draws the same rows
                seed=self.cfg.seed * 7919 + selection_round * 31 + client.partition_id,
            )
            _store_rows(context, rows)
        return _stored_rows(context) or []


def _matched_count(counts: list[int], partition_id: int, server_round: int) -> int:
    if not 0 <= partition_id < len(counts) or counts[partition_id] < 0:
        raise ValueError(
            f"selection.random.match_run: partition {partition_id} did not train in round "
            f"{server_round} of that run, so there is no count to match"
        )
    return counts[partition_id]


class FedHDSRows(ClientSelection):
    """FedHDS: local clustering up, the server's choice of clusters down, one row per cluster."""

    def rows(self, client: LocalClient, context: Context, instruction: Instruction) -> list[int]:
        ids = instruction.ints(SELECTED_CLUSTERS)
        if ids is not None:  # a selection round: this node's winning cluster ids
            rows = coreset_indices(_load_clustering(context), [i for i in ids if i >= 0])
            _store_rows(context, rows)
            log.info("partition %d: coreset of %d / %d samples", client.partition_id, len(rows),
                     len(client.dataset))
        rows = _stored_rows(context)
        if rows is None:
            raise RuntimeError(
                "FedHDS: no selection has reached this node yet (train before train.select)"
            )
        return rows

    def summarize(self, client: LocalClient, context: Context, loaded: LoadedModel,
                  instruction: Instruction) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cluster the local samples; keep the clustering here, return centroids, ids, weights."""
        settings = self.cfg.selection.fedhds
        server_round = instruction.server_round
        rows = client.trainable_rows()
        features = self._features(client, loaded, instruction, rows)
        clustering = cluster_client(
            features,
            reducer=settings.reducer,
            min_cluster_size=settings.min_cluster_size,
            seed=self.cfg.seed + server_round,
            pca_dims=settings.pca_dims,
            threads=torch.get_num_threads(),
        )
        # representatives index `rows`; map them back to dataset rows
        clustering.representatives = np.asarray(rows, dtype=np.int64)[clustering.representatives]
        _save_clustering(context, clustering)
        centroids, weights = self._release(clustering)
        if settings.noise_sigma > 0:  # heuristic, no guarantee (post-processing after DP)
            rng = np.random.default_rng(
                self.cfg.seed * 1_000_003 + server_round * 101 + client.partition_id)
            centroids = privatize_centroids(centroids, sigma=settings.noise_sigma, rng=rng)
        log.info("partition %d: %d samples -> %d local clusters", client.partition_id,
                 len(features), len(centroids))
        return centroids, clustering.cluster_ids, weights

    def _release(self, clustering: LocalClustering) -> tuple[np.ndarray, np.ndarray]:
        """(centroids, weights) to send: the weighted centroids and cluster sizes, or with
        privacy.centroid_dp the Gaussian mechanism's noisy means and noisy counts."""
        privacy = self.cfg.privacy
        if not privacy.centroid_dp:
            return clustering.centroids.astype(np.float32), clustering.weights
        embedding = clustering.embedding
        if embedding is None:
            raise RuntimeError("FedHDS: centroid_dp needs the clustering's reduced features")
        released = private_centroids(
            unit_rms(embedding),
            clustering.labels,
            clustering.num_clusters,
            clip=privacy.centroid_clip,
            noise_multiplier=privacy.centroid_noise_multiplier,
            # OS entropy: noise seeded from cfg.seed could be regenerated by the server
            rng=np.random.default_rng(),
        )
        return released.centroids, released.counts

    def _features(self, client: LocalClient, loaded: LoadedModel, instruction: Instruction,
                  rows: list[int]) -> np.ndarray:
        settings = self.cfg.selection.fedhds
        texts = client.texts(loaded.tokenizer, rows)
        if settings.feature_model == "global":
            from fedinstruct.methods.fedhds.features import last_token_hidden_states

            layout = layout_of(get_peft_model_state_dict(loaded.model))
            global_state = instruction.adapter_state(layout)
            set_peft_model_state_dict(loaded.model, global_state)
            return last_token_hidden_states(
                loaded.model,
                loaded.tokenizer,
                texts,
                batch_size=settings.feature_batch_size,
                max_length=self.cfg.train.max_length,
            )
        from fedinstruct.methods.fedhds.features import (
            SentenceEmbedder,
            cached_features,
            fingerprint_of,
        )

        fingerprint = fingerprint_of(settings.feature_model, texts)
        path = cache_root() / "features" / f"{fingerprint[:16]}.npy"

        def compute() -> np.ndarray:
            embedder = SentenceEmbedder.load(settings.feature_model)
            return embedder.encode(texts, batch_size=settings.feature_batch_size)

        return cached_features(path, compute, fingerprint=fingerprint)


def _save_clustering(context: Context, clustering: LocalClustering) -> None:
    arrays = {
        "cluster_ids": clustering.cluster_ids,
        "centroids": clustering.centroids,
        "weights": clustering.weights,
        "representatives": clustering.representatives,
        "labels": clustering.labels,
    }
    context.state[STATE_KEY] = ArrayRecord(
        {name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()}
    )


def _load_clustering(context: Context) -> LocalClustering:
    if STATE_KEY not in context.state:
        raise RuntimeError("FedHDS: the server selected clusters but this node has no clustering")
    arrays = {k: v.numpy() for k, v in context.state[STATE_KEY].items()}
    return LocalClustering(**arrays)
