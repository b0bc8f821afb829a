"""What a deployment's operator prepares: TLS certificates, SuperNode keys, the `flwr` connection.

The certificates and keys come from scripts/make-certs.sh and scripts/make-node-keys.sh, the
same scripts the docs and the Docker images use, so every route makes identical files.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import tomli_w

from fedinstruct.deploy.process import DeploymentError

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
