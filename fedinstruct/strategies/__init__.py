"""Server strategies: FedIT (FedAvg over LoRA adapters) and FedBiOT."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from fedinstruct.config import RunConfig
from fedinstruct.server_model import AdapterServer


def build_strategy(cfg: RunConfig) -> tuple[Strategy, AdapterServer]:
    """The Flower strategy that aggregates, and the server-side model logic that goes with it."""
    if cfg.strategy.name == "fedbiot":
        from fedinstruct.strategies.fedbiot import build_fedbiot

        return build_fedbiot(cfg)
    from fedinstruct.strategies.fedit import build_fedit

    return build_fedit(cfg), AdapterServer(cfg)
