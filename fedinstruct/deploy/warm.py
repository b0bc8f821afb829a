"""Warm app processes: Flower's ClientApp/ServerApp processes start from a pre-imported parent.

A SuperNode starts a fresh `flwr-clientapp` process for every message, and a SuperLink a fresh
`flwr-serverapp` for every run. For an LLM app, importing torch, transformers and peft takes
most of that start (more than a short round's training on a small CPU host). Here a
long-lived server imports those once; the `flwr-clientapp` that Flower launches (found first on
the PATH) is a small launcher that hands its arguments, environment and stdio to the server,
which forks a child that runs Flower's real entry point and reports its exit code back.

- Each task still is its own process, with Flower's own code path, token and exit codes.
- The app's own modules are dropped after the warm-up, so each child imports the app from the
  FAB that Flower installed for the run (the submitted code, not the code pre-imported here).
- Without a server (not started, crashed) the launcher runs the real command instead.
- A child is not reused for the next message: Flower's `flwr-clientapp` ends through
  `flwr_exit`, which runs process-wide exit handlers and arms a force-exit timer, so one
  process per task is what its code path supports.
- Prewarm (flwr-clientapp): in each child the server wraps `ClientApp.__call__`, so that a
  task that handled its message leaves a hint: which app module (one of `--app`, imported from
  the run's FAB), run config and node config it ran. Between messages the server imports that
  module from the FAB and calls its `prewarm(run_config, node_config)` hook (if it has one),
  e.g. to load the run's base model, so the next task starts with it in memory (shared
  copy-on-write) instead of loading it. The app itself knows nothing of the warm server.
- The server runs math libraries single-threaded (OpenMP's thread pool does not survive a
  fork); each child gets its thread count back before it runs (`warm_setup`).
- Local trust: only processes of the server's own user are served (private socket folder,
  SO_PEERCRED peer check); requests are read without blocking, with a deadline
  (`--request-timeout`) and a size limit, and checked before anything is forked
  (`warm_requests`). Each child asks the kernel for SIGKILL when the server dies
  (PR_SET_PDEATHSIG), so no task outlives a killed server.

This module is the server loop (and its command line). How its process is prepared (pre-imports,
threads, logging) is `fedinstruct.deploy.warm_setup`; its socket, peer checks and the reading
and checking of requests, `fedinstruct.deploy.warm_requests`; what a forked child does, and the
hints it leaves, `fedinstruct.deploy.warm_task`.

    python -m fedinstruct.deploy.warm flwr-clientapp --app fedinstruct.client_app \\
        --socket /run/fi/node.sock --shims /run/fi/bin
    PATH=/run/fi/bin:$PATH FEDINSTRUCT_WARM_SOCKET=/run/fi/node.sock flower-supernode ...
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from fedinstruct.deploy.launcher import (
    EXIT,
    PID,
    READY,
    SOCKET_ENV,
    route_to_server,
    server_command,
    write_launchers,
)
from fedinstruct.deploy.warm_requests import (
    MAX_PENDING,
    PendingRequest,
    RequestDropped,
    RequestRefused,
    WarmServerError,
    listen_privately,
    peer_of_this_user,
    private_folder,
)
from fedinstruct.deploy.warm_setup import (
    drop_app_modules,
    log_to_stdout,
    single_threaded,
    warm_up,
)
from fedinstruct.deploy.warm_task import (
    die_with_parent,
    entry_point,
    leave_hints,
    run_child,
    take_hint,
)

log = logging.getLogger("fedinstruct.deploy")

__all__ = ["READY", "SOCKET_ENV", "WarmServer", "WarmServerError", "leave_hints", "main",
           "route_to_server", "server_command", "take_hint"]


class WarmServer:
    """Accepts launcher requests on a Unix socket and forks a child for each (one thread).

    Only processes of the server's own user are served: the socket is mode 600 in a folder of
    mode 700, and every connection's peer is checked with SO_PEERCRED. A request is read
    without blocking, within `request_timeout` seconds and `warm_requests.MAX_REQUEST` bytes,
    so a stalled or hostile client holds up no one else; a malformed one is logged and refused
    (its launcher, if any, then runs the command itself). Children die with the server.
    """

    def __init__(self, socket_path: Path, commands: Sequence[str], *, threads: int = 1,
                 prewarm: bool = False, apps: Sequence[str] = (),
                 parent: int | None = None, request_timeout: float = 10.0) -> None:
        self.socket_path, self.commands = socket_path, set(commands)
        self.apps = list(apps)  # app modules whose `prewarm` hook a hint may name
        self.parent = parent  # stop once this process (e.g. the SuperNode) is gone
        self.threads = threads  # each child's math-library thread count
        self.request_timeout = request_timeout  # seconds a client may take to send a request
        # where the children leave their hints (main: prewarm=True when flwr-clientapp is served)
        self.hint = socket_path.with_suffix(".hint.json") if prewarm and self.apps else None
        self.prewarmed = ""  # the hint last acted on
        self.pending: dict[socket.socket, PendingRequest] = {}  # connections still sending
        self.children: dict[int, socket.socket] = {}  # pid -> its launcher's connection
        self.orphans: set[int] = set()  # children whose launcher was killed (signalled)
        self.started: dict[int, float] = {}  # pid -> when it was forked
        self._stop = False

    def serve(self) -> None:
        if threading.active_count() > 1:
            log.warning("%d threads run before forking; children get only this one",
                        threading.active_count())
        listener = listen_privately(self.socket_path)
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        print(f"{READY} on {self.socket_path} for {sorted(self.commands)}", flush=True)
        try:
            while not self._stop:
                if self.parent is not None and os.getppid() != self.parent:
                    log.info("the process that started this server is gone; stopping")
                    break
                launchers = [c for p, c in self.children.items() if p not in self.orphans]
                watched = [listener, *self.pending, *launchers]
                try:
                    readable, _, _ = select.select(watched, [], [], 0.2)
                except InterruptedError:
                    readable = []
                for ready in readable:
                    try:
                        if ready is listener:
                            self._accept(listener)
                        elif ready in self.pending:
                            self._read(ready, listener)
                        else:
                            self._launcher_gone(ready)
                    except Exception:  # one connection never takes the server down
                        log.exception("error handling a connection")
                        if ready in self.pending:
                            self._drop(ready)
                self._expire()
                self._reap()
                self._prewarm()
        finally:
            listener.close()
            self.socket_path.unlink(missing_ok=True)
            for conn in list(self.pending):
                self._drop(conn)
            self._stop_children()

    def _request_stop(self, signum: int, frame: object) -> None:
        self._stop = True

    def _accept(self, listener: socket.socket) -> None:
        """Take a connection of this user (others: refused and logged) and wait for its request."""
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        pid = peer_of_this_user(conn)
        if pid is None:
            conn.close()
            return
        conn.setblocking(False)
        if len(self.pending) >= MAX_PENDING:
            oldest = min(self.pending, key=lambda c: self.pending[c].deadline)
            log.warning("%d connections are still sending; dropped the oldest (pid %d)",
                        len(self.pending), self.pending[oldest].pid)
            self._drop(oldest)
        self.pending[conn] = PendingRequest(pid, time.monotonic() + self.request_timeout)

    def _read(self, conn: socket.socket, listener: socket.socket) -> None:
        """Read what has arrived of a request; once complete, check it and fork its child."""
        pending = self.pending[conn]
        try:
            request = pending.read(conn, self.commands)
        except RequestDropped as err:
            log.warning("%s", err)
            self._drop(conn)
            return
        except RequestRefused as err:
            self._refuse(conn, str(err))
            return
        if request is not None:
            del self.pending[conn]
            self._fork(conn, request, pending.fds, listener)

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        """Log and refuse a request: its launcher runs the command itself."""
        pending = self.pending.get(conn)
        log.warning("refused a request from pid %d: %s",
                    pending.pid if pending else -1, reason)
        with contextlib.suppress(OSError):
            conn.send(PID.pack(0))
        self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        """Close a connection that has no child (yet) and the descriptors it passed."""
        pending = self.pending.pop(conn, None)
        if pending is not None:
            pending.close_fds()
        conn.close()

    def _expire(self) -> None:
        """Drop connections that did not send their request in time."""
        now = time.monotonic()
        for conn, pending in list(self.pending.items()):
            if now > pending.deadline:
                log.warning("dropped the connection of pid %d: no whole request within %.1f s",
                            pending.pid, self.request_timeout)
                self._drop(conn)

    def _fork(self, conn: socket.socket, request: dict, fds: list[int],
              listener: socket.socket) -> None:
        """Fork the request's child; it runs Flower's entry point and dies with the server."""
        sys.stdout.flush()
        sys.stderr.flush()
        server = os.getpid()
        try:
            pid = os.fork()
        except OSError as err:  # e.g. out of processes: the launcher runs the command itself
            log.warning("could not fork %s: %s", request["command"], err)
            self.pending[conn] = PendingRequest(0, 0.0, fds=list(fds))
            self._refuse(conn, "no child could be forked")
            return
        if pid == 0:  # the child: never returns into the server loop
            code = 1
            try:
                die_with_parent(server)
                for other in [listener, conn, *self.pending, *self.children.values()]:
                    other.close()
                for pending in self.pending.values():
                    pending.close_fds()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                code = run_child(request, fds, self.threads, self.hint, self.apps)
            finally:
                with contextlib.suppress(OSError):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        self.started[pid] = time.monotonic()
        with contextlib.suppress(OSError):
            conn.send(PID.pack(pid))
        log.info("%s started as pid %d", request["command"], pid)

    def _prewarm(self) -> None:
        """Run the `prewarm` hook of the app a finished task named (once per hint)."""
        if self.hint is None or not self.hint.exists():
            return
        hint = take_hint(self.hint)
        key = json.dumps(hint, sort_keys=True)
        if hint is None or key == self.prewarmed or hint.get("module") not in self.apps:
            return
        self.prewarmed = key
        start = time.perf_counter()
        sys.path.insert(0, hint["app_dir"])
        try:
            hook = getattr(importlib.import_module(hint["module"]), "prewarm", None)
            if hook is not None:
                hook(hint["run_config"], hint["node_config"])
                log.info("prewarmed %s in %.1f s", hint["module"], time.perf_counter() - start)
        except (Exception, SystemExit):  # the app's hook never stops the server
            log.exception("prewarm of %s failed; tasks load for themselves", hint["module"])
        finally:
            sys.path.remove(hint["app_dir"])
            drop_app_modules([hint["module"]])
        if threading.active_count() > 1:
            log.warning("prewarm left %d threads running", threading.active_count())

    def _launcher_gone(self, conn: socket.socket) -> None:
        """The launcher closed its end (it was killed): stop its child as well."""
        try:
            if conn.recv(4096):  # a launcher sends nothing after its request: ignore it
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass  # reset: gone as well
        for pid, other in list(self.children.items()):
            if other is conn and pid not in self.orphans:
                log.info("the launcher of pid %d is gone; stopping it", pid)
                self.orphans.add(pid)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            self.orphans.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            wall = time.monotonic() - self.started.pop(pid, time.monotonic())
            log.info("pid %d exited with code %d after %.1f s (%.1f s of CPU)", pid, code, wall,
                     usage.ru_utime + usage.ru_stime)
            if conn is None:
                continue
            with contextlib.suppress(OSError):
                conn.sendall(EXIT.pack(code if code >= 0 else 128 - code))
            conn.close()

    def _stop_children(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        for pid in list(self.children):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self._reap()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commands", nargs="+", help="Flower commands to serve, e.g. flwr-clientapp")
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket to listen on")
    parser.add_argument("--app", action="append", default=[],
                        help="app module (e.g. fedinstruct.client_app): its dependencies are "
                             "pre-imported, the app itself is imported by each child; for "
                             "flwr-clientapp its `prewarm` hook runs between tasks")
    parser.add_argument("--preload", action="append", default=[],
                        help="further module to pre-import and keep")
    parser.add_argument("--shims", type=Path, help="also write the launchers into this folder")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="stop when the process that started the server exits")
    parser.add_argument("--no-prewarm", dest="prewarm", action="store_false",
                        help="do not run the app's `prewarm` hook between tasks "
                             "(flwr-clientapp)")
    parser.add_argument("--request-timeout", type=float, default=10.0,
                        help="seconds a client may take to send its request (then dropped)")
    args = parser.parse_args(argv)
    parent = os.getppid()  # before the slow warm-up, in case it exits meanwhile
    try:
        private_folder(args.socket.parent)  # fail now, not after the slow warm-up
    except WarmServerError as err:
        parser.exit(2, f"warm app server: {err}\n")
    log_to_stdout()
    for command in args.commands:
        entry_point(command)  # fail now, not in every child
    if args.shims:
        write_launchers(args.shims, args.commands)
    warm_up(args.app, args.preload)
    threads = single_threaded()
    prewarm = args.prewarm and "flwr-clientapp" in args.commands
    WarmServer(args.socket, args.commands, threads=threads, prewarm=prewarm, apps=args.app,
               parent=parent if args.exit_with_parent else None,
               request_timeout=args.request_timeout).serve()




if __name__ == "__main__":
    main()
