"""resume=true: a run stopped after round 2 and resumed to round 4 ends with the same adapter as a
run that was never stopped: server-optimizer moments, FedHDS selection (replayed when the run
resumes between two selections) and client randomness included (real Flower simulations).
A resume that cannot be one (no checkpoint, another config) fails before anything starts."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import fedinstruct.server_app as server_app
from fedinstruct.compose import compose_config, to_container
from fedinstruct.config import ConfigError
from fedinstruct.server.output import RunOutput
from fedinstruct.server.resume import check_output_dir, config_changes
from fedinstruct.server_app import run_server

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
    from fedinstruct.simulation import simulate

    def start(folder, rounds: int, *extra: str):
        return simulate(compose_config([*tiny_run, *SETTINGS, f"num_rounds={rounds}",
                                        f"output_dir={folder}", *extra]))

    return start


def final_adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapters" / "final" / "adapter_model.safetensors"))


def rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # real Flower simulations
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


# --- resume=true checks, before any model loads or anything is written -----------------------


def _started_run(folder, *overrides: str):
    """A run folder as a run that stopped after round 1 leaves it."""
    cfg = compose_config([f"output_dir={folder}", *overrides])
    output = RunOutput(folder)
    output.save_config(to_container(cfg))
    output.save_checkpoint(1, {"global/w": torch.zeros(2)}, {"row": {"round": 1}})
    return cfg


def _resume(folder, *overrides: str):
    return compose_config([f"output_dir={folder}", "resume=true", *overrides])


NO_CHECKPOINT = "resume=true but {} holds no checkpoint: set output_dir to the folder of the run"


def test_resume_without_a_checkpoint_fails_and_writes_nothing(tmp_path, monkeypatch):
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match=re.escape(NO_CHECKPOINT.format(missing))):
        check_output_dir(_resume(missing))
    assert not missing.exists()

    empty = tmp_path / "empty"  # e.g. the fresh timestamped folder of a run without output_dir
    empty.mkdir()

    def boom(cfg):
        raise AssertionError("the method was built before the resume check")

    monkeypatch.setattr(server_app, "server_method", boom)
    with pytest.raises(ConfigError, match=re.escape(NO_CHECKPOINT.format(empty))):
        run_server(None, _resume(empty))
    assert list(empty.iterdir()) == []


def test_resume_with_the_same_or_a_harmless_change_passes(tmp_path):
    _started_run(tmp_path, "num_rounds=2")
    check_output_dir(_resume(tmp_path, "num_rounds=2"))
    check_output_dir(_resume(tmp_path, "num_rounds=5", "federation.round_timeout=60",
                         "federation.min_replies=2", "eval.every=0", "eval.max_samples=4"))


def test_resume_with_a_changed_config_names_each_change(tmp_path):
    _started_run(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_output_dir(_resume(tmp_path, "train.lr=0.002", "model.lora.r=16", "num_rounds=9"))
    message = str(err.value)
    assert f"the config differs from the one the run in {tmp_path} started with" in message
    assert "train.lr: 0.001 -> 0.002" in message and "model.lora.r: 8 -> 16" in message
    assert "num_rounds:" not in message  # a resumed run may extend the run


def test_a_key_the_saved_config_lacks_counts_as_its_default():
    saved = to_container(compose_config([]))
    del saved["strategy"]["norm_bound"]  # saved by a fedinstruct that had no such key
    assert config_changes(saved, to_container(compose_config([]))) == []
    changed = to_container(compose_config(["strategy.norm_bound=0"]))
    assert config_changes(saved, changed) == ["strategy.norm_bound: 3.0 -> 0.0"]


def test_a_new_run_never_writes_over_another_run(tmp_path):
    _started_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n')
    with pytest.raises(ConfigError, match="holds another run: set resume=true"):
        check_output_dir(compose_config([f"output_dir={tmp_path}"]))
    check_output_dir(compose_config([f"output_dir={tmp_path / 'new'}"]))  # a new folder is fine
