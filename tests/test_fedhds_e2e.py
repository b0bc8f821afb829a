"""FedHDS end to end: real simulations with the tiny model train on a coreset, not on everything."""

from __future__ import annotations

import json

import pytest

from fedinstruct.config import ConfigError
from fedinstruct.methods.fedhds.server import random_count_schedule
from fedinstruct.simulation import simulate

pytestmark = pytest.mark.slow  # real Flower simulations


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("selection", ["fedhds", "fedhds_turbo"])
def test_fedhds_trains_on_fewer_samples_than_all(tiny_config, selection):
    cfg = tiny_config(
        f"selection={selection}",
        "num_rounds=2",
        "train.local_steps=3",
        "dataset.samples_per_client=40",
        "eval.every=0",
    )
    rows = _rows(simulate(cfg))
    assert [r["round"] for r in rows] == [1, 2]
    total = 3 * 40
    for row in rows:
        assert row["local_clusters"] > 0
        assert 0 < row["train_samples"] < total, "FedHDS did not select a coreset"
        assert row["train_fraction_of_data"] == pytest.approx(row["train_samples"] / total)
        assert "time_selection" in row and "time_server_clustering" in row
        assert set(row["train_samples_per_client"]) <= {"0", "1", "2"}
        # what went up during selection is tiny: centroids, not per-sample features
        assert row["bytes_up"] > 0


def test_random_matches_another_runs_counts_client_by_client(tiny_config, tmp_path):
    """The paper's Random at equal count: each client draws what it trained on in that run."""
    reference = tmp_path / "reference"
    reference.mkdir()
    counts = {1: {"0": 3, "1": 0, "2": 7}, 2: {"0": 1, "1": 4, "2": 2}}
    (reference / "metrics.jsonl").write_text(
        "".join(json.dumps({"round": r, "train_samples_per_client": c}) + "\n"
                for r, c in counts.items())
    )
    cfg = tiny_config(
        "selection=random",
        f"selection.random.match_run={reference}",
        "num_rounds=2",
        "train.local_steps=2",
        "dataset.samples_per_client=20",
        "eval.every=0",
    )
    rows = _rows(simulate(cfg))
    assert {r["round"]: r["train_samples_per_client"] for r in rows} == counts

    bad = tiny_config("selection=random", f"selection.random.match_run={tmp_path / 'none'}")
    with pytest.raises(ConfigError, match="selection.random.match_run"):
        random_count_schedule(bad)


def test_a_selection_of_only_noise_keeps_the_adapter_and_the_run_going(tiny_config):
    """Server clustering that finds no cluster (e.g. under centroid noise) selects nothing: the
    round leaves the adapter as it was, and the run goes on instead of failing."""
    from safetensors.torch import load_file

    cfg = tiny_config("selection=fedhds", "selection.fedhds.server_min_cluster_size=1000",
                      "num_rounds=2", "train.local_steps=1", "dataset.samples_per_client=20",
                      "eval.every=0")
    folder = simulate(cfg)
    rows = _rows(folder)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["train_samples"] == 0 for r in rows)  # nothing selected, nothing trained
    lora_b = {k: t for k, t in load_file(
        folder / "adapters" / "final" / "adapter_model.safetensors").items() if "lora_B" in k}
    assert lora_b and all(not t.any() for t in lora_b.values())  # peft's initial B is zero
