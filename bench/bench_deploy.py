"""FedIT as a real deployment (SuperLink + SuperNodes as separate processes, TLS and node auth,
own network namespaces or loopback) against the same run as a Flower simulation: per-round wall
time and where it goes. Same model, data, rounds and settings on both sides.

    python bench/bench_deploy.py                        # SmolLM2-135M-Instruct, 3 nodes, 3 rounds
    python bench/bench_deploy.py --rounds 3 --steps 4 --cold
    python bench/bench_deploy.py --model tiny --rounds 2 --steps 2 --samples 16   # smoke run

Split of a round (seconds, from each run's metrics.jsonl):
- client: training on the critical path (in the simulation the clients take turns on the
  cores, so their sum; on the deployment the nodes run side by side, so the slowest one);
- load: model load in the client processes (sum over clients; 0 where a warm app server
  had loaded it between messages, off the round's critical path);
- framework: the rest of the train phase (messages, serialization, process starts, polling);
- server: evaluation + aggregation + checkpoint (+ the FedHDS selection stage if any).
Target: from round 2 on, the deployment's round at most 1.2x the simulation's.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.2


def settings(args: argparse.Namespace) -> dict[str, str | int]:
    """The run, as Flower run_config keys (`overrides` carries the other Hydra keys)."""
    return {
        "model": args.model,
        "num_rounds": args.rounds,
        "train.local_steps": args.steps,
        "eval.max_samples": args.eval_samples,
        "eval.max_new_tokens": args.new_tokens,
        "federation.num_clients": args.nodes,
        "federation.min_train_nodes": args.nodes,
        "overrides": f"dataset.samples_per_client={args.samples} "
                     f"federation.min_available_nodes={args.nodes}",
    }


def as_hydra(config: dict[str, str | int]) -> list[str]:
    from fedinstruct.compose import overrides_from_run_config

    return overrides_from_run_config(config)


def read_rows(folder: Path) -> list[dict]:
    from fedinstruct.server.output import read_metrics

    rows = read_metrics(folder)
    return [r for r in rows if r["round"] >= 1]


def simulation(args: argparse.Namespace, folder: Path) -> tuple[list[dict], float]:
    from fedinstruct.compose import compose_config
    from fedinstruct.simulation import simulate

    cfg = compose_config([*as_hydra(settings(args)), f"output_dir={folder}"])
    start = time.perf_counter()
    simulate(cfg)
    wall = time.perf_counter() - start
    concurrency = max(1, (os.cpu_count() or 1) // max(1, cfg.federation.client_cpus))
    return [split(r, concurrency) for r in read_rows(folder)], wall


def deployment(args: argparse.Namespace, folder: Path, warm: bool
               ) -> tuple[list[dict], float, float]:
    from fedinstruct.deploy import LocalDeployment

    start = time.perf_counter()
    with LocalDeployment(REPO, num_nodes=args.nodes, tls=True, auth=True,
                         isolation=args.isolation, warm=warm, database=args.database or None,
                         workdir=folder / "deploy", start_timeout=600) as dep:
        started = time.perf_counter() - start
        result = dep.run(timeout=args.timeout,
                         run_config={**settings(args), "output_dir": str(folder / "run")})
        if not result.ok:
            raise SystemExit(f"deployment run ended {result.status}:\n{result.logs[-4000:]}")
        kind = dep.network.kind if dep.network else "?"
    print(f"deployment ({kind}, warm={warm}, {dep.node_threads} thread(s) per node): started "
          f"in {started:.1f} s, run took {result.elapsed_s:.1f} s")
    return [split(r, args.nodes) for r in read_rows(folder / "run")], started, result.elapsed_s


def split(row: dict, concurrency: int) -> dict:
    """Where a round's time went; client time on the critical path for `concurrency`."""
    client = max(row["time_client_train_max"], row["time_client_train"] / concurrency)
    load = row["time_client_load"]
    server = sum(row.get(k, 0.0) for k in ("time_eval", "time_aggregate", "time_checkpoint",
                                           "time_selection", "time_server_prep"))
    return {"round": row["round"], "wall": row["time_round"], "train": row["time_train_phase"],
            "client": client, "load": load,
            "framework": max(0.0, row["time_train_phase"] - client - load), "server": server,
            "replied": row["nodes_replied"]}


def table(title: str, runs: dict[str, list[dict]], reference: str) -> None:
    print(f"\n### {title}\n")
    print("| run | round | round s | x simulation | train phase s | client s | load s "
          "| framework s | server s | replies |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, rows in runs.items():
        for row, ref in zip(rows, runs[reference], strict=False):
            ratio = row["wall"] / ref["wall"]
            print(f"| {name} | {row['round']} | {row['wall']:.1f} | {ratio:.2f} "
                  f"| {row['train']:.1f} | {row['client']:.1f} | {row['load']:.1f} "
                  f"| {row['framework']:.1f} | {row['server']:.1f} | {row['replied']} |")


def verdict(runs: dict[str, list[dict]], reference: str) -> None:
    ref_later = [r["wall"] for r in runs[reference] if r["round"] >= 2]
    print()
    for name, rows in runs.items():
        if name == reference:
            continue
        first = rows[0]["wall"] / runs[reference][0]["wall"]
        later = [r["wall"] for r in rows if r["round"] >= 2]
        if not later or not ref_later:
            print(f"- {name}: round 1 at {first:.2f}x simulation (no later rounds)")
            continue
        ratio = (sum(later) / len(later)) / (sum(ref_later) / len(ref_later))
        status = "meets" if ratio <= TARGET else "misses"
        print(f"- {name}: round 1 at {first:.2f}x simulation; rounds 2+ at {ratio:.2f}x on "
              f"average ({status} the {TARGET}x target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="conf/model choice (tiny: smoke run)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="local steps per round")
    parser.add_argument("--samples", type=int, default=64, help="samples per client")
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--isolation", default="auto", choices=["auto", "netns", "loopback"])
    parser.add_argument("--cold", action="store_true",
                        help="also run the deployment without warm app processes")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per deployment run, s")
    parser.add_argument("--database", default="state.db",
                        help="SuperLink state file (default, persistent) or '' for in-memory state")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        root = Path(tmp)
        print(f"load average before: {os.getloadavg()}")
        runs["simulation"], sim_wall = simulation(args, root / "simulation")
        print(f"simulation: {sim_wall:.1f} s in all")
        print(f"load average before: {os.getloadavg()}")
        runs["deployment"], _, _ = deployment(args, root / "warm", warm=True)
        if args.cold:
            print(f"load average before: {os.getloadavg()}")
            runs["deployment, cold"], _, _ = deployment(args, root / "cold", warm=False)
        print(f"load average after: {os.getloadavg()}")

    title = (f"FedIT, model={args.model}, {args.nodes} nodes, {args.rounds} rounds, "
             f"SuperLink state {args.database or 'in memory'}, "
             f"{args.steps} steps, {args.samples} samples per client, {os.cpu_count()} CPUs")
    table(title, runs, "simulation")
    verdict(runs, "simulation")


if __name__ == "__main__":
    main()
