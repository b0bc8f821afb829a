"""The `fedinstruct` command: Hydra overrides, a `-m` sweep with its summary, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "fedinstruct.cli"]


def _run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow  # a Hydra sweep of two training runs
def test_sweep_runs_each_job_and_summarises(tmp_path, tiny_run):
    args = [
        "-m",
        *tiny_run,
        "num_rounds=1",
        "train.local_steps=2",
        "eval.max_new_tokens=4",
        "seed=1,2",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    result = _run(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    rows = [
        line for line in summary.splitlines() if line.startswith("| 0") or line.startswith("| 1")
    ]
    assert len(rows) == 2 and "seed=1" in rows[0] and "seed=2" in rows[1]
    for job in ("0", "1"):
        metrics = (tmp_path / "sweep" / job / "metrics.jsonl").read_text().splitlines()
        assert json.loads(metrics[-1])["round"] == 1
        assert (tmp_path / "sweep" / job / "adapters" / "final" / "adapter_config.json").exists()


@pytest.mark.slow  # two CLI processes, ~5 s
def test_unknown_key_and_bad_value_fail_fast_with_the_name(tmp_path):
    unknown = _run(["model=tiny", "train.lrx=1"], tmp_path)
    assert unknown.returncode != 0 and "train.lrx" in unknown.stderr
    bad = _run(["model=tiny", "model.quantization=3bit"], tmp_path)
    assert bad.returncode == 2
    assert "model.quantization must be one of" in bad.stderr
    assert "Base model loaded" not in bad.stderr + bad.stdout


@pytest.mark.slow  # three CLI processes, ~20 s
def test_a_run_that_cannot_start_fails_before_it_starts(tmp_path):
    from fedinstruct.server.output import RunOutput

    hang = _run(["model=tiny", "federation.num_clients=2", "federation.min_train_nodes=5"],
                tmp_path)
    assert hang.returncode == 2, hang.stderr[-2000:]
    assert "federation.min_train_nodes=5 is more than federation.num_clients=2" in hang.stderr
    resume = _run(["model=tiny", "resume=true"], tmp_path)  # a new job folder: nothing to resume
    assert resume.returncode == 2, resume.stderr[-2000:]
    assert "holds no checkpoint: set output_dir to the folder of the run to resume" in (
        resume.stderr)
    with RunOutput(tmp_path / "busy").lock():
        busy = _run(["model=tiny", f"output_dir={tmp_path / 'busy'}"], tmp_path)
    assert busy.returncode == 2, busy.stderr[-2000:]
    assert f"{tmp_path / 'busy'} is in use by another run (pid {os.getpid()} on " in busy.stderr
    for result in (hang, resume, busy):
        assert "Base model loaded" not in result.stderr + result.stdout
