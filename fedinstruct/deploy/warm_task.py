"""The task side of the warm app server: what a forked child does, and the hints it leaves.

A child forked by `fedinstruct.deploy.warm.WarmServer` takes over its launcher's stdio, working
folder and environment, resets what a fresh process would not share with its parent (random
state, the math libraries' thread count) and then runs Flower's real entry point for the
requested command, so that each task keeps Flower's own code path and exit codes.

Prewarm hints: a flwr-clientapp child wraps `ClientApp.__call__` so that a task that handled
its message names the app module it ran (imported from the run's FAB), with its run config and
node config. The server takes the hint between tasks and runs that module's `prewarm` hook.
The hint's format is defined here, both for writing (`write_hint`) and reading (`take_hint`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import random
import signal
import sys
import traceback
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

log = logging.getLogger("fedinstruct.deploy")

__all__ = ["app_location", "die_with_parent", "entry_point", "leave_hints", "run_child",
           "take_hint", "write_hint"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# libc, loaded in the server before it forks (no dynamic loading in a forked child)
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(parent: int) -> None:
    """In a forked child: be SIGKILLed when the server (parent) dies, even by SIGKILL.

    The kernel sends the signal when the parent exits; a parent that died before the call is
    caught by checking that it is still the parent afterwards (the child then exits at once).
    """
    if _LIBC is not None and _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:
        os._exit(1)


def entry_point(command: str):
    """The function a console script runs (e.g. flwr-clientapp -> flwr_clientapp)."""
    found = entry_points(group="console_scripts", name=command)
    if not found:
        raise LookupError(f"no console script named {command!r} is installed")
    return next(iter(found)).load()


def app_location(app_modules: Sequence[str]) -> tuple[str, Path] | None:
    """The first of app_modules this process imported, and the folder it was imported from.

    In a child that is the run's FAB (Flower puts it first on sys.path and imports the app's
    component from it), so a hint names the code the run submitted, not the server's copy.
    """
    for name in app_modules:
        file = getattr(sys.modules.get(name), "__file__", None)
        if file:
            path = Path(os.path.abspath(file))
            depth = name.count(".") + (path.name == "__init__.py")
            return name, path.parents[depth]
    return None


def write_hint(path: Path, module: str, app_dir: Path, run_config: Mapping[str, Any],
               node_config: Mapping[str, Any]) -> None:
    """Write a hint for the server at path, atomically (it never reads a half-written one)."""
    hint = {"module": module, "app_dir": str(app_dir),
            "run_config": dict(run_config), "node_config": dict(node_config)}
    partial = path.with_name(f"{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(hint))
    partial.replace(path)


HINT_FIELDS = {"module": str, "app_dir": str, "run_config": dict, "node_config": dict}
MAX_HINT = 1 << 20  # bytes; a larger hint file is refused


def take_hint(path: Path) -> dict[str, Any] | None:
    """Read and remove the latest hint; None if there is none (a malformed one is logged).

    Nothing in a hint can stop the server: unreadable, oversized, torn, too deeply nested or
    mistyped hints are removed, logged and ignored.
    """
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_HINT + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        log.warning("ignored an unreadable prewarm hint %s: %s", path, err)
        data = None
    with contextlib.suppress(OSError):
        path.unlink()
    if data is None:
        return None
    if len(data) > MAX_HINT:
        log.warning("ignored a prewarm hint of more than %d bytes", MAX_HINT)
        return None
    try:
        hint = json.loads(data)
    except (ValueError, RecursionError) as err:
        log.warning("ignored a malformed prewarm hint: %s", str(err)[:200])
        return None
    if not isinstance(hint, dict) or set(hint) != set(HINT_FIELDS) or any(
            not isinstance(hint[name], kind) for name, kind in HINT_FIELDS.items()):
        log.warning("ignored a prewarm hint without the fields %s", sorted(HINT_FIELDS))
        return None
    return hint


def leave_hints(path: Path, app_modules: Sequence[str]) -> None:
    """Make every ClientApp of this process leave a hint at path after each handled message.

    Called in a forked flwr-clientapp child before Flower's entry point runs. The hint names
    the first of app_modules the task imported (None imported: no hint), with the message's
    run config and node config. A task that failed leaves none; a hint that cannot be written
    is logged and never fails the task.
    """
    call = ClientApp.__call__

    @functools.wraps(call)
    def call_and_hint(self: ClientApp, message: Message, context: Context) -> Message:
        reply = call(self, message, context)
        try:
            found = app_location(app_modules)
            if found is not None:
                write_hint(path, *found, context.run_config, context.node_config)
        except Exception:
            log.warning("could not leave a prewarm hint at %s", path, exc_info=True)
        return reply

    ClientApp.__call__ = call_and_hint


def run_child(request: dict, fds: list[int], threads: int, hint: Path | None,
               app_modules: Sequence[str] = ()) -> int:
    """In the forked child: become the requested Flower command; return its exit code."""
    for target, fd in zip(request["fds"], fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    log.handlers.clear()  # the server's log handler is not the child's
    log.propagate = True
    log.setLevel(logging.NOTSET)
    os.environ.clear()
    os.environ.update(request["env"])
    random.seed()  # a fresh process would not share its parent's random state
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()
        sys.modules["torch"].set_num_threads(threads)
    if hint is not None and request["command"] == "flwr-clientapp":
        leave_hints(hint, app_modules)
    sys.argv = [request["command"], *request["argv"]]
    try:
        entry_point(request["command"])()
    except SystemExit as done:
        code = done.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0

