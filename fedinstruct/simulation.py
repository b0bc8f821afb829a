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
from collections.abc import Callable
from pathlib import Path

from fedinstruct.client_app import make_client_app
from fedinstruct.config import RunConfig
from fedinstruct.logs import setup_logging, verbose
from fedinstruct.server.output import RunOutput
from fedinstruct.server.resume import check_output_dir
from fedinstruct.server_app import make_server_app

RAY_WORKER_SETUP = "fedinstruct.logs.setup_ray_worker"


def simulate(cfg: RunConfig) -> Path:
    """Run `cfg` with `federation.num_clients` virtual SuperNodes; return the run folder."""
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    setup_logging()  # again: importing Flower's simulation put its warning filters first

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
    restore = _poll_only_waiting_nodes()
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
        restore()
        if started_ray:
            _stop_ray()
    return Path(cfg.output_dir)


def _poll_only_waiting_nodes() -> Callable[[], None]:
    """Make the Simulation Runtime's message pump cost O(messages), not O(nodes); returns
    the function that puts Flower's own pump back.

    Flower 1.41's pump (`vce_api.add_messages_to_queue`) asks the in-memory LinkState for
    every registered node's messages every 0.1 s, and each ask scans every stored message:
    with 1,000 virtual nodes that is ~10,000 locked scans a second, about half a CPU core of
    pure overhead (bench/bench_wire.py: 1.03 against 0.60 CPU s per 1-s round of the server
    process), which on 2 busy cores starved the clients' training (one run, 10 of 1,000
    sampled: 34 s a round instead of 7 s). This pump reads the undelivered messages' nodes
    in one pass and asks only those nodes, through the same `get_message_ins` (which marks
    them delivered and drops expired ones), so idle nodes cost nothing. Any other LinkState
    keeps Flower's pump.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
        store, lock = getattr(state, "message_ins_store", None), getattr(state, "lock", None)
        if not isinstance(store, dict) or lock is None:
            original(state, queue, nodes_mapping, f_stop)
            return
        while not f_stop.is_set():
            with lock:
                waiting = {msg.metadata.dst_node_id for msg in store.values()
                           if msg.metadata.delivered_at == ""}
            for node_id in sorted(waiting):
                if node_id in nodes_mapping:
                    for msg in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(msg)
            f_stop.wait(0.1)

    vce_api.add_messages_to_queue = add_messages_to_queue

    def restore() -> None:
        vce_api.add_messages_to_queue = original

    return restore


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
        logging_level=logging.INFO if verbose() else logging.WARNING,
        log_to_driver=True,
    )
    return True


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():  # Flower's backend shuts it down at the end of a run
        ray.shutdown()
