"""FedBiOT model surgery, alignment and proximal term on tiny LLaMA models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from fedinstruct.client.training import proximal_term, snapshot
from fedinstruct.methods.fedbiot.alignment import align, alignment_loss, evaluate_alignment
from fedinstruct.methods.fedbiot.split import (
    PLAN_FILE,
    SplitPlan,
    adapter_to_full_model_state,
    build_compressed_model,
    decoder_layers,
    emulator_layer_indices,
    emulator_state_dict,
    fedbiot_lora_configs,
    load_split_plan,
    lora_parameter_groups,
    split_lora_state,
)

VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run far faster on one thread than on oversubscribed shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_llama(num_layers: int = 10, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,  # bitsandbytes 4-bit blocks need rows of >= 64
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def random_batches(n: int, seed: int, vocab: int = 9, batch_size: int = 4, length: int = 12):
    """Random sequences over a small token set, so held-out batches share train's distribution."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (batch_size, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # some right padding
        ids[0, -3:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@pytest.fixture(scope="module")
def full_and_plan():
    full = tiny_llama()
    return full, SplitPlan.from_config(10, adapter_layers=2, drop_ratio=0.5)


# --- layer selection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_layers", "k", "beta", "count"),
    [(30, 2, 0.5, 14), (30, 4, 0.2, 21), (10, 2, 0.5, 4), (32, 2, 0.0, 30), (6, 2, 0.9, 2)],
)
def test_emulator_indices_keep_ends_with_uniform_stride(num_layers, k, beta, count):
    idx = emulator_layer_indices(num_layers, adapter_layers=k, drop_ratio=beta)
    assert len(idx) == count
    assert idx[0] == 0 and idx[-1] == num_layers - k - 1
    assert idx == sorted(set(idx))
    gaps = [b - a for a, b in zip(idx[:-1], idx[1:], strict=True)]
    assert max(gaps) - min(gaps) <= 1  # uniform stride up to integer rounding
    stride = (num_layers - k - 1) / (count - 1)
    assert all(abs(i - n * stride) <= 0.5 for n, i in enumerate(idx))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_layers": 3, "adapter_layers": 2, "drop_ratio": 0.5}, "num_layers"),
        ({"num_layers": 10, "adapter_layers": 0, "drop_ratio": 0.5}, "adapter_layers"),
        ({"num_layers": 10, "adapter_layers": 2, "drop_ratio": 1.0}, "drop_ratio"),
        ({"num_layers": 10, "adapter_layers": 2, "drop_ratio": -0.1}, "drop_ratio"),
        ({"num_layers": 10.0, "adapter_layers": 2, "drop_ratio": 0.5}, "num_layers"),
    ],
)
def test_emulator_indices_reject_bad_arguments(kwargs, field):
    num_layers = kwargs.pop("num_layers")
    with pytest.raises(ValueError, match=field):
        emulator_layer_indices(num_layers, **kwargs)


def test_split_plan_round_trips_and_validates():
    plan = SplitPlan.from_config(30, adapter_layers=4, drop_ratio=0.2)
    assert plan.adapter_layers == (26, 27, 28, 29)
    data = plan.to_dict()
    assert all(isinstance(v, int) for v in data["emulator_layers"] + [data["num_layers"]])
    assert SplitPlan.from_dict(data) == plan
    with pytest.raises(ValueError, match="below"):
        SplitPlan(10, (0, 8), (8, 9))
    with pytest.raises(ValueError, match="missing"):
        SplitPlan.from_dict({"num_layers": 10})


def test_decoder_layers_rejects_other_architectures():
    with pytest.raises(ValueError, match=r"Linear.*model\.model\.layers"):
        decoder_layers(torch.nn.Linear(2, 2))


# --- compressed model ------------------------------------------------------------------------


def test_compressed_model_keeps_adapter_and_generates(full_and_plan):
    full, plan = full_and_plan
    comp = build_compressed_model(full, plan)
    assert len(decoder_layers(full)) == 10  # full model untouched
    assert comp.config.num_hidden_layers == len(decoder_layers(comp)) == 6 < 10
    assert type(comp) is type(full) and comp is not full
    full_sd, comp_sd = full.state_dict(), comp.state_dict()
    for j, i in enumerate(plan.kept_layers):
        assert decoder_layers(comp)[j].self_attn.layer_idx == j
        for name, tensor in decoder_layers(full)[i].state_dict().items():
            assert torch.equal(comp_sd[f"model.layers.{j}.{name}"], tensor)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(comp_sd[name], full_sd[name])
    # deep copy: changing the compressed model leaves the full model alone
    with torch.no_grad():
        decoder_layers(comp)[-1].mlp.up_proj.weight.add_(1.0)
    assert not torch.equal(
        decoder_layers(comp)[-1].mlp.up_proj.weight, decoder_layers(full)[9].mlp.up_proj.weight
    )

    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    assert comp(input_ids=ids).logits.shape == (2, 7, VOCAB)
    cached = comp.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    plain = comp.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False
    )
    assert cached.shape == (2, 13) and torch.equal(cached, plain)


def test_emulator_state_holds_only_the_kept_layers(full_and_plan, tmp_path):
    full, plan = full_and_plan
    comp = build_compressed_model(full, plan)
    state = emulator_state_dict(comp)
    layer_ids = {int(k.split(".")[2]) for k in state if k.startswith("model.layers.")}
    assert layer_ids == set(range(plan.num_compressed_layers))
    dropped = [i for i in range(10) if i not in plan.kept_layers]
    assert dropped
    for i in dropped:  # no tensor of a dropped layer travels, under any name
        w = decoder_layers(full)[i].self_attn.q_proj.weight
        assert not any(v.shape == w.shape and torch.equal(v, w) for v in state.values())

    assert comp.config.num_hidden_layers == len(decoder_layers(comp)) == 6
    assert sum(p.numel() for p in comp.parameters()) < sum(p.numel() for p in full.parameters())

    (tmp_path / PLAN_FILE).write_text(json.dumps(plan.to_dict()))
    assert load_split_plan(tmp_path) == plan
    with pytest.raises(FileNotFoundError, match="emulator folder"):
        load_split_plan(tmp_path / "missing")


# --- LoRA naming -----------------------------------------------------------------------------


def peft_pair(full, plan):
    comp_cfg, full_cfg = fedbiot_lora_configs(plan, r=8, target_modules=("v_proj", "o_proj"))
    comp = get_peft_model(build_compressed_model(full, plan), comp_cfg)
    full_peft = get_peft_model(copy.deepcopy(full), full_cfg)
    torch.manual_seed(1)
    _, adapter_names = lora_parameter_groups(comp, plan)
    with torch.no_grad():  # a trained-looking adapter LoRA (B != 0); emulator LoRA stays at init
        for name in adapter_names:
            if "lora_B" in name:
                comp.get_parameter(name).normal_(0, 0.2)
    _, adapter = split_lora_state(get_peft_model_state_dict(comp), plan)
    result = set_peft_model_state_dict(full_peft, adapter_to_full_model_state(adapter, plan))
    assert not result.unexpected_keys
    return comp, full_peft


def test_adapter_keys_rename_injectively_and_load_into_full_model(full_and_plan):
    full, plan = full_and_plan
    comp, full_peft = peft_pair(full, plan)
    emu_names, adapter_names = lora_parameter_groups(comp, plan)
    assert len(emu_names) == 4 * 2 * 2 and len(adapter_names) == 2 * 2 * 2
    assert {n.split(".")[4] for n in adapter_names} == {"4", "5"}
    assert {n.split(".")[4] for n in emu_names} == {"0", "1", "2", "3"}

    emulator, adapter = split_lora_state(get_peft_model_state_dict(comp), plan)
    assert len(emulator) == 16 and len(adapter) == 8
    full_state = adapter_to_full_model_state(adapter, plan)
    assert len(full_state) == len(adapter)  # injective
    assert {k.split(".")[4] for k in full_state} == {"8", "9"}

    loaded = get_peft_model_state_dict(full_peft)
    assert set(loaded) == set(full_state)
    assert all(torch.equal(loaded[k], v) for k, v in full_state.items())
    with pytest.raises(ValueError, match="not an adapter layer"):
        adapter_to_full_model_state(emulator, plan)


# --- proximal term ---------------------------------------------------------------------------


def test_proximal_term_has_gradient_and_pulls_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)
    reference = snapshot(model)
    assert "1.bias" not in reference
    assert proximal_term(model, reference).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    term = proximal_term(model, reference)
    term.backward()
    grad = model[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert torch.allclose(grad, 2 * (model[0].weight - reference["0.weight"]))

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    distances = []
    for _ in range(5):
        optimizer.zero_grad()
        term = proximal_term(model, reference)
        distances.append(term.item())
        term.backward()
        optimizer.step()
    assert all(b < a for a, b in zip(distances[:-1], distances[1:], strict=True))
    assert distances[-1] < 0.5 * distances[0]
    with pytest.raises(ValueError, match="no trainable parameter"):
        proximal_term(model, {"other.weight": torch.zeros(1)})


# --- alignment -------------------------------------------------------------------------------


def test_alignment_reduces_loss_and_trains_only_emulator_lora(full_and_plan):
    full, plan = full_and_plan
    comp, full_peft = peft_pair(full, plan)
    train, held_out = random_batches(8, seed=1), random_batches(2, seed=2)

    loss, parts = alignment_loss(full_peft, comp, train[0], plan, kl_weight=1.0, layerwise=True)
    assert loss.requires_grad and parts["hidden_mse"] > 0 and parts["kl"] > 0
    assert parts["loss"] == pytest.approx(
        parts["hidden_mse"] + parts["kl"] + parts["layerwise_mse"], rel=1e-5
    )

    emu_names, adapter_names = lora_parameter_groups(comp, plan)
    before = {n: p.detach().clone() for n, p in comp.named_parameters()}
    full_before = {n: p.detach().clone() for n, p in full_peft.named_parameters()}
    flags = {n: p.requires_grad for n, p in comp.named_parameters()}
    assert all(flags[n] for n in adapter_names)

    eval_before = evaluate_alignment(full_peft, comp, held_out, plan, kl_weight=1.0)
    losses = align(full_peft, comp, train, plan, steps=20, lr=3e-3, kl_weight=1.0, progress=False)
    eval_after = evaluate_alignment(full_peft, comp, held_out, plan, kl_weight=1.0)
    assert len(losses) == 20
    assert eval_after < 0.5 * eval_before

    after = dict(comp.named_parameters())
    emu = set(emu_names)
    assert all(not torch.equal(before[n], after[n]) for n in emu if "lora_B" in n)
    for name, tensor in after.items():
        if name not in emu:
            assert torch.equal(before[name], tensor), name  # adapter LoRA + base bit-identical
    assert all(torch.equal(full_before[n], p) for n, p in full_peft.named_parameters())
    assert {n: p.requires_grad for n, p in comp.named_parameters()} == flags
