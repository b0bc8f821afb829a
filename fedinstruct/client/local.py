"""A client's local state and work: the node's cache, its partition, training and evaluation.

What a ClientApp process keeps between messages, for one run at a time (`NODE`): loading and
quantizing a base model costs seconds to minutes, tokenizing a partition a few seconds: both
happen once per process, and each message only swaps the adapter. Models live in
a holder that survives re-imports of fedinstruct, so that a task forked by a warm app server
finds the model its parent loaded (shared copy-on-write); only library objects go there.
"""

from __future__ import annotations

import logging
import sys
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedTokenizerBase

from fedinstruct.client.training import TrainResult, proximal_term, snapshot, train_lora
from fedinstruct.compose import config_from_run_config
from fedinstruct.config import RunConfig
from fedinstruct.data import TokenizedExample, build_prompt, tokenize_dataset
from fedinstruct.data.federated import client_dataset, local_file_dataset
from fedinstruct.metrics import response_loss
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


log = logging.getLogger(__name__)


@dataclass
class LocalClient:
    cfg: RunConfig
    partition_id: int
    dataset: Dataset
    examples: list[TokenizedExample] = field(default_factory=list)
    # index into `examples` for each dataset row (None where the row was dropped)
    row_to_example: list[int | None] = field(default_factory=list)
    token_stats: dict[str, int] = field(default_factory=dict)

    @classmethod
    def create(cls, cfg: RunConfig, node_config: dict[str, Any]) -> LocalClient:
        partition_id = int(node_config.get("partition-id", 0))
        num_partitions = int(node_config.get("num-partitions", cfg.federation.num_clients))
        data_path = node_config.get("data-path")
        dataset = (
            local_file_dataset(cfg, str(data_path))
            if data_path
            else client_dataset(cfg, partition_id, num_partitions)
        )
        return cls(cfg=cfg, partition_id=partition_id, dataset=dataset)

    def prepare(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Tokenize the local data once (dataset order kept; drops counted, not hidden)."""
        if self.row_to_example:
            return
        examples, stats = tokenize_dataset(
            self.dataset,
            tokenizer,
            template=self.cfg.train.template,
            max_length=self.cfg.train.max_length,
            mask_prompt=self.cfg.train.mask_prompt,
        )
        self.token_stats = stats
        by_row = {example.source_row: i for i, example in enumerate(examples)}
        self.row_to_example = [by_row.get(row) for row in range(len(self.dataset))]
        self.examples = examples
        if stats["dropped"] or stats["truncated"]:
            log.info(
                "partition %d: %d samples, %d truncated, %d dropped (response past max_length)",
                self.partition_id,
                len(self.dataset),
                stats["truncated"],
                stats["dropped"],
            )

    def trainable_rows(self) -> list[int]:
        """Dataset rows that survived tokenization (a dropped row can never be trained on)."""
        return [row for row, example in enumerate(self.row_to_example) if example is not None]

    def texts(self, tokenizer: PreTrainedTokenizerBase, rows: list[int]) -> list[str]:
        """Prompt + response of the given rows, in that order (selection features)."""
        template = self.cfg.train.template
        return [
            build_prompt(self.dataset[row], template, tokenizer) + self.dataset[row]["response"]
            for row in rows
        ]

    def examples_for_rows(self, rows: list[int]) -> list[TokenizedExample]:
        return [self.examples[i] for r in rows if (i := self.row_to_example[r]) is not None]

    def train(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        global_state: dict[str, torch.Tensor],
        rows: list[int],
        *,
        server_round: int,
        proximal_weight: float = 0.0,
    ) -> tuple[dict[str, torch.Tensor], TrainResult]:
        """Load the global adapter, train on `rows`, return the new LoRA state.

        `proximal_weight` > 0 adds weight * ||theta - theta_round_start||^2 to the loss
        (FedProx: mu / 2; FedBiOT: eps), a term that carries gradient.
        """
        set_peft_model_state_dict(model, global_state)
        extra_loss = None
        if proximal_weight > 0:
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            reference = snapshot(trainable)

            def extra_loss() -> torch.Tensor:
                return proximal_weight * proximal_term(trainable, reference)

        result = train_lora(
            model,
            self.examples_for_rows(rows),
            self.cfg.train,
            pad_token_id=tokenizer.pad_token_id,
            seed=self.cfg.seed * 100_003 + server_round * 1_009 + self.partition_id,
            extra_loss=extra_loss,
        )
        state = {
            k: v.detach().cpu().float().clone() for k, v in get_peft_model_state_dict(model).items()
        }
        return state, result

    def evaluate(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        global_state: dict[str, torch.Tensor],
    ) -> tuple[float, int]:
        """Loss of the global adapter on this client's held-out share (last rows of its data)."""
        set_peft_model_state_dict(model, global_state)
        count = max(1, int(len(self.examples) * self.cfg.eval.federated_fraction))
        held_out = self.examples[-count:]
        loss = response_loss(
            model,
            held_out,
            pad_token_id=tokenizer.pad_token_id,
            batch_size=self.cfg.eval.batch_size,
        )
        return loss, len(held_out)

