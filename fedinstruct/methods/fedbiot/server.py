"""FedBiOT (Wu et al., KDD'24): clients tune an adapter on a compressed emulator that the
server keeps aligned with the full model.

Global state (the ArrayRecord the round loop carries) = emulator LoRA + adapter LoRA, in the
compressed model's key space. Each round the server aligns the emulator LoRA on public data,
sends both LoRAs down (plus, once per node, the emulator's base weights), averages the adapter
LoRA the clients send back, and evaluates the adapter on the emulator (AdapEmu) and on the
full model (AdapFu), which is what it exports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import Strategy
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedinstruct.config import ConfigError, RunConfig
from fedinstruct.data import (
    load_instruction_dataset,
    make_synthetic_dataset,
    pad_batch,
    tokenize_dataset,
)
from fedinstruct.methods.base import ServerMethod, ServerSelection
from fedinstruct.methods.fedbiot.alignment import align, evaluate_alignment
from fedinstruct.methods.fedbiot.package import EmulatorPackage, read_fingerprint
from fedinstruct.methods.fedbiot.split import (
    SplitPlan,
    adapter_to_full_model_state,
    build_compressed_model,
    decoder_layers,
    fedbiot_lora_configs,
    split_lora_state,
)
from fedinstruct.methods.fedit import build_fedit
from fedinstruct.model import adapter_bytes, load_base_model, resolve_model_path
from fedinstruct.protocol import FEDBIOT_MODEL_CONFIG, Layout, TrainUpdate, with_config

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def public_dataset(cfg: RunConfig) -> Dataset:
    """The server's alignment rows: synthetic, or a dataset that is not the clients'."""
    s = cfg.strategy.fedbiot
    if s.public_dataset == "synthetic":
        return make_synthetic_dataset(s.public_samples, seed=cfg.seed + 20_000)
    public = Path(s.public_dataset).expanduser().resolve()
    for name in ("source", "test_source"):
        private = getattr(cfg.dataset, name)
        if not private:
            continue
        private_path = Path(private).expanduser().resolve()
        if public == private_path or private_path in public.parents:
            raise ConfigError(
                f"strategy.fedbiot.public_dataset={s.public_dataset!r} is dataset.{name}: the "
                "server aligns on public data, never on the clients' or the test data"
            )
    data = load_instruction_dataset(s.public_dataset)
    if len(data) > s.public_samples:
        data = data.shuffle(seed=cfg.seed).select(range(s.public_samples))
    return data


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().float().clone() for k, v in state.items()}


@dataclass
class _Models:
    full: PeftModel  # full model + LoRA on the adapter layers (AdapFu, alignment teacher)
    compressed: PeftModel  # emulator + adapter, LoRA on every layer (AdapEmu, aligned)
    tokenizer: Any
    plan: SplitPlan
    package: EmulatorPackage


class FedBiOTServer(ServerMethod):
    """The server's FedBiOT work: alignment, merging, two-way evaluation, export."""

    def __init__(self, cfg: RunConfig, strategy: Strategy, selection: ServerSelection) -> None:
        super().__init__(cfg, strategy, selection)
        self.settings = cfg.strategy.fedbiot
        self._served: set[int] = set()  # nodes given the emulator by this server process
        self._models: _Models | None = None
        self._align_batches: tuple[list[Batch], list[Batch]] | None = None
        self._align_offset = 0
        self._base_path: str | None = None

    # -- models ------------------------------------------------------------------------------
    def models(self) -> _Models:
        if self._models is None:
            self._models = self._load()
        return self._models

    def _load(self) -> _Models:
        start = time.perf_counter()
        base, tokenizer = load_base_model(self.cfg.model, quantize=False)
        self._base_path = resolve_model_path(self.cfg.model)
        s, lora = self.settings, self.cfg.model.lora
        plan = SplitPlan.from_config(
            len(decoder_layers(base)), adapter_layers=s.adapter_layers, drop_ratio=s.drop_ratio
        )
        compressed_base = build_compressed_model(base, plan)
        package = EmulatorPackage.from_model(compressed_base, plan, tokenizer)
        compressed_lora, full_lora = fedbiot_lora_configs(
            plan, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
        )
        torch.manual_seed(self.cfg.seed)  # the initial LoRA is reproducible
        compressed = get_peft_model(compressed_base, compressed_lora)
        full = get_peft_model(base, full_lora)
        full.requires_grad_(False)  # the teacher: never trained here
        log.info(
            "FedBiOT: full model %d layers; emulator keeps %s, adapter %s; emulator package "
            "%.1f MB (%s), ready in %.1f s",
            plan.num_layers, list(plan.emulator_layers), list(plan.adapter_layers),
            adapter_bytes(package.state) / 1e6, package.fingerprint,
            time.perf_counter() - start,
        )
        if s.emulator_path:
            self._prepare_emulator_path(package, s.emulator_path)
        return _Models(full, compressed, tokenizer, plan, package)

    @staticmethod
    def _prepare_emulator_path(package: EmulatorPackage, path: str) -> None:
        """Write the package to a configured path that is empty; refuse one of another model."""
        folder = Path(path).expanduser()
        found = read_fingerprint(folder)
        if found is None and not (folder.exists() and any(folder.iterdir())):
            package.save(folder)
            log.info("FedBiOT emulator written to strategy.fedbiot.emulator_path=%s", folder)
        elif found != package.fingerprint:
            raise ConfigError(
                f"strategy.fedbiot.emulator_path={path!r} holds "
                + (f"emulator {found}" if found else "other files")
                + f", not this server's emulator {package.fingerprint}"
            )

    @property
    def plan(self) -> SplitPlan:
        return self.models().plan

    @property
    def sends_emulator(self) -> bool:
        return not self.settings.emulator_path

    def split(self, arrays: ArrayRecord) -> tuple[list[str], list[str]]:
        """Keys of the emulator LoRA and of the adapter LoRA in a global state."""
        emulator, adapter = split_lora_state(dict(arrays.items()), self.plan)
        return list(emulator), list(adapter)

    def _load_lora(self, arrays: ArrayRecord) -> None:
        m = self.models()
        state = arrays.to_torch_state_dict()
        for model, part in ((m.compressed, state), (m.full, self.adapter_state(arrays))):
            result = set_peft_model_state_dict(model, part)
            if result.unexpected_keys:
                raise ValueError(f"LoRA keys {result.unexpected_keys[:3]} fit no layer")

    # -- round hooks -------------------------------------------------------------------------
    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord(_cpu_state(get_peft_model_state_dict(self.models().compressed)))

    def _public_batches(self) -> tuple[list[Batch], list[Batch]]:
        """(train, measure) batches of the public data, tokenized once."""
        if self._align_batches is None:
            m, train = self.models(), self.cfg.train
            examples, _ = tokenize_dataset(
                public_dataset(self.cfg), m.tokenizer, template=train.template,
                max_length=train.max_length, mask_prompt=True,
            )
            if not examples:
                raise ValueError("strategy.fedbiot.public_dataset: no row fits train.max_length")
            size = train.batch_size
            batches = [
                pad_batch(examples[i : i + size], m.tokenizer.pad_token_id)
                for i in range(0, len(examples), size)
            ]
            held = max(1, len(batches) // 8) if len(batches) > 1 else 0
            measure = batches[len(batches) - held :] if held else batches
            self._align_batches = (batches[: len(batches) - held] or batches, measure)
        return self._align_batches

    def _align(self, steps: int) -> None:
        """`steps` alignment steps, continuing through the public data where the last ended."""
        m, s = self.models(), self.settings
        train, _ = self._public_batches()
        start = self._align_offset % len(train)
        align(
            m.full, m.compressed, train[start:] + train[:start], m.plan, steps=steps,
            lr=s.align_lr, kl_weight=s.kl_weight, layerwise=s.layerwise,
        )
        self._align_offset += steps

    def _alignment_loss(self) -> float:
        m, s = self.models(), self.settings
        _, measure = self._public_batches()
        return evaluate_alignment(
            m.full, m.compressed, measure, m.plan, s.kl_weight, layerwise=s.layerwise
        )

    def before_round(
        self, server_round: int, arrays: ArrayRecord
    ) -> tuple[ArrayRecord, dict[str, float]]:
        """Align the emulator LoRA to the current adapter (after pre-alignment in round 1)."""
        s = self.settings
        pre = s.pre_align_steps if server_round == 1 else 0
        if not s.align or pre + s.align_steps == 0:
            return arrays, {}
        start = time.perf_counter()
        self._load_lora(arrays)
        metrics = {"align_loss_before": self._alignment_loss()}
        if pre:
            self._align(pre)
            metrics["pre_align_loss_after"] = self._alignment_loss()
        if s.align_steps:
            self._align(s.align_steps)
        metrics["align_loss_after"] = (
            self._alignment_loss() if s.align_steps else metrics["pre_align_loss_after"]
        )
        metrics["align_steps"] = pre + s.align_steps
        emulator_keys, _ = self.split(arrays)
        aligned = get_peft_model_state_dict(self.models().compressed)
        state = arrays.to_torch_state_dict()
        state.update(_cpu_state({k: aligned[k] for k in emulator_keys}))
        metrics["time_align"] = time.perf_counter() - start
        log.info(
            "round %d: alignment loss %.4f -> %.4f (%d steps, %.1f s)", server_round,
            metrics["align_loss_before"], metrics["align_loss_after"], pre + s.align_steps,
            metrics["time_align"],
        )
        return ArrayRecord(state), metrics

    def after_aggregation(self, arrays: ArrayRecord, aggregated: ArrayRecord) -> ArrayRecord:
        """The averaged adapter LoRA next to the server's (aligned) emulator LoRA."""
        _, adapter_keys = self.split(arrays)
        if set(aggregated.keys()) != set(adapter_keys):
            raise ValueError("the aggregated update is not exactly the adapter LoRA")
        return ArrayRecord({k: aggregated[k] if k in aggregated else arrays[k] for k in arrays})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Where alignment is in the public data, so a resumed run does not replay it."""
        return {"align_offset": torch.tensor([self._align_offset])}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "align_offset" in tensors:
            self._align_offset = int(tensors["align_offset"][0])

    def adapter_state(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The adapter LoRA renamed onto the full model's layers (AdapFu; exported)."""
        _, adapter_keys = self.split(arrays)
        adapter = {k: arrays[k] for k in adapter_keys}
        state = ArrayRecord(adapter).to_torch_state_dict()
        return adapter_to_full_model_state(state, self.plan)

    # -- messages ----------------------------------------------------------------------------
    def upload_layout(self, arrays: ArrayRecord) -> Layout:
        """Clients send the adapter LoRA only."""
        _, adapter_keys = self.split(arrays)
        return {k: tuple(arrays[k].shape) for k in adapter_keys}

    def weight(self, update: TrainUpdate) -> float:
        return 1.0 if self.settings.uniform_weights else update.weight

    def address(self, messages: Iterable[Message]) -> list[Message]:
        """Each message gets the emulator's fingerprint and split plan, and a node that has not
        received the emulator from this server process gets the emulator itself."""
        package = self.models().package
        addressed = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            entries: dict[str, Any] = dict(package.message_config())
            if self.sends_emulator and node not in self._served:
                msg.content = RecordDict({**dict(msg.content.items()), **package.records()})
                entries[FEDBIOT_MODEL_CONFIG] = package.model_config
                self._served.add(node)
            addressed.append(with_config(msg, entries))
        return addressed

    def delivered(self, messages: list[Message], replies: list[Message]) -> None:
        """A node that failed or did not reply gets the emulator again: it may have lost it
        (or never got it), and a restarted node may be a fresh machine."""
        ok = {r.metadata.src_node_id for r in replies if not r.has_error()}
        self._served -= {m.metadata.dst_node_id for m in messages} - ok

    # -- evaluation and export ---------------------------------------------------------------
    def evaluation_model(self) -> tuple[PeftModel, Any]:
        """AdapFu: the full model with the adapter LoRA on its top layers."""
        m = self.models()
        return m.full, m.tokenizer

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        metrics = super().evaluate(server_round, arrays)  # AdapFu: full model + adapter
        if not metrics:
            return metrics
        start = time.perf_counter()
        m = self.models()
        set_peft_model_state_dict(m.compressed, arrays.to_torch_state_dict())
        metrics.update(self.held_out().evaluate(m.compressed, m.tokenizer).as_metrics("emu_eval"))
        metrics["time_eval_emu"] = time.perf_counter() - start
        return metrics

    def export_config(self):
        """PEFT config of the exported adapter: LoRA on the full model's adapter layers only."""
        lora = self.cfg.model.lora
        _, config = fedbiot_lora_configs(
            self.plan, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
        )
        config.base_model_name_or_path = self._base_path
        return config


def build_server(cfg: RunConfig, selection: ServerSelection) -> FedBiOTServer:
    """FedBiOT's server half: FedAvg over the adapter LoRA (no server optimizer)."""
    return FedBiOTServer(cfg, build_fedit(cfg), selection)
