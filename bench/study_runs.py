"""What every seeded study's federation shares: the overrides of one run on a written split."""

from __future__ import annotations

import argparse
from pathlib import Path


def common_overrides(args: argparse.Namespace, seed: int, data: Path, folder: Path) -> list[str]:
    """One seed's federation of `args.clients` prepartitioned Dolly clients in `data`, scored
    on held-out loss and `args.rouge_rows` generations (the caller sets `eval.every`)."""
    return [
        f"seed={seed}",
        f"num_rounds={args.rounds}",
        f"output_dir={folder}",
        f"model={args.model}",
        "model.quantization=none",  # CPU: bitsandbytes' NF4 is several times slower than fp32
        "dataset=dolly",
        "dataset.partitioner=prepartitioned",
        f"dataset.source={data}",
        *(f"federation.{key}={args.clients}"
          for key in ("num_clients", "min_train_nodes", "min_available_nodes")),
        "federation.client_cpus=1",
        f"train.local_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.max_length={args.max_length}",
        "eval.max_samples=0",
        f"eval.generate_samples={args.rouge_rows}",
        f"eval.max_new_tokens={args.max_new_tokens}",
    ]
