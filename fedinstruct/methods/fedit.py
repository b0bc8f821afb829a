"""FedIT: federated averaging over LoRA adapters (Zhang et al., ICASSP'24), optionally with one
of Flower's server optimizers applied to the adapter.

FedIT's server and client halves are the defaults of `fedinstruct.methods.base`; what is FedIT's
own is the choice of Flower strategy.

Every method aggregates through `AdapterAggregation` (FedBiOT too, over its adapter's LoRA):
the round loop hands a strategy only replies that `fedinstruct.protocol` has validated and
unpacked, each with its adapter and its weight. Here replies that trained on nothing are left
out, an update far from the global adapter compared with the others is rejected with a logged
reason, and the server optimizer's state is saved and restored for resume.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
)

from fedinstruct.config import RunConfig
from fedinstruct.methods.base import ServerMethod, ServerSelection
from fedinstruct.protocol import ADAPTER_RECORD, METRICS_RECORD, WEIGHT

log = logging.getLogger(__name__)


def update_norm(update: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    """Distance of an update from the global tensors of the same names."""
    squared = sum(float(np.sum((a.numpy() - reference[k]) ** 2)) for k, a in update.items())
    return squared**0.5


class AdapterAggregation:
    """Mixin placed before a Flower strategy class (FedAvg, FedAdam, ...) in the MRO."""

    reject_norm_ratio: float = 10.0
    norm_bound: float = 3.0
    _reference: dict[str, np.ndarray] | None = None
    _previous_norm: float | None = None  # the last round's typical update distance

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reference = {k: a.numpy() for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def screen_replies(self, replies: Iterable[Message]) -> list[Message]:
        """The replies that may enter the average, distance-bounded; log why others may not.

        - a reply that trained on nothing is left out;
        - with 3 or more replies, one whose distance from the global adapter is over
          `reject_norm_ratio` x the median of the others' is rejected;
        - an update farther than `norm_bound` x a reference distance is scaled back to it. The
          reference is the median distance of the last round's replies, or, in the first round,
          the median distance of the other replies: with 1 or 2 replies a median cannot tell
          an outlier, and the bound is what keeps one reply from taking the adapter over.
        """
        assert self._reference is not None, "configure_train sets the reference"
        accepted: list[tuple[Message, float]] = []
        for msg in replies:
            if float(msg.content[METRICS_RECORD][WEIGHT]) <= 0:
                log.info("node %s trained on no samples this round; left out",
                         msg.metadata.src_node_id)
                continue
            accepted.append((msg, update_norm(msg.content[ADAPTER_RECORD], self._reference)))
        kept: list[Message] = []
        previous = self._previous_norm
        norms = [n for _, n in accepted]
        if norms:  # next round's reference (with fewer than 3, the smaller cannot be an outlier)
            self._previous_norm = statistics.median(norms) if len(norms) >= 3 else min(norms)
        for i, (msg, norm) in enumerate(accepted):
            others = [n for j, (_, n) in enumerate(accepted) if j != i]
            median = statistics.median(others) if others else 0.0
            if len(accepted) >= 3 and median > 0 and norm > self.reject_norm_ratio * median:
                log.warning("rejected update from node %s: norm %.3g is over %.0fx the median "
                            "%.3g of the others", msg.metadata.src_node_id, norm,
                            self.reject_norm_ratio, median)
                continue
            reference = previous or median
            bound = self.norm_bound * reference
            if self.norm_bound > 0 and bound > 0 and norm > bound:
                log.warning("clipped update from node %s: norm %.3g scaled to %.3g (%gx the "
                            "reference %.3g)", msg.metadata.src_node_id, norm, bound,
                            self.norm_bound, reference)
                msg = self._scaled(msg, bound / norm)
            kept.append(msg)
        return kept

    def _scaled(self, msg: Message, factor: float) -> Message:
        """A copy of `msg` whose update is moved `factor` of the way from the global adapter."""
        assert self._reference is not None
        arrays = ArrayRecord({
            k: Array(self._reference[k] + factor * (a.numpy() - self._reference[k]))
            for k, a in msg.content[ADAPTER_RECORD].items()
        })
        content = RecordDict({ADAPTER_RECORD: arrays,
                              METRICS_RECORD: msg.content[METRICS_RECORD]})
        return Message(content=content, metadata=msg.metadata)

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
        """Server-optimizer state (FedOpt moments, FedAvgM momentum) and the last round's
        median update distance, as named arrays."""
        state: dict[str, np.ndarray] = {}
        if self._previous_norm is not None:
            state["norm/previous"] = np.asarray([self._previous_norm])
        for attr in self._STATE_ATTRS:
            value: Any = getattr(self, attr, None)
            items = value.items() if isinstance(value, dict) else enumerate(value or [])
            state.update({f"{attr}/{k}": np.asarray(v) for k, v in items})
        return state

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        if "norm/previous" in state:
            self._previous_norm = float(state["norm/previous"][0])
        for attr in self._STATE_ATTRS:
            prefix = f"{attr}/"
            values = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not values:
                continue
            if isinstance(getattr(self, attr, None), dict) or attr != "momentum_vector":
                setattr(self, attr, values)
            else:
                setattr(self, attr, [values[str(i)] for i in range(len(values))])


class FedIT(AdapterAggregation, FedAvg):
    """Sample-weighted FedAvg over adapter tensors."""


class FedITAdam(AdapterAggregation, FedAdam):
    """FedIT with FedAdam's server-side update of the adapter."""


class FedITYogi(AdapterAggregation, FedYogi):
    """FedIT with FedYogi's server-side update of the adapter."""


class FedITAvgM(AdapterAggregation, FedAvgM):
    """FedIT with server momentum on the adapter."""


class FedITProx(AdapterAggregation, FedProx):
    """FedIT whose clients add FedProx's proximal term (`proximal-mu` in the train config)."""


class FedITMedian(AdapterAggregation, FedMedian):
    """FedIT with the coordinate-wise median of the updates instead of their mean."""


class FedITTrimmedMean(AdapterAggregation, FedTrimmedAvg):
    """FedIT with the coordinate-wise trimmed mean (`strategy.trim_fraction` cut each side)."""


def sampling_kwargs(cfg: RunConfig) -> dict[str, object]:
    """Sampling arguments every Flower strategy takes."""
    fed = cfg.federation
    return {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_train if cfg.eval.federated else 0.0,
        "min_train_nodes": fed.min_train_nodes,
        "min_evaluate_nodes": fed.min_train_nodes if cfg.eval.federated else 0,
        "min_available_nodes": fed.min_available_nodes,
        "weighted_by_key": WEIGHT,
    }


def build_fedit(cfg: RunConfig) -> AdapterAggregation:
    """The Flower strategy for `strategy.server_optimizer`, screening replies as it averages."""
    s = cfg.strategy
    kwargs = sampling_kwargs(cfg)
    if s.aggregation == "median":
        strategy: AdapterAggregation = FedITMedian(**kwargs)
    elif s.aggregation == "trimmed_mean":
        strategy = FedITTrimmedMean(**kwargs, beta=s.trim_fraction)
    elif s.server_optimizer == "none":
        strategy = FedIT(**kwargs)
    elif s.server_optimizer == "fedadam":
        strategy = FedITAdam(**kwargs, eta=s.server_lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)
    elif s.server_optimizer == "fedyogi":
        strategy = FedITYogi(**kwargs, eta=s.server_lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)
    elif s.server_optimizer == "fedavgm":
        strategy = FedITAvgM(
            **kwargs, server_learning_rate=s.server_lr, server_momentum=s.server_momentum
        )
    else:
        strategy = FedITProx(**kwargs, proximal_mu=s.proximal_mu)
    strategy.reject_norm_ratio = s.reject_norm_ratio
    strategy.norm_bound = s.norm_bound
    return strategy


def build_server(cfg: RunConfig, selection: ServerSelection) -> ServerMethod:
    return ServerMethod(cfg, build_fedit(cfg), selection)
