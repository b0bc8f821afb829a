"""Run fedinstruct (or any Flower app) on a real SuperLink + SuperNodes topology on this host.

Each component runs as its own Flower process, by default in its own network namespace (see
`fedinstruct.deploy.network`), with TLS and SuperNode authentication as on separate machines:

    with LocalDeployment(app_dir=".", num_nodes=2, tls=True, auth=True) as dep:
        result = dep.run(timeout=600, run_config={"num-server-rounds": 1})
        assert result.ok, result.logs

`Topology` builds the exact command lines; docker/compose*.yaml is generated from it
(scripts/compose-nodes.py), so Compose and local deployments run the same flags. Starting,
waiting for and restarting the single components is `fedinstruct.deploy.components`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from fedinstruct.deploy.components import Components, NodeHandle
from fedinstruct.deploy.credentials import (
    make_certs,
    make_node_keys,
    write_connection,
)
from fedinstruct.deploy.network import Network, ensure_port_free, free_port, open_network
from fedinstruct.deploy.process import (
    DeploymentError,
    Harvester,
    ManagedProcess,
    describe,
    flower_env,
    flower_executable,
    living,
    processes_of,
    start_process,
    stop_managed,
    stop_processes,
    wait_for_log,
)
from fedinstruct.deploy.run import (
    ANSI,
    CONNECTION,
    RunHandle,
    RunResult,
    parse_json,
)
from fedinstruct.deploy.topology import (
    SUPERLINK_PORT,
    ConfigValue,
    Topology,
)

log = logging.getLogger("fedinstruct.deploy")


class LocalDeployment(Components):
    """SuperLink + SuperNodes as separate processes (and network namespaces) on this host.

    Use as a context manager: entering starts everything (certificates, keys, SuperLink,
    node registration, SuperNodes); leaving stops every process and checks none is left.
    Logs and generated files go to `workdir`; without one, a temporary folder that is removed
    after a clean stop unless keep_workdir=True. With warm=True (default) every SuperNode and
    the SuperLink start their app processes from a pre-imported parent (see
    `fedinstruct.deploy.warm`) instead of a cold Python start per message.

    The nodes stand for separate machines but share this host's cores: each gets its share
    (`node_threads`, default cores // nodes, at least 1) as its math-library thread count, as
    Flower's simulation does for its client actors. Oversubscribed OpenMP threads spin against
    each other and would make every node several times slower than a machine of its own.
    """

    def __init__(self, app_dir: str | Path, num_nodes: int = 2, *, tls: bool = True,
                 auth: bool = True, run_config: Mapping[str, ConfigValue] | None = None,
                 data_paths: Sequence[str] | None = None,
                 node_configs: Sequence[Mapping[str, ConfigValue]] | None = None,
                 isolation: str = "auto", workdir: str | Path | None = None,
                 database: str | None = "state.db", superlink_port: int | None = None,
                 env: Mapping[str, str] | None = None,
                 node_env: Sequence[Mapping[str, str]] | None = None,
                 start_timeout: float = 120.0, keep_workdir: bool = False,
                 warm: bool = True, node_threads: int | None = None) -> None:
        self.app_dir = Path(app_dir).resolve()
        if not (self.app_dir / "pyproject.toml").is_file():
            raise DeploymentError(f"app_dir {self.app_dir} has no pyproject.toml")
        self.topology = Topology(num_nodes=num_nodes, tls=tls, auth=auth, data_paths=data_paths,
                                 node_configs=node_configs)
        if node_env is not None and len(node_env) != num_nodes:
            raise ValueError(f"node_env has {len(node_env)} entries for {num_nodes} nodes")
        self.run_config = dict(run_config or {})
        self.isolation, self.database = isolation, database
        self.requested_port, self.start_timeout = superlink_port, start_timeout
        self.env, self.node_env = dict(env or {}), list(node_env or [{}] * num_nodes)
        self.node_threads = node_threads or max(1, (os.cpu_count() or 1) // num_nodes)
        self._tmp = None if workdir else tempfile.mkdtemp(prefix="fedinstruct-deploy-")
        self.keep_workdir = keep_workdir
        self.workdir = Path(workdir or self._tmp).resolve()
        self.certs_dir = self.workdir / "certs" if tls else None
        self.keys_dir = self.workdir / "keys" if auth else None
        self.ctl_home = self.workdir / "ctl" / "flwr-home"
        self.network: Network | None = None
        self.superlink: ManagedProcess | None = None
        self.superlink_address = ""
        self.nodes: dict[str, NodeHandle] = {}
        self._streams: list[ManagedProcess] = []
        self._runs = 0
        self._harvester = Harvester()
        self.warm = warm
        self.superlink_warm: ManagedProcess | None = None
        self._sockets: str | None = None  # short folder: Unix socket paths are limited

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop(check=False)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(check=exc[0] is None)

    def start(self) -> None:
        """Network, certificates, keys, SuperLink, registration, then every SuperNode."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._harvester.start()
        log.info("deployment: %d nodes, tls=%s, auth=%s, workdir %s", self.topology.num_nodes,
                 self.topology.tls, self.topology.auth, self.workdir)
        self.network = open_network(self.isolation)
        link_host = self.network.add_member("superlink")
        self.network.add_member("ctl")
        if self.network.isolated:
            port, bind = self.requested_port or SUPERLINK_PORT, "0.0.0.0"
        else:
            bind = link_host
            port = self.requested_port or free_port(link_host)
            ensure_port_free(link_host, port, "SuperLink")
        self.superlink_address = f"{link_host}:{port}"
        if self.certs_dir is not None:
            make_certs(self.certs_dir, "localhost", "127.0.0.1", link_host)
        names = [self.topology.node_name(i) for i in range(self.topology.num_nodes)]
        if self.keys_dir is not None:
            make_node_keys(self.keys_dir, *names)
        write_connection(self.ctl_home, CONNECTION, self.superlink_address,
                         self.certs_dir / "ca.crt" if self.certs_dir else None)
        self._start_superlink(bind, port)
        node_ids = self._register(*names) if self.keys_dir is not None else {}
        for index, name in enumerate(names):
            self.add_node(name, index=index, wait=False, register=False)
            self.nodes[name].node_id = node_ids.get(name)
        for handle in list(self.nodes.values()):
            self.wait_node(handle.name)
        for warm in [self.superlink_warm, *(h.warm for h in self.nodes.values())]:
            if warm is not None:
                self._wait_warm(warm)
        log.info("deployment ready: SuperLink %s (%s network), nodes %s", self.superlink_address,
                 self.network.kind, {n: h.node_id for n, h in self.nodes.items()})

    def stop(self, check: bool = True) -> None:
        """Stop runs' log streams, nodes, SuperLink; remove namespaces; verify nothing is left.

        Stopping twice is harmless (the second call finds nothing to stop).
        """
        errors = []
        # Nodes first (they deactivate themselves at the SuperLink), then the SuperLink.
        link = [p for p in (self.superlink, self.superlink_warm) if p is not None]
        phases = [[p for p in self._processes() if p not in link], link]
        for phase in phases:
            try:
                stop_managed(*phase)
            except DeploymentError as err:
                errors.append(str(err))
        self._harvester.close()
        if self.network is not None:  # anything else inside the namespaces
            stop_processes(processes_of(self.network.pids()))
        left = self.leftover_processes()
        if self.network is not None:
            try:
                self.network.close()
            except RuntimeError as err:
                errors.append(str(err))
        if left:
            errors.append(f"processes left after stop: {describe(left)}")
        log.info("deployment stopped%s", f" with errors: {errors}" if errors else "")
        if self._sockets:
            shutil.rmtree(self._sockets, ignore_errors=True)
        if self._tmp and not errors and not self.keep_workdir:
            shutil.rmtree(self._tmp, ignore_errors=True)
        if errors and check:
            raise DeploymentError("; ".join(errors))

    def leftover_processes(self) -> list[psutil.Process]:
        """Processes of this deployment still running (should be empty after stop())."""
        tracked: dict[int, psutil.Process] = {}
        for proc in self._processes():
            tracked.update(proc.tracked)
        if self.network is not None:
            for proc in processes_of(self.network.pids()):
                tracked.setdefault(proc.pid, proc)
        return living(tracked.values())

    def status_report(self, log_lines: int = 25) -> str:
        """Which components are alive, what they spawned, and the end of every log."""
        lines = [f"{proc.name}: {'alive' if proc.alive() else 'exited'}; running: "
                 f"{describe(living(proc.tracked.values()))}" for proc in self._processes()]
        for path in sorted(self.workdir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-log_lines:]
            lines += [f"----- {path.name} (last {len(tail)} lines)", *tail]
        return "\n".join(lines)

    def _processes(self) -> list[ManagedProcess]:
        """Every component started: run streams, nodes, SuperLink, warm servers."""
        found = [*self._streams, self.superlink, self.superlink_warm,
                 *(p for h in self.nodes.values() for p in (h.process, h.warm))]
        return [p for p in found if p is not None]

    # ----------------------------------------------------------------- flwr CLI
    def flwr(self, *args: str, check: bool = True, timeout: float = 120.0
             ) -> subprocess.CompletedProcess[str]:
        """Run the `flwr` CLI as the operator (in its namespace, with the deployment's config)."""
        assert self.network is not None
        argv = [*self.network.exec_prefix("ctl"), flower_executable("flwr"), *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                env=flower_env(self.ctl_home, self.env), check=False)
        if check and result.returncode != 0:
            raise DeploymentError(f"`flwr {' '.join(args)}` failed ({result.returncode}):\n"
                                  f"{ANSI.sub('', result.stdout + result.stderr).strip()}")
        return result

    def flwr_json(self, *args: str) -> dict[str, Any]:
        """Run `flwr ... --format json` and parse its answer."""
        return parse_json(self.flwr(*args, "--format", "json").stdout, f"flwr {args[0]}")

    def list_nodes(self) -> list[dict[str, Any]]:
        """The SuperLink's view of the nodes (`flwr supernode ls`)."""
        return self.flwr_json("supernode", "ls", CONNECTION)["nodes"]

    def start_run(self, run_config: Mapping[str, ConfigValue] | None = None,
                  app_dir: str | Path | None = None) -> RunHandle:
        """Submit the app (`flwr run APP fedinstruct --stream`) and return once it has a run id."""
        assert self.network is not None
        self._runs += 1
        config = {**self.run_config, **(run_config or {})}
        argv = [*self.network.exec_prefix("ctl"), flower_executable("flwr"), "run",
                str(Path(app_dir).resolve() if app_dir else self.app_dir), CONNECTION, "--stream"]
        if config:
            path = self.workdir / "ctl" / f"run-config-{self._runs}.toml"
            # flat keys ("dataset.source" = ...): Flower's run config keys may contain dots,
            # and a group choice (dataset = "dolly") can sit next to its sub-keys
            path.write_text(tomli_w.dumps(config))
            argv += ["--run-config", str(path)]
        stream = self._harvester.watch(start_process(
            f"run-{self._runs}", argv, self.workdir / f"run-{self._runs}.log",
            flower_env(self.ctl_home, self.env)))
        self._streams.append(stream)
        match = wait_for_log(stream, r"Successfully started run (\d+)", self.start_timeout)
        log.info("run %s started", match.group(1))
        return RunHandle(self, int(match.group(1)), stream)

    def run(self, timeout: float = 600.0, run_config: Mapping[str, ConfigValue] | None = None,
            app_dir: str | Path | None = None) -> RunResult:
        """Submit a run and wait for it to finish; RunTimeout if it does not in time."""
        return self.start_run(run_config, app_dir).wait(timeout)
