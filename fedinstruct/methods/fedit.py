"""FedIT: federated averaging over LoRA adapters (Zhang et al., ICASSP'24), optionally with one
of Flower's server optimizers applied to the adapter.

FedIT's server and client halves are the defaults of `fedinstruct.methods.base`; what is FedIT's
own is the choice of Flower strategy.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from fedinstruct.config import RunConfig
from fedinstruct.methods.aggregation import AdapterAggregation
from fedinstruct.methods.base import ServerMethod, ServerSelection
from fedinstruct.protocol import WEIGHT


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
    if s.server_optimizer == "none":
        strategy: AdapterAggregation = FedIT(**kwargs)
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
    return strategy


def build_server(cfg: RunConfig, selection: ServerSelection) -> ServerMethod:
    return ServerMethod(cfg, build_fedit(cfg), selection)
