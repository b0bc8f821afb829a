"""The warm app server: its launchers fork Flower's commands (or run them cold without a
server), it accepts only its own user on a private socket, drops stalled or malformed
requests and keeps serving, and its children die with it."""

from __future__ import annotations

import array
import json
import logging
import os
import shutil
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

from fedinstruct.deploy.launcher import receive
from fedinstruct.deploy.warm import (
    READY,
    SOCKET_ENV,
    WarmServer,
    WarmServerError,
    listen_privately,
)
from fedinstruct.deploy.warm import main as warm_main

REPO = Path(__file__).resolve().parents[1]


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
