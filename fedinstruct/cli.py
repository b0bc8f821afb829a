"""`fedinstruct`: run a federation as a Flower simulation, configured with Hydra.

    fedinstruct                                   # the default run
    fedinstruct model=tiny num_rounds=2           # overrides
    fedinstruct -m selection=all,fedhds seed=1,2  # a sweep: one simulation and folder per job

A sweep ends with a summary table of all jobs (also written as summary.md in the sweep folder).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fedinstruct.compose import CONF_DIR, to_run_config
from fedinstruct.config import ConfigError
from fedinstruct.logs import setup_logging
from fedinstruct.server.output import OutputInUse, read_metrics

log = logging.getLogger("fedinstruct.cli")

SUMMARY_KEYS = ("eval_loss", "eval_rougeL", "emu_eval_rougeL", "train_samples", "time_round")


def _job_output_dir(cfg: DictConfig) -> str:
    """Hydra's job folder, unless the user set `output_dir=` explicitly."""
    hydra_cfg = HydraConfig.get()
    if any(o.startswith("output_dir=") for o in hydra_cfg.overrides.task):
        return str(cfg.output_dir)
    return hydra_cfg.runtime.output_dir


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _run(cfg: DictConfig) -> float | None:
    setup_logging()
    cfg.output_dir = _job_output_dir(cfg)
    try:
        run_config = to_run_config(cfg)
    except ConfigError as err:
        print(f"fedinstruct: configuration error: {err}", file=sys.stderr)
        sys.exit(2)
    from fedinstruct.simulation import simulate  # heavy imports after the config is valid

    try:
        folder = simulate(run_config)  # resume=true without a checkpoint, a locked output_dir
    except (ConfigError, OutputInUse) as err:
        print(f"fedinstruct: cannot run: {err}", file=sys.stderr)
        sys.exit(2)
    rows = read_metrics(folder)
    final = rows[-1] if rows else {}
    log.info("Run folder: %s", folder)
    return final.get("eval_rougeL")


class SweepSummary(Callback):
    """After a `-m` sweep: one table row per job with its overrides and final metrics."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        lines = ["| job | overrides | " + " | ".join(SUMMARY_KEYS) + " |"]
        lines.append("|" + "---|" * (len(SUMMARY_KEYS) + 2))
        for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()):
            overrides_file = job_dir / ".hydra" / "overrides.yaml"
            overrides = (
                overrides_file.read_text().replace("\n- ", " ").strip("- \n")
                if overrides_file.exists()
                else ""
            )
            rows = read_metrics(job_dir)
            final = rows[-1] if rows else {}
            cells = [_fmt(final.get(key)) for key in SUMMARY_KEYS]
            lines.append(f"| {job_dir.name} | {overrides} | " + " | ".join(cells) + " |")
        table = "\n".join(lines)
        (sweep_dir / "summary.md").write_text(table + "\n")
        print(f"\nSweep summary ({sweep_dir}):\n{table}")


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def main() -> None:
    _run()


if __name__ == "__main__":
    main()
