"""Epsilon as a number: a Rényi-DP accountant for the Gaussian releases of a run.

dp-accounting (Google's maintained library) does the accounting. Flower 1.41 ships an
accountant too, but only without sampling amplification and only for plain FedAvg; a federation
that samples m of N clients per round needs the amplification to state a useful epsilon.

Client-level DP-FedAvg (McMahan et al., ICLR'18): each round releases the mean of the sampled
clients' clipped updates plus Gaussian noise. Neighbouring datasets differ by one client's
data (add or remove). Flower samples a fixed number of clients per round; it is accounted as
Poisson sampling with the same rate q = m / N, as DP-FedAvg's analysis and TensorFlow
Federated do. A round whose mean averaged k < m replies (dropouts) had noise std z*C/m on a
mean whose sensitivity is C/k: it is charged with the smaller effective multiplier z*k/m.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import dp_accounting
from dp_accounting.rdp import RdpAccountant

# Rényi orders (TensorFlow Privacy's defaults from 1.5 up: below that the series for large
# sampling rates does not converge and the library drops those orders with a warning each)
ORDERS = [1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5, *range(5, 64), 128, 256, 512]
logging.getLogger("absl").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Release:
    """One Gaussian release: noise multiplier (in units of the sensitivity), sampling rate."""

    noise_multiplier: float
    sampling_rate: float = 1.0

    def event(self) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling_rate >= 1.0:
            return gaussian
        return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, gaussian)


@dataclass
class Accountant:
    """The releases of one run so far, and the epsilon they spend at `delta`."""

    delta: float
    releases: list[Release] = field(default_factory=list)

    def charge(self, release: Release) -> None:
        self.releases.append(release)

    def epsilon(self, extra: list[Release] | None = None) -> float:
        """Epsilon at `delta` after every release so far (and `extra` ones, if given)."""
        releases = self.releases + (extra or [])
        if not releases:
            return 0.0
        if any(r.noise_multiplier <= 0 for r in releases):
            return float("inf")
        accountant = RdpAccountant(ORDERS)
        for release, same in itertools.groupby(releases):  # identical rounds: one computation
            accountant.compose(release.event(), count=len(list(same)))
        return float(accountant.get_epsilon(self.delta))


def noise_for_epsilon(target: float, rounds: int, sampling_rate: float, delta: float,
                      tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier whose `rounds` releases spend at most `target`."""
    def spent(z: float) -> float:
        return Accountant(delta, [Release(z, sampling_rate)] * rounds).epsilon()

    low, high = 0.0, 1.0
    while spent(high) > target:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {target} in {rounds} rounds")
    while high - low > tolerance * high:
        middle = (low + high) / 2
        low, high = (middle, high) if spent(middle) > target else (low, middle)
    return high
