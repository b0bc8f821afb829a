"""Where the components of a local deployment live on the network.

`NamespaceNetwork` gives every component (SuperLink, the operator's CLI, each SuperNode) its own
Linux network namespace, joined by veth links to a bridge inside a separate switch namespace, so
nodes reach the SuperLink only over a real (virtual) network and the host's own network is never
touched. `LoopbackNetwork` is the fallback where namespaces are unavailable (no root, no
iproute2): components get distinct 127.x.y.z addresses on the host's loopback.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import shutil
import socket
import subprocess
from typing import Protocol

from fedinstruct.deploy.process import DeploymentError

log = logging.getLogger("fedinstruct.deploy")

NAMESPACE_SUBNET = ipaddress.ip_network("10.77.0.0/24")


class NetworkError(DeploymentError):
    """Setting up or tearing down the deployment network failed."""


class Network(Protocol):
    """What a deployment needs from its network."""

    kind: str
    isolated: bool  # each member has its own network stack, so fixed ports never collide

    def add_member(self, member: str) -> str:
        """Create a place for a component; return the address others reach it at."""
        ...

    def exec_prefix(self, member: str) -> list[str]:
        """argv prefix that runs a command inside the member's network."""
        ...

    def pids(self) -> set[int]:
        """Every process inside this network's namespaces (empty for loopback)."""
        ...

    def close(self) -> None:
        """Remove everything this network created."""
        ...


def _ip(*args: str) -> str:
    """Run `ip ARGS`, raising NetworkError with its stderr on failure."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetworkError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout


def netns_unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if shutil.which("ip") is None:
        return "the iproute2 `ip` command is not installed"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"fi{secrets.token_hex(3)}-probe"
    try:
        _ip("netns", "add", probe)
    except NetworkError as err:
        return str(err)
    try:  # the kernel must also offer bridges and veth pairs
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    except NetworkError as err:
        return str(err)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


class NamespaceNetwork:
    """One namespace per component, all bridged in a private switch namespace."""

    kind = "netns"
    isolated = True

    def __init__(self, subnet: ipaddress.IPv4Network = NAMESPACE_SUBNET) -> None:
        self.tag = f"fi{secrets.token_hex(3)}"
        self.subnet = subnet
        self.switch = f"{self.tag}-sw"
        self.members: dict[str, str] = {}  # member -> namespace
        self.addresses: dict[str, str] = {}
        self._hosts = iter(subnet.hosts())
        _ip("netns", "add", self.switch)
        try:
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except NetworkError:
            self.close()
            raise
        log.info("network: namespaces %s-* bridged by br0 in %s, subnet %s",
                 self.tag, self.switch, subnet)

    def namespace(self, member: str) -> str:
        return self.members[member]

    def add_member(self, member: str) -> str:
        if member in self.addresses:
            return self.addresses[member]
        namespace = f"{self.tag}-{member}"
        veth = f"v{len(self.members)}"
        address = str(next(self._hosts))
        _ip("netns", "add", namespace)
        self.members[member] = namespace
        _ip("-n", self.switch, "link", "add", veth, "type", "veth",
            "peer", "name", "eth0", "netns", namespace)
        _ip("-n", self.switch, "link", "set", veth, "master", "br0", "up")
        _ip("-n", namespace, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        self.addresses[member] = address
        log.info("network: %s in namespace %s at %s", member, namespace, address)
        return address

    def exec_prefix(self, member: str) -> list[str]:
        return ["ip", "netns", "exec", self.members[member]]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for namespace in [self.switch, *self.members.values()]:
            try:
                found.update(int(p) for p in _ip("netns", "pids", namespace).split())
            except NetworkError:
                continue
        return found

    def close(self) -> None:
        errors = []
        for namespace in [*self.members.values(), self.switch]:
            try:
                _ip("netns", "del", namespace)
            except NetworkError as err:
                if "No such file" not in str(err):
                    errors.append(str(err))
        self.members.clear()
        if errors:
            raise NetworkError("; ".join(errors))
        log.info("network: removed namespaces %s-*", self.tag)


class LoopbackNetwork:
    """Distinct 127.a.b.x addresses on the host's loopback, one per component."""

    kind = "loopback"
    isolated = False

    def __init__(self) -> None:
        second, third = secrets.randbelow(200) + 20, secrets.randbelow(250) + 1
        self.base = f"127.{second}.{third}"
        self.addresses: dict[str, str] = {}
        log.info("network: loopback addresses %s.x", self.base)

    def add_member(self, member: str) -> str:
        if member not in self.addresses:
            self.addresses[member] = f"{self.base}.{len(self.addresses) + 1}"
            log.info("network: %s at %s", member, self.addresses[member])
        return self.addresses[member]

    def exec_prefix(self, member: str) -> list[str]:
        return []

    def pids(self) -> set[int]:
        return set()

    def close(self) -> None:
        self.addresses.clear()


def open_network(isolation: str = "auto") -> Network:
    """Namespaces when possible ("auto"), or as asked ("netns" / "loopback")."""
    if isolation not in ("auto", "netns", "loopback"):
        raise ValueError(f"isolation must be 'auto', 'netns' or 'loopback', got {isolation!r}")
    if isolation == "loopback":
        log.info("network: loopback addresses, as requested")
        return LoopbackNetwork()
    reason = netns_unavailable_reason()
    if reason is None:
        return NamespaceNetwork()
    if isolation == "netns":
        raise NetworkError(f"network namespaces requested but unavailable: {reason}")
    log.warning("network: namespaces unavailable (%s); falling back to loopback addresses",
                reason)
    return LoopbackNetwork()


def free_port(host: str) -> int:
    """A TCP port that is free on host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_port_free(host: str, port: int, what: str) -> None:
    """Fail early and clearly when a fixed port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise NetworkError(f"{what}: port {port} on {host} is in use ({err.strerror})") from err
