"""resume=true: a run stopped after round 2 and resumed to round 4 ends with the same adapter as a
run that was never stopped: server-optimizer moments, FedHDS selection (replayed when the run
resumes between two selections) and client randomness included (real Flower simulations)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedinstruct.config import compose_config
from fedinstruct.simulation import simulate

pytestmark = pytest.mark.slow  # real Flower simulations

SETTINGS = [
    "federation.num_clients=2",
    "federation.min_train_nodes=2",
    "federation.min_available_nodes=2",
    "train.local_steps=2",
    "dataset.samples_per_client=16",
    "eval.every=0",
    "strategy.server_optimizer=fedadam",
    "strategy.server_lr=3e-3",
    # selections at rounds 1 and 4: the resumed run starts at round 3, between the two
    "selection=fedhds",
    "selection.reselect_every=3",
    "selection.fedhds.reducer=pca",
    "selection.fedhds.keep_noise=true",
]


@pytest.fixture
def run(tiny_run):
    def start(folder, rounds: int, *extra: str):
        return simulate(compose_config([*tiny_run, *SETTINGS, f"num_rounds={rounds}",
                                        f"output_dir={folder}", *extra]))

    return start


def final_adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapters" / "final" / "adapter_model.safetensors"))


def rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_resumed_fedadam_fedhds_run_matches_the_uninterrupted_run(tmp_path, run):
    straight = run(tmp_path / "straight", 4)
    stopped = run(tmp_path / "resumed", 2)
    after_two = final_adapter(stopped)
    checkpoint = load_file(str(stopped / "checkpoint" / "tensors.safetensors"))
    moments = {k: v for k, v in checkpoint.items() if k.startswith("strategy/")}
    assert any(k.startswith("strategy/m_t/") for k in moments), "FedAdam's moments not saved"
    assert any(k.startswith("strategy/v_t/") for k in moments)
    assert all(v.abs().sum() > 0 for v in moments.values())

    resumed = run(tmp_path / "resumed", 4, "resume=true")
    expected, got = final_adapter(straight), final_adapter(resumed)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(after_two[k], got[k]) for k in got), "rounds 3-4 changed nothing"

    assert [r["round"] for r in rows(resumed)] == [1, 2, 3, 4]
    assert json.loads((resumed / "checkpoint" / "state.json").read_text())["round"] == 4
    straight_rows, resumed_rows = rows(straight), rows(resumed)
    assert "time_selection" not in straight_rows[2], "round 3 is not a selection round"
    assert "time_selection" in resumed_rows[2], "the resumed run did not replay the selection"
    for a, b in zip(straight_rows, resumed_rows, strict=True):
        assert a["train_samples_per_client"] == b["train_samples_per_client"]
        assert 0 < a["train_samples"] < 2 * 16, "FedHDS trained on everything"
