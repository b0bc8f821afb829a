"""A real SuperLink + SuperNodes deployment (TLS, node auth, own network namespaces) runs a tiny
Flower app end to end, refuses an unregistered node, and leaves no process behind; topology
commands and the operator's scripts. The warm app server: test_warm_server.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from fedinstruct.deploy import DeploymentError, LocalDeployment, Topology, format_config
from fedinstruct.deploy.network import netns_unavailable_reason
from fedinstruct.deploy.process import flower_env

REPO = Path(__file__).resolve().parents[1]

ECHO_SERVER = """
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    expected = int(context.run_config["num-nodes"])
    deadline = time.monotonic() + float(context.run_config["wait-s"])
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) != expected:
        raise RuntimeError(f"expected {expected} nodes, found {len(node_ids)}")
    messages = [
        Message(RecordDict({"cfg": ConfigRecord({"round": 1})}), dst_node_id=node,
                message_type="query")
        for node in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=60))
    ids = sorted(int(r.content["echo"]["partition-id"]) for r in replies if r.has_content())
    print(f"ECHO partition-ids={ids}", flush=True)
    if ids != list(range(expected)):
        raise RuntimeError(f"replies carried partition ids {ids}")
"""

ECHO_CLIENT = """
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def echo(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    return Message(RecordDict({"echo": MetricRecord({"partition-id": partition})}),
                   reply_to=msg)
"""


@pytest.fixture
def echo_app(tmp_path, write_flower_app) -> Path:
    """A minimal Flower app: one query round, every node echoes its partition id."""
    return write_flower_app(tmp_path / "app", "echoapp",
                            {"server": ECHO_SERVER, "client": ECHO_CLIENT},
                            config={"num-nodes": 2, "wait-s": 30},
                            description="Echoes each node's partition id")


@pytest.mark.slow  # a real deployment
def test_tls_auth_deployment_runs_app_refuses_unregistered_node_and_cleans_up(
        tmp_path, echo_app, processes_with_home_under):
    app = echo_app
    work = tmp_path / "deploy"
    netns_expected = netns_unavailable_reason() is None
    dep = LocalDeployment(app, num_nodes=2, tls=True, auth=True, workdir=work,
                          run_config={"num-nodes": 2, "wait-s": 30},
                          warm=False)  # Flower's own app processes (the e2e tests run warm ones)
    with dep:
        assert dep.network is not None
        assert dep.network.kind == ("netns" if netns_expected else "loopback")
        assert all(h.node_id is not None for h in dep.nodes.values())
        superlink_argv = dep.superlink.argv if dep.superlink else []
        assert "--enable-supernode-auth" in superlink_argv
        assert "--insecure" not in superlink_argv

        rogue = dep.add_node("rogue", node_config={"partition-id": 7, "num-partitions": 2},
                             register=False, wait=False)
        run = dep.start_run()
        # The image's `register` role, as docker/compose.tls.yaml runs it: one key is new, one
        # already registered (tolerated, so re-running compose up works).
        assert dep.keys_dir is not None and dep.certs_dir is not None
        subprocess.run(["bash", str(REPO / "scripts/make-node-keys.sh"), str(dep.keys_dir),
                        "spare"], check=True, capture_output=True)
        register = subprocess.Popen(
            [*dep.network.exec_prefix("ctl"), "sh", str(REPO / "docker/entrypoint.sh"),
             "register", dep.superlink_address, str(dep.certs_dir / "ca.crt"),
             str(dep.keys_dir / "node-0.pub"), str(dep.keys_dir / "spare.pub")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=flower_env(tmp_path / "register-home"))
        rogue.process.popen.wait(timeout=60)
        assert "Failed to activate SuperNode" in rogue.process.log_text()

        result = run.wait(timeout=120)
        registered, _ = register.communicate(timeout=120)
        assert register.returncode == 0, registered
        assert "already registered" in registered and "registered successfully" in registered
        assert result.ok, result.logs
        assert "ECHO partition-ids=[0, 1]" in result.logs  # the rogue (id 7) got no work

        superlink_log = dep.superlink.log_text() if dep.superlink else ""
        assert "No SuperNode found with the given public key" in superlink_log
        assert superlink_log.count("activate-node HTTP/1.1\" 200") == 2

        node_1 = dep.nodes["node-1"]
        dep.kill_node(1, sig=signal.SIGTERM)  # graceful: the node deactivates itself
        assert not node_1.process.alive()
        assert node_1.node_id == dep.restart_node(1).node_id  # same key, same identity
        tracked = dep.leftover_processes()
        assert tracked and all(p.is_running() for p in tracked)

    assert dep.leftover_processes() == []
    assert processes_with_home_under(work) == []
    if netns_expected:
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert dep.network is not None and getattr(dep.network, "tag", "") not in namespaces


def test_port_in_use_fails_before_starting_anything(tmp_path, echo_app):
    app = echo_app
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))  # taken on every address, the deployment's included
        busy.listen()
        port = busy.getsockname()[1]
        dep = LocalDeployment(app, num_nodes=1, tls=False, auth=False, isolation="loopback",
                              workdir=tmp_path / "deploy", superlink_port=port)
        with pytest.raises(DeploymentError, match=f"SuperLink: port {port} on 127.* is in use"):
            dep.__enter__()
    assert dep.superlink is None and dep.nodes == {}
    assert dep.leftover_processes() == []


def test_topology_commands_and_validation():
    topo = Topology(num_nodes=3, tls=True, auth=True)
    args = topo.supernode_args(2, superlink="superlink:9093", certs_dir=Path("/certs"),
                               keys_dir=Path("/keys"))
    assert args[args.index("--node-config") + 1] == "partition-id=2 num-partitions=3"
    assert args[args.index("--auth-supernode-private-key") + 1] == "/keys/node-2"
    assert "--insecure" not in args
    plain = Topology(num_nodes=1, tls=False, auth=False)
    assert "--insecure" in plain.superlink_args(host="0.0.0.0", certs_dir=None, database=None)
    with pytest.raises(ValueError, match="auth=True needs tls=True"):
        Topology(num_nodes=1, tls=False, auth=True)
    with pytest.raises(ValueError, match="data_paths has 1 entries for 2 nodes"):
        Topology(num_nodes=2, data_paths=["/d/0.json"])
    assert format_config({"data-path": "/d/0.json", "x": 0.5, "on": True}) == (
        'data-path="/d/0.json" x=0.5 on=true')
    with pytest.raises(ValueError, match="node-config bad"):
        format_config({"bad": 'say "hi"'})


def test_missing_app_is_a_clear_error(tmp_path):
    with pytest.raises(DeploymentError, match="has no pyproject.toml"):
        LocalDeployment(tmp_path / "nowhere")


def test_scripts_are_idempotent(tmp_path):
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    run = [lambda: subprocess.run(["bash", str(REPO / "scripts/make-certs.sh"), str(certs),
                                   "superlink", "127.0.0.1"], capture_output=True, text=True,
                                  check=True).stdout,
           lambda: subprocess.run(["bash", str(REPO / "scripts/make-node-keys.sh"), str(keys),
                                   "node-0"], capture_output=True, text=True, check=True).stdout]
    first = [step() for step in run]
    stamp = {p: p.read_bytes() for p in [certs / "server.pem", keys / "node-0"]}
    second = [step() for step in run]
    assert all("made" in out for out in first) and all("made" not in out for out in second)
    assert all(p.read_bytes() == data for p, data in stamp.items())
    san = subprocess.run(["openssl", "x509", "-in", str(certs / "server.pem"), "-noout", "-ext",
                          "subjectAltName"], capture_output=True, text=True, check=True).stdout
    assert "DNS:superlink" in san and "IP Address:127.0.0.1" in san
    assert (keys / "node-0.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert oct(os.stat(keys / "node-0").st_mode & 0o777) == "0o600"
