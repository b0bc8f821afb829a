"""What a method is: a server half and a client half, each asked by the round loop or the
ClientApp, never probed.

The server half (`ServerMethod`) holds the global state: it builds the initial adapter, says
what each node is sent and what a reply must hold, merges the aggregate back, evaluates and
exports. FedIT's behaviour is the default here: one LoRA adapter is the global model. The
client half (`ClientMethod`) says which model a client trains and with what extra loss.

Data selection is a second, independent axis (`ServerSelection` / `ClientSelection`):
`all`, `random` and FedHDS compose with every training method.

A run's method is chosen once, at the end of this module, from the config: the training method
(`strategy.name`) and the data selection (`selection.name`) each name a server half and a client
half, imported on demand, so that a client never imports the server's alignment code.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping
from importlib import import_module
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.serverapp.strategy import Strategy
from peft import PeftModel, set_peft_model_state_dict

from fedinstruct.client.local import LoadedModel, LocalClient, base_model
from fedinstruct.config import RunConfig
from fedinstruct.model import (
    add_lora,
    initial_adapter_state,
    load_base_model,
    lora_config,
    resolve_model_path,
)
from fedinstruct.privacy import dp
from fedinstruct.protocol import PROXIMAL_MU, Instruction, Layout, TrainUpdate, layout_of
from fedinstruct.server.evaluation import HeldOutSet
from fedinstruct.server.output import RunOutput


class Send(Protocol):
    """The round loop's way to run an exchange: the connected nodes, and send-and-collect."""

    def node_ids(self) -> list[int]: ...

    def __call__(self, messages: list[Message], label: str) -> list[Message]:
        """Address, pack and send `messages`; return the successful replies."""
        ...


class ServerSelection:
    """The server half of data selection. `all` uses it as it is: no stage, no extra config."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def train_config(self, server_round: int) -> dict[str, Any]:
        """Entries every train message of this round carries."""
        return {}

    def stage(self, server_round: int, arrays: ArrayRecord, send: Send, row: dict[str, Any]
              ) -> dict[int, list[int]] | None:
        """A selection exchange before training: per node id, the cluster ids it trains on
        (None: no stage this round)."""
        return None

    def weight_cap(self, node_id: int) -> int | None:
        """The most rows this selection lets a node train on this round (None: no bound)."""
        return None

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and numbers a resumed run needs to replay the selection."""
        return {}, {}

    def restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        del tensors, state


class ClientSelection:
    """The client half of data selection: which local rows to train on this round. `all` uses
    it as it is: every local row, every round (FedIT's setting)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def rows(self, client: LocalClient, context: Context, instruction: Instruction) -> list[int]:
        return list(range(len(client.dataset)))

    def summarize(self, client: LocalClient, context: Context, loaded: LoadedModel,
                  instruction: Instruction) -> tuple[Any, Any, Any]:
        """(centroids, cluster ids, weights) of the local data, for a selection stage."""
        raise NotImplementedError(f"selection={self.cfg.selection.name} has no selection stage")


class ServerMethod:
    """The server half of a training method; FedIT's behaviour unless a method overrides it."""

    def __init__(self, cfg: RunConfig, strategy: Strategy, selection: ServerSelection) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.selection = selection
        self.privacy: dp.PrivacyLedger | None = None  # set by server_method for privacy.dp
        self._model: PeftModel | None = None
        self._tokenizer: Any = None
        self._held_out: HeldOutSet | None = None
        self._export_config = None

    # -- global state -----------------------------------------------------------------------
    def initial_arrays(self) -> ArrayRecord:
        """The first global adapter, from the model's config alone (no weights loaded)."""
        return ArrayRecord(initial_adapter_state(self.cfg.model, self.cfg.seed))

    def before_round(self, server_round: int, arrays: ArrayRecord
                     ) -> tuple[ArrayRecord, dict[str, float]]:
        """Server work before a round's training (FedBiOT aligns its emulator here)."""
        return arrays, {}

    def upload_layout(self, arrays: ArrayRecord) -> Layout:
        """Names and shapes a client's train reply must hold (the whole adapter for FedIT)."""
        return layout_of(arrays)

    def weight_cap(self, node_id: int) -> int | None:
        """The most distinct samples a node can honestly report for this round: what its local
        steps can draw, and what the server's selection left it (None: no bound known)."""
        train = self.cfg.train
        caps = [self.selection.weight_cap(node_id)]
        if train.local_steps > 0:
            caps.append(train.local_steps * train.batch_size * train.grad_accum)
        known = [c for c in caps if c is not None]
        return min(known) if known else None

    def weight(self, update: TrainUpdate) -> float:
        """A reply's weight in the average: the samples it trained on (checked against
        `weight_cap` before); with differential privacy every client weighs the same."""
        return 1.0 if self.privacy is not None else update.weight

    def after_aggregation(self, arrays: ArrayRecord, aggregated: ArrayRecord) -> ArrayRecord:
        """The next global state from the aggregate (the aggregate itself for FedIT)."""
        return aggregated

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Extra server-side tensors a resumed run needs (none for FedIT)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        del tensors

    # -- messages ---------------------------------------------------------------------------
    def address(self, messages: Iterable[Message]) -> list[Message]:
        """Per-node content added to a stage's messages (FedBiOT: its emulator)."""
        return list(messages)

    def delivered(self, messages: list[Message], replies: list[Message]) -> None:
        """Which messages reached their node (FedBiOT resends the emulator to the others)."""

    # -- evaluation and export --------------------------------------------------------------
    def adapter_state(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The full-model adapter held in `arrays` (what is exported and evaluated)."""
        return arrays.to_torch_state_dict()

    def evaluation_model(self) -> tuple[PeftModel, Any]:
        """The model the held-out set is scored on (loaded on first use)."""
        if self._model is None:
            base, self._tokenizer = load_base_model(self.cfg.model,
                                                    quantize=self.cfg.eval.quantized_base)
            self._model = add_lora(base, self.cfg.model)
        return self._model, self._tokenizer

    def held_out(self) -> HeldOutSet:
        if self._held_out is None:
            self._held_out = HeldOutSet(self.cfg, self.evaluation_model()[1])
        return self._held_out

    def evaluates(self, server_round: int) -> bool:
        every = self.cfg.eval.every
        return every > 0 and (server_round % every == 0 or server_round == self.cfg.num_rounds)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        if not self.evaluates(server_round):
            return {}
        start = time.perf_counter()
        model, tokenizer = self.evaluation_model()
        set_peft_model_state_dict(model, self.adapter_state(arrays))
        metrics = self.held_out().evaluate(model, tokenizer).as_metrics("eval")
        metrics["time_eval"] = time.perf_counter() - start
        return metrics

    def export_config(self):
        """The PEFT config the exported adapter is saved with."""
        if self._export_config is None:  # resolve the base model's path once, not every round
            self._export_config = lora_config(
                self.cfg.model, base_model_name_or_path=resolve_model_path(self.cfg.model))
        return self._export_config

    def export(self, output: RunOutput, server_round: int, arrays: ArrayRecord) -> None:
        output.save_adapter(server_round, self.adapter_state(arrays), self.export_config())


class ClientMethod:
    """The client half of a training method; FedIT's behaviour unless a method overrides it."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def model(self, instruction: Instruction, node_config: Mapping[str, Any]
              ) -> tuple[LoadedModel, bool]:
        """The model this client trains, and whether this call loaded it."""
        return base_model(self.cfg)

    def prewarm(self) -> None:
        """Load the model before the first message (a warm app server's hook).

        Only on CPU hosts: a process that has touched CUDA cannot fork usable children, so GPU
        nodes load in each task (from the node's pre-quantized copy).
        """
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # asks without initialising
        if not torch.cuda.is_available():
            base_model(self.cfg)

    def proximal_weight(self, instruction: Instruction) -> float:
        """Weight of ||theta - theta_round_start||^2 in the loss: FedProx's mu / 2."""
        return instruction.number(PROXIMAL_MU) / 2


# name -> (server half, client half), as "module:attribute"
TRAINING = {
    "fedit": ("fedinstruct.methods.fedit:build_server", "fedinstruct.methods.base:ClientMethod"),
    "fedbiot": ("fedinstruct.methods.fedbiot.server:build_server",
                "fedinstruct.methods.fedbiot.client:FedBiOTClient"),
}
SELECTION = {
    "all": ("fedinstruct.methods.base:ServerSelection",
            "fedinstruct.methods.base:ClientSelection"),
    "random": ("fedinstruct.methods.fedhds.server:RandomSelection",
               "fedinstruct.methods.fedhds.client:RandomRows"),
    "fedhds": ("fedinstruct.methods.fedhds.server:FedHDSSelection",
               "fedinstruct.methods.fedhds.client:FedHDSRows"),
}


def _load(path: str) -> Any:
    module, name = path.split(":")
    return getattr(import_module(module), name)


def server_method(cfg: RunConfig) -> ServerMethod:
    """The server half of the run's method, with its Flower strategy and selection, inside
    Flower's DP wrapper when `privacy.dp` asks for it."""
    selection: ServerSelection = _load(SELECTION[cfg.selection.name][0])(cfg)
    method: ServerMethod = _load(TRAINING[cfg.strategy.name][0])(cfg, selection)
    if cfg.privacy.dp != "none":
        # the clip bounds each update: no screen may change how many updates are averaged
        method.strategy.reject_norm_ratio, method.strategy.norm_bound = math.inf, 0.0
        z = dp.noise_multiplier(cfg)
        method.strategy = dp.wrap(method.strategy, cfg, z)
        method.privacy = dp.PrivacyLedger(z, cfg.privacy.clip, cfg.privacy.delta,
                                          cfg.privacy.target_epsilon)
    return method


def client_method(cfg: RunConfig) -> tuple[ClientMethod, ClientSelection]:
    """The client halves of the run's training method and data selection."""
    return (_load(TRAINING[cfg.strategy.name][1])(cfg),
            _load(SELECTION[cfg.selection.name][1])(cfg))
