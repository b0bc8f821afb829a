"""What every fedinstruct strategy shares on top of Flower's Message-API strategies.

The round loop hands a strategy only replies that `fedinstruct.protocol` has validated and
unpacked (keys, shapes, finiteness), each carrying its adapter and its weight. Here:

- replies that trained on nothing (an empty coreset) are left out of the average;
- an update whose distance from the global adapter is far above the others' is rejected with a
  logged reason and never reaches the global adapter;
- the strategy's own state (server-optimizer moments) can be saved and restored for resume.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedinstruct.protocol import ADAPTER_RECORD, METRICS_RECORD, WEIGHT

log = logging.getLogger(__name__)


def update_norm(update: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    """Distance of an update from the global tensors of the same names."""
    squared = sum(float(np.sum((a.numpy() - reference[k]) ** 2)) for k, a in update.items())
    return squared**0.5


class AdapterAggregation:
    """Mixin placed before a Flower strategy class (FedAvg, FedAdam, ...) in the MRO."""

    reject_norm_ratio: float = 10.0
    _reference: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reference = {k: a.numpy() for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def screen_replies(self, replies: Iterable[Message]) -> list[Message]:
        """Keep the replies that may enter the average; log why the others may not."""
        accepted: list[tuple[Message, float]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if float(msg.content[METRICS_RECORD][WEIGHT]) <= 0:
                log.info("node %s trained on no samples this round; left out", node)
                continue
            update = msg.content[ADAPTER_RECORD]
            norm = update_norm(update, self._reference) if self._reference is not None else 0.0
            accepted.append((msg, norm))
        if len(accepted) < 3:
            return [msg for msg, _ in accepted]
        kept = []
        for i, (msg, norm) in enumerate(accepted):
            others = statistics.median([n for j, (_, n) in enumerate(accepted) if j != i])
            if others > 0 and norm > self.reject_norm_ratio * others:
                log.warning(
                    "rejected update from node %s: norm %.3g is over %.0fx the median %.3g"
                    " of the others",
                    msg.metadata.src_node_id, norm, self.reject_norm_ratio, others,
                )
                continue
            kept.append(msg)
        return kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self.screen_replies(list(replies))
        if not valid:
            log.warning("round %d: no usable update; the global adapter is unchanged", server_round)
            return None, None
        return super().aggregate_train(server_round, valid)  # type: ignore[misc]

    # -- resume -----------------------------------------------------------------------------
    _STATE_ATTRS = ("m_t", "v_t", "momentum_vector")

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Server-optimizer state (FedOpt moments, FedAvgM momentum) as named arrays."""
        state: dict[str, np.ndarray] = {}
        for attr in self._STATE_ATTRS:
            value: Any = getattr(self, attr, None)
            items = value.items() if isinstance(value, dict) else enumerate(value or [])
            state.update({f"{attr}/{k}": np.asarray(v) for k, v in items})
        return state

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        for attr in self._STATE_ATTRS:
            prefix = f"{attr}/"
            values = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not values:
                continue
            if isinstance(getattr(self, attr, None), dict) or attr != "momentum_vector":
                setattr(self, attr, values)
            else:
                setattr(self, attr, [values[str(i)] for i in range(len(values))])
