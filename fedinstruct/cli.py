"""`fedinstruct`: run a federation as a Flower simulation, configured with Hydra; use its result.

    fedinstruct                                   # the default run
    fedinstruct model=tiny num_rounds=2           # overrides
    fedinstruct -m selection=all,fedhds seed=1,2  # a sweep: one simulation and folder per job
    fedinstruct -v ...                            # every log line (--debug: tracebacks too)
    fedinstruct eval|generate|export RUN_DIR ...  # a finished run's adapter (fedinstruct.use)

A sweep ends with a summary table of all jobs (also written as summary.md in the sweep folder).
The config and every data row the run reads are checked before the simulation starts: a bad
one fails in seconds with one line naming it (exit status 2).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fedinstruct.compose import CONF_DIR, to_run_config
from fedinstruct.config import ConfigError, EvalSettings, RunConfig
from fedinstruct.logs import set_verbose, setup_logging, terminal_logging
from fedinstruct.server.output import OutputInUse, read_metrics

log = logging.getLogger("fedinstruct.cli")

SUBCOMMANDS = ("eval", "generate", "export")
SUMMARY_KEYS = ("eval_loss", "eval_rougeL", "emu_eval_rougeL", "train_samples", "time_round")
LEDGER_KEYS = ("dp_epsilon", "dp_centroid_epsilon", "mb_total")  # shown where a job has them
TASK_METRICS = tuple(m for m in EvalSettings.METRICS if m not in ("loss", "rougeL"))
VERBOSE_FLAGS, DEBUG_FLAG = ("-v", "--verbose"), "--debug"


def _job_output_dir(cfg: DictConfig) -> str:
    """Hydra's job folder, unless the user set `output_dir=` explicitly."""
    hydra_cfg = HydraConfig.get()
    if any(o.startswith("output_dir=") for o in hydra_cfg.overrides.task):
        return str(cfg.output_dir)
    return hydra_cfg.runtime.output_dir


def _debug() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _fail(message: str, err: BaseException) -> None:
    """One line and exit status 2; the traceback with --debug (or HYDRA_FULL_ERROR=1)."""
    if _debug():
        raise err
    print(f"fedinstruct: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _run(cfg: DictConfig) -> float | None:
    setup_logging()
    cfg.output_dir = _job_output_dir(cfg)
    try:
        run_config = to_run_config(cfg)
    except ConfigError as err:
        _fail(f"configuration error: {err}", err)
    try:
        check_run_data(run_config)  # every row the run reads, before Ray and any model start
    except (ConfigError, ValueError, OSError) as err:
        _fail(data_error_message(err), err)
    terminal_logging()  # imports Flower: after the checks, which must fail fast
    from fedinstruct.simulation import simulate  # heavy imports after the config is valid

    try:
        folder = simulate(run_config)  # resume=true without a checkpoint, a locked output_dir
    except (ConfigError, OutputInUse) as err:
        _fail(f"cannot run: {err}", err)
    rows = read_metrics(folder)
    final = rows[-1] if rows else {}
    log.info("Run folder: %s", folder)
    return final.get("eval_rougeL")


# -- data, checked before the run -------------------------------------------------------------
def check_run_data(cfg: RunConfig) -> None:
    """Load every client's rows and the held-out rows as the run will (the loader validates
    each row), and check that the held-out rows allow the chosen metrics. The pools stay
    cached in this process, where the ServerApp reads its held-out rows again."""
    from fedinstruct.data.federated import client_dataset, test_dataset
    from fedinstruct.server.evaluation import check_held_out

    for partition in range(cfg.federation.num_clients):
        client_dataset(cfg, partition, cfg.federation.num_clients)
    if cfg.eval.every > 0:
        check_held_out(cfg, test_dataset(cfg))


def data_error_message(err: BaseException) -> str:
    """The error's one line; a row of a JSON Lines or CSV file also gets its line number."""
    from fedinstruct.data import DatasetError

    if isinstance(err, DatasetError) and err.line is None and err.row is not None:
        line = _line_of_row(Path(err.source), err.row)
        if line is not None:
            err = DatasetError(err.source, err.problem, row=err.row, field=err.field, line=line)
    if isinstance(err, FileNotFoundError) and err.filename and str(err.filename) not in str(err):
        return f"{err.strerror or err}: {err.filename}"
    return str(err)


def _line_of_row(path: Path, row: int) -> int | None:
    """The line a row starts on: JSON Lines (blank lines skipped) and CSV (header first)."""
    suffix = path.suffix.lower()
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if suffix == ".jsonl":
                rows = (number for number, text in enumerate(handle, 1) if text.strip())
                return next((n for i, n in enumerate(rows) if i == row), None)
            if suffix == ".csv":
                reader = csv.reader(handle)
                start = 1
                for index, _ in enumerate(reader, start=-1):  # the header is index -1
                    if index == row:
                        return start
                    start = reader.line_num + 1
    except OSError:
        return None
    return None


# -- sweep summary ---------------------------------------------------------------------------
class SweepSummary(Callback):
    """After a `-m` sweep: one table row per job with its overrides and final metrics."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = []
        for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()):
            overrides_file = job_dir / ".hydra" / "overrides.yaml"
            overrides = (
                overrides_file.read_text().replace("\n- ", " ").strip("- \n")
                if overrides_file.exists()
                else ""
            )
            rows = read_metrics(job_dir)
            jobs.append((job_dir.name, overrides, rows[-1] if rows else {}))
        keys = summary_keys([final for _, _, final in jobs])
        lines = ["| job | overrides | " + " | ".join(keys) + " |"]
        lines.append("|" + "---|" * (len(keys) + 2))
        for name, overrides, final in jobs:
            cells = [_fmt(final.get(key)) for key in keys]
            lines.append(f"| {name} | {overrides} | " + " | ".join(cells) + " |")
        table = "\n".join(lines)
        (sweep_dir / "summary.md").write_text(table + "\n")
        print(f"\nSweep summary ({sweep_dir}):\n{table}")


def summary_keys(finals: list[dict[str, Any]]) -> list[str]:
    """The summary's columns: the fixed ones, each task metric some job reported, and the
    privacy and traffic spent where some job reported them."""
    tasks = [f"{prefix}_{name}" for prefix in ("eval", "emu_eval") for name in TASK_METRICS]
    found = [key for key in tasks if any(key in final for final in finals)]
    spent = [key for key in LEDGER_KEYS if any(key in final for final in finals)]
    at = SUMMARY_KEYS.index("emu_eval_rougeL") + 1
    return [*SUMMARY_KEYS[:at], *found, *SUMMARY_KEYS[at:], *spent]


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def main() -> None:
    """Subcommands (eval, generate, export) by the first word; anything else is Hydra's."""
    argv = sys.argv[1:]
    if argv and argv[0] in SUBCOMMANDS:
        from fedinstruct.use import main as use_main

        sys.exit(use_main(argv))
    if any(flag in argv for flag in VERBOSE_FLAGS):
        set_verbose(True)
    if DEBUG_FLAG in argv:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv[1:] = [a for a in argv if a not in (*VERBOSE_FLAGS, DEBUG_FLAG)]
    _run()


if __name__ == "__main__":
    main()
