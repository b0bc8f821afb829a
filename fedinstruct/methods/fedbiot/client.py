"""FedBiOT's client model: emulator + adapter built from the package the server sent once.

The client never sees the full model: it loads the compressed base (quantized per
`model.quantization`), adds LoRA to every layer, freezes the emulator's LoRA (the server aligns
it) and trains only the adapter's, which is all it sends back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model

from fedinstruct.client.local import NODE, LoadedModel
from fedinstruct.config import RunConfig
from fedinstruct.methods.base import ClientMethod
from fedinstruct.methods.fedbiot.package import PIN_KEY, emulator_folder
from fedinstruct.methods.fedbiot.split import (
    SplitPlan,
    decoder_layers,
    fedbiot_lora_configs,
    load_split_plan,
    lora_parameter_groups,
    split_lora_state,
)
from fedinstruct.model import load_base_model
from fedinstruct.protocol import FEDBIOT_FINGERPRINT, FEDBIOT_PLAN, Instruction

log = logging.getLogger(__name__)


def adapter_only(state: dict[str, torch.Tensor], plan: SplitPlan) -> dict[str, torch.Tensor]:
    """The adapter's LoRA tensors of a compressed-model LoRA state (what goes up)."""
    return split_lora_state(state, plan)[1]


def load_client_model(cfg: RunConfig, folder: str | Path) -> LoadedModel:
    """Emulator + adapter from an emulator folder, with only the adapter's LoRA trainable.

    The base loads like any base model (quantized per `model.quantization`, with the node's
    pre-quantized copy reused), from the emulator folder instead of the full model.
    """
    start = time.perf_counter()
    folder = Path(folder)
    plan = load_split_plan(folder)
    settings = dataclasses.replace(cfg.model, name_or_path=str(folder), gguf_file=None)
    base, tokenizer = load_base_model(settings)
    if len(decoder_layers(base)) != plan.num_compressed_layers:
        raise ValueError(f"emulator folder {folder}: model and split plan disagree on layers")
    lora = cfg.model.lora
    compressed_lora, _ = fedbiot_lora_configs(
        plan, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    )
    model = get_peft_model(base, compressed_lora)
    emulator_names, adapter_names = lora_parameter_groups(model, plan)
    for name in emulator_names:
        model.get_parameter(name).requires_grad_(False)  # aligned by the server only
    if not adapter_names:
        raise ValueError("model.lora.target_modules matched nothing in the adapter layers")
    log.info(
        "FedBiOT client model: %d emulator + %d adapter layers (full model: %d), "
        "%d trainable LoRA tensors",
        len(plan.emulator_layers), len(plan.adapter_layers), plan.num_layers, len(adapter_names),
    )
    return LoadedModel(
        model, tokenizer, time.perf_counter() - start,
        upload=functools.partial(adapter_only, plan=plan),
    )


class FedBiOTClient(ClientMethod):
    """Trains the adapter's LoRA on emulator + adapter, with a proximal term (eps)."""

    def model(self, instruction: Instruction, node_config: Mapping[str, Any]
              ) -> tuple[LoadedModel, bool]:
        """Emulator + adapter for the message's emulator, and whether this call loaded it."""
        fingerprint = str(instruction.config.get(FEDBIOT_FINGERPRINT, ""))
        pin = node_config.get(PIN_KEY)

        def load():
            folder = emulator_folder(self.cfg.strategy.fedbiot.emulator_path, instruction.content,
                                     pin=str(pin) if pin else None)
            loaded = load_client_model(self.cfg, folder)
            return loaded.model, loaded.tokenizer

        model, tokenizer, seconds, fresh = NODE.model(f"{self.cfg.model!r}|{fingerprint}", load)
        plan = SplitPlan.from_dict(json.loads(str(instruction.config[FEDBIOT_PLAN])))
        upload = functools.partial(adapter_only, plan=plan)
        return LoadedModel(model, tokenizer, seconds, upload=upload), fresh

    def prewarm(self) -> None:
        """Nothing to prewarm: the model is built from the emulator the messages bring."""

    def proximal_weight(self, instruction: Instruction) -> float:
        return self.cfg.strategy.fedbiot.proximal_eps
