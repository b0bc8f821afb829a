"""The folder every run leaves: resolved config, metrics per round, PEFT adapters, a plot,
and the checkpoint a crashed run resumes from."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from peft import LoraConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_peft_adapter(
    folder: Path, state: Mapping[str, torch.Tensor], lora_config: LoraConfig
) -> Path:
    """Write an adapter in PEFT's format (`PeftModel.from_pretrained(base, folder)` loads it)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora_config.save_pretrained(str(tmp))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


class RunOutput:
    """One run's folder. Everything is written atomically, so a crash never leaves a torn file."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.folder / METRICS_FILE

    def save_config(self, config: Mapping[str, Any]) -> None:
        _atomic_write_text(
            self.folder / "config.yaml", yaml.safe_dump(dict(config), sort_keys=False)
        )

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(dict(row), default=float) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for number, line in enumerate(self.metrics_path.read_text().splitlines(), start=1):
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a crash while it was written
                log.warning("%s line %d is not JSON; skipped", self.metrics_path, number)
        return rows

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows after `last_round` (a resumed run rewrites them)."""
        rows = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        _atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

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
        final = self.folder / CHECKPOINT_DIR
        tmp = self.folder / f".{CHECKPOINT_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp / "tensors.safetensors"),
        )
        (tmp / "state.json").write_text(json.dumps({"round": server_round, **state}, default=float))
        old = self.folder / f".{CHECKPOINT_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
        folder = self.folder / CHECKPOINT_DIR
        if not (folder / "state.json").exists():
            return None
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
            ("samples trained", [k for k in ("train_samples",) if _has(rows, k)]),
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
