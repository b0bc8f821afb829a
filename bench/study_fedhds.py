"""FedHDS-Turbo against Random at equal counts and FedIT on all data, over seeds, with intervals.

    # the issue's full version (all ~1,400 rows per client, 10 rounds, 3 seeds; hours on 2 cores)
    python bench/study_fedhds.py --data ../shared/data/dolly15k-fedit10
    # what ran for the README (2 shared cores); seeds may run in separate processes
    python bench/study_fedhds.py --data ../shared/data/dolly15k-fedit10 --rows 200 --rounds 2 \
        --steps 1 --loss-rows 32 --rouge-rows 4 --seeds 1 2 3
    python bench/study_fedhds.py --report          # the tables, from bench/results/fedhds.jsonl
    python bench/study_fedhds.py --data ../shared/data/dolly15k-fedit10 --quick   # plumbing

Per seed, on the same clients, rounds, local steps and held-out rows:

1. FedIT-all: ``selection=all``; each client's local steps sample batches from all its rows;
2. FedHDS-Turbo: all-MiniLM-L6-v2 features (computed once, cached across rounds and seeds),
   t-SNE 2-D, HDBSCAN (min_cluster_size 2 on clients and server), re-selected every
   ``--reselect-every`` rounds; the local steps cycle over the coreset;
3. Random: each client draws, every round, exactly as many rows as it trained on in that seed's
   FedHDS-Turbo run (``selection.random.match_run``), the same local steps over them;
4. with ``--llm-features``: FedHDS proper (features from the global model), same settings.

The seed changes LoRA's initialization, the batch order, the t-SNE/selection seed and Random's
draws; the data (each client's rows, the held-out rows) are drawn once with ``--data-seed`` so
seeds are paired. Zero-shot as in the paper: every row of ``--zero-shot`` (summarization) leaves
the clients, and the held-out rows come from it. Quality, scored after the last round on the
final global adapter (``fedinstruct.use.evaluate_run``): response-token loss on ``--loss-rows``
held-out rows (one forward pass per row: the low-noise measure) and Rouge-L F of greedy
generations on the first ``--rouge-rows`` of them. ``--split dirichlet`` re-partitions the 10
clients' rows by category with Dirichlet(``--alpha``) proportions, as FedIT's code does.

Every finished federation appends one JSON line to ``--results``; ``--report`` prints, per
setting, the mean and 95% t-interval over seeds of each measure and the paired differences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import stats  # noqa: E402  (bench/stats.py)
from study_runs import common_overrides  # noqa: E402

FEDIT, TURBO, RANDOM, FEDHDS = "FedIT-all", "FedHDS-Turbo", "Random", "FedHDS (LLM features)"
RESULTS = Path(__file__).resolve().parent / "results" / "fedhds.jsonl"
TEMPLATE = "alpaca"
SETTINGS = ("model", "split", "alpha", "clients", "rows", "rounds", "steps", "batch_size",
            "max_length", "loss_rows", "rouge_rows", "max_new_tokens", "reselect_every",
            "zero_shot", "data_seed", "quick")


# -- data -----------------------------------------------------------------------------------
def dirichlet_split(pools: list[list[dict]], alpha: float, seed: int) -> list[list[dict]]:
    """All clients' rows re-partitioned: per category, Dirichlet(alpha) shares over clients."""
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[dict]] = defaultdict(list)
    for rows in pools:
        for row in rows:
            by_category[row["category"] or ""].append(row)
    clients: list[list[dict]] = [[] for _ in pools]
    for category in sorted(by_category):
        rows = by_category[category]
        order = rng.permutation(len(rows))
        shares = rng.dirichlet([alpha] * len(pools))
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
        for client, part in enumerate(np.split(order, cuts)):
            clients[client] += [rows[i] for i in part]
    return clients


def write_split(args: argparse.Namespace, target: Path) -> dict[str, Any]:
    """Client files (zero-shot category removed, `--rows` fitting rows each, 0: all that fit)
    and a held-out file: `--loss-rows` fitting rows of the unseen category."""
    from bench_fedhds import fitting_rows, sample_fitting
    from datasets import Dataset, concatenate_datasets

    from fedinstruct.compose import compose_config
    from fedinstruct.data import load_prepartitioned, load_prepartitioned_test
    from fedinstruct.model import load_tokenizer, resolve_model_path

    cfg = compose_config([f"model={args.model}"])
    tokenizer = load_tokenizer(resolve_model_path(cfg.model))
    target.mkdir(parents=True, exist_ok=True)
    pools, unseen = [], []
    for client in range(args.clients):
        rows = load_prepartitioned(args.data, client).to_list()
        unseen += [r for r in rows if r["category"] == args.zero_shot]
        pools.append([r for r in rows if r["category"] != args.zero_shot])
    if args.split == "dirichlet":
        pools = dirichlet_split(pools, args.alpha, args.data_seed)
    info: dict[str, Any] = {"clients": []}
    for client, rows in enumerate(pools):
        data = Dataset.from_list(rows)
        count = args.rows or len(data)
        keep = sample_fitting(data, tokenizer, args.max_length, count,
                              seed=args.data_seed * 1_000 + client)
        (target / f"local_training_{client}.json").write_text(
            json.dumps(data.select(keep).to_list()))
        info["clients"].append([len(keep), len(data)])
    test = concatenate_datasets([
        load_prepartitioned_test(args.data).filter(lambda r: r["category"] == args.zero_shot),
        Dataset.from_list(unseen)])
    fits = fitting_rows(test, tokenizer, args.max_length)
    rng = np.random.default_rng(args.data_seed)
    chosen = [fits[i] for i in rng.permutation(len(fits))[: args.loss_rows]]
    (target / "global_test.json").write_text(json.dumps(test.select(chosen).to_list()))
    info["test"] = [len(chosen), len(fits), len(test)]
    return info


# -- runs -----------------------------------------------------------------------------------
def overrides(args: argparse.Namespace, seed: int, variant: str, data: Path, folder: Path,
              match_run: Path | None = None) -> list[str]:
    common = [
        *common_overrides(args, seed, data, folder),
        f"train.template={TEMPLATE}",
        "eval.every=0",  # scored once, after the run, by this process (see score())
        f"selection.reselect_every={args.reselect_every}",
    ]
    if variant == FEDIT:
        return [*common, "selection=all"]
    if variant == RANDOM:
        return [*common, "selection=random", f"selection.random.match_run={match_run}"]
    fedhds = ["selection.fedhds.reducer=tsne", "selection.fedhds.min_cluster_size=2",
              "selection.fedhds.server_min_cluster_size=2"]
    if variant == FEDHDS:
        return [*common, "selection=fedhds", "selection.fedhds.feature_model=global", *fedhds]
    return [*common, "selection=fedhds_turbo", *fedhds]


def federate(run_overrides: list[str]) -> tuple[Path, list[dict[str, Any]], float]:
    from fedinstruct.compose import compose_config
    from fedinstruct.server.output import read_metrics
    from fedinstruct.simulation import simulate

    start = time.perf_counter()
    folder = simulate(compose_config(run_overrides))
    return folder, read_metrics(folder), time.perf_counter() - start


def score(run_dir: Path | None, base_overrides: list[str] | None = None) -> dict[str, float]:
    """Held-out loss (all rows) and Rouge-L (first --rouge-rows) of the final adapter, or of
    the base model (`base_overrides`)."""
    start = time.perf_counter()
    if run_dir is not None:
        from fedinstruct.use import evaluate_run

        metrics = evaluate_run(run_dir)
    else:
        from fedinstruct.compose import compose_config
        from fedinstruct.model import load_base_model
        from fedinstruct.server.evaluation import HeldOutSet

        cfg = compose_config(base_overrides or [])
        model, tokenizer = load_base_model(cfg.model, quantize=False)
        model.eval()
        metrics = HeldOutSet(cfg, tokenizer).evaluate(model, tokenizer).as_metrics("eval")
    return {"loss": metrics["eval_loss"], "rougeL": metrics["eval_rougeL"],
            "eval_s": time.perf_counter() - start}


def summarize(rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    trained = [r for r in rows if r["round"] > 0]
    selection = sum(r.get("time_selection", 0.0) for r in trained)
    training = sum(r.get("time_train_phase", 0.0) for r in trained)
    return {
        "samples": sum(int(r.get("train_samples", 0)) for r in trained),
        "rows_per_round": [sum(r.get("train_samples_per_client", {}).values()) for r in trained],
        "selection_s": selection, "training_s": training, "method_s": selection + training,
        "wall_s": wall,
    }


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in SETTINGS}


def run_seed(args: argparse.Namespace, seed: int, data: Path, runs: Path,
             info: dict[str, Any]) -> None:
    variants = [v for v in (FEDIT, TURBO, RANDOM) if v in args.variants]
    variants += [FEDHDS] if args.llm_features else []
    if RANDOM in variants and TURBO not in variants:
        raise SystemExit("Random matches the same seed's FedHDS-Turbo run: run both")
    folders = {v: runs / f"seed{seed}-{i}-{v.split(' ')[0]}" for i, v in enumerate(variants)}
    for variant in variants:
        print(f"\n### seed {seed}: {variant}", flush=True)
        folder, rows, wall = federate(overrides(args, seed, variant, data, folders[variant],
                                                match_run=folders.get(TURBO)))
        record = {"study": "fedhds", "seed": seed, "variant": variant,
                  "settings": settings_of(args), "data": info,
                  "metrics": {**score(folder), **summarize(rows, wall)},
                  "load": os.getloadavg()[0], "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        stats.append_jsonl(args.results, record)
        print(f"### seed {seed}: {variant}: {json.dumps(record['metrics'])}", flush=True)


# -- report ---------------------------------------------------------------------------------
def report(path: Path) -> str:
    records = stats.read_jsonl(path)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[stats.setting_key(r["settings"])].append(r)
    out: list[str] = []
    for key, group in groups.items():
        settings = json.loads(key)
        by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in group:
            by_variant[r["variant"]].append(r)
        base = by_variant.pop("base model", [])
        order = [v for v in (FEDIT, TURBO, RANDOM, FEDHDS) if v in by_variant]
        out += [f"## FedHDS study: {json.dumps(settings)}", ""]
        if base:
            m = base[-1]["metrics"]
            out += [f"Base model (no adapter, seed-independent): loss {m['loss']:.4f}, "
                    f"Rouge-L {m['rougeL']:.4f}", ""]
        out += stats.mean_table(
            {v: by_variant[v] for v in order},
            ["loss", "rougeL", "samples", "selection_s", "training_s", "wall_s"],
            ["held-out loss", "Rouge-L", "rows trained (sum over rounds)", "selection s",
             "training s", "whole run s"], digits=[4, 4, 1, 0, 0, 0])
        pairs = [(f"{a} - {b}", by_variant[a], by_variant[b])
                 for a, b in ((TURBO, RANDOM), (TURBO, FEDIT), (RANDOM, FEDIT),
                              (FEDHDS, RANDOM), (FEDHDS, FEDIT))
                 if a in by_variant and b in by_variant]
        if base:  # the base model is seed-independent: the same value paired with every seed
            seeds = sorted({r["seed"] for v in order for r in by_variant[v]})
            same = [{"seed": seed, "metrics": base[-1]["metrics"]} for seed in seeds]
            pairs += [(f"{v} - base model", by_variant[v], same) for v in order]
        out += ["", "Paired over seeds (A - B; loss: lower is better):", ""]
        out += stats.paired_table(pairs, [("loss", False), ("rougeL", True)])
        out.append("")
    return "\n".join(out) if out else f"no records in {path}\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="the Dolly 10-client split folder")
    p.add_argument("--report", action="store_true", help="print the tables and stop")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--variants", nargs="+", default=[FEDIT, TURBO, RANDOM],
                   choices=[FEDIT, TURBO, RANDOM])
    p.add_argument("--quick", action="store_true", help="tiny model, 4 clients: plumbing only")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--split", choices=["fedit", "dirichlet"], default="fedit")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rows", type=int, default=0, help="rows per client (0: all that fit)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=2, help="local steps per round, every variant")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--loss-rows", type=int, default=300)
    p.add_argument("--rouge-rows", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--reselect-every", type=int, default=1)
    p.add_argument("--zero-shot", default="summarization")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--llm-features", action="store_true", help="also FedHDS with LLM features")
    p.add_argument("--runs-dir", help="keep the run folders here (default: a temp folder)")
    args = p.parse_args()
    if args.quick:
        args.model, args.clients, args.rows, args.rounds, args.steps = "tiny", 4, 40, 2, 1
        args.loss_rows, args.rouge_rows, args.max_new_tokens = 8, 4, 4
    if not args.report and not (args.data and (Path(args.data) / "global_test.json").is_file()):
        p.error("--data: the Dolly split folder (with global_test.json) is needed")
    if args.data:
        args.data = str(Path(args.data).resolve())
    return args


def main() -> None:
    args = parse_args()
    if args.report:
        print(report(args.results))
        return
    with tempfile.TemporaryDirectory(prefix="study-fedhds-") as tmp:
        runs = Path(args.runs_dir).resolve() if args.runs_dir else Path(tmp) / "runs"
        data = Path(tmp) / "data"
        info = write_split(args, data)
        print(f"clients (rows used, rows held): {info['clients']}; held-out {info['test']}",
              flush=True)
        known = {(r["variant"], stats.setting_key(r["settings"]))
                 for r in stats.read_jsonl(args.results)}
        if ("base model", stats.setting_key(settings_of(args))) not in known:
            base = overrides(args, 0, FEDIT, data, Path(tmp) / "base")
            stats.append_jsonl(args.results, {
                "study": "fedhds", "seed": None, "variant": "base model",
                "settings": settings_of(args), "data": info, "metrics": score(None, base)})
        for seed in args.seeds:
            run_seed(args, seed, data, runs, info)
    print("\n" + report(args.results))


if __name__ == "__main__":
    main()
