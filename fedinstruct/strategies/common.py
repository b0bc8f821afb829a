"""What every fedinstruct strategy shares on top of Flower's Message-API strategies:

- replies that trained on nothing (an empty coreset) are left out of the average;
- a client update with wrong keys or shapes, NaN/Inf, or a norm far above the others' is
  rejected with a logged reason and never reaches the global adapter;
- weights are the samples each client trained on (`num-examples`), or uniform by option;
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

from fedinstruct.wire import layout_of, unpack

log = logging.getLogger(__name__)

WEIGHT_KEY = "num-examples"


def update_problem(update: ArrayRecord, reference: dict[str, np.ndarray]) -> str | None:
    """Why `update` cannot be averaged into `reference`, or None when it can."""
    keys = set(update.keys())
    if keys != set(reference):
        missing, extra = sorted(set(reference) - keys), sorted(keys - set(reference))
        return (
            f"keys differ from the global adapter (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for key, array in update.items():
        values = array.numpy()
        if values.shape != reference[key].shape:
            return f"'{key}' has shape {values.shape}, expected {reference[key].shape}"
        if not np.all(np.isfinite(values)):
            return f"'{key}' holds NaN or Inf"
    return None


def update_norm(update: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    squared = sum(float(np.sum((a.numpy() - reference[k]) ** 2)) for k, a in update.items())
    return squared**0.5


class AdapterAggregation:
    """Mixin placed before a Flower strategy class (FedAvg, FedAdam, ...) in the MRO."""

    reject_norm_ratio: float = 10.0
    uniform_weights: bool = False
    _reference: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reference = self.upload_reference(arrays)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def upload_reference(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        """The global tensors a client update must match (all of them for FedIT)."""
        return {k: a.numpy() for k, a in arrays.items()}

    def screen_replies(self, replies: Iterable[Message]) -> list[Message]:
        """Keep the replies that may enter the average; log why the others may not."""
        accepted: list[tuple[Message, float]] = []
        for msg in replies:
            if msg.has_error():
                log.warning(
                    "node %s failed this round: %s", msg.metadata.src_node_id, msg.error.reason
                )
                continue
            metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
            if float(metrics.get(WEIGHT_KEY, 0)) <= 0:
                log.info(
                    "node %s trained on no samples this round; left out", msg.metadata.src_node_id
                )
                continue
            name, update = next(iter(msg.content.array_records.items()), (None, None))
            reason = "no adapter in reply" if update is None else None
            if update is not None and self._reference is not None:
                try:  # adapters travel packed (fedinstruct.wire); unpack against the reference
                    update = msg.content[name] = unpack(update, layout_of(self._reference))
                    reason = update_problem(update, self._reference)
                except ValueError as err:
                    reason = str(err)
            if reason:
                log.warning("rejected update from node %s: %s", msg.metadata.src_node_id, reason)
                continue
            norm = update_norm(update, self._reference) if self._reference is not None else 0.0
            accepted.append((msg, norm))
        if len(accepted) >= 3:
            norms = [n for _, n in accepted]
            kept = []
            for msg, norm in accepted:
                others = statistics.median([n for n in norms if n is not norm] or [norm])
                if others > 0 and norm > self.reject_norm_ratio * others:
                    log.warning(
                        "rejected update from node %s: norm %.3g is over %.0fx the median %.3g"
                        " of the others",
                        msg.metadata.src_node_id,
                        norm,
                        self.reject_norm_ratio,
                        others,
                    )
                    continue
                kept.append((msg, norm))
            accepted = kept
        if self.uniform_weights:
            for msg, _ in accepted:
                next(iter(msg.content.metric_records.values()))[WEIGHT_KEY] = 1
        return [msg for msg, _ in accepted]

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
