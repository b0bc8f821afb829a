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
- The server runs math libraries single-threaded: OpenMP's thread pool does not survive a
  fork (a child forked after a multi-threaded op hangs in its first one). Each child gets its
  thread count back (OMP_NUM_THREADS, else the default) before it runs.

This module is the server (and its command line); what a forked child does, and the hints it
leaves, is `fedinstruct.deploy.warm_task`.

    python -m fedinstruct.deploy.warm flwr-clientapp --app fedinstruct.client_app \\
        --socket /run/fi/node.sock --shims /run/fi/bin
    PATH=/run/fi/bin:$PATH FEDINSTRUCT_WARM_SOCKET=/run/fi/node.sock flower-supernode ...
"""

from __future__ import annotations

import argparse
import array
import contextlib
import gc
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
    HEADER,
    PID,
    READY,
    SOCKET_ENV,
    route_to_server,
    server_command,
    write_launchers,
)
from fedinstruct.deploy.warm_task import entry_point, leave_hints, run_child, take_hint

log = logging.getLogger("fedinstruct.deploy")

__all__ = ["READY", "SOCKET_ENV", "WarmServer", "leave_hints", "main", "route_to_server",
           "server_command", "take_hint"]


def warm_up(app_modules: Sequence[str], preload: Sequence[str] = ()) -> None:
    """Import the app modules and `preload`; then drop the app's own packages again.

    What the app modules import (torch, transformers, ...) stays loaded; the app's top-level
    packages are dropped, so that each child imports them from the run's FAB. A failed import
    is logged, not fatal: the children then import it themselves and report the error.
    """
    for module in [*preload, *app_modules]:
        start = time.perf_counter()
        try:
            importlib.import_module(module)
            log.info("pre-imported %s in %.1f s", module, time.perf_counter() - start)
        except Exception:
            log.exception("could not pre-import %s; children will import it themselves", module)
    drop_app_modules(app_modules)


def drop_app_modules(app_modules: Sequence[str]) -> None:
    """Forget the app's own packages, so that each child imports them from the run's FAB."""
    for package in {module.split(".")[0] for module in app_modules}:
        own = [name for name in sys.modules if name == package or name.startswith(package + ".")]
        for name in own:
            del sys.modules[name]
        log.info("dropped the %d modules of %s (children import it from the run's FAB)",
                 len(own), package)
    gc.collect()
    gc.freeze()  # keep the garbage collector from touching (and copying) the shared pages


def single_threaded() -> int:
    """Make this process's math libraries single-threaded; return the children's count."""
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        threads = threads or torch.get_num_threads()
        torch.set_num_threads(1)
    with contextlib.suppress(ImportError):
        from tqdm import tqdm

        tqdm.monitor_interval = 0  # no monitor thread: forking must not copy a held lock
    return threads or (os.cpu_count() or 1)


def _receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    fd_space = socket.CMSG_SPACE(3 * array.array("i").itemsize)
    data, ancillary, _, _ = conn.recvmsg(1 << 16, fd_space)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
    if len(data) < HEADER.size:
        raise ValueError("short request")
    (size,) = HEADER.unpack_from(data)
    body = data[HEADER.size:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ValueError("request cut short")
        body += chunk
    return json.loads(body), fds


class WarmServer:
    """Accepts launcher requests on a Unix socket and forks a child for each (one thread)."""

    def __init__(self, socket_path: Path, commands: Sequence[str], *, threads: int = 1,
                 prewarm: bool = False, apps: Sequence[str] = (),
                 parent: int | None = None) -> None:
        self.socket_path, self.commands = socket_path, set(commands)
        self.apps = list(apps)  # app modules whose `prewarm` hook a hint may name
        self.parent = parent  # stop once this process (e.g. the SuperNode) is gone
        self.threads = threads  # each child's math-library thread count
        # where the children leave their hints (main: prewarm=True when flwr-clientapp is served)
        self.hint = socket_path.with_suffix(".hint.json") if prewarm and self.apps else None
        self.prewarmed = ""  # the hint last acted on
        self.children: dict[int, socket.socket] = {}  # pid -> its launcher's connection
        self.orphans: set[int] = set()  # children whose launcher was killed (signalled)
        self.started: dict[int, float] = {}  # pid -> when it was forked
        self._stop = False

    def serve(self) -> None:
        if threading.active_count() > 1:
            log.warning("%d threads run before forking; children get only this one",
                        threading.active_count())
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        listener.listen(64)
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        print(f"{READY} on {self.socket_path} for {sorted(self.commands)}", flush=True)
        try:
            while not self._stop:
                if self.parent is not None and os.getppid() != self.parent:
                    log.info("the process that started this server is gone; stopping")
                    break
                watched = [listener, *self.children.values()]
                try:
                    readable, _, _ = select.select(watched, [], [], 0.2)
                except InterruptedError:
                    readable = []
                for ready in readable:
                    if ready is listener:
                        self._accept(listener)
                    else:
                        self._launcher_gone(ready)
                self._reap()
                self._prewarm()
        finally:
            listener.close()
            self.socket_path.unlink(missing_ok=True)
            self._stop_children()

    def _request_stop(self, signum: int, frame: object) -> None:
        self._stop = True

    def _accept(self, listener: socket.socket) -> None:
        """Receive one request; fork its child (or refuse: the launcher then runs cold)."""
        conn, _ = listener.accept()
        fds: list[int] = []
        try:
            request, fds = _receive_request(conn)
            if request["command"] not in self.commands:
                raise ValueError(f"command {request['command']!r} is not served here")
        except (OSError, ValueError, KeyError) as err:
            log.warning("refused a launcher request (%s); it runs the command itself", err)
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                conn.sendall(PID.pack(0))
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the server loop
            code = 1
            try:
                for other in [listener, conn, *self.children.values()]:
                    other.close()
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
            conn.sendall(PID.pack(pid))
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
        except Exception:
            log.exception("prewarm of %s failed; tasks load for themselves", hint["module"])
        finally:
            sys.path.remove(hint["app_dir"])
            drop_app_modules([hint["module"]])
        if threading.active_count() > 1:
            log.warning("prewarm left %d threads running", threading.active_count())

    def _launcher_gone(self, conn: socket.socket) -> None:
        """The launcher closed its end (it was killed): stop its child as well."""
        with contextlib.suppress(OSError):
            if conn.recv(1):
                return
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
    args = parser.parse_args(argv)
    parent = os.getppid()  # before the slow warm-up, in case it exits meanwhile
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s warm %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    for command in args.commands:
        entry_point(command)  # fail now, not in every child
    if args.shims:
        write_launchers(args.shims, args.commands)
    warm_up(args.app, args.preload)
    threads = single_threaded()
    prewarm = args.prewarm and "flwr-clientapp" in args.commands
    WarmServer(args.socket, args.commands, threads=threads, prewarm=prewarm, apps=args.app,
               parent=parent if args.exit_with_parent else None).serve()


if __name__ == "__main__":
    main()
