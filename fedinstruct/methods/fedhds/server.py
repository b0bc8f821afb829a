"""The server's side of data selection: Random at another run's counts, and FedHDS's stage.

FedHDS (Qin et al., ACL Findings'25): every `reselect_every` rounds each client clusters its
own samples and sends the centroids only; the server clusters all centroids and tells each
client which of its local clusters won. The selection's round and adapter are checkpointed,
so a resumed run replays it (clients keep their clustering only for one run).

With `privacy.centroid_dp` every selection stage is one Gaussian release per client (see
`clustering.py`: multiplier z / sqrt(2), sample-level, within one client). The server charges
one release per stage it sends, replays included (a replay draws fresh noise), and writes the
epsilon spent so far at `privacy.delta` into every round's row as `dp_centroid_epsilon`: an
upper bound for every client, computed from the config and the number of stages alone.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedinstruct.config import ConfigError, RunConfig
from fedinstruct.methods.base import Send, ServerSelection
from fedinstruct.methods.fedhds.baselines import matched_counts
from fedinstruct.methods.fedhds.centroid_privacy import effective_noise_multiplier
from fedinstruct.methods.fedhds.clustering import select_global
from fedinstruct.privacy.accountant import Accountant, Release
from fedinstruct.protocol import (
    ADAPTER_RECORD,
    CONFIG_RECORD,
    RANDOM_COUNTS,
    SELECT,
    SERVER_ROUND,
    Centroids,
    ProtocolError,
    read_select_reply,
)

log = logging.getLogger(__name__)


def random_count_schedule(cfg: RunConfig) -> dict[int, list[int]] | None:
    """`selection.random.match_run`: per round, the rows each partition trained on there."""
    source = cfg.selection.random.match_run
    if source is None:
        return None
    try:
        return matched_counts(source, cfg.num_rounds)
    except (OSError, ValueError) as err:
        raise ConfigError(f"selection.random.match_run: {err}") from err


class RandomSelection(ServerSelection):
    """Random rows are drawn by each client; the server only relays `match_run` counts."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        # read now: a bad match_run fails before any model is loaded (models load lazily)
        self.counts = random_count_schedule(cfg)

    def train_config(self, server_round: int) -> dict[str, Any]:
        return {} if self.counts is None else {RANDOM_COUNTS: self.counts[server_round]}

    def weight_cap(self, node_id: int) -> int | None:
        random = self.cfg.selection.random
        return random.count if self.counts is None and random.ratio is None else None


class FedHDSSelection(ServerSelection):
    """Centroids up, server clustering, winning local cluster ids down (in train)."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self._selection: tuple[int, ArrayRecord] | None = None  # (round, adapter) of the last
        self._replay = False  # resumed between two selections
        self._selected: dict[int, list[int]] = {}  # node -> winning cluster ids, last stage
        # privacy.centroid_dp: one Gaussian release per selection stage sent
        self.centroid_accountant = Accountant(cfg.privacy.delta)

    def centroid_release(self) -> Release:
        """What one selection stage releases under privacy.centroid_dp, for the accountant."""
        return Release(effective_noise_multiplier(self.cfg.privacy.centroid_noise_multiplier))

    def stage(self, server_round: int, arrays: ArrayRecord, send: Send, row: dict[str, Any]
              ) -> dict[int, list[int]] | None:
        selected = self._stage(server_round, arrays, send, row)
        if self.cfg.privacy.centroid_dp:  # the spend so far, also in rounds without a stage
            row["dp_centroid_epsilon"] = self.centroid_accountant.epsilon()
            row["dp_centroid_delta"] = self.cfg.privacy.delta
            row["dp_centroid_releases"] = len(self.centroid_accountant.releases)
        return selected

    def _stage(self, server_round: int, arrays: ArrayRecord, send: Send, row: dict[str, Any]
               ) -> dict[int, list[int]] | None:
        reselect = (server_round - 1) % self.cfg.selection.reselect_every == 0
        if not (reselect or self._replay):
            return None
        if reselect or self._selection is None:
            self._selection = (server_round, arrays)
        else:
            log.info("round %d: replaying the selection of round %d", server_round,
                     self._selection[0])
        self._replay = False
        start = time.perf_counter()
        self._selected = self._select(*self._selection, send, row)
        row["time_selection"] = time.perf_counter() - start
        return self._selected

    def weight_cap(self, node_id: int) -> int | None:
        """One row per winning cluster: the coreset the server chose for the node."""
        return len(self._selected.get(node_id, []))

    def _select(self, selection_round: int, arrays: ArrayRecord, send: Send,
                row: dict[str, Any]) -> dict[int, list[int]]:
        settings = self.cfg.selection.fedhds
        content = RecordDict({ADAPTER_RECORD: arrays,
                              CONFIG_RECORD: ConfigRecord({SERVER_ROUND: selection_round})})
        messages = [Message(content, dst_node_id=node, message_type=SELECT)
                    for node in send.node_ids()]
        if self.cfg.privacy.centroid_dp:  # charged when sent: a client releases on receipt
            self.centroid_accountant.charge(self.centroid_release())
        replies: list[Centroids] = []
        for reply in send(messages, f"round {selection_round} selection"):
            try:
                replies.append(read_select_reply(reply, settings.max_centroids))
            except ProtocolError as err:
                log.warning("selection: node %s sent an invalid reply, left out: %s",
                            reply.metadata.src_node_id, err)
        dims = Counter(c.centroids.shape[1] for c in replies if len(c.cluster_ids))
        dim = dims.most_common(1)[0][0] if dims else None
        payload = {}
        for c in replies:
            if len(c.cluster_ids) and c.centroids.shape[1] != dim:
                log.warning("selection: node %s sent %d-D centroids, the others %d-D; left out",
                            c.node_id, c.centroids.shape[1], dim)
                continue
            payload[c.node_id] = (c.cluster_ids, c.centroids, c.weights)
        client_seconds = max((c.metrics.get("time-select", 0.0) for c in replies), default=0.0)
        start = time.perf_counter()
        # clients in an order of their content, not of their node ids (random per run), so
        # that the same centroids always give the same selection
        order = sorted(payload, key=lambda node: payload[node][1].tobytes())
        by_rank = select_global({rank: payload[node] for rank, node in enumerate(order)},
                                min_cluster_size=settings.server_min_cluster_size,
                                keep_noise=settings.keep_noise)
        selected = {node: by_rank[rank] for rank, node in enumerate(order)}
        row["time_server_clustering"] = time.perf_counter() - start
        row["local_clusters"] = int(sum(len(p[0]) for p in payload.values()))
        row["selected_clusters"] = int(sum(len(v) for v in selected.values()))
        if row["local_clusters"] and not row["selected_clusters"]:  # only without keep_noise
            log.warning("selection: the server's clustering of %d centroids found no cluster; "
                        "no node has a row to train on (selection.fedhds.keep_noise=true keeps "
                        "every outlier)", row["local_clusters"])
        row["time_select_clients"] = client_seconds
        return selected

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        # the multipliers, not a count: a resumed run with another z still accounts the old ones
        spent = [r.noise_multiplier for r in self.centroid_accountant.releases]
        releases = {"centroid_dp_releases": spent} if spent else {}
        if self._selection is None:
            return {}, releases
        selection_round, arrays = self._selection
        return arrays.to_torch_state_dict(), {"selection_round": selection_round, **releases}

    def restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        if tensors and "selection_round" in state:
            self._selection = (int(state["selection_round"]), ArrayRecord(tensors))
            self._replay = True
        self.centroid_accountant.releases = [
            Release(float(z)) for z in state.get("centroid_dp_releases", [])]
