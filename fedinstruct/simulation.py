"""Run one federation as a Flower simulation in this process (the `fedinstruct` CLI, tests)."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.simulation import run_simulation

from fedinstruct.client_app import make_client_app
from fedinstruct.config import RunConfig
from fedinstruct.server.output import RunOutput
from fedinstruct.server.resume import check_output_dir
from fedinstruct.server_app import make_server_app


def simulate(cfg: RunConfig) -> Path:
    """Run `cfg` with `federation.num_clients` virtual SuperNodes; return the run folder."""
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Relative output folders are resolved here, not in the simulation's worker processes.
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    # What run_server checks first, here too: a run that cannot start fails before Ray starts.
    check_output_dir(cfg)
    with RunOutput(cfg.output_dir).lock():
        pass  # another run holds the folder: OutputInUse now (run_server locks it for the run)
    resources = {"num_cpus": cfg.federation.client_cpus, "num_gpus": cfg.federation.client_gpus}
    run_simulation(
        server_app=make_server_app(cfg),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.federation.num_clients,
        backend_config={"client_resources": resources, "init_args": {"log_to_driver": True}},
    )
    return Path(cfg.output_dir)
