"""Who runs with which flags: one SuperLink and N SuperNodes, as command-line arguments.

Shared by local deployments (`fedinstruct.deploy`) and the generated Compose files
(scripts/compose-nodes.py), so both run exactly the same flags, ports and node configs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SUPERLINK_PORT = 9093  # Control, Fleet and Runtime APIs share one HTTP port in Flower 1.41
SUPERNODE_RUNTIME_PORT = 9094  # the SuperNode's local API for its ClientApp processes
ConfigValue = str | int | float | bool


def format_config(config: Mapping[str, ConfigValue]) -> str:
    """`key=value ...` as `--node-config` parses it (strings quoted, TOML scalars)."""
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ValueError(f"node-config key {key!r}: use letters, digits, '_', '-', '.'")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif isinstance(value, str) and '"' not in value and "'" not in value:
            text = f'"{value}"'
        else:
            raise ValueError(f"node-config {key}={value!r}: need a number, bool or unquoted str")
        parts.append(f"{key}={text}")
    return " ".join(parts)


@dataclass
class Topology:
    """One SuperLink and `num_nodes` SuperNodes; builds every component's command line."""

    num_nodes: int = 2
    tls: bool = True
    auth: bool = True
    superlink_port: int = SUPERLINK_PORT
    node_runtime_port: int = SUPERNODE_RUNTIME_PORT
    data_paths: Sequence[str] | None = None  # adds data-path=... to node i's config
    node_configs: Sequence[Mapping[str, ConfigValue]] | None = None  # replaces the defaults

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {self.num_nodes}")
        if self.auth and not self.tls:
            raise ValueError("auth=True needs tls=True: Flower refuses node auth without TLS")
        for name, seq in (("data_paths", self.data_paths), ("node_configs", self.node_configs)):
            if seq is not None and len(seq) != self.num_nodes:
                raise ValueError(f"{name} has {len(seq)} entries for {self.num_nodes} nodes")

    def node_name(self, index: int) -> str:
        return f"node-{index}"

    def node_config(self, index: int) -> dict[str, ConfigValue]:
        if self.node_configs is not None:
            return dict(self.node_configs[index])
        config: dict[str, ConfigValue] = {"partition-id": index, "num-partitions": self.num_nodes}
        if self.data_paths is not None:
            config["data-path"] = str(self.data_paths[index])
        return config

    def superlink_args(self, *, host: str, certs_dir: Path | None, database: str | None,
                       port: int | None = None) -> list[str]:
        """Arguments of `flower-superlink` (after the program name)."""
        args: list[str] = []
        if self.tls:
            certs = _require(certs_dir, "certs_dir")
            args += ["--ssl-ca-certfile", str(certs / "ca.crt"),
                     "--ssl-certfile", str(certs / "server.pem"),
                     "--ssl-keyfile", str(certs / "server.key")]
        else:
            args.append("--insecure")
        if self.auth:
            args.append("--enable-supernode-auth")
        if database is not None:
            args += ["--database", database]
        args += ["--host", host, "--port", str(port or self.superlink_port),
                 "--disable-runtime-dependency-installation"]
        return args

    def supernode_args(self, index: int, *, superlink: str, certs_dir: Path | None,
                       keys_dir: Path | None, host: str = "127.0.0.1", port: int | None = None,
                       node_config: Mapping[str, ConfigValue] | None = None,
                       key_name: str | None = None) -> list[str]:
        """Arguments of `flower-supernode` for node `index` (after the program name)."""
        args = ["--superlink", superlink]
        if self.tls:
            args += ["--root-certificates", str(_require(certs_dir, "certs_dir") / "ca.crt")]
        else:
            args.append("--insecure")
        if self.auth:
            key = _require(keys_dir, "keys_dir") / (key_name or self.node_name(index))
            args += ["--auth-supernode-private-key", str(key)]
        config = self.node_config(index) if node_config is None else node_config
        args += ["--node-config", format_config(config),
                 "--host", host, "--port", str(port or self.node_runtime_port)]
        return args


def _require(value: Path | None, name: str) -> Path:
    if value is None:
        raise ValueError(f"{name} is required with this topology (tls/auth enabled)")
    return value
