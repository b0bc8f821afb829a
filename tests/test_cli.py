"""The `fedinstruct` command: Hydra overrides, a `-m` sweep with its summary, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

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
    terminal = result.stdout + result.stderr  # each Flower line once, no known noise
    assert terminal.count("aggregate_train: Received 3 results") == 2, terminal[-3000:]
    for noise in ("DEBUG", "DEPRECATED FEATURE", "No module named 'kernels'",
                  "local training:", "script_method", "Tip: In future versions of Ray"):
        assert noise not in terminal, f"{noise!r} in the terminal:\n{terminal[-3000:]}"
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


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _bad_jsonl(path):
    rows = [{"instruction": f"q{i}", "response": f"a{i}", "category": f"c{i % 3}"}
            for i in range(30)]
    del rows[17]["response"]
    # a blank line first: the row's line number is not its index + 1
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow  # two CLI processes, ~3 s each
def test_a_bad_row_fails_in_seconds_with_one_line(tmp_path):
    bad = _bad_jsonl(tmp_path / "bad.jsonl")
    args = ["model=tiny", "dataset=custom", f"dataset.source={bad}",
            f"hydra.run.dir={tmp_path}/run"]
    cpu_before, start = _children_cpu(), time.perf_counter()
    result = _run(args, tmp_path)
    elapsed, cpu = time.perf_counter() - start, _children_cpu() - cpu_before
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        f"fedinstruct: {bad}, line 19, row 17, field 'response': missing field "
        "(row has: instruction, category)"), result.stderr[-2000:]
    assert cpu < 5, f"the bad row took {cpu:.1f} s of CPU to report"
    # ~3 s on 2 free cores; on a machine busier than its cores, wall time measures the others
    if os.getloadavg()[0] < (os.cpu_count() or 1):
        assert elapsed < 5, f"the bad row took {elapsed:.1f} s to report"
    debug = _run(["--debug", *args], tmp_path)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "DatasetError" in debug.stderr


def test_data_errors_name_the_line_of_the_row(tmp_path):
    from fedinstruct.cli import data_error_message
    from fedinstruct.data import DatasetError

    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"a": 1}\n\n\n{"a": 2}\n{"a": 3}\n')
    assert data_error_message(DatasetError(jsonl, "bad", row=2, field="a")) == (
        f"{jsonl}, line 5, row 2, field 'a': bad")
    table = tmp_path / "rows.csv"
    table.write_text('instruction,response\n"two\nlines",x\nq,\n')
    assert data_error_message(DatasetError(table, "response is empty", row=1,
                                           field="response")) == (
        f"{table}, line 4, row 1, field 'response': response is empty")
    assert data_error_message(DatasetError("hub/id", "gone", row=3)) == "hub/id, row 3: gone"


def test_own_flags_are_taken_before_hydra_and_subcommands_bypass_it(monkeypatch):
    import fedinstruct.cli as cli
    import fedinstruct.use as use
    from fedinstruct.logs import VERBOSE_ENV, verbose

    monkeypatch.setenv(VERBOSE_ENV, "0")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # recorded, so what main() sets is undone
    seen = []
    monkeypatch.setattr(cli, "_run", lambda: seen.append(list(sys.argv[1:])))
    argv = ["fedinstruct", "-v", "model=tiny", "--debug", "-m", "seed=1,2"]
    monkeypatch.setattr(sys, "argv", argv)
    cli.main()
    assert seen == [["model=tiny", "-m", "seed=1,2"]]
    assert verbose() and os.environ["HYDRA_FULL_ERROR"] == "1"

    monkeypatch.setattr(use, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", ["fedinstruct", "generate", "run", "-v", "hi"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 0 and seen[-1] == ["generate", "run", "-v", "hi"]


def test_the_sweep_summary_shows_the_task_metrics_some_job_reported():
    from fedinstruct.cli import summary_keys

    assert summary_keys([{"eval_loss": 1.0}]) == [
        "eval_loss", "eval_rougeL", "emu_eval_rougeL", "train_samples", "time_round"]
    assert summary_keys([{"eval_numeric_match": 0.5}, {"emu_eval_exact_match": 0.1}]) == [
        "eval_loss", "eval_rougeL", "emu_eval_rougeL", "eval_numeric_match",
        "emu_eval_exact_match", "train_samples", "time_round"]
    assert summary_keys([{"mb_total": 3.5}, {"dp_epsilon": 8.0}])[-2:] == ["dp_epsilon", "mb_total"]


def test_the_simulation_runtime_entry_point_is_the_one_fedinstruct_calls():
    """fedinstruct.simulation calls Flower's Simulation Runtime below its deprecated public
    wrapper; a Flower upgrade that changes it fails here, not in a federation."""
    import inspect

    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    params = inspect.signature(_run_simulation).parameters
    for name in ("num_supernodes", "exit_event", "client_app", "server_app", "backend_config",
                 "verbose_logging"):
        assert name in params
    assert EventType.PYTHON_API_RUN_SIMULATION_LEAVE
