"""Run one federation as a Flower simulation in this process (the `fedinstruct` CLI, tests).

Flower 1.41 deprecates its Python entry point `flwr.simulation.run_simulation` in favour of
`flwr run`, which starts a SuperLink and a separate `flwr-simulation` process and rebuilds the
config from the flat run_config. Its public replacement, `run_simulation_process`, serves a
SuperLink's SimulationIo API and is no in-process route either. Both `run_simulation` and that
process run `flwr.simulation.run_simulation._run_simulation`, the Simulation Runtime itself, with
no deprecation; fedinstruct calls it directly: in-process, the apps passed as objects, and as
fast as before (flwr is pinned to 1.41.x in pyproject.toml, and tests/test_cli.py checks the
signature used here). `flwr run .` remains the Flower way (README).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from fedinstruct.client_app import make_client_app
from fedinstruct.config import RunConfig
from fedinstruct.logs import verbose
from fedinstruct.server.output import RunOutput
from fedinstruct.server.resume import check_output_dir
from fedinstruct.server_app import make_server_app

RAY_WORKER_SETUP = "fedinstruct.logs.setup_ray_worker"


def simulate(cfg: RunConfig) -> Path:
    """Run `cfg` with `federation.num_clients` virtual SuperNodes; return the run folder."""
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Relative output folders are resolved here, not in the simulation's worker processes.
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    # What run_server checks first, here too: a run that cannot start fails before Ray starts.
    check_output_dir(cfg)
    with RunOutput(cfg.output_dir).lock():
        pass  # another run holds the folder: OutputInUse now (run_server locks it for the run)
    resources = {"num_cpus": cfg.federation.client_cpus, "num_gpus": cfg.federation.client_gpus}
    started_ray = _start_ray()
    try:
        _run_simulation(
            num_supernodes=cfg.federation.num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=make_client_app(cfg),
            server_app=make_server_app(cfg),
            backend_config={"client_resources": resources},
            verbose_logging=verbose(),
        )
    finally:
        if started_ray:
            _stop_ray()
    return Path(cfg.output_dir)


def _start_ray() -> bool:
    """Start Ray as Flower's Ray backend would (it keeps a running one), plus a worker setup
    hook: each client worker filters library noise and shows no progress bars before it
    imports anything (fedinstruct.logs.setup_ray_worker). False: Ray was running already."""
    import ray

    if ray.is_initialized():
        return False
    pythonpath = os.pathsep.join(sys.path)  # what Flower's backend passes on, too
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath},
                     "worker_process_setup_hook": RAY_WORKER_SETUP},
        include_dashboard=False,
        logging_level=logging.DEBUG if verbose() else logging.WARNING,
        log_to_driver=True,
    )
    return True


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():  # Flower's backend shuts it down at the end of a run
        ray.shutdown()
