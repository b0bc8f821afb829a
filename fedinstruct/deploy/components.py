"""The components of a `LocalDeployment`: its SuperLink, its SuperNodes and their warm servers.

`Components` starts each of them as its own process in its network namespace member, waits
until it is up, and stops or restarts single nodes (e.g. to test a crash). It is the base of
`fedinstruct.deploy.local.LocalDeployment`, which sets up the state it works on (network,
certificates, keys, workdir) and runs the deployment's lifecycle and its runs.
"""

from __future__ import annotations

import logging
import signal
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedinstruct.deploy.credentials import make_node_keys, register_nodes
from fedinstruct.deploy.launcher import READY, route_to_server, server_command
from fedinstruct.deploy.network import Network, free_port
from fedinstruct.deploy.process import (
    DeploymentError,
    Harvester,
    ManagedProcess,
    flower_env,
    flower_executable,
    start_process,
    stop_managed,
    thread_env,
    wait_for_log,
)
from fedinstruct.deploy.run import CONNECTION
from fedinstruct.deploy.topology import ConfigValue, Topology

log = logging.getLogger("fedinstruct.deploy")


@dataclass
class NodeHandle:
    """A started SuperNode."""

    name: str
    index: int | None
    argv: list[str]
    env: dict[str, str]
    process: ManagedProcess
    member: str
    node_id: int | None = None
    warm: ManagedProcess | None = None  # its warm ClientApp server (warm=True)


class Components:
    """Start, wait for, stop and restart the SuperLink, the SuperNodes and their warm servers.

    A base class: `LocalDeployment.__init__` sets the state declared here.
    """

    topology: Topology
    app_dir: Path
    workdir: Path
    ctl_home: Path
    certs_dir: Path | None
    keys_dir: Path | None
    database: str | None
    env: dict[str, str]
    node_env: list[Mapping[str, str]]
    node_threads: int
    start_timeout: float
    warm: bool
    network: Network | None
    superlink: ManagedProcess | None
    superlink_warm: ManagedProcess | None
    superlink_address: str
    nodes: dict[str, NodeHandle]
    _harvester: Harvester
    _sockets: str | None

    def _start_warm(self, owner: str, member: str, command: str,
                    env: dict[str, str]) -> ManagedProcess | None:
        """Start owner's warm app server (not waited for) and route `command` in env to it."""
        if not self.warm:
            return None
        assert self.network is not None
        self._sockets = self._sockets or tempfile.mkdtemp(prefix="fiw-")  # short paths
        socket_path, shims = Path(self._sockets) / f"{owner}.sock", self.workdir / owner / "bin"
        argv = [*self.network.exec_prefix(member),
                *server_command(command, socket_path, shims, self.app_dir)]
        process = self._harvester.watch(start_process(
            f"{owner}-warm", argv, self.workdir / f"{owner}-warm.log", env))
        route_to_server(env, socket_path, shims)
        return process

    def _wait_warm(self, process: ManagedProcess, offset: int = 0) -> None:
        wait_for_log(process, READY, self.start_timeout, offset=offset)

    def _member_env(self, member: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return flower_env(self.workdir / member / "flwr-home", {**self.env, **(extra or {})})

    def _start_superlink(self, bind: str, port: int) -> None:
        assert self.network is not None
        database = None
        if self.database is not None:
            database = self.database if self.database.startswith(":") else str(
                (self.workdir / "superlink" / self.database).resolve())
        argv = [*self.network.exec_prefix("superlink"), flower_executable("flower-superlink"),
                *self.topology.superlink_args(host=bind, port=port, certs_dir=self.certs_dir,
                                              database=database)]
        env = self._member_env("superlink")
        self.superlink_warm = self._start_warm("superlink", "superlink", "flwr-serverapp", env)
        self.superlink = self._harvester.watch(start_process(
            "superlink", argv, self.workdir / "superlink.log", env))
        wait_for_log(self.superlink, r"Starting Flower SuperExec", self.start_timeout,
                     failure_patterns=[r"address already in use", r"Exit Code: \d+"])

    def add_node(self, name: str, *, index: int | None = None,
                 node_config: Mapping[str, ConfigValue] | None = None, register: bool = True,
                 wait: bool = True) -> NodeHandle:
        """Start a SuperNode. index selects a topology node; others need node_config.

        register=False starts a node whose key the SuperLink does not know (auth refuses it).
        """
        assert self.network is not None
        if name in self.nodes:
            raise DeploymentError(f"node {name!r} exists; use restart_node")
        if node_config is None:
            if index is None:
                raise ValueError(f"node {name!r}: give index or node_config")
            node_config = self.topology.node_config(index)
        member = f"n{len(self.nodes)}"
        address = self.network.add_member(member)
        if self.keys_dir is not None and not (self.keys_dir / name).exists():
            make_node_keys(self.keys_dir, name)
        node_id = None
        if self.keys_dir is not None and register:
            node_id = self._register(name)[name]
        host = "127.0.0.1" if self.network.isolated else address
        port = None if self.network.isolated else free_port(host)
        args = self.topology.supernode_args(
            index or 0, superlink=self.superlink_address, certs_dir=self.certs_dir,
            keys_dir=self.keys_dir, host=host, port=port, key_name=name, node_config=node_config)
        argv = [*self.network.exec_prefix(member), flower_executable("flower-supernode"), *args]
        env = self._member_env(name, {**thread_env(self.node_threads),
                                      **(self.node_env[index] if index is not None else {})})
        warm = self._start_warm(name, member, "flwr-clientapp", env)
        process = self._harvester.watch(start_process(name, argv, self.workdir / f"{name}.log",
                                                      env))
        handle = NodeHandle(name, index, argv, env, process, member, node_id, warm)
        self.nodes[name] = handle
        if wait:
            self.wait_node(name)
            if warm is not None:
                self._wait_warm(warm)
        return handle

    def wait_node(self, name: str, offset: int = 0) -> int:
        """Wait until the node is connected; return its node id."""
        handle = self.nodes[name]
        match = wait_for_log(handle.process, r"SuperNode ID: (\d+)", self.start_timeout,
                             offset=offset, failure_patterns=[r"Exit Code: \d+"])
        handle.node_id = int(match.group(1))
        log.info("node %s connected as %d", name, handle.node_id)
        return handle.node_id

    def _register(self, *names: str) -> dict[str, int]:
        assert self.keys_dir is not None and self.network is not None
        return register_nodes([self.keys_dir / f"{name}.pub" for name in names], CONNECTION,
                              prefix=self.network.exec_prefix("ctl"),
                              env=flower_env(self.ctl_home, self.env), timeout=self.start_timeout)

    def kill_node(self, name_or_index: str | int, sig: int = signal.SIGKILL) -> None:
        """Stop a node and everything it spawned (SIGKILL by default: like a crash)."""
        handle = self.nodes[self._name(name_or_index)]
        log.info("killing node %s with signal %d", handle.name, sig)
        stop_managed(*(p for p in (handle.process, handle.warm) if p is not None), sig=sig)

    def restart_node(self, name_or_index: str | int, wait: bool = True) -> NodeHandle:
        """Start a stopped (or running: it is stopped first) node again with the same command.

        After a crash (SIGKILL) the SuperLink keeps an authenticated node marked online until
        its heartbeat lapses (up to 2 x 30 s) and refuses the same identity until then; with
        wait=True the start is retried until start_timeout.
        """
        handle = self.nodes[self._name(name_or_index)]
        running = [p for p in (handle.process, handle.warm) if p is not None and p.alive()]
        if running:
            stop_managed(*running)
        warm_offset = 0
        if handle.warm is not None:
            old_warm = handle.warm
            warm_offset = old_warm.log_size()
            handle.warm = self._harvester.watch(start_process(
                old_warm.name, old_warm.argv, old_warm.log_path, handle.env))
            handle.warm.tracked.update(old_warm.tracked)
        deadline = time.monotonic() + self.start_timeout
        while True:
            offset = handle.process.log_size()
            old = handle.process
            handle.process = self._harvester.watch(
                start_process(handle.name, handle.argv, old.log_path, handle.env))
            handle.process.tracked.update(old.tracked)
            if not wait:
                return handle
            try:
                self.wait_node(handle.name, offset=offset)
                if handle.warm is not None:
                    self._wait_warm(handle.warm, offset=warm_offset)
                return handle
            except DeploymentError:
                refused = "Failed to activate SuperNode" in handle.process.log_text(offset)
                if not refused or handle.node_id is None or time.monotonic() > deadline:
                    raise
            stop_managed(handle.process)
            log.info("node %s: SuperLink still sees it online (unclean stop); retrying in 5 s",
                     handle.name)
            time.sleep(5.0)

    def _name(self, name_or_index: str | int) -> str:
        name = (self.topology.node_name(name_or_index) if isinstance(name_or_index, int)
                else name_or_index)
        if name not in self.nodes:
            raise KeyError(f"no node {name!r}; nodes: {sorted(self.nodes)}")
        return name

