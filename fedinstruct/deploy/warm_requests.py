"""Local trust for the warm app server: its private socket, peer checks and launcher requests.

Only processes of the server's own user are served, and no client can stall or crash it:

- The socket is created with mode 600 (under umask 177) inside a folder of mode 700 (made, or
  checked, at start), so only this user's processes reach it (and the prewarm hints beside it).
- Every connection's peer uid is checked with SO_PEERCRED; others are refused and logged (the
  launchers check the server's uid the same way, see `fedinstruct.deploy.launcher`).
- Requests are read without blocking, one piece per readable socket, with a deadline and a size
  limit, so a stalled or hostile client holds up no one else; a malformed request is refused
  (its launcher, if any, then runs the command itself) and the server goes on.
- A request may pass only the launcher's stdio descriptors, and each field is checked before
  anything is forked from it.

The server loop that uses these is `fedinstruct.deploy.warm`.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from fedinstruct.deploy.launcher import HEADER

log = logging.getLogger("fedinstruct.deploy")

MAX_REQUEST = 1 << 20  # bytes of one launcher request (argv, cwd, environment); more: refused
MAX_PENDING = 32  # connections still sending their request; more: the oldest is dropped
STDIO = (0, 1, 2)  # the only descriptors a request may pass (the launcher's stdio)
FD_SPACE = socket.CMSG_SPACE(len(STDIO) * array.array("i").itemsize)
REQUEST_FIELDS = {"command", "argv", "cwd", "env", "fds"}
PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class WarmServerError(RuntimeError):
    """The server cannot serve safely (e.g. its socket's folder is open to others)."""


class RequestRefused(Exception):
    """A request that is answered with a refusal (pid 0): its launcher runs the command itself."""


class RequestDropped(Exception):
    """A connection that is closed unanswered (it failed or closed before a whole request)."""


def private_folder(folder: Path) -> Path:
    """Make (or check) folder: a real folder of this user that no one else may enter (700).

    The socket and the prewarm hints live in it, so only this user's processes reach them.
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(folder)
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid()
            or stat.S_IMODE(info.st_mode) & 0o077):
        raise WarmServerError(
            f"{folder} must be a folder of uid {os.geteuid()} that no one else can enter "
            f"(mode 700); it is {stat.filemode(info.st_mode)}, owned by uid {info.st_uid}. "
            "Give --socket a path inside a private folder (the server makes a missing one).")
    return folder


def listen_privately(path: Path) -> socket.socket:
    """A listening Unix socket at path, mode 600, inside a private folder.

    The socket is created under umask 177, so it never exists with wider permissions (no
    chmod afterwards, no race).
    """
    private_folder(path.parent)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(umask)
    listener.listen(64)
    listener.setblocking(False)
    return listener


def peer_credentials(conn: socket.socket) -> tuple[int, int] | None:
    """(pid, uid) of the process at the other end, from the kernel (SO_PEERCRED; Linux)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        pid, uid, _ = PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, option, PEERCRED.size))
    except OSError:
        return None
    return pid, uid


def peer_of_this_user(conn: socket.socket) -> int | None:
    """The pid at the other end if it runs as this process's user; else None (logged)."""
    peer = peer_credentials(conn)
    if peer is None or peer[1] != os.geteuid():
        who = "an unknown peer" if peer is None else f"pid {peer[0]} (uid {peer[1]})"
        log.warning("refused a connection from %s: this server serves uid %d only",
                    who, os.geteuid())
        return None
    return peer[0]


def parse_request(body: bytes, received_fds: int, commands: set[str]) -> dict:
    """The launcher's request, checked field by field; ValueError says what is wrong."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(request, dict):
        raise ValueError(f"not a JSON object but {type(request).__name__}")
    if set(request) != REQUEST_FIELDS:
        raise ValueError(f"fields {sorted(request)}, expected {sorted(REQUEST_FIELDS)}")
    command, argv, cwd, env, fds = (request[k] for k in ("command", "argv", "cwd", "env", "fds"))
    if not isinstance(command, str) or command not in commands:
        raise ValueError(f"command {command!r} is not served here ({sorted(commands)})")
    if not isinstance(argv, list) or not all(isinstance(a, str) and "\0" not in a
                                             for a in argv):
        raise ValueError("argv must be a list of strings")
    if not isinstance(cwd, str) or not os.path.isabs(cwd) or "\0" in cwd:
        raise ValueError("cwd must be an absolute path")
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k
            and "\0" not in k + v for k, v in env.items()):
        raise ValueError("env must map variable names to strings")
    if (not isinstance(fds, list) or len(fds) != received_fds or len(set(fds)) != len(fds)
            or not all(type(fd) is int and fd in STDIO for fd in fds)):
        raise ValueError(f"fds {fds!r} do not name the {received_fds} descriptors passed "
                         f"(each one of {STDIO})")
    return request


@dataclass
class PendingRequest:
    """A connection whose request is still arriving (read piece by piece, never blocking)."""

    pid: int
    deadline: float
    data: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def read(self, conn: socket.socket, commands: set[str]) -> dict | None:
        """Read what has arrived; the checked request once it is whole, else None.

        Raises RequestRefused for a request that is too large, passes too many descriptors or
        is malformed, and RequestDropped for a connection that failed or closed early.
        """
        try:
            data, ancillary, flags, _ = conn.recvmsg(1 << 16, FD_SPACE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as err:
            raise RequestDropped(f"dropped the connection of pid {self.pid}: {err}") from None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                self.fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        if flags & socket.MSG_CTRUNC or len(self.fds) > len(STDIO):
            raise RequestRefused(f"more than {len(STDIO)} file descriptors")
        if not data:
            raise RequestDropped(
                f"pid {self.pid} closed its connection before sending a whole request")
        self.data += data
        if len(self.data) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(self.data)
        if size > MAX_REQUEST:
            raise RequestRefused(f"a request of {size} bytes (limit {MAX_REQUEST})")
        received = len(self.data) - HEADER.size
        if received > size:
            raise RequestRefused(f"{received} bytes after a header announcing {size}")
        if received < size:
            return None
        try:
            return parse_request(bytes(self.data[HEADER.size:]), len(self.fds), commands)
        except ValueError as err:
            raise RequestRefused(str(err)) from None
