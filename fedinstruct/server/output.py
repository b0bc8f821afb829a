"""The folder every run leaves: resolved config, metrics per round, PEFT adapters, a plot,
and the checkpoint a crashed run resumes from; a lock keeps a second run out of it."""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fedinstruct.files import atomic_folder, atomic_write_text, previous_copy

if TYPE_CHECKING:  # torch loads only to write tensors: the CLI and readers stay light
    import torch
    from peft import LoraConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILES = ("tensors.safetensors", "state.json")
LOCK_FILE = ".lock"


class OutputInUse(RuntimeError):
    """Another live run holds the run folder's lock; the message names the folder and its pid."""


def read_metrics(source: str | Path, *, skip_bad: bool = False) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (`source`: the run folder or the file); [] if absent.

    A line that is not JSON raises ValueError naming the file and line; with `skip_bad` (a
    run's own file, whose last line a crash may have torn) it is logged and skipped instead.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if not skip_bad:
                raise ValueError(f"{path} line {number} is not JSON: {err}") from None
            log.warning("%s line %d is not JSON; skipped", path, number)
    return rows


def save_peft_adapter(
    folder: Path, state: Mapping[str, torch.Tensor], lora_config: LoraConfig
) -> Path:
    """Write an adapter in PEFT's format (`PeftModel.from_pretrained(base, folder)` loads it)."""
    from safetensors.torch import save_file

    def build(tmp: Path) -> None:
        lora_config.save_pretrained(str(tmp))
        tensors = {k: v.contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / "adapter_model.safetensors"))

    return atomic_folder(folder, build, replace=True)


class RunOutput:
    """One run's folder. Everything is written atomically, so a crash never leaves a torn file."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.folder / METRICS_FILE

    @contextmanager
    def lock(self, wait: float = 0.0) -> Iterator[None]:
        """Hold `<folder>/.lock` (an exclusive flock) for a run; the OS drops it if the process
        dies. Held by another run for more than `wait` seconds (a stopped run's process may
        take a moment to exit): OutputInUse, naming the holder's pid."""
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
                    if time.monotonic() >= deadline:
                        raise OutputInUse(
                            f"{self.folder} is in use by another run (pid {holder}): wait for "
                            "it to end, or set output_dir to another folder"
                        ) from None
                    time.sleep(0.5)
                except OSError as err:  # a file system without locks (some network mounts)
                    log.warning("cannot lock %s (%s): another run could write there too",
                                self.folder, err)
                    break
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def save_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_text(
            self.folder / CONFIG_FILE, yaml.safe_dump(dict(config), sort_keys=False)
        )

    def saved_config(self) -> dict[str, Any] | None:
        """The resolved config the run saved (None: it saved none)."""
        path = self.folder / CONFIG_FILE
        return yaml.safe_load(path.read_text()) if path.is_file() else None

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(dict(row), default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path, skip_bad=True)

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows after `last_round` (a resumed run rewrites them)."""
        rows = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def save_adapter(
        self,
        server_round: int,
        state: Mapping[str, torch.Tensor],
        lora_config: LoraConfig,
        name: str = "adapter",
    ) -> Path:
        folder = save_peft_adapter(
            self.folder / "adapters" / f"round_{server_round:03d}", state, lora_config
        )
        latest = self.folder / "adapters" / "final" if name == "adapter" else self.folder / name
        save_peft_adapter(latest, state, lora_config)
        return folder

    # -- checkpoint -------------------------------------------------------------------------
    def save_checkpoint(
        self, server_round: int, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]
    ) -> None:
        """Everything needed to resume after `server_round`: tensors plus JSON-able state."""
        from safetensors.torch import save_file

        def build(tmp: Path) -> None:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                str(tmp / "tensors.safetensors"),
            )
            state_json = json.dumps({"round": server_round, **state}, default=float)
            (tmp / "state.json").write_text(state_json)

        atomic_folder(self.folder / CHECKPOINT_DIR, build, replace=True)

    def checkpoint_folder(self) -> Path | None:
        """The last complete checkpoint: `checkpoint/`, or the previous one a crash in the
        middle of replacing it left under its temporary name (None: the run saved none)."""
        for folder in (self.folder / CHECKPOINT_DIR, previous_copy(self.folder / CHECKPOINT_DIR)):
            if all((folder / name).is_file() for name in CHECKPOINT_FILES):
                return folder
        return None

    def load_checkpoint(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
        folder = self.checkpoint_folder()
        if folder is None:
            return None
        from safetensors.torch import load_file

        state = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "tensors.safetensors"))
        return int(state.pop("round")), tensors, state

    # -- plot -------------------------------------------------------------------------------
    def plot(self) -> Path | None:
        """metrics.png: one panel per metric family, x = round."""
        rows = self.read_metrics()
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [
            ("loss", [k for k in ("eval_loss", "train_loss", "emu_eval_loss") if _has(rows, k)]),
            ("Rouge-L", [k for k in ("eval_rougeL", "emu_eval_rougeL") if _has(rows, k)]),
            ("task metrics", [f"{p}_{m}" for p in ("eval", "emu_eval")
                              for m in ("exact_match", "numeric_match", "choice_accuracy")
                              if _has(rows, f"{p}_{m}")]),
            ("samples trained", [k for k in ("train_samples",) if _has(rows, k)]),
            ("privacy spent (epsilon)",
             [k for k in ("dp_epsilon", "dp_centroid_epsilon") if _has(rows, k)]),
            ("seconds", [k for k in sorted(rows[-1]) if k.startswith("time_") and _has(rows, k)]),
        ]
        panels = [p for p in panels if p[1]]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
        for ax, (title, keys) in zip(axes[0], panels, strict=False):
            for key in keys:
                points = [(r["round"], r[key]) for r in rows if _finite(r.get(key))]
                ax.plot(*zip(*points, strict=False), marker="o", label=key)
            ax.set_title(title)
            ax.set_xlabel("round")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.folder / "metrics.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _has(rows: list[dict[str, Any]], key: str) -> bool:
    return any(_finite(r.get(key)) for r in rows)
