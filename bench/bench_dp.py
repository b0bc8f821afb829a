"""FedIT with client-level differential privacy: utility at epsilon = inf, 8 and 2.

    python bench/bench_dp.py --data ../shared/data/dolly15k-fedit10          # ~25 min, 2 cores
    python bench/bench_dp.py --data ../shared/data/dolly15k-fedit10 --model tiny --quick

Client-level DP needs many clients: Dolly's FedIT split is pooled and re-split IID into
``--clients`` virtual clients, ``--sampled`` of them trained per round (q = sampled / clients).
Three federations on the same clients, rounds and seed: no DP, then central DP-FedAvg with the
noise multiplier `privacy.target_epsilon` picks for the planned rounds at delta 1e-5 (8, then
2), every update clipped to ``--clip``. Each client trains the same number of steps, so the
no-DP row's sample-weighted mean weighs the clients (almost) equally too: the rows differ by
clipping and noise. Reported: held-out loss and Rouge-L after the last round (Rouge-L on a few
dozen generations is noisy: read the loss first), epsilon spent, and the seconds per round.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EPSILONS = (None, 8.0, 2.0)


def write_pool(data: Path, target: Path, rows: int, seed: int) -> tuple[Path, Path]:
    """A seeded sample of the pooled training rows (JSONL) and the held-out file."""
    pool = []
    for path in sorted(data.glob("local_training_*.json")):
        pool += json.loads(path.read_text())
    random.Random(seed).shuffle(pool)
    train = target / "pool.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in pool[:rows]))
    return train, data / "global_test.json"


def run(args: argparse.Namespace, epsilon: float | None, train: Path, test: Path,
        folder: Path) -> dict:
    from fedinstruct.compose import compose_config
    from fedinstruct.server.output import read_metrics
    from fedinstruct.simulation import simulate

    overrides = [
        f"model={args.model}", "model.quantization=none", "dataset=dolly",
        f"dataset.source={train}", f"dataset.test_source={test}", "dataset.partitioner=iid",
        f"federation.num_clients={args.clients}", f"federation.min_train_nodes={args.sampled}",
        f"federation.min_available_nodes={args.clients}",
        f"federation.fraction_train={args.sampled / args.clients}", "federation.client_cpus=1",
        f"num_rounds={args.rounds}", f"train.local_steps={args.steps}",
        f"train.batch_size={args.batch_size}", "train.max_length=192",
        f"eval.every={args.rounds}", f"eval.max_samples={args.eval_samples}",
        f"eval.max_new_tokens={args.max_new_tokens}", f"seed={args.seed}",
        f"output_dir={folder}",
    ]
    if epsilon is not None:
        overrides += ["privacy.dp=central", f"privacy.target_epsilon={epsilon}",
                      f"privacy.clip={args.clip}"]
    start = time.perf_counter()
    simulate(compose_config(overrides))
    rows = read_metrics(folder)
    last = rows[-1]
    return {
        "epsilon": "inf" if epsilon is None else f"{last['dp_epsilon']:.2f} (target {epsilon:g})",
        "z": last.get("dp_noise_multiplier", 0.0),
        "loss": last.get("eval_loss"), "rougeL": last.get("eval_rougeL"),
        "base_loss": rows[0].get("eval_loss"),
        "s_per_round": sum(r["time_round"] for r in rows if r["round"] > 0) / args.rounds,
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--eval-samples", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 10 clients, 5 sampled")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.clients, args.sampled, args.rows = 2, 10, 5, 400
        args.eval_samples, args.max_new_tokens = 8, 8
    with tempfile.TemporaryDirectory() as tmp:
        train, test = write_pool(args.data, Path(tmp), args.rows, args.seed)
        results = [run(args, eps, train, test, Path(tmp) / f"run-{i}")
                   for i, eps in enumerate(EPSILONS)]
    print(f"\n## FedIT with client-level DP ({args.model}, {args.clients} clients, "
          f"{args.sampled} sampled per round, {args.rounds} rounds x {args.steps} steps x "
          f"batch {args.batch_size}, clip {args.clip}, delta 1e-5)\n")
    print(f"Base model before training: held-out loss {results[0]['base_loss']:.4f}\n")
    print("| epsilon spent | noise multiplier | held-out loss | Rouge-L | s / round |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['epsilon']} | {r['z']:.3f} | {r['loss']:.4f} | {r['rougeL']:.4f} | "
              f"{r['s_per_round']:.1f} |")


if __name__ == "__main__":
    main()
