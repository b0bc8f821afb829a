"""FedHDS against FedIT on all data and a random coreset: held-out Rouge-L and loss, samples
trained, and the wall time of selection and of training.

    python bench/bench_fedhds.py --data ../shared/data/dolly15k-fedit10   # ~33 min, 2 quiet cores
    python bench/bench_fedhds.py --data ../shared/data/dolly15k-fedit10 --model tiny --quick

Defaults: SmolLM2-135M-Instruct, 10 clients x 40 rows, 2 rounds, 24 held-out rows, 32 new tokens,
evaluated zero-shot as in the paper: every row of one category (``--zero-shot``, default
summarization, the reference code's Dolly task 7) leaves the clients' data, and the held-out rows
are drawn from that unseen category.

Five federations on the same clients, rounds and seed, one after the other:

1. FedIT-all: every client trains one epoch over all of its local rows each round;
2. FedHDS: features from the current global model (last-token hidden state of every layer),
   t-SNE to 2-D, HDBSCAN (min_cluster_size 2, as the paper sets for Dolly) on each client and
   over all clients' centroids on the server; clients train one epoch over their coreset;
3. FedHDS-Turbo: the same with features from a small fixed sentence embedder (all-MiniLM-L6-v2);
4. FedHDS, re-selecting every 2 rounds (``selection.reselect_every=2``): the per-round feature
   pass over all local rows is most of FedHDS's cost, and this option halves it;
5. Random: in every round each client draws exactly as many rows, uniformly, as it trained on in
   FedHDS's run (``selection.random.match_run``): the paper's Random baseline at equal count.

Scale: the clients' data are scaled down to fit two CPU cores. The benchmark writes a copy of
the split with, per client, a seeded sample of the rows whose Alpaca prompt + response fit in
``--max-length`` tokens (so no variant trains on a truncated or dropped row), and a held-out set
drawn the same way from ``global_test.json``, stratified by category. The base model is not
quantized (on CPU, bitsandbytes' NF4 path is several times slower than fp32). Feature caches
start empty, so FedHDS-Turbo pays for its embeddings in the first round.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FEDIT, FEDHDS, TURBO, RANDOM = "FedIT-all", "FedHDS", "FedHDS-Turbo", "Random"
FEDHDS_2 = "FedHDS, re-select every 2"
VARIANTS = (FEDIT, FEDHDS, TURBO, FEDHDS_2, RANDOM)
RESULTS = Path(__file__).resolve().parent / "results"
TEMPLATE = "alpaca"
DEFAULTS = {  # full run, then --quick
    "rounds": (2, 2),
    "clients": (10, 2),
    "samples_per_client": (40, 48),
    "eval_samples": (24, 6),
    "max_new_tokens": (32, 8),
}


# -- data -----------------------------------------------------------------------------------
def fitting_rows(dataset, tokenizer, max_length: int) -> list[int]:
    """Rows whose prompt + response fit in max_length tokens, untruncated."""
    from fedinstruct.data import tokenize_dataset

    examples, _ = tokenize_dataset(dataset, tokenizer, template=TEMPLATE, max_length=max_length)
    return [example.source_row for example in examples if not example.truncated]


def stratified(categories: list[str], count: int, seed: int) -> list[int]:
    """`count` positions, round-robin over categories, seeded order within each category."""
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[int]] = defaultdict(list)
    for position, category in enumerate(categories):
        by_category[category].append(position)
    queues = [list(rng.permutation(by_category[c])) for c in sorted(by_category)]
    chosen: list[int] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(int(queue.pop()))
    return sorted(chosen)


def sample_fitting(dataset, tokenizer, max_length: int, count: int, seed: int) -> list[int]:
    """`count` rows in a seeded order among those that fit (tokenizing only as many as needed)."""
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(dataset))]
    chosen: list[int] = []
    for start in range(0, len(order), 4 * count):
        block = order[start : start + 4 * count]
        chosen += [block[j] for j in fitting_rows(dataset.select(block), tokenizer, max_length)]
        if len(chosen) >= count:
            break
    return sorted(chosen[:count])


def write_scaled_split(args: argparse.Namespace, target: Path) -> dict[str, Any]:
    """A copy of the first `clients` partitions and the test file, scaled down (see module doc).

    With ``--zero-shot CATEGORY`` (the paper's protocol) that category's rows leave every
    client's data and the held-out rows are drawn from them (and from global_test.json's);
    otherwise the held-out rows come from global_test.json, stratified by category.
    """
    from datasets import concatenate_datasets

    from fedinstruct.compose import compose_config
    from fedinstruct.data import load_prepartitioned, load_prepartitioned_test
    from fedinstruct.model import load_tokenizer, resolve_model_path

    cfg = compose_config([f"model={args.model}"])
    tokenizer = load_tokenizer(resolve_model_path(cfg.model))
    target.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"clients": [], "short_clients": []}
    unseen = []
    for client in range(args.clients):
        data = load_prepartitioned(args.data, client)
        if args.zero_shot:
            unseen.append(data.filter(lambda row: row["category"] == args.zero_shot))
            data = data.filter(lambda row: row["category"] != args.zero_shot)
        keep = sample_fitting(data, tokenizer, args.max_length, args.samples_per_client,
                              seed=args.seed * 1_000 + client)
        if len(keep) < args.samples_per_client:
            info["short_clients"].append((client, len(keep)))
        rows = data.select(keep).to_list()
        (target / f"local_training_{client}.json").write_text(json.dumps(rows))
        info["clients"].append((len(keep), len(data)))
    test = load_prepartitioned_test(args.data)
    if args.zero_shot:
        same = test.filter(lambda row: row["category"] == args.zero_shot)
        test = concatenate_datasets([same, *unseen])
        if len(test) == 0:
            raise SystemExit(f"--zero-shot {args.zero_shot!r}: no row has that category")
    fits = fitting_rows(test, tokenizer, args.max_length)
    categories = [test[i]["category"] or "" for i in fits]
    chosen = [fits[i] for i in stratified(categories, args.eval_samples, args.seed)]
    (target / "global_test.json").write_text(json.dumps(test.select(chosen).to_list()))
    info["test"] = (len(test), len(fits), len(chosen))
    info["test_categories"] = dict(Counter(test[i]["category"] for i in chosen))
    return info


def isolated_feature_cache(root: Path) -> None:
    """A fresh cache root that shares converted models but starts with no cached features."""
    from fedinstruct.model import cache_root

    real = cache_root().expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    for name in ("models", "quantized"):
        (real / name).mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(real / name, target_is_directory=True)
    os.environ["FEDINSTRUCT_CACHE"] = str(root)  # Ray's workers inherit it


# -- runs -----------------------------------------------------------------------------------
def overrides(args: argparse.Namespace, variant: str, data: Path, folder: Path,
              match_run: Path | None = None) -> list[str]:
    """Hydra overrides of one variant; everything but selection and local epochs is shared."""
    common = [
        f"seed={args.seed}",
        f"num_rounds={args.rounds}",
        f"output_dir={folder}",
        f"model={args.model}",
        f"model.quantization={args.quantization}",
        "dataset=dolly",
        "dataset.partitioner=prepartitioned",
        f"dataset.source={data}",
        *(f"federation.{key}={args.clients}"
          for key in ("num_clients", "min_train_nodes", "min_available_nodes")),
        "federation.client_cpus=1",  # two single-threaded clients at a time on two cores
        "train.local_steps=0",
        f"train.batch_size={args.batch_size}",
        f"train.max_length={args.max_length}",
        f"train.template={TEMPLATE}",
        "eval.every=1",
        "eval.max_samples=0",  # the scaled test file holds exactly --eval-samples rows
        f"eval.max_new_tokens={args.max_new_tokens}",
    ]
    if variant == FEDIT:
        return [*common, "selection=all", "train.local_epochs=1"]
    coreset = [*common, f"train.local_epochs={args.coreset_epochs}"]
    if variant == RANDOM:
        return [*coreset, "selection=random", f"selection.random.match_run={match_run}"]
    fedhds = ["selection.fedhds.reducer=tsne", "selection.fedhds.min_cluster_size=2",
              "selection.fedhds.server_min_cluster_size=2",
              f"selection.fedhds.pca_dims={args.pca_dims or 'null'}"]
    if variant in (FEDHDS, FEDHDS_2):
        every = 2 if variant == FEDHDS_2 else 1
        return [*coreset, "selection=fedhds", "selection.fedhds.feature_model=global",
                f"selection.reselect_every={every}", *fedhds]
    return [*coreset, "selection=fedhds_turbo", *fedhds]


def federate(run_overrides: list[str]) -> tuple[list[dict[str, Any]], float]:
    """Run one federation in this process; its metrics rows and its wall time."""
    from fedinstruct.compose import compose_config
    from fedinstruct.server.output import read_metrics
    from fedinstruct.simulation import simulate

    cfg = compose_config(run_overrides)
    start = time.perf_counter()
    folder = simulate(cfg)
    return read_metrics(folder), time.perf_counter() - start


def summarize(rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    evaluated = [r for r in rows if "eval_rougeL" in r]
    trained = [r for r in rows if r["round"] > 0]
    selection = sum(r.get("time_selection", 0.0) for r in trained)
    training = sum(r.get("time_train_phase", 0.0) for r in trained)
    return {
        "rouge": [(r["round"], r["eval_rougeL"]) for r in evaluated],
        "loss": [(r["round"], r["eval_loss"]) for r in evaluated],
        "samples": sum(int(r.get("train_samples", 0)) for r in trained),
        "per_round": [r.get("train_samples_per_client", {}) for r in trained],
        "clusters": [(r.get("local_clusters"), r.get("selected_clusters")) for r in trained],
        "selection_s": selection,
        "training_s": training,
        "method_s": selection + training,
        "eval_s": sum(r.get("time_eval", 0.0) for r in rows),
        "wall_s": wall,
    }


# -- report ---------------------------------------------------------------------------------
def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def _ratio(part: float, whole: float) -> str:
    return f"{part / whole:.3f}x" if whole else "n/a"


def target_lines(name: str, results: dict[str, dict[str, Any]]) -> list[str]:
    method, full, rand = results[name], results[FEDIT], results[RANDOM]
    rouge, full_rouge, rand_rouge = (r["rouge"][-1][1] for r in (method, full, rand))
    # FedIT-all trains on every local row every round: its distinct samples are one round's;
    # a coreset variant's sum over rounds bounds its distinct samples from above
    full_distinct = full["samples"] / len(full["per_round"]) if full["per_round"] else 0
    share = method["samples"] / full_distinct if full_distinct else float("inf")
    time_ratio = method["method_s"] / full["method_s"] if full["method_s"] else float("inf")
    wall_ratio = method["wall_s"] / full["wall_s"]
    equal = " at equal count" if method["samples"] == rand["samples"] else " (at FedHDS's count)"

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    return [
        f"- {name} Rouge-L >= FedIT-all's: {verdict(rouge >= full_rouge)} "
        f"({rouge:.4f} vs {full_rouge:.4f})",
        f"- {name} distinct samples <= 5% of FedIT-all's: {verdict(share <= 0.05)} "
        f"(at most {method['samples']} vs {full_distinct:.0f}, {100 * share:.2f}%)",
        f"- {name} Rouge-L >= Random's{equal}: {verdict(rouge >= rand_rouge)} "
        f"({rouge:.4f} vs {rand_rouge:.4f}; samples {method['samples']} vs {rand['samples']})",
        f"- {name} wall time <= 0.25x FedIT-all's: {verdict(time_ratio <= 0.25)} "
        f"(selection + training {method['method_s']:.1f} s vs {full['method_s']:.1f} s = "
        f"{time_ratio:.3f}x; whole run incl. the same evaluation and start-up: "
        f"{method['wall_s']:.0f} s vs {full['wall_s']:.0f} s = {wall_ratio:.3f}x)",
    ]


def held_out(args: argparse.Namespace, info: dict[str, Any]) -> str:
    total, fitting, chosen = info["test"]
    if args.zero_shot:
        return (f"- held-out (zero-shot, the paper's protocol): {chosen} rows of the unseen "
                f"category {args.zero_shot!r} ({fitting} of its {total} rows fit), which no "
                "client trains on")
    return (f"- held-out: {chosen} rows of global_test.json ({fitting} of {total} fit), "
            f"stratified by category {info['test_categories']}")


def report(args: argparse.Namespace, info: dict[str, Any], results: dict[str, dict[str, Any]],
           loads: tuple[float, float], total_s: float) -> str:
    full = results[FEDIT]
    local = ", ".join(f"{used}/{total}" for used, total in info["clients"])
    lines = [
        f"## FedHDS benchmark: Dolly-15k FedIT split, {args.model}, CPU",
        "",
        f"- model: {args.model} (quantization={args.quantization}); {args.rounds} rounds, seed "
        f"{args.seed}; {args.clients} clients (partitions 0..{args.clients - 1} of the split)",
        f"- clients' data scaled down: per client a seeded sample of {args.samples_per_client} "
        f"rows among those whose prompt + response fit in {args.max_length} tokens "
        f"(rows used/held per client: {local})",
        held_out(args, info) + "; Rouge-L F of greedy generations "
        f"({args.max_new_tokens} new tokens) and response-token loss, after every round",
        f"- training: batch {args.batch_size}; FedIT-all 1 epoch over all local rows per round; "
        f"coreset variants {args.coreset_epochs} epoch(s) over the coreset; Random draws, per "
        "client and round, as many rows as that client trained on in FedHDS's run",
        f"- FedHDS: t-SNE 2-D{f' after PCA-{args.pca_dims}' if args.pca_dims else ''}, HDBSCAN "
        "min_cluster_size 2 on clients and server, re-selection every round (and every 2 "
        "rounds in its own row); Turbo: "
        "all-MiniLM-L6-v2 features, computed in round 1 and cached",
        "- samples trained = sum over rounds of the rows each client trained on; "
        "selection s = sum over rounds of time_selection; training s = sum of time_train_phase; "
        "round 1's first phase (selection for FedHDS, training otherwise) also holds the clients' "
        "start-up (process, imports, model load, tokenizing); whole run = simulate() wall time; "
        f"load average {loads[0]:.1f} at start, {loads[1]:.1f} at end; benchmark took "
        f"{total_s / 60:.1f} min",
    ]
    if info["short_clients"]:
        lines.append(f"- clients with fewer fitting rows than asked: {info['short_clients']}")
    lines += [
        "",
        "| variant | Rouge-L | loss | samples trained | % of FedIT-all | selection s | "
        "training s | sel.+train s | x FedIT-all | whole run s | x FedIT-all |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        r = results[name]
        lines.append(
            f"| {name} | {r['rouge'][-1][1]:.4f} | {r['loss'][-1][1]:.4f} | {r['samples']} "
            f"| {_pct(r['samples'], full['samples'])} | {r['selection_s']:.1f} "
            f"| {r['training_s']:.1f} | {r['method_s']:.1f} "
            f"| {_ratio(r['method_s'], full['method_s'])} | {r['wall_s']:.0f} "
            f"| {_ratio(r['wall_s'], full['wall_s'])} |"
        )
    lines += ["", "Round by round (Rouge-L / loss):", "",
              "| round | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|"]
    for i, (round_no, _) in enumerate(full["rouge"]):
        cells = [f"{results[v]['rouge'][i][1]:.4f} / {results[v]['loss'][i][1]:.4f}"
                 for v in VARIANTS]
        lines.append(f"| {round_no} | " + " | ".join(cells) + " |")
    lines += ["", "Coreset per round (local clusters -> selected; rows per client):", ""]
    for name in (FEDHDS, TURBO, FEDHDS_2, RANDOM):
        r = results[name]
        parts = []
        for (local_k, chosen), per_client in zip(r["clusters"], r["per_round"], strict=True):
            head = f"{local_k} -> {chosen}; " if local_k is not None else ""
            parts.append(head + "[" + ", ".join(str(v) for v in per_client.values()) + "]")
        lines.append(f"- {name}: " + " | ".join(parts))
    lines += ["", "Targets (the paper's direction, at this scale):", ""]
    for name in (FEDHDS, TURBO, FEDHDS_2):
        lines += target_lines(name, results)
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the Dolly 10-client split folder")
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a plumbing check")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--samples-per-client", type=int)
    parser.add_argument("--eval-samples", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--zero-shot", default="summarization", metavar="CATEGORY",
                        help="hold this category out of training and evaluate on it, as the "
                        "paper does on Dolly ('' evaluates on global_test.json's categories)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--coreset-epochs", type=float, default=1.0)
    parser.add_argument("--pca-dims", type=int, default=None, help="PCA before t-SNE (FedHDS)")
    parser.add_argument("--quantization", choices=["none", "4bit", "8bit"], default="none")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs-dir", help="keep the run folders here (default: a temp folder)")
    parser.add_argument("--out", help="markdown file for the table (default: bench/results/"
                        "fedhds.md, or fedhds-quick.md with --quick)")
    args = parser.parse_args()
    for key, (full, quick) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if not (Path(args.data) / "global_test.json").is_file():
        parser.error(f"--data {args.data}: no global_test.json there (the Dolly split folder)")
    if not 1 <= args.clients <= 10 or args.rounds < 1 or args.samples_per_client < 2:
        parser.error("need 1 <= --clients <= 10, --rounds >= 1, --samples-per-client >= 2")
    args.data = str(Path(args.data).resolve())
    args.out = args.out or str(RESULTS / ("fedhds-quick.md" if args.quick else "fedhds.md"))
    return args


def main() -> None:
    args = parse_args()
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-fedhds-") as tmp:
        runs = Path(args.runs_dir).resolve() if args.runs_dir else Path(tmp) / "runs"
        data = Path(tmp) / "data"
        info = write_scaled_split(args, data)
        isolated_feature_cache(Path(tmp) / "cache")
        results: dict[str, dict[str, Any]] = {}
        folders = {v: runs / f"{i}-{v.split(',')[0]}" for i, v in enumerate(VARIANTS)}
        for variant in VARIANTS:
            print(f"\n### {variant}", flush=True)
            rows, wall = federate(overrides(args, variant, data, folders[variant],
                                            match_run=folders[FEDHDS]))
            results[variant] = summarize(rows, wall)
            print(f"### {variant} done in {wall:.0f} s", flush=True)
    text = report(args, info, results, (load_start, os.getloadavg()[0]),
                  time.perf_counter() - start)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
