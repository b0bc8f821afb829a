"""FedIT on SmolLM2-135M-Instruct: where a round's time goes, bytes on the wire, client memory
with 4-bit against none, and client training throughput against a bare peft loop.

    python bench/bench_fedit.py [--rounds 2] [--clients 3] [--steps 8]

Each measurement that compares two things runs both in the same invocation, side by side;
memory is measured in a fresh subprocess per variant (peak RSS is per process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

MODEL = ["model=smollm2"]


def _client_probe(quantization: str, steps: int, batch_size: int) -> dict[str, float]:
    """In this (fresh) process: load the client model, time our loop and a bare peft loop."""
    import torch

    from fedinstruct.client.training import sample_order, train_lora
    from fedinstruct.compose import compose_config
    from fedinstruct.data import make_synthetic_dataset, pad_batch, tokenize_dataset
    from fedinstruct.model import (
        add_lora,
        load_base_model,
        model_bytes,
    )

    cfg = compose_config(
        [
            *MODEL,
            f"model.quantization={quantization}",
            f"train.local_steps={steps}",
            f"train.batch_size={batch_size}",
        ]
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base, tokenizer = load_base_model(cfg.model)
    model_bytes = model_bytes(base)
    model = add_lora(base, cfg.model)
    examples, _ = tokenize_dataset(
        make_synthetic_dataset(64, seed=5), tokenizer, max_length=cfg.train.max_length
    )

    train_lora(
        model, examples, cfg.train, pad_token_id=tokenizer.pad_token_id, seed=0, progress=False
    )  # warm-up
    ours = train_lora(
        model, examples, cfg.train, pad_token_id=tokenizer.pad_token_id, seed=1, progress=False
    )

    # The bare loop: same model, same batches, plain AdamW, nothing else.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    order = sample_order(len(examples), steps * batch_size, 1)
    model.train()
    start = time.perf_counter()
    tokens = 0
    for step in range(steps):
        batch = pad_batch(
            [examples[i] for i in order[step * batch_size : (step + 1) * batch_size]],
            tokenizer.pad_token_id,
        )
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    bare_seconds = time.perf_counter() - start
    return {
        "model_bytes": model_bytes,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss_before / 1024,
        "ours_tokens_per_s": ours.tokens / ours.seconds,
        "bare_tokens_per_s": tokens / bare_seconds,
        "step_seconds": ours.seconds / ours.steps,
    }


def client_probe(quantization: str, steps: int, batch_size: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--probe",
            quantization,
            "--steps",
            str(steps),
            "--batch-size",
            str(batch_size),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def simulation(rounds: int, clients: int, steps: int, folder: Path) -> list[dict]:
    from fedinstruct.compose import compose_config
    from fedinstruct.server.output import read_metrics
    from fedinstruct.simulation import simulate

    cfg = compose_config(
        [
            *MODEL,
            f"num_rounds={rounds}",
            f"federation.num_clients={clients}",
            f"federation.min_train_nodes={clients}",
            f"federation.min_available_nodes={clients}",
            f"train.local_steps={steps}",
            f"output_dir={folder}",
        ]
    )
    simulate(cfg)
    return read_metrics(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--probe", choices=["4bit", "none"])
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(_client_probe(args.probe, args.steps, args.batch_size)))
        return

    from fedinstruct.compose import compose_config
    from fedinstruct.model import adapter_bytes, initial_adapter_state

    cfg = compose_config(MODEL)
    adapter = adapter_bytes(initial_adapter_state(cfg.model, 0))
    with tempfile.TemporaryDirectory() as tmp:
        rows = simulation(args.rounds, args.clients, args.steps, Path(tmp) / "run")
    q4 = client_probe("4bit", args.steps, args.batch_size)
    fp = client_probe("none", args.steps, args.batch_size)

    print(
        "\n## FedIT on SmolLM2-135M-Instruct "
        f"({args.clients} clients, {args.steps} steps x batch {args.batch_size}, CPU)"
    )
    phases = []
    for row in rows[1:]:
        compute, load = row["time_client_train"], row["time_client_load"]
        overhead = row["time_train_phase"] - compute - load
        overhead += row["time_aggregate"] + row["time_checkpoint"]
        phases.append(
            [
                row["round"],
                f"{row['time_round']:.1f}",
                f"{compute:.1f}",
                f"{load:.1f}",
                f"{row.get('time_eval', 0):.1f}",
                f"{overhead:.1f}",
                f"{overhead / row['time_round']:.1%}",
            ]
        )
    table(
        [
            "round",
            "round s",
            "client compute s",
            "model load s",
            "eval s",
            "framework overhead s",
            "overhead share",
        ],
        phases,
    )

    base_bytes = fp["model_bytes"]
    wire = [
        [name, f"{value:,.0f}", f"{value / adapter:.3f}", f"{value / base_bytes:.4f}"]
        for name, value in (
            ("down", rows[-1]["bytes_per_client_down"]),
            ("up", rows[-1]["bytes_per_client_up"]),
            ("adapter tensors", adapter),
        )
    ]
    table(
        ["bytes per client per round", "value", "x adapter tensor bytes", "x base model (fp32)"],
        wire,
    )

    def ratio_row(name: str, key: str, scale: float = 1.0, fmt: str = ".1f") -> list[str]:
        a, b = q4[key] * scale, fp[key] * scale
        return [name, format(a, fmt), format(b, fmt), f"{a / b:.2f}"]

    table(
        ["client", "4bit", "none", "ratio"],
        [
            ratio_row("model footprint MB", "model_bytes", 1 / 2**20),
            ratio_row("peak process RSS MB", "peak_rss_mb", fmt=".0f"),
            ratio_row("s per local step", "step_seconds", fmt=".2f"),
        ],
    )
    table(
        ["throughput tokens/s", "fedinstruct loop", "bare peft loop", "ratio"],
        [
            [
                name,
                f"{p['ours_tokens_per_s']:.0f}",
                f"{p['bare_tokens_per_s']:.0f}",
                f"{p['ours_tokens_per_s'] / p['bare_tokens_per_s']:.2f}",
            ]
            for name, p in (("4bit", q4), ("none", fp))
        ],
    )


def table(headers: list[str], rows: list[list]) -> None:
    print("\n| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()
