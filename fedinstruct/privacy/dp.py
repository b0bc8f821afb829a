"""Client-level differential privacy of the adapter updates, with Flower's own DP parts.

`privacy.dp=central`: the server clips each client's update to `privacy.clip` and adds
Gaussian noise to their mean (Flower's `DifferentialPrivacyServerSideFixedClipping`).
`privacy.dp=client`: each client clips its own update before it leaves the node (Flower's
`fixedclipping_mod` on the ClientApp) and the server only adds the noise (Flower's
`DifferentialPrivacyClientSideFixedClipping`), so the server never holds an unclipped update.

Either way every sampled client weighs the same (DP-FedAvg's sensitivity is that of a mean),
and the run's `PrivacyLedger` charges each round to the accountant and stops the run, with a
checkpoint, before a round would spend more than `privacy.target_epsilon`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedinstruct.config import RunConfig
from fedinstruct.privacy.accountant import Accountant, Release, noise_for_epsilon
from fedinstruct.protocol import CONFIG_RECORD

log = logging.getLogger(__name__)


class _KeepsInnerState:
    """Checkpointing goes to the wrapped strategy (server-optimizer state, norms)."""

    strategy: Strategy

    def state_arrays(self) -> dict[str, np.ndarray]:
        return self.strategy.state_arrays()  # type: ignore[attr-defined]

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        self.strategy.load_state_arrays(state)  # type: ignore[attr-defined]


class CentralDP(_KeepsInnerState, DifferentialPrivacyServerSideFixedClipping):
    """The server clips every update, then noises their mean."""


class ClientClippedDP(_KeepsInnerState, DifferentialPrivacyClientSideFixedClipping):
    """Clients clip (the clip norm rides in the train config); the server noises the mean."""


def sampled_per_round(cfg: RunConfig) -> int:
    """Clients Flower samples each round (what the noise is calibrated to)."""
    fed = cfg.federation
    return max(int(fed.fraction_train * fed.num_clients), fed.min_train_nodes)


def noise_multiplier(cfg: RunConfig) -> float:
    """`privacy.noise_multiplier`, or the one that spends `target_epsilon` in num_rounds."""
    privacy = cfg.privacy
    if privacy.target_epsilon is None:
        return privacy.noise_multiplier
    rate = sampled_per_round(cfg) / cfg.federation.num_clients
    z = noise_for_epsilon(privacy.target_epsilon, cfg.num_rounds, rate, privacy.delta)
    log.info("privacy.target_epsilon=%g over %d rounds (q=%.3g, delta=%g): noise multiplier "
             "%.4f", privacy.target_epsilon, cfg.num_rounds, rate, privacy.delta, z)
    return z


def wrap(strategy: Strategy, cfg: RunConfig, z: float) -> Strategy:
    """`strategy` inside Flower's DP wrapper for `privacy.dp`."""
    kind = CentralDP if cfg.privacy.dp == "central" else ClientClippedDP
    return kind(strategy, noise_multiplier=z, clipping_norm=cfg.privacy.clip,
                num_sampled_clients=sampled_per_round(cfg))


@dataclass
class PrivacyLedger:
    """What a run has spent: one release per round, charged with the replies it averaged."""

    noise_multiplier: float
    clip: float
    delta: float
    budget: float | None
    accountant: Accountant = field(init=False)

    def __post_init__(self) -> None:
        self.accountant = Accountant(self.delta)

    @staticmethod
    def release(z: float, averaged: int, sampled: int, population: int) -> Release:
        """The round's Gaussian release: noise std z*C/m on a mean of k updates (sensitivity
        C/k) is a release with multiplier z*k/m, subsampled at rate m/N."""
        return Release(z * averaged / sampled if sampled else z,
                       min(1.0, sampled / max(population, 1)))

    def would_exceed(self, sampled: int, population: int) -> bool:
        """Whether one more full round would spend more than the budget."""
        if self.budget is None:
            return False
        planned = self.release(self.noise_multiplier, sampled, sampled, population)
        return self.accountant.epsilon([planned]) > self.budget

    def charge(self, averaged: int, sampled: int, population: int) -> dict[str, float]:
        """Charge a round; the metrics row's privacy entries."""
        self.accountant.charge(self.release(self.noise_multiplier, averaged, sampled,
                                            population))
        return {"dp_epsilon": self.accountant.epsilon(), "dp_delta": self.delta,
                "dp_noise_multiplier": self.noise_multiplier, "dp_clip": self.clip}

    def state(self) -> np.ndarray:
        """The releases so far, after the run's noise multiplier (row 0): a resumed run goes
        on with the noise it started with, whatever num_rounds says now."""
        rows = [[self.noise_multiplier, 0.0]]
        rows += [[r.noise_multiplier, r.sampling_rate] for r in self.accountant.releases]
        return np.asarray(rows, dtype=np.float64)

    def restore(self, state: np.ndarray, strategy: Strategy) -> None:
        self.noise_multiplier = float(state[0, 0])
        strategy.noise_multiplier = self.noise_multiplier  # Flower's DP wrapper
        self.accountant.releases = [Release(float(z), float(q)) for z, q in state[1:]]


def clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod` for the train messages that ask for clipping (dp=client);
    every other message passes through untouched."""
    config = msg.content.config_records.get(CONFIG_RECORD)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    return fixedclipping_mod(msg, context, call_next)
