"""The `flwr-*` launchers that hand Flower's app-process starts to a warm app server.

A launcher is put first on the PATH of a SuperNode (or SuperLink) under the name of the Flower
command it stands for. It passes its arguments, environment and stdio to the warm app server
at $FEDINSTRUCT_WARM_SOCKET and waits for the exit code of the child the server forks, or runs
the real command itself when no server answers, the server refuses the request, or the server
is not a process of the launcher's own user (SO_PEERCRED; see `fedinstruct.deploy.warm`).
"""

from __future__ import annotations

import inspect
import os
import socket
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

from flwr.common.config import get_project_config

SOCKET_ENV = "FEDINSTRUCT_WARM_SOCKET"
READY = "warm app server ready"
HEADER = struct.Struct("!I")  # length of the JSON request that follows
PID = struct.Struct("!q")  # server -> launcher: the child's pid (0: refused, run it yourself)
EXIT = struct.Struct("!i")  # server -> launcher: the child's exit code

LAUNCHER = '''#!{python} -S
"""{command}: run by the warm app server at ${env} (see fedinstruct.deploy.warm)."""
import array, json, os, signal, socket, struct, sys

REAL = {real!r}


def cold():
    os.execv(REAL, [REAL, *sys.argv[1:]])


try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(os.environ["{env}"])
    # this process's environment and stdio go to a server of the same user only
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid != os.geteuid():
        raise PermissionError(f"the server at ${env} runs as uid {{uid}}")
except (KeyError, OSError, AttributeError):
    cold()
fds = []
for fd in (0, 1, 2):
    try:
        os.fstat(fd)
        fds.append(fd)
    except OSError:
        pass
request = json.dumps({{"command": {command!r}, "argv": sys.argv[1:], "cwd": os.getcwd(),
                      "env": dict(os.environ), "fds": fds}}).encode()
conn.sendmsg([struct.pack("!I", len(request)) + request],
             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


{receive}

answer = receive(conn, 8)
child = struct.unpack("!q", answer)[0] if answer else 0
if child <= 0:
    conn.close()
    cold()
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda number, frame: os.kill(child, number))
status = receive(conn, 4)
sys.exit(struct.unpack("!i", status)[0] if status else 1)
'''


def receive(conn: socket.socket, size: int) -> bytes | None:
    """Exactly size bytes from conn, or None if it closes first (the server's answers)."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# The launcher runs with `python -S` and imports nothing of fedinstruct (it must start fast and
# work without it), so it gets this function's source rather than an import.
RECEIVE = inspect.getsource(receive)


def write_launchers(folder: Path, commands: Iterable[str], python: str = sys.executable) -> Path:
    """Write one launcher per Flower command into folder (put it first on the PATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(python).parent
    for command in commands:
        real = bin_dir / command
        path = folder / command
        path.write_text(LAUNCHER.format(python=python, command=command, env=SOCKET_ENV,
                                        real=str(real if real.exists() else command),
                                        receive=RECEIVE))
        path.chmod(0o755)
    return folder


def server_command(command: str, socket_path: Path, shims: Path, app_dir: Path) -> list[str]:
    """argv of a warm server for a Flower command, pre-importing the app module it runs.

    The module is the app's component in app_dir/pyproject.toml (`tool.flwr.app.components`):
    the server pre-imports its dependencies and, for flwr-clientapp, calls its `prewarm` hook.
    """
    component = {"flwr-serverapp": "serverapp", "flwr-clientapp": "clientapp"}[command]
    app_ref = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"][component]
    return [sys.executable, "-m", "fedinstruct.deploy.warm", command, "--socket",
            str(socket_path), "--shims", str(shims), "--app", app_ref.split(":")[0]]


def route_to_server(env: dict[str, str], socket_path: Path, shims: Path) -> None:
    """Make the processes started with env launch their app processes from the server."""
    env["PATH"] = f"{shims}{os.pathsep}{env.get('PATH', '')}"
    env[SOCKET_ENV] = str(socket_path)
