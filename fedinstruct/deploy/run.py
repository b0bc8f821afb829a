"""Runs submitted to a local deployment: the `flwr run --stream` process, status, result."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedinstruct.deploy.process import DeploymentError, ManagedProcess, stop_managed

log = logging.getLogger("fedinstruct.deploy")

CONNECTION = "fedinstruct"  # connection name written to FLWR_HOME/config.toml
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class RunTimeout(DeploymentError):
    """A run did not finish in time; it has been stopped. `logs` holds what it printed."""

    def __init__(self, message: str, logs: str) -> None:
        super().__init__(message)
        self.logs = logs


@dataclass
class RunResult:
    """How a run ended: `status` is Flower's (e.g. finished:completed), `logs` its output."""

    run_id: int
    status: str
    logs: str
    elapsed_s: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


class FlwrCli(Protocol):
    """The operator's `flwr` CLI of a deployment (e.g. `LocalDeployment`)."""

    def flwr(self, *args: str, check: bool = True, timeout: float = 120.0
             ) -> subprocess.CompletedProcess[str]: ...

    def flwr_json(self, *args: str) -> dict[str, Any]: ...


class RunHandle:
    """A submitted run whose logs are being streamed; `wait()` gives its RunResult.

    `cli` runs `flwr` against the deployment the run was submitted to.
    """

    def __init__(self, cli: FlwrCli, run_id: int, stream: ManagedProcess) -> None:
        self.cli, self.run_id, self.stream = cli, run_id, stream
        self.started = time.monotonic()

    def status(self) -> dict[str, Any]:
        runs = self.cli.flwr_json("ls", CONNECTION, "--run-id", str(self.run_id))["runs"]
        return runs[0]

    def wait(self, timeout: float = 600.0) -> RunResult:
        deadline = self.started + timeout
        while self.stream.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        details = self.status()
        while not details["status"].startswith("finished") and time.monotonic() < deadline:
            time.sleep(2.0)  # the log stream ended early (e.g. a lost connection): poll
            details = self.status()
        logs = ANSI.sub("", self.stream.log_text())
        if not details["status"].startswith("finished"):
            self.cli.flwr("stop", str(self.run_id), CONNECTION, check=False)
            stop_managed(self.stream)
            raise RunTimeout(f"run {self.run_id} not finished after {timeout:.0f} s "
                             f"(status {details['status']}); stopped it", logs)
        stop_managed(self.stream)
        result = RunResult(self.run_id, details["status"], ANSI.sub("", self.stream.log_text()),
                           time.monotonic() - self.started, details)
        log.info("run %d: %s after %.1f s", self.run_id, result.status, result.elapsed_s)
        return result


def parse_json(out: str, what: str) -> dict[str, Any]:
    start, end = out.find("{"), out.rfind("}")
    if start < 0:
        raise DeploymentError(f"`{what}` printed no JSON: {out!r}")
    return json.loads(out[start:end + 1])
