"""Deploy fedinstruct on a real SuperLink + SuperNodes topology.

- `local`: `LocalDeployment`, every component as its own process (and network namespace) here;
- `components`: starting, waiting for and restarting the SuperLink, SuperNodes (`NodeHandle`)
  and their warm app servers (`warm`: the server loop, `warm_setup`: its process's warm-up,
  `warm_requests`: its socket, peer checks and requests, `warm_task`: its forked tasks);
- `topology`: the command lines of each component, shared with the generated Compose files;
- `run`: submitted runs (`RunHandle`, `RunResult`);
- `process`: starting, watching and stopping the Flower processes;
- `network`: network namespaces bridged together, or loopback addresses as a fallback.
"""

from fedinstruct.deploy.components import NodeHandle
from fedinstruct.deploy.local import LocalDeployment
from fedinstruct.deploy.network import NetworkError, netns_unavailable_reason
from fedinstruct.deploy.process import DeploymentError
from fedinstruct.deploy.run import CONNECTION, RunHandle, RunResult, RunTimeout
from fedinstruct.deploy.topology import (
    SUPERLINK_PORT,
    SUPERNODE_RUNTIME_PORT,
    ConfigValue,
    Topology,
    format_config,
)

__all__ = [
    "CONNECTION",
    "SUPERLINK_PORT",
    "SUPERNODE_RUNTIME_PORT",
    "ConfigValue",
    "DeploymentError",
    "LocalDeployment",
    "NetworkError",
    "NodeHandle",
    "RunHandle",
    "RunResult",
    "RunTimeout",
    "Topology",
    "format_config",
    "netns_unavailable_reason",
]
