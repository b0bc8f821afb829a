"""4-bit: the base really is NF4 (bitsandbytes Linear4bit) and LoRA trains on it on CPU."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from peft import get_peft_model_state_dict

from fedinstruct.client.training import train_lora
from fedinstruct.data import make_synthetic_dataset, tokenize_dataset
from fedinstruct.model import (
    add_lora,
    compute_dtype,
    device,
    initial_adapter_state,
    load_base_model,
    prequantized_folder,
    quantization_config,
    resolve_model_path,
)


def test_4bit_base_is_nf4_and_lora_trains(tiny_config):
    cfg = tiny_config("train.local_steps=6", "train.lr=1e-2")
    base, tokenizer = load_base_model(cfg.model)
    linear4 = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4, "no bitsandbytes Linear4bit layer in the 4-bit model"
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linear4)
    assert all(m.weight.quant_state.nested for m in linear4), "double quantization is off"
    assert not any(p.requires_grad for p in base.parameters())

    model = add_lora(base, cfg.model)
    before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    examples, _ = tokenize_dataset(make_synthetic_dataset(16, seed=1), tokenizer, max_length=96)
    result = train_lora(
        model, examples, cfg.train, pad_token_id=tokenizer.pad_token_id, seed=0, progress=False
    )
    after = get_peft_model_state_dict(model)
    assert result.steps == 6 and result.tokens > 0
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "LoRA weights did not change on the 4-bit base"


def test_quantized_model_is_smaller_than_unquantized(tiny_config):
    cfg4 = tiny_config()
    cfg_none = tiny_config("model.quantization=none")
    quantized, _ = load_base_model(cfg4.model)
    full, _ = load_base_model(cfg_none.model)
    linear_bytes = lambda m: sum(  # noqa: E731
        p.numel() * p.element_size() for n, p in m.named_parameters() if "proj" in n
    )
    assert linear_bytes(quantized) < 0.3 * linear_bytes(full)


def test_initial_adapter_needs_no_weights(tiny_config):
    """The server's initial adapter: LoRA shapes of the model, B zero, from the config alone."""
    cfg = tiny_config()
    state = initial_adapter_state(cfg.model, seed=3)
    base, _ = load_base_model(cfg.model)
    reference = get_peft_model_state_dict(add_lora(base, cfg.model))
    assert set(state) == set(reference)
    for key, tensor in state.items():
        assert tensor.shape == reference[key].shape
        if "lora_B" in key:
            assert torch.count_nonzero(tensor) == 0
        else:
            assert tensor.abs().sum() > 0
    assert torch.equal(
        state[next(iter(state))],
        initial_adapter_state(cfg.model, seed=3)[next(iter(state))],
    )


def test_prequantized_copy_matches_fresh_quantization(tiny_config):
    """Later loads read the node's saved NF4 copy; it must equal quantizing from scratch."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config()
    cached, tokenizer = load_base_model(cfg.model)  # first call may create the copy
    again, _ = load_base_model(cfg.model)
    assert prequantized_folder(cfg.model, resolve_model_path(cfg.model)).exists()
    fresh = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(cfg.model),
        quantization_config=quantization_config(cfg.model),
        dtype=compute_dtype(),
        device_map={"": device()},
    )
    ids = tokenizer("What is 2 + 2?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = fresh(input_ids=ids).logits
        torch.testing.assert_close(cached(input_ids=ids).logits, expected)
        torch.testing.assert_close(again(input_ids=ids).logits, expected)


def test_lora_on_chosen_layers_only(tiny_config):
    """model.lora.layers_to_transform: the server's initial adapter and a client's agree."""
    cfg = tiny_config("model.lora.layers_to_transform=[1,3]")
    state = initial_adapter_state(cfg.model, seed=0)
    base, _ = load_base_model(cfg.model)
    reference = get_peft_model_state_dict(add_lora(base, cfg.model))
    assert set(state) == set(reference)
    layers = {int(k.split("layers.")[1].split(".")[0]) for k in state}
    assert layers == {1, 3}
