"""The methods: what the server sends, what a client does, how replies aggregate.

A run's method is chosen once, here, from the config: the training method (`strategy.name`:
FedIT or FedBiOT) and the data selection (`selection.name`: all, random or FedHDS) each name a
server half and a client half. Halves are imported on demand, so a client never imports the
server's alignment code and the server never imports feature extractors.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from fedinstruct.config import RunConfig

if TYPE_CHECKING:
    from fedinstruct.methods.base import (
        ClientMethod,
        ClientSelection,
        ServerMethod,
        ServerSelection,
    )

# name -> (server half, client half), as "module:attribute"
TRAINING = {
    "fedit": ("fedinstruct.methods.fedit:build_server", "fedinstruct.methods.base:ClientMethod"),
    "fedbiot": ("fedinstruct.methods.fedbiot.server:build_server",
                "fedinstruct.methods.fedbiot.client:FedBiOTClient"),
}
SELECTION = {
    "all": ("fedinstruct.methods.base:ServerSelection",
            "fedinstruct.methods.fedhds.client:AllRows"),
    "random": ("fedinstruct.methods.fedhds.server:RandomSelection",
               "fedinstruct.methods.fedhds.client:RandomRows"),
    "fedhds": ("fedinstruct.methods.fedhds.server:FedHDSSelection",
               "fedinstruct.methods.fedhds.client:FedHDSRows"),
}


def _load(path: str):
    module, name = path.split(":")
    return getattr(import_module(module), name)


def server_method(cfg: RunConfig) -> ServerMethod:
    """The server half of the run's method, with its Flower strategy and selection."""
    selection: ServerSelection = _load(SELECTION[cfg.selection.name][0])(cfg)
    return _load(TRAINING[cfg.strategy.name][0])(cfg, selection)


def client_method(cfg: RunConfig) -> tuple[ClientMethod, ClientSelection]:
    """The client halves of the run's training method and data selection."""
    return (_load(TRAINING[cfg.strategy.name][1])(cfg),
            _load(SELECTION[cfg.selection.name][1])(cfg))
