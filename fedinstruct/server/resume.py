"""Whether a run may use its output folder: a new run never writes over another run, and a
resumed run goes on with the config it started with (nothing else may be checkpointed into it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedinstruct.compose import to_container
from fedinstruct.config import ConfigError, RunConfig
from fedinstruct.server.output import CONFIG_FILE, RunOutput

log = logging.getLogger(__name__)

# What a resumed run may change: num_rounds (to extend the run), resume and output_dir (how the
# run is found), and what only decides how long the server waits, how many replies it needs and
# what it measures, never what it trains: the federation's timeouts, quorum and simulation
# resources, and eval.* (metrics only). A key ending in "." stands for all the keys under it.
RESUME_MAY_CHANGE = (
    "num_rounds", "resume", "output_dir", "federation.round_timeout",
    "federation.node_wait_timeout", "federation.min_replies", "federation.min_available_nodes",
    "federation.client_cpus", "federation.client_gpus", "eval.",
)


def _leaves(node: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`key: old -> new` for each key of `current` that a resumed run may not change. A key the
    saved config lacks (added to fedinstruct since) counts as its default."""
    old = dict(_leaves(to_container(RunConfig()))) | dict(_leaves(saved))
    return [
        f"{key}: {old[key]!r} -> {value!r}"
        for key, value in _leaves(current)
        if key in old and old[key] != value
        and not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE)
    ]


def check_output_dir(cfg: RunConfig) -> None:
    """A new run needs a folder that holds no other run; resume=true needs the run's folder
    with a checkpoint, and the config it started with. Reads only: nothing is written."""
    folder = Path(cfg.output_dir).expanduser().resolve()
    output = RunOutput(folder) if folder.is_dir() else None
    if not cfg.resume:
        if output is not None and (output.checkpoint_folder() or output.read_metrics()):
            raise ConfigError(f"output_dir {folder} holds another run: set resume=true to go on "
                              "with it, or choose another output_dir")
        return
    if output is None or output.checkpoint_folder() is None:
        raise ConfigError(f"resume=true but {folder} holds no checkpoint: set output_dir to the "
                          "folder of the run to resume")
    saved = output.saved_config()
    if saved is None:
        log.warning("%s has no %s: the resumed run's config is not checked against it",
                    folder, CONFIG_FILE)
    elif changes := config_changes(saved, to_container(cfg)):
        raise ConfigError(
            f"resume=true but the config differs from the one the run in {folder} started with: "
            f"{'; '.join(changes)}. Resume with the run's settings (num_rounds, timeouts and "
            "eval.* may change), or start a new run in another output_dir"
        )
