"""Long-running Flower processes of a local deployment: start, watch logs, stop the whole tree.

Flower's SuperLink and SuperNode start their SuperExec and App processes in new sessions, so a
process-group kill misses them. Every descendant seen is therefore remembered (with its start
time, so a reused pid is never signalled) and the whole set is stopped at the end.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger("fedinstruct.deploy")


class DeploymentError(RuntimeError):
    """A deployment step failed; the message names the component and quotes its log."""


def log_tail(path: Path, lines: int = 25) -> str:
    """Last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ManagedProcess:
    """One started component (SuperLink, SuperNode or CLI stream) and what it spawned."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    tracked: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self, offset: int = 0) -> str:
        """The log from byte `offset` on (offsets are bytes: logs hold multi-byte text)."""
        try:
            return self.log_path.read_bytes()[offset:].decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        """Bytes written to the log so far (an offset for log_text / wait_for_log)."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def harvest(self) -> None:
        """Remember the current descendants, so that they can be stopped after the parent."""
        try:
            root = psutil.Process(self.popen.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            self.tracked.setdefault(proc.pid, proc)

    def processes(self) -> list[psutil.Process]:
        self.harvest()
        return list(self.tracked.values())


def start_process(
    name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str]
) -> ManagedProcess:
    """Start argv in its own session with stdout+stderr going to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as sink:
        popen = subprocess.Popen(
            list(argv),
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            start_new_session=True,
        )
    log.info("started %s (pid %d), log %s", name, popen.pid, log_path)
    log.debug("%s argv: %s", name, " ".join(argv))
    proc = ManagedProcess(name=name, argv=list(argv), log_path=log_path, popen=popen)
    proc.harvest()
    return proc


def wait_for_log(
    proc: ManagedProcess,
    pattern: str,
    timeout: float,
    *,
    offset: int = 0,
    failure_patterns: Iterable[str] = (),
) -> re.Match[str]:
    """Wait until pattern appears in the log (after byte offset) while the process lives.

    Raises DeploymentError with the log tail when the process exits, a failure pattern
    appears first, or the timeout passes.
    """
    regex = re.compile(pattern)
    failures = [re.compile(p) for p in failure_patterns]
    deadline = time.monotonic() + timeout
    while True:
        proc.harvest()
        text = proc.log_text(offset)
        if match := regex.search(text):
            return match
        for failure in failures:
            if failure.search(text):
                raise DeploymentError(
                    f"{proc.name} failed ({failure.pattern!r} in {proc.log_path}):\n"
                    f"{log_tail(proc.log_path)}"
                )
        if not proc.alive():
            raise DeploymentError(
                f"{proc.name} exited with code {proc.popen.returncode} before "
                f"{pattern!r} appeared in {proc.log_path}:\n{log_tail(proc.log_path)}"
            )
        if time.monotonic() > deadline:
            raise DeploymentError(
                f"{proc.name}: {pattern!r} did not appear in {proc.log_path} within "
                f"{timeout:.0f} s:\n{log_tail(proc.log_path)}"
            )
        time.sleep(0.2)


def processes_of(pids: Iterable[int]) -> list[psutil.Process]:
    """psutil handles for the pids that still exist."""
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return found


def living(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Processes still running (a zombie waiting to be reaped counts as gone)."""
    alive = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def stop_processes(
    processes: Iterable[psutil.Process], grace: float = 5.0, sig: int = signal.SIGTERM
) -> list[psutil.Process]:
    """Signal every process, SIGKILL those alive after grace seconds; return the survivors."""
    targets = living(processes)
    for proc in targets:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(targets, timeout=grace)
    alive = living(alive)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(alive, timeout=grace)
    return living(alive)


def stop_managed(*procs: ManagedProcess, grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Stop components and every descendant they were seen with, together; reap the children."""
    tracked = [p for proc in procs for p in proc.processes()]
    survivors = stop_processes(tracked, grace=grace, sig=sig)
    for proc in procs:
        try:
            proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(timeout=grace)
    if survivors:
        raise DeploymentError(
            f"{', '.join(p.name for p in procs)}: {describe(survivors)} survived SIGKILL"
        )


class Harvester:
    """Background thread that keeps recording the descendants of running components.

    A SuperNode's SuperExec retries on its own after the SuperNode exits; recording it while
    the parent lives is what lets stop() find it later.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.procs: list[ManagedProcess] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="deploy-harvester", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def watch(self, proc: ManagedProcess) -> ManagedProcess:
        self.procs.append(proc)
        return proc

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for proc in list(self.procs):
                if proc.alive():
                    proc.harvest()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def describe(processes: Iterable[psutil.Process]) -> str:
    """pid and command line of each process, for error messages."""
    parts = []
    for proc in processes:
        try:
            parts.append(f"{proc.pid} {' '.join(proc.cmdline())}")
        except psutil.Error:
            parts.append(f"{proc.pid} (gone)")
    return "; ".join(parts)


def thread_env(threads: int) -> dict[str, str]:
    """Math-library thread counts for a process that gets `threads` cores of a shared host."""
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process: no runtime pip installs, no update checks."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            "NO_COLOR": "1",
            # a SuperExec checks for new app tasks every second by default
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
        }
    )
    env.update(extra or {})
    flwr_home.mkdir(parents=True, exist_ok=True)
    return env


def flower_executable(name: str) -> str:
    """Path of a Flower console script next to the running interpreter, else its bare name."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name
