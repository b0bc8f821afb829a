"""The node's cache: what a ClientApp process keeps between messages, for one run at a time.

Loading and quantizing a base model costs seconds to minutes, tokenizing a partition a few
seconds: both happen once per process, and each message only swaps the adapter. Models live in
a holder that survives re-imports of fedinstruct, so that a task forked by a warm app server
finds the model its parent loaded (shared copy-on-write); only library objects go there.
"""

from __future__ import annotations

import logging
import sys
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedinstruct.client.local import LocalClient
from fedinstruct.config import RunConfig, config_from_run_config
from fedinstruct.model import add_lora, load_base_model

log = logging.getLogger(__name__)

PROCESS_HOLDER = "_fedinstruct_process_cache"

Upload = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class LoadedModel:
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    load_seconds: float
    upload: Upload | None = None  # which LoRA tensors go back to the server (FedBiOT: some)


class NodeCache:
    """One run's config and per-partition data, and the process's one loaded model."""

    def __init__(self) -> None:
        self._run_key: str | None = None
        self._cfg: RunConfig | None = None
        self._clients: dict[str, LocalClient] = {}

    @property
    def _models(self) -> dict[str, tuple[Any, Any, float]]:
        holder = sys.modules.setdefault(PROCESS_HOLDER, types.ModuleType(PROCESS_HOLDER))
        return holder.__dict__.setdefault("models", {})

    def config(self, run_config: Mapping[str, Any]) -> RunConfig:
        """The nested config of Flower's flat run_config, composed once per run."""
        key = repr(sorted(run_config.items()))
        if key != self._run_key:
            self._run_key, self._cfg = key, config_from_run_config(run_config)
            self._clients.clear()
        assert self._cfg is not None
        return self._cfg

    def client(self, cfg: RunConfig, node_config: Mapping[str, Any]) -> LocalClient:
        """This partition's data, loaded and tokenized once."""
        key = repr((id(cfg), sorted(node_config.items())))
        if key not in self._clients:
            self._clients[key] = LocalClient.create(cfg, dict(node_config))
        return self._clients[key]

    def model(self, key: str, load: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any, float, bool]:
        """(model, tokenizer, load seconds, loaded now) for `key`; one model at a time."""
        models = self._models
        fresh = key not in models
        if fresh:
            models.clear()
            start = time.perf_counter()
            model, tokenizer = load()
            models[key] = (model, tokenizer, time.perf_counter() - start)
        return (*models[key], fresh)


NODE = NodeCache()


def base_model(cfg: RunConfig) -> tuple[LoadedModel, bool]:
    """The run's base model with LoRA attached, and whether this call loaded it (False also
    when a warm app server loaded it before forking this process)."""

    def load() -> tuple[PeftModel, PreTrainedTokenizerBase]:
        base, tokenizer = load_base_model(cfg.model)
        return add_lora(base, cfg.model), tokenizer

    model, tokenizer, seconds, fresh = NODE.model(repr(cfg.model), load)
    return LoadedModel(model, tokenizer, seconds), fresh

