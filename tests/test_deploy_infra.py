"""A real SuperLink + SuperNodes deployment (TLS, node auth, own network namespaces) runs a tiny
Flower app end to end, refuses an unregistered node, and leaves no process behind; the warm app
server's launchers."""

from __future__ import annotations

import array
import json
import logging
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from fedinstruct.deploy import DeploymentError, LocalDeployment, Topology, format_config
from fedinstruct.deploy.launcher import receive
from fedinstruct.deploy.network import netns_unavailable_reason
from fedinstruct.deploy.process import flower_env
from fedinstruct.deploy.warm import (
    READY,
    SOCKET_ENV,
    WarmServer,
    WarmServerError,
    listen_privately,
)
from fedinstruct.deploy.warm import main as warm_main

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


@pytest.mark.slow
def test_warm_launcher_forks_flower_commands_and_runs_cold_without_a_server(tmp_path):
    sock, shims = tmp_path / "warm.sock", tmp_path / "bin"
    server = subprocess.Popen(
        [sys.executable, "-m", "fedinstruct.deploy.warm", "flwr-clientapp", "--socket", str(sock),
         "--shims", str(shims), "--app", "fedinstruct.logs"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not sock.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sock.exists(), "the warm server did not start"
        launcher = str(shims / "flwr-clientapp")
        env = {**os.environ, SOCKET_ENV: str(sock)}
        ok = subprocess.run([launcher, "--help"], env=env, capture_output=True, text=True)
        assert ok.returncode == 0 and "usage: flwr-clientapp" in ok.stdout
        bad = subprocess.run([launcher, "--token-file"], env=env, capture_output=True, text=True)
        assert bad.returncode == 2 and "expected one argument" in bad.stderr  # argparse's code
        cold = subprocess.run([launcher, "--help"], capture_output=True, text=True,
                              env={**os.environ, SOCKET_ENV: str(tmp_path / "none.sock")})
        assert cold.returncode == 0 and "usage: flwr-clientapp" in cold.stdout
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert READY in out and out.count("flwr-clientapp started as pid") == 2
    assert "dropped the" in out and "modules of fedinstruct" in out
    assert server.returncode == 0 and not sock.exists()


PACKAGE = REPO / "fedinstruct"


# ----------------------------------------------------------------- warm app server: local trust
# A warm server (fedinstruct.deploy.warm) serving a stand-in command: its child sleeps argv[0]
# seconds and exits with argv[1]; everything else (socket, checks, fork) is the real server.
FAKE_SERVER = """
import sys
import time

import fedinstruct.deploy.warm as warm
import fedinstruct.deploy.warm_task as task


def fake_entry_point(command):
    def run():
        time.sleep(float(sys.argv[1]))
        sys.exit(int(sys.argv[2]))
    return run


task.entry_point = warm.entry_point = fake_entry_point
warm.main(["fake-app", "--socket", sys.argv[1], "--request-timeout", sys.argv[2]])
"""
NOBODY = 65534


class FakeWarmServer:
    """The stand-in server as a process; `ask` speaks the launchers' protocol to it."""

    def __init__(self, folder: Path, request_timeout: float = 5.0,
                 socket_folder: Path | None = None) -> None:
        self.socket = (socket_folder or folder / "warm") / "node.sock"
        script = folder / "fake_server.py"
        script.write_text(FAKE_SERVER)
        self.log = folder / "warm.log"
        with open(self.log, "w") as out:
            # umask 0: the server alone must make its folder and socket private
            self.process = subprocess.Popen(
                [sys.executable, str(script), str(self.socket), str(request_timeout)],
                stdout=out, stderr=subprocess.STDOUT, umask=0,
                env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 60
        while READY not in self.log_text():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log_text()
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log.read_text()

    def connect(self) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(self.socket))
        conn.settimeout(10)
        return conn

    def ask(self, body: bytes, fds: list[int] | None = None, size: int | None = None
            ) -> tuple[int | None, int | None]:
        """Send a request; (child pid or 0 if refused or None if cut off, its exit code)."""
        fds = [] if fds is None else fds
        with self.connect() as conn:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            conn.sendmsg([struct.pack("!I", len(body) if size is None else size) + body],
                         rights if fds else [])
            answer = receive(conn, 8)
            if answer is None:
                return None, None
            pid = struct.unpack("!q", answer)[0]
            status = receive(conn, 4) if pid > 0 else None
            return pid, None if status is None else struct.unpack("!i", status)[0]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def fake_request(sleep_s: float = 0.0, code: int = 0, **change: object) -> bytes:
    request = {"command": "fake-app", "argv": [str(sleep_s), str(code)], "cwd": "/",
               "env": {"PATH": os.environ["PATH"]}, "fds": []}
    return json.dumps({**request, **change}).encode()


@pytest.fixture
def fake_warm(tmp_path):
    server = FakeWarmServer(tmp_path)
    yield server
    server.stop()


def test_warm_server_socket_is_private_even_under_an_open_umask(fake_warm, tmp_path):
    folder, sock = os.stat(fake_warm.socket.parent), os.stat(fake_warm.socket)
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
    assert stat.S_IMODE(folder.st_mode) == 0o700
    assert sock.st_uid == folder.st_uid == os.geteuid()
    assert fake_warm.ask(fake_request(code=3))[1] == 3  # and it serves its own user

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)  # a folder others can enter: refused, before anything listens there
    with pytest.raises(WarmServerError, match="no one else can enter"):
        listen_privately(shared / "node.sock")
    assert not (shared / "node.sock").exists()
    with pytest.raises(SystemExit) as stopped:
        warm_main(["flwr-clientapp", "--socket", str(shared / "node.sock")])
    assert stopped.value.code == 2


def as_nobody(action) -> tuple[int, int]:
    """Run action() in a forked child that became uid/gid 65534; (its pid, its exit code)."""
    pid = os.fork()
    if pid == 0:  # the child: only syscalls, then _exit
        code = 99
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = action()
        except BaseException:
            code = 98
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return pid, os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user (CI is root)")
def test_warm_server_refuses_a_connection_from_another_user(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="fi-peer-"))  # one level under /tmp: openable below
    fake_warm = FakeWarmServer(tmp_path, socket_folder=base / "warm")
    try:
        check_foreign_user_is_refused(fake_warm)
    finally:
        fake_warm.stop()
        shutil.rmtree(base)


def check_foreign_user_is_refused(fake_warm: FakeWarmServer) -> None:
    request = fake_request(60)

    def try_it() -> int:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(10)
        try:
            conn.connect(str(fake_warm.socket))
        except PermissionError:
            return 10  # the folder (700) keeps it out
        try:
            conn.sendall(struct.pack("!I", len(request)) + request)
            answer = receive(conn, 8)
        except (BrokenPipeError, ConnectionResetError):
            answer = None
        return 11 if answer is None else 12  # 11: cut off, 12: answered

    assert as_nobody(try_it)[1] == 10
    # Even with the file system opened up, the peer check (SO_PEERCRED) refuses the other uid.
    fake_warm.socket.parent.parent.chmod(0o711)
    fake_warm.socket.parent.chmod(0o711)
    fake_warm.socket.chmod(0o666)
    pid, code = as_nobody(try_it)
    assert code == 11, fake_warm.log_text()
    assert f"refused a connection from pid {pid} (uid {NOBODY})" in fake_warm.log_text()
    assert "fake-app started" not in fake_warm.log_text()
    assert fake_warm.process.poll() is None and fake_warm.ask(fake_request(code=4))[1] == 4


def test_warm_server_drops_a_stalled_client_without_blocking_others(tmp_path):
    server = FakeWarmServer(tmp_path, request_timeout=1.0)
    try:
        stalled = server.connect()
        stalled.sendall(b"\0\0")  # half a header, then nothing
        assert server.ask(fake_request(code=5))[1] == 5  # served meanwhile
        assert stalled.recv(8) == b""  # dropped after its deadline, never answered
        stalled.close()
        log = server.log_text()
        dropped = log.index("no whole request within 1.0 s")
        assert log.index("fake-app started") < dropped, log  # not held up by the stalled one
    finally:
        server.stop()


def test_warm_server_refuses_malformed_requests_and_keeps_serving(fake_warm):
    garbage = [
        (b"{not json", None),
        (b"[" * 100_000, None),  # nested too deep for the JSON parser
        (b"[1, 2]", None),
        (json.dumps({"command": "fake-app"}).encode(), None),  # fields missing
        (fake_request(argv="sleep 60"), None),
        (fake_request(argv=[1, 2]), None),
        (fake_request(env={"A": 1}), None),
        (fake_request(cwd="relative"), None),
        (fake_request(command="sh"), None),  # not a command it serves
        (fake_request(extra=True), None),
        (fake_request(fds=[0, 1, 2]), None),  # names descriptors it did not pass
        (b"x", 1 << 31),  # announces 2 GiB
    ]
    for body, size in garbage:
        assert fake_warm.ask(body, size=size)[0] == 0, body[:60]  # refused: run it cold
        assert fake_warm.process.poll() is None, fake_warm.log_text()
    with fake_warm.connect() as conn:  # more descriptors than stdio
        body = fake_request(fds=[0, 1, 2, 3])
        conn.sendmsg([struct.pack("!I", len(body)) + body],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2, 0]))])
        assert receive(conn, 8) in (None, struct.pack("!q", 0))
    assert fake_warm.log_text().count("refused a request") == len(garbage) + 1
    assert fake_warm.ask(fake_request(code=6))[1] == 6
    with open(os.devnull, "w") as null:  # stdio passed along as a launcher does
        assert fake_warm.ask(fake_request(code=7, fds=[1]), fds=[null.fileno()])[1] == 7
    assert fake_warm.process.poll() is None


def test_malformed_prewarm_hints_are_logged_and_ignored(tmp_path, caplog, monkeypatch):
    deploy_log = logging.getLogger("fedinstruct.deploy")
    caplog.set_level(logging.WARNING, logger=deploy_log.name)
    monkeypatch.setattr(deploy_log, "handlers", [*deploy_log.handlers, caplog.handler])
    monkeypatch.setattr(deploy_log, "propagate", False)  # whatever the loggers above do
    server = WarmServer(tmp_path / "node.sock", ["flwr-clientapp"], prewarm=True,
                        apps=["fedinstruct.client_app"])
    assert server.hint is not None
    hints = ["{torn", "[" * 100_000, '["a list"]', json.dumps({"module": 1}),
             json.dumps({"module": "fedinstruct.client_app", "app_dir": str(tmp_path),
                         "run_config": [], "node_config": {}}),
             json.dumps({"module": "os", "app_dir": "/", "run_config": {}, "node_config": {},
                         "more": 1}),
             "x" * (2 << 20)]
    for text in hints:
        server.hint.write_text(text)
        server._prewarm()  # nothing raises
        assert not server.hint.exists() and server.prewarmed == ""
    assert caplog.text.count("ignored a") == len(hints)


def test_children_die_with_a_killed_warm_server(fake_warm):
    with fake_warm.connect() as conn:
        body = fake_request(sleep_s=120)
        conn.sendall(struct.pack("!I", len(body)) + body)
        child = psutil.Process(struct.unpack("!q", receive(conn, 8))[0])
        assert child.ppid() == fake_warm.process.pid and child.is_running()
        fake_warm.process.kill()  # SIGKILL: no handler of the server runs
        fake_warm.process.wait(timeout=10)
        assert receive(conn, 4) is None  # its launcher sees the server gone
    deadline = time.monotonic() + 10
    while alive(child):
        assert time.monotonic() < deadline, "the task outlived its server"
        time.sleep(0.05)


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
