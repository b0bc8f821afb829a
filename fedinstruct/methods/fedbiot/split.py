"""FedBiOT model surgery: split a decoder into a compressed emulator and a trainable adapter.

The adapter is the top K decoder layers; the emulator stands in for the layers below it,
compressed by keeping a uniform-stride subset. Clients only ever hold the compressed model
(emulator + adapter), built from weights the server sends once, so they never load the full LLM.
LoRA lives on every layer of the compressed model: the server aligns the emulator's LoRA, the
clients train the adapter's LoRA, and the adapter LoRA maps onto the full model by renaming layers.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

PLAN_FILE = "fedbiot_split_plan.json"
_LAYER_KEY = re.compile(r"(?<![A-Za-z0-9_])layers\.(\d+)\.")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (PeftModel or LoraModel), else the model."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """Decoder layer list of a LLaMA-family causal LM (``model.model.layers``), through peft."""
    base = _unwrap(model)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"{type(base).__name__} is not supported for FedBiOT: looked for the decoder layers "
            "at `model.model.layers` (LLaMA-family causal LMs: Llama, Mistral, Qwen2, SmolLM)"
        )
    return layers


def emulator_layer_indices(num_layers: int, *, adapter_layers: int, drop_ratio: float) -> list[int]:
    """Uniform-stride subset of the layers below the adapter; the first and last are always kept.

    Keeps ``round((1 - drop_ratio) * n_below)`` layers (at least 2), so the emulator still starts
    from the embedding-side layer and ends at the layer that feeds the adapter.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise ValueError(f"num_layers must be an int, got {num_layers!r}")
    if isinstance(adapter_layers, bool) or not isinstance(adapter_layers, int):
        raise ValueError(f"adapter_layers must be an int, got {adapter_layers!r}")
    if adapter_layers < 1:
        raise ValueError(f"adapter_layers must be >= 1, got {adapter_layers}")
    if isinstance(drop_ratio, bool) or not isinstance(drop_ratio, (int, float)):
        raise ValueError(f"drop_ratio must be a number in [0, 1), got {drop_ratio!r}")
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1), got {drop_ratio}")
    n_below = num_layers - adapter_layers
    if n_below < 2:
        raise ValueError(
            f"num_layers={num_layers} leaves {n_below} layer(s) below adapter_layers="
            f"{adapter_layers}; the emulator needs at least 2"
        )
    keep = min(n_below, max(2, round((1.0 - drop_ratio) * n_below)))
    # Integer form of round-half-up(i * (n_below - 1) / (keep - 1)): exact, ends at n_below - 1.
    span, gaps = n_below - 1, keep - 1
    return [(2 * i * span + gaps) // (2 * gaps) for i in range(keep)]


@dataclass(frozen=True)
class SplitPlan:
    """Which full-model layers form the emulator (compressed) and the adapter (kept whole)."""

    num_layers: int
    emulator_layers: tuple[int, ...]
    adapter_layers: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "emulator_layers", tuple(int(i) for i in self.emulator_layers))
        object.__setattr__(self, "adapter_layers", tuple(int(i) for i in self.adapter_layers))
        for name in ("emulator_layers", "adapter_layers"):
            idx = getattr(self, name)
            if not idx:
                raise ValueError(f"SplitPlan.{name} must not be empty")
            if list(idx) != sorted(set(idx)):
                raise ValueError(f"SplitPlan.{name} must be strictly increasing, got {list(idx)}")
            if idx[0] < 0 or idx[-1] >= self.num_layers:
                raise ValueError(
                    f"SplitPlan.{name} {list(idx)} out of range for num_layers={self.num_layers}"
                )
        if self.emulator_layers[-1] >= self.adapter_layers[0]:
            raise ValueError(
                f"SplitPlan.emulator_layers {list(self.emulator_layers)} must all lie below "
                f"adapter_layers {list(self.adapter_layers)}"
            )

    @classmethod
    def from_config(
        cls, num_layers: int, adapter_layers: int = 2, drop_ratio: float = 0.5
    ) -> SplitPlan:
        """Adapter = the top ``adapter_layers`` layers; emulator = compressed layers below."""
        emulator = emulator_layer_indices(
            num_layers, adapter_layers=adapter_layers, drop_ratio=drop_ratio
        )
        return cls(
            num_layers, tuple(emulator), tuple(range(num_layers - adapter_layers, num_layers))
        )

    @property
    def num_compressed_layers(self) -> int:
        return len(self.emulator_layers) + len(self.adapter_layers)

    @property
    def kept_layers(self) -> tuple[int, ...]:
        """Full-model index of each compressed-model layer, in order."""
        return self.emulator_layers + self.adapter_layers

    def to_dict(self) -> dict[str, Any]:
        """Plain ints and lists, so the plan fits a Flower ConfigRecord or JSON."""
        return {
            "num_layers": self.num_layers,
            "emulator_layers": list(self.emulator_layers),
            "adapter_layers": list(self.adapter_layers),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SplitPlan:
        missing = [k for k in ("num_layers", "emulator_layers", "adapter_layers") if k not in data]
        if missing:
            raise ValueError(f"SplitPlan dict is missing field(s) {missing}")
        return cls(
            int(data["num_layers"]),
            tuple(data["emulator_layers"]),
            tuple(data["adapter_layers"]),
        )


def build_compressed_model(full_model: PreTrainedModel, plan: SplitPlan) -> PreTrainedModel:
    """A new causal LM of the same class holding the kept emulator layers then the adapter layers.

    Embeddings, final norm and LM head are copied too. The full model is left untouched.
    """
    if hasattr(full_model, "get_base_model") or any(
        isinstance(m, BaseTunerLayer) for m in full_model.modules()
    ):
        raise ValueError("build_compressed_model needs the base model, before LoRA is added")
    layers = decoder_layers(full_model)
    if len(layers) != plan.num_layers:
        raise ValueError(
            f"plan.num_layers={plan.num_layers} but {type(full_model).__name__} has "
            f"{len(layers)} decoder layers"
        )
    inner = full_model.model
    # Deep-copy a skeleton that only references the kept layers: no copy of dropped layers is made.
    inner.layers = torch.nn.ModuleList([layers[i] for i in plan.kept_layers])
    try:
        compressed = copy.deepcopy(full_model)
    finally:
        inner.layers = layers
    config = compressed.config
    config.num_hidden_layers = plan.num_compressed_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in plan.kept_layers]
    for new_idx, layer in enumerate(decoder_layers(compressed)):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx  # the KV cache is indexed by position in the layer list
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    return compressed


def emulator_state_dict(compressed_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """All base weights of the compressed model (no LoRA): what a client needs to build it.

    Tensors are detached but share storage with the model; clone them before mutating.
    """
    base = _unwrap(compressed_model)
    state = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach()
    return state


def load_split_plan(folder: str | Path) -> SplitPlan:
    """The split plan stored in an emulator folder (next to the compressed model)."""
    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a FedBiOT emulator folder")
    return SplitPlan.from_dict(json.loads(path.read_text()))


def fedbiot_lora_configs(
    plan: SplitPlan,
    *,
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> tuple[LoraConfig, LoraConfig]:
    """Matching LoRA configs: all layers of the compressed model; adapter layers of the full one."""
    common = dict(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    compressed = LoraConfig(**common)
    full = LoraConfig(
        **common, layers_to_transform=list(plan.adapter_layers), layers_pattern="layers"
    )
    return compressed, full


def _layer_of(key: str) -> int:
    match = _LAYER_KEY.search(key)
    if match is None:
        raise ValueError(f"LoRA key {key!r} names no decoder layer ('layers.<i>.')")
    return int(match.group(1))


def _with_layer(key: str, layer: int) -> str:
    return _LAYER_KEY.sub(f"layers.{layer}.", key, count=1)


def _is_emulator(key: str, plan: SplitPlan) -> bool:
    layer = _layer_of(key)
    if layer >= plan.num_compressed_layers:
        raise ValueError(
            f"key {key!r} is in layer {layer}, but the compressed model of this plan has "
            f"{plan.num_compressed_layers} layers"
        )
    return layer < len(plan.emulator_layers)


def lora_parameter_groups(
    peft_model: torch.nn.Module, plan: SplitPlan
) -> tuple[list[str], list[str]]:
    """Names of LoRA parameters of the compressed model in emulator layers vs adapter layers."""
    emulator, adapter = [], []
    for name, _ in peft_model.named_parameters():
        if "lora_" in name:
            (emulator if _is_emulator(name, plan) else adapter).append(name)
    return emulator, adapter


def split_lora_state(
    state: Mapping[str, torch.Tensor], plan: SplitPlan
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split ``get_peft_model_state_dict`` output of the compressed model: (emulator, adapter)."""
    emulator, adapter = {}, {}
    for key, value in state.items():
        (emulator if _is_emulator(key, plan) else adapter)[key] = value
    return emulator, adapter


def adapter_to_full_model_state(
    adapter_lora_state: Mapping[str, torch.Tensor], plan: SplitPlan
) -> dict[str, torch.Tensor]:
    """Rename adapter LoRA keys from compressed-model layers to full-model layers."""
    n_emu = len(plan.emulator_layers)
    renamed = {}
    for key, value in adapter_lora_state.items():
        j = _layer_of(key)
        if not n_emu <= j < plan.num_compressed_layers:
            raise ValueError(
                f"key {key!r} is not an adapter layer of the compressed model "
                f"(adapter layers are {n_emu}..{plan.num_compressed_layers - 1})"
            )
        renamed[_with_layer(key, plan.adapter_layers[j - n_emu])] = value
    return renamed
