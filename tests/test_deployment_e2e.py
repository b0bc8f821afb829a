"""fedinstruct itself on a real deployment: one SuperLink and two SuperNodes as separate
processes in their own network namespaces (loopback addresses where namespaces are unavailable),
TLS and SuperNode authentication on, the app submitted with `flwr run`. One deployment serves
every run of this module: FedIT, FedHDS, a resume after the server was stopped, and a SuperNode
killed in the middle of a round. The last test stops it and checks nothing is left running."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_deploy_infra import processes_with_home_under

from fedinstruct.deploy import CONNECTION, LocalDeployment, netns_unavailable_reason

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)

TINY = {
    "model": "tiny",
    "train.local_steps": 2,
    "train.max_length": 96,
    "eval.max_samples": 4,
    "eval.max_new_tokens": 4,
    "federation.num_clients": 2,
    "federation.min_train_nodes": 2,
}
OVERRIDES = "dataset.samples_per_client=16 federation.min_available_nodes=2"


def config(output_dir: Path, rounds: int, *overrides: str, **keys) -> dict:
    return {**TINY, "num_rounds": rounds, "output_dir": str(output_dir),
            "overrides": " ".join([OVERRIDES, *overrides]), **keys}


def rows(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    reason = netns_unavailable_reason()
    if reason:
        log.warning("network namespaces unavailable (%s): loopback addresses instead", reason)
    dep = LocalDeployment(REPO, num_nodes=2, tls=True, auth=True,
                          workdir=tmp_path_factory.mktemp("deploy"))
    with dep:
        yield dep


@pytest.fixture(autouse=True)
def report_processes_on_failure(request, deployment):
    """A failed test prints which components are alive and the end of every log."""
    yield
    report = getattr(request.node, "report_call", None)
    if report is None or not report.failed:
        return
    print(deployment.status_report())


def test_fedit_run_on_the_deployment(deployment, tmp_path):
    assert deployment.network is not None
    assert deployment.network.kind == ("loopback" if netns_unavailable_reason() else "netns")
    result = deployment.run(timeout=400, run_config=config(tmp_path / "fedit", 2))
    assert result.ok, result.logs[-3000:]
    metrics = rows(tmp_path / "fedit")
    assert [r["round"] for r in metrics] == [0, 1, 2]
    for row in metrics[1:]:
        assert row["nodes_replied"] == 2 and row["train_samples"] > 0
        assert row["time_train_phase"] >= row["time_client_train_max"] > 0
    assert (tmp_path / "fedit" / "adapters" / "final" / "adapter_model.safetensors").exists()
    # every app process started from its node's pre-imported parent, which loaded the run's
    # model after round 1's task: round 2's tasks found it in memory
    assert metrics[1]["time_client_load"] > 0
    assert metrics[2]["time_client_load"] == 0
    for name in ("node-0", "node-1"):
        warm_log = (deployment.workdir / f"{name}-warm.log").read_text()
        assert "flwr-clientapp started as pid" in warm_log
        assert "prewarmed fedinstruct.client_app" in warm_log


def test_fedhds_run_on_the_deployment(deployment, tmp_path):
    result = deployment.run(timeout=400, run_config=config(
        tmp_path / "fedhds", 2, "eval.every=0", "selection.fedhds.reducer=pca",
        "selection.fedhds.keep_noise=true", selection="fedhds"))
    assert result.ok, result.logs[-3000:]
    metrics = rows(tmp_path / "fedhds")
    assert [r["round"] for r in metrics] == [1, 2]
    for row in metrics:
        assert row["nodes_replied"] == 2 and row["local_clusters"] > 0
        assert 0 < row["train_samples"] < 2 * 16, "FedHDS did not select a coreset"


def test_resume_after_the_server_was_stopped(deployment, tmp_path):
    folder = tmp_path / "resume"
    run = deployment.start_run(config(folder, 4, "eval.every=0"))
    checkpoint = folder / "checkpoint" / "state.json"
    wait_until(lambda: checkpoint.exists() and json.loads(checkpoint.read_text())["round"] >= 2,
               300, "the checkpoint of round 2")
    deployment.flwr("stop", str(run.run_id), CONNECTION)
    stopped = run.wait(timeout=60)
    assert stopped.status == "finished:stopped"
    done = json.loads(checkpoint.read_text())["round"]
    assert done == 2, f"stopped after round {done}, not within round 3"

    result = deployment.run(timeout=400, run_config=config(
        folder, 4, "eval.every=0", "federation.round_timeout=120", "federation.min_replies=2",
        resume=True))
    assert result.ok, result.logs[-3000:]
    assert f"Resuming {folder} after round 2" in result.logs
    assert "round 3/4" in result.logs and "round 1/4" not in result.logs
    assert [r["round"] for r in rows(folder)] == [1, 2, 3, 4]
    assert json.loads(checkpoint.read_text())["round"] == 4


def test_a_node_killed_mid_round_is_left_out_then_rejoins(deployment, tmp_path):
    folder = tmp_path / "faults"
    run = deployment.start_run(config(
        folder, 8, "eval.every=0", "federation.round_timeout=60", "federation.min_replies=1",
        "federation.min_available_nodes=1", **{"federation.min_train_nodes": 1}))
    wait_until(lambda: len(rows(folder)) >= 1, 300, "round 1")
    node_log = deployment.nodes["node-1"].process.log_path
    received = node_log.read_text().count("Receiving: train message")
    wait_until(lambda: node_log.read_text().count("Receiving: train message") > received, 60,
               "node-1 to receive its round-2 message")
    lost_id = deployment.nodes["node-1"].node_id
    deployment.kill_node(1, sig=signal.SIGKILL)  # a crash: no goodbye to the SuperLink
    assert deployment.restart_node(1).node_id == lost_id  # refused until its heartbeat lapses
    rejoined_after = len(rows(folder))
    wait_until(lambda: len(rows(folder)) >= rejoined_after + 2, 300, "a round after the rejoin")
    deployment.flwr("stop", str(run.run_id), CONNECTION)
    result = run.wait(timeout=60)

    metrics = rows(folder)
    assert metrics[0]["nodes_replied"] == 2
    assert metrics[1]["round"] == 2 and metrics[1]["nodes_replied"] == 1
    assert all(r["nodes_replied"] >= 1 for r in metrics)
    assert metrics[rejoined_after + 1]["nodes_replied"] == 2, "the restarted node did not rejoin"
    assert f"round 2 train: node {lost_id} lost" in result.logs


def test_stopping_leaves_no_process_or_namespace_behind(deployment):
    deployment.stop()
    assert deployment.leftover_processes() == []
    assert processes_with_home_under(deployment.workdir) == []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert getattr(deployment.network, "tag", "absent") not in namespaces
