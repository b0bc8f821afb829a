"""fedinstruct itself on a real deployment: one SuperLink and two SuperNodes as separate
processes in their own network namespaces (loopback addresses where namespaces are unavailable,
or with FEDINSTRUCT_TEST_ISOLATION=loopback), TLS and SuperNode authentication on, the app
submitted with `flwr run`: FedIT, FedHDS, a resume after the server was stopped, a SuperNode
killed in the middle of a round, and stopping the deployment.

Starting a deployment takes a while, so the tests share one, but none relies on what another
did to it: each gets it healthy (started, every node up, no run left going) and the FedIT test
gets nodes whose warm app servers hold no model yet. Any test passes alone and in any order."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from fedinstruct.deploy import CONNECTION, LocalDeployment, netns_unavailable_reason

pytestmark = pytest.mark.slow  # a real deployment and federated runs

log = logging.getLogger(__name__)

ISOLATION = os.environ.get("FEDINSTRUCT_TEST_ISOLATION", "auto")  # auto, netns or loopback

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


def expected_network_kind() -> str:
    if ISOLATION == "auto":
        return "loopback" if netns_unavailable_reason() else "netns"
    return ISOLATION


def netns_names() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def listening_on(addresses: set[str]) -> list[str]:
    """host:port of every TCP socket listening on one of these host addresses."""
    return sorted(f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.ip in addresses)


class SharedDeployment:
    """The module's deployment, handed to each test in a known state whatever ran before."""

    def __init__(self, app_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.app_dir, self.tmp_path_factory = app_dir, tmp_path_factory
        self.current: LocalDeployment | None = None
        self.used = False  # a test has had it: its nodes' warm servers may hold a model

    def healthy(self, cold: bool = False) -> LocalDeployment:
        """Started (again, if a test stopped it), every node up, no run going; with cold=True
        every node's warm app server restarted unless no test has used them yet."""
        dep = self.current
        if dep is None or dep.superlink is None or not dep.superlink.alive():
            self.close()
            if ISOLATION == "auto" and (reason := netns_unavailable_reason()):
                log.warning("network namespaces unavailable (%s): loopback addresses", reason)
            dep = LocalDeployment(self.app_dir, num_nodes=2, tls=True, auth=True,
                                  isolation=ISOLATION,
                                  workdir=self.tmp_path_factory.mktemp("deploy"))
            dep.__enter__()
            self.current, self.used = dep, False
        self.stop_unfinished_runs(dep)
        for name, handle in dep.nodes.items():
            down = not handle.process.alive() or (handle.warm is not None
                                                  and not handle.warm.alive())
            if down or (cold and self.used):
                log.info("restarting %s (%s)", name, "down" if down else "for cold caches")
                dep.restart_node(name)
        self.used = True
        return dep

    @staticmethod
    def stop_unfinished_runs(dep: LocalDeployment) -> None:
        """Stop any run a failed test left going; it would take the nodes' time."""
        def unfinished() -> list[str]:
            runs = dep.flwr_json("ls", CONNECTION)["runs"]
            return [r["run-id"] for r in runs if not r["status"].startswith("finished")]

        left = unfinished()
        for run_id in left:
            log.warning("stopping run %s left by an earlier test", run_id)
            dep.flwr("stop", str(run_id), CONNECTION, check=False)
        if left:
            wait_until(lambda: not unfinished(), 60, "left-over runs to stop")

    def close(self) -> None:
        if self.current is not None:
            self.current.stop(check=False)
            self.current = None


@pytest.fixture(scope="module")
def shared_deployment(repo_root, tmp_path_factory):
    shared = SharedDeployment(repo_root, tmp_path_factory)
    yield shared
    shared.close()


def _report_on_failure(request, dep: LocalDeployment) -> None:
    """A failed test prints which components are alive and the end of every log."""
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        print(dep.status_report())


@pytest.fixture
def deployment(shared_deployment, request):
    """The shared deployment, healthy; the state a test leaves is repaired for the next one."""
    dep = shared_deployment.healthy()
    yield dep
    _report_on_failure(request, dep)


@pytest.fixture
def cold_deployment(shared_deployment, request):
    """The shared deployment with no model loaded in any node's warm app server yet."""
    dep = shared_deployment.healthy(cold=True)
    yield dep
    _report_on_failure(request, dep)


def test_fedit_run_on_the_deployment(cold_deployment, tmp_path):
    deployment = cold_deployment
    assert deployment.network is not None
    assert deployment.network.kind == expected_network_kind()
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


def test_a_hostile_node_counts_for_nothing(deployment, tmp_path, hostile_app_dir):
    """node-0 runs tests/apps/hostile_app.py: a different bad train and FedHDS selection reply
    each round. Every one is refused and logged, the run completes, and its adapter equals
    that of the same run in which node-0's ClientApp raises every time."""
    rounds, adapters = 4, {}
    for mode in ("bad", "raise"):
        folder = tmp_path / mode
        result = deployment.run(timeout=400, app_dir=hostile_app_dir, run_config={
            **config(folder, rounds, "eval.every=0", "federation.min_replies=1",
                     "selection.fedhds.reducer=pca", "selection.fedhds.keep_noise=true",
                     "model.quantization=none"),  # bit-reproducible (see test_trust.py)
            "selection": "fedhds", "hostile-mode": mode, "hostile-nodes": 1})
        assert result.ok, result.logs[-3000:]
        assert [r["round"] for r in rows(folder)] == list(range(1, rounds + 1))
        if mode == "bad":
            assert result.logs.count("rejected update from node") == rounds, result.logs[-3000:]
            assert result.logs.count("selection: node") == rounds
        adapters[mode] = load_file(str(folder / "adapters" / "final" /
                                       "adapter_model.safetensors"))
    for key, expected in adapters["raise"].items():
        torch.testing.assert_close(adapters["bad"][key], expected, rtol=1e-5, atol=1e-6)


def test_stopping_leaves_no_process_namespace_or_socket_behind(deployment,
                                                               processes_with_home_under):
    network = deployment.network
    assert network is not None
    if network.kind == "netns":
        namespaces = {network.switch, *network.members.values()}  # switch, SuperLink, ctl, nodes
        assert len(namespaces) >= 5 and namespaces <= netns_names()
    else:
        # one 127.x address per component (not 127.0.0.1, not 0.0.0.0), each listened on
        addresses = dict(network.addresses)
        assert len(set(addresses.values())) == len(addresses) >= 4  # SuperLink, ctl, 2 nodes
        assert all(a.startswith("127.") and a != "127.0.0.1" for a in addresses.values())
        superlink_host = deployment.superlink_address.rsplit(":", 1)[0]
        assert superlink_host == addresses["superlink"]
        listening = listening_on(set(addresses.values()))
        assert deployment.superlink_address in listening, listening
        for handle in deployment.nodes.values():  # each node's ClientApp API on its address
            assert any(a.startswith(f"{addresses[handle.member]}:") for a in listening)

    deployment.stop()
    assert deployment.leftover_processes() == []
    assert processes_with_home_under(deployment.workdir) == []
    if network.kind == "netns":
        assert namespaces.isdisjoint(netns_names())
        assert not any(name.startswith(network.tag) for name in netns_names())
    else:
        assert listening_on(set(addresses.values())) == []
