"""Hints from a finished ClientApp task to the warm app server that forked it.

In deployment every message runs in a fresh ClientApp process. A task forked by the warm app
server (`fedinstruct.deploy.warm`) leaves a hint when it is done: which app, run config and
node config it ran. Between messages the server calls that app's `prewarm` hook, which loads
the run's base model into `fedinstruct.modeling.process_cache`; the next task is forked with
the model already in memory instead of loading it again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HINT_ENV = "FEDINSTRUCT_WARM_HINT"  # set by the warm app server in the tasks it forks


def leave_hint(app_module: str, app_dir: Path, run_config: Mapping[str, Any],
               node_config: Mapping[str, Any]) -> None:
    """Write the hint where the warm app server looks (nothing when not started by one)."""
    target = os.environ.get(HINT_ENV)
    if not target:
        return
    hint = {"module": app_module, "app_dir": str(app_dir),
            "run_config": dict(run_config), "node_config": dict(node_config)}
    partial = Path(f"{target}.{os.getpid()}")
    partial.write_text(json.dumps(hint))
    partial.replace(target)  # the server never reads a half-written hint


def take_hint(path: Path) -> dict[str, Any] | None:
    """Read and remove the latest hint; None if there is none (or it is unreadable)."""
    try:
        hint = json.loads(path.read_text())
        path.unlink()
    except (OSError, ValueError):
        return None
    return hint if isinstance(hint, dict) else None
