"""FedBiOT's client model: emulator + adapter built from the package the server sent once.

The client never sees the full model: it loads the compressed base (quantized per
`model.quantization`), adds LoRA to every layer, freezes the emulator's LoRA (the server aligns
it) and trains only the adapter's, which is all it sends back.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import torch
from flwr.app import Message
from peft import get_peft_model

from fedinstruct import modeling
from fedinstruct.config import RunConfig
from fedinstruct.emulator import (
    SplitPlan,
    decoder_layers,
    fedbiot_lora_configs,
    load_split_plan,
    lora_parameter_groups,
    split_lora_state,
)
from fedinstruct.emulator_package import FINGERPRINT_KEY, emulator_folder
from fedinstruct.local_client import LoadedModel

log = logging.getLogger(__name__)

_MODELS: dict[tuple[str, str], LoadedModel] = {}


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
    base, tokenizer = modeling.load_base_model(settings)
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


def compressed_client_model(cfg: RunConfig, msg: Message) -> tuple[LoadedModel, bool]:
    """This process's emulator + adapter for the message's emulator; True when loaded now."""
    fingerprint = str(msg.content["config"].get(FINGERPRINT_KEY, ""))
    key = (repr(cfg.model), fingerprint)
    if fingerprint and key in _MODELS:
        return _MODELS[key], False
    start = time.perf_counter()
    folder = emulator_folder(cfg.strategy.fedbiot.emulator_path, msg.content)
    loaded = load_client_model(cfg, folder)
    loaded.load_seconds = time.perf_counter() - start
    _MODELS[key] = loaded
    return loaded, True
