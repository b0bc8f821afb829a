"""End to end: a real Flower simulation of FedIT with the tiny model, 3 clients, 2 rounds."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedinstruct.model import initial_adapter_state, load_base_model
from fedinstruct.simulation import simulate

pytestmark = pytest.mark.slow  # a real Flower simulation


def test_fedit_simulation_learns_and_leaves_its_outputs(tiny_config):
    cfg = tiny_config(
        "num_rounds=2", "train.local_steps=6", "eval.federated=true", "eval.federated_fraction=0.25"
    )
    folder = simulate(cfg)

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["eval_loss"] < rows[1]["eval_loss"] < rows[0]["eval_loss"], (
        "held-out loss did not fall"
    )
    for row in rows[1:]:
        for key in (
            "eval_rougeL",
            "train_samples",
            "bytes_down",
            "bytes_up",
            "time_round",
            "time_train_phase",
            "time_eval",
        ):
            assert key in row, f"metrics row lacks {key}"
        assert row["nodes_replied"] == 3
        assert row["fed_eval_loss"] > 0, "federated evaluation on the clients' shares is missing"
        assert row["train_samples"] == sum(row["train_samples_per_client"].values()) > 0

    assert rows[1]["time_client_load"] > 0
    assert rows[2]["time_client_load"] == 0, "a client process reloaded its base model"

    adapter_bytes = sum(
        t.numel() * 4 for t in initial_adapter_state(cfg.model, 0).values()
    )
    # each tensor travels with a small header: a visible share only for the tiny adapter
    assert adapter_bytes * 3 <= rows[1]["bytes_up"] <= 1.10 * adapter_bytes * 3

    first = load_file(str(folder / "adapters" / "round_001" / "adapter_model.safetensors"))
    second = load_file(str(folder / "adapters" / "round_002" / "adapter_model.safetensors"))
    initial = initial_adapter_state(cfg.model, cfg.seed)
    assert any(not torch.equal(first[k], initial[k]) for k in initial), (
        "round 1 did not change the adapter"
    )
    assert any(not torch.equal(first[k], second[k]) for k in first), (
        "round 2 did not change the adapter"
    )

    base, _ = load_base_model(cfg.model)
    peft_model = PeftModel.from_pretrained(base, str(folder / "adapters" / "final"))
    assert peft_model.peft_config["default"].r == cfg.model.lora.r
    assert (folder / "config.yaml").exists() and (folder / "metrics.png").stat().st_size > 1000
    assert (folder / "checkpoint" / "state.json").exists()
