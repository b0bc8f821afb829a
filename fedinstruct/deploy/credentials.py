"""What a deployment's operator prepares: TLS certificates, SuperNode keys, the `flwr` connection.

The certificates and keys come from scripts/make-certs.sh and scripts/make-node-keys.sh, the
same scripts the docs and the Docker images use, so every route makes identical files.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from fedinstruct.deploy.process import DeploymentError, flower_executable
from fedinstruct.deploy.run import ANSI, parse_json

log = logging.getLogger("fedinstruct.deploy")

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run_script(name: str, *args: str) -> str:
    """Run one of scripts/*.sh; DeploymentError with its stderr when it fails."""
    script = SCRIPTS / name
    if not script.is_file():
        raise DeploymentError(f"{script} not found: run from a fedinstruct source checkout")
    result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise DeploymentError(f"{name} failed: {result.stderr.strip()}")
    log.info("%s: %s", name, result.stdout.strip().replace("\n", "; "))
    return result.stdout


def make_certs(folder: Path, *hosts: str) -> None:
    """A development CA and a SuperLink certificate valid for hosts (kept if present)."""
    run_script("make-certs.sh", str(folder), *hosts)


def make_node_keys(folder: Path, *names: str) -> None:
    """An ECDSA key pair per SuperNode name (kept if present)."""
    run_script("make-node-keys.sh", str(folder), *names)


def write_connection(flwr_home: Path, name: str, address: str, ca_cert: Path | None) -> Path:
    """FLWR_HOME/config.toml with one SuperLink connection, the default one."""
    connection: dict[str, Any] = {"address": address}
    if ca_cert is not None:
        connection["root-certificates"] = str(ca_cert)
    else:
        connection["insecure"] = True
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": name, name: connection}}))
    log.info("flwr connection %r -> %s in %s", name, address, path)
    return path


def register_nodes(public_keys: Sequence[Path], connection: str, *, prefix: Sequence[str] = (),
                   env: Mapping[str, str] | None = None, timeout: float = 120.0
                   ) -> dict[str, int]:
    """`flwr supernode register KEY.pub CONNECTION` for every key, concurrently.

    Returns the node id per key name (file name without .pub); prefix wraps each command (e.g.
    `ip netns exec NS`), env is the operator's environment (its FLWR_HOME holds the connection).
    """
    calls = {key.stem: subprocess.Popen(
        [*prefix, flower_executable("flwr"), "supernode", "register", str(key), connection,
         "--format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(env) if env is not None else None) for key in public_keys}
    node_ids = {}
    for name, call in calls.items():
        out, _ = call.communicate(timeout=timeout)
        if call.returncode != 0:
            raise DeploymentError(f"registering {name} failed:\n{ANSI.sub('', out)}")
        node_ids[name] = int(parse_json(out, "flwr supernode register")["node-id"])
        log.info("registered %s as node %d", name, node_ids[name])
    return node_ids
