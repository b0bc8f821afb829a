"""FedBiOT over seeds: AdapEmu and AdapFu against alignment steps, and AdapFu against FedIT and
the capacity control as local training grows, with 95% intervals and paired differences.

    # the issue's fuller version (3 clients, 10 rounds x 5 steps, 300 held-out rows; hours)
    python bench/study_fedbiot.py --data ../shared/data/dolly15k-fedit10 --rounds 10
    # what ran for the README (2 shared cores); seeds may run in separate processes
    python bench/study_fedbiot.py --data ../shared/data/dolly15k-fedit10 --clients 2 --rounds 2 \
        --steps 5 --loss-rows 32 --rouge-rows 4 --max-new-tokens 16 --align-steps 10 \
        --public-samples 64 --variants FedIT FedBiOT control --seeds 1 2 3
    python bench/study_fedbiot.py --report         # the tables, from bench/results/fedbiot.jsonl
    python bench/study_fedbiot.py --data ../shared/data/dolly15k-fedit10 --quick   # plumbing

Per seed, four federations on the same clients, rounds, local steps and held-out rows, scored
after every round by the server (so each run gives a curve against cumulative local steps,
round x ``--steps``):

1. FedIT: LoRA on all layers of the full model;
2. FedBiOT: K=``--adapter-layers`` adapter layers, drop ratio 0.5; the server aligns the
   emulator ``--pre-align-steps`` steps before round 1 and ``--align-steps`` per round on
   ``--public-samples`` rows of a Dolly partition no client holds (1/8 held back to measure the
   alignment loss); AdapFu = full model + adapter LoRA, AdapEmu = emulator + adapter LoRA;
3. FedBiOT without alignment (``strategy.fedbiot.align=false``): the 0-alignment-steps point;
4. the capacity control: FedIT with LoRA on the adapter layers only (FedBiOT's trainable set
   trained on the full model).

AdapEmu and AdapFu against alignment steps: FedBiOT's round r has had pre + r x align steps;
the no-alignment run at the same round has had the same local training and none. The seed
changes LoRA's initialization, batch order and the clients' sampling; the data (held-out rows:
``--loss-rows`` rows that fit ``--max-length``, drawn with ``--data-seed`` from partitions no
client or public set holds; Rouge-L on the first ``--rouge-rows``) are the same for every seed.
Every finished federation appends one JSON line to ``--results``; ``--report`` prints the tables.
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

FEDIT, BIOT, NOALIGN, CONTROL = "FedIT", "FedBiOT", "FedBiOT, no alignment", "control"
VARIANTS = (FEDIT, BIOT, NOALIGN, CONTROL)
RESULTS = Path(__file__).resolve().parent / "results" / "fedbiot.jsonl"
SETTINGS = ("model", "clients", "rounds", "steps", "batch_size", "max_length", "loss_rows",
            "rouge_rows", "max_new_tokens", "adapter_layers", "pre_align_steps", "align_steps",
            "align_lr", "public_samples", "public_partition", "data_seed", "quick")


# -- data -----------------------------------------------------------------------------------
def write_data(args: argparse.Namespace, target: Path) -> dict[str, Any]:
    """The clients' partitions as they are, the public rows, and held-out rows from the
    partitions between the clients and the public one (no client or public set holds them)."""
    from bench_fedhds import fitting_rows
    from datasets import Dataset

    from fedinstruct.compose import compose_config
    from fedinstruct.model import load_tokenizer, resolve_model_path

    target.mkdir(parents=True, exist_ok=True)
    source = Path(args.data)
    for client in range(args.clients):
        name = f"local_training_{client}.json"
        rows = json.loads((source / name).read_text())
        if args.quick:
            rows = rows[:64]
        (target / name).write_text(json.dumps(rows))
    public = json.loads((source / f"local_training_{args.public_partition}.json").read_text())
    (target.parent / "public.json").write_text(json.dumps(public[: 4 * args.public_samples]))
    pool = []
    for partition in range(args.clients, 10):
        if partition != args.public_partition:
            pool += json.loads((source / f"local_training_{partition}.json").read_text())
    rng = np.random.default_rng(args.data_seed)
    order = rng.permutation(len(pool))[: 6 * args.loss_rows]  # enough that fit, tokenized once
    candidates = Dataset.from_list([pool[i] for i in order])
    cfg = compose_config([f"model={args.model}"])
    tokenizer = load_tokenizer(resolve_model_path(cfg.model))
    fits = fitting_rows(candidates, tokenizer, args.max_length)[: args.loss_rows]
    held_out = candidates.select(fits)
    (target / "global_test.json").write_text(json.dumps(held_out.to_list()))
    return {"held_out": len(held_out), "categories": sorted(set(held_out["category"])),
            "public_rows": min(len(public), 4 * args.public_samples)}


# -- runs -----------------------------------------------------------------------------------
def overrides(args: argparse.Namespace, seed: int, variant: str, data: Path,
              folder: Path) -> list[str]:
    common = [
        *common_overrides(args, seed, data, folder),
        "eval.every=1",
    ]
    if args.quick:
        common += ["model.tiny.num_hidden_layers=6"]
    if variant == FEDIT:
        return [*common, "strategy=fedit"]
    if variant == CONTROL:
        layers = range(args.num_layers - args.adapter_layers, args.num_layers)
        return [*common, "strategy=fedit",
                f"model.lora.layers_to_transform=[{','.join(map(str, layers))}]"]
    fedbiot = [
        *common,
        "strategy=fedbiot",
        f"strategy.fedbiot.adapter_layers={args.adapter_layers}",
        "strategy.fedbiot.drop_ratio=0.5",
        f"strategy.fedbiot.pre_align_steps={args.pre_align_steps}",
        f"strategy.fedbiot.align_steps={args.align_steps}",
        f"strategy.fedbiot.align_lr={args.align_lr}",
        f"strategy.fedbiot.public_samples={args.public_samples}",
        f"strategy.fedbiot.public_dataset={data.parent / 'public.json'}",
    ]
    return fedbiot + (["strategy.fedbiot.align=false"] if variant == NOALIGN else [])


def federate(run_overrides: list[str]) -> tuple[list[dict[str, Any]], float]:
    from fedinstruct.compose import compose_config
    from fedinstruct.server.output import read_metrics
    from fedinstruct.simulation import simulate

    start = time.perf_counter()
    folder = simulate(compose_config(run_overrides))
    return read_metrics(folder), time.perf_counter() - start


def flatten(args: argparse.Namespace, variant: str, rows: list[dict[str, Any]],
            wall: float) -> dict[str, float]:
    """Per round r: loss_r, rougeL_r (AdapFu / the model), emu_loss_r, emu_rougeL_r, and the
    cumulative alignment steps align_r; plus times."""
    out: dict[str, float] = {"wall_s": wall}
    aligned = 0
    for row in rows:
        r = row["round"]
        aligned += int(row.get("align_steps", 0))
        for key, name in (("eval_loss", "loss"), ("eval_rougeL", "rougeL"),
                          ("emu_eval_loss", "emu_loss"), ("emu_eval_rougeL", "emu_rougeL"),
                          ("align_loss_after", "align_loss")):
            if key in row:
                out[f"{name}_r{r}"] = float(row[key])
        if variant == BIOT:
            out[f"align_r{r}"] = aligned
    trained = [r for r in rows if r["round"] > 0]
    out["training_s"] = sum(r.get("time_train_phase", 0.0) for r in trained)
    out["align_s"] = sum(r.get("time_align", 0.0) for r in trained)
    return out


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in SETTINGS}


def run_seed(args: argparse.Namespace, seed: int, data: Path, runs: Path,
             info: dict[str, Any]) -> None:
    for i, variant in enumerate(args.variants):
        print(f"\n### seed {seed}: {variant}", flush=True)
        folder = runs / f"seed{seed}-{i}-{variant.split(',')[0]}"
        rows, wall = federate(overrides(args, seed, variant, data, folder))
        record = {"study": "fedbiot", "seed": seed, "variant": variant,
                  "settings": settings_of(args), "data": info,
                  "metrics": flatten(args, variant, rows, wall),
                  "load": os.getloadavg()[0], "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        stats.append_jsonl(args.results, record)
        print(f"### seed {seed}: {variant}: {json.dumps(record['metrics'])}", flush=True)


# -- report ---------------------------------------------------------------------------------
def _cell(records: list[dict[str, Any]], measure: str, digits: int = 4) -> str:
    mean, half, _ = stats.interval(list(stats.by_seed(records, measure).values()))
    return stats.fmt(mean, half, digits)


def report(path: Path) -> str:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in stats.read_jsonl(path):
        groups[stats.setting_key(r["settings"])].append(r)
    out: list[str] = []
    for key, group in groups.items():
        s = json.loads(key)
        v: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in group:
            v[r["variant"]].append(r)
        rounds = range(s["rounds"] + 1)
        out += [f"## FedBiOT study: {json.dumps(s)}", ""]
        curve = [(name, label) for name, label in (
            (FEDIT, "FedIT"), (CONTROL, "control (last K layers)"), (BIOT, "FedBiOT AdapFu"),
            (NOALIGN, "FedBiOT AdapFu, no alignment")) if v[name]]
        for measure, title in (("loss", "held-out loss"), ("rougeL", "Rouge-L")):
            out += [f"AdapFu {title} against cumulative local steps (mean ± 95% over seeds):",
                    "", "| round | local steps | " + " | ".join(label for _, label in curve)
                    + " |", "|---|---|" + "---|" * len(curve)]
            for r in rounds:
                cells = [_cell(v[name], f"{measure}_r{r}") for name, _ in curve]
                out.append(f"| {r} | {r * s['steps']} | " + " | ".join(cells) + " |")
            out.append("")
        emu = [(BIOT, f"emu_{m}_r{{}}", f"AdapEmu {t}") for m, t in
               (("loss", "loss"), ("rougeL", "Rouge-L"))]
        if v[NOALIGN]:
            emu += [(NOALIGN, f"emu_{m}_r{{}}", f"AdapEmu {t}, no alignment") for m, t in
                    (("loss", "loss"), ("rougeL", "Rouge-L"))]
        out += ["AdapEmu (emulator + adapter) against alignment steps (FedBiOT's round r has "
                "had pre + r x align steps and r rounds of local training"
                + ("; the no-alignment run the same local training and no alignment" if
                   v[NOALIGN] else "") + "):", "",
                "| round | alignment steps | alignment loss after (held-back public rows) | "
                + " | ".join(label for _, _, label in emu) + " |",
                "|---|---|---|" + "---|" * len(emu)]
        for r in rounds:
            steps = stats.by_seed(v[BIOT], f"align_r{r}")
            cells = [_cell(v[BIOT], f"align_loss_r{r}")]
            cells += [_cell(v[name], pattern.format(r)) for name, pattern, _ in emu]
            label = str(int(next(iter(steps.values())))) if steps else "n/a"
            out.append(f"| {r} | {label} | " + " | ".join(cells) + " |")
        pairs = []
        for r in rounds[1:]:
            pairs += [(f"r{r}: AdapFu - FedIT", v[BIOT], v[FEDIT], r),
                      (f"r{r}: AdapFu - control", v[BIOT], v[CONTROL], r),
                      (f"r{r}: control - FedIT", v[CONTROL], v[FEDIT], r),
                      (f"r{r}: AdapFu - AdapFu no alignment", v[BIOT], v[NOALIGN], r)]
        out += ["", "Paired over seeds (A - B; loss: lower is better):", "",
                "| A - B | measure | mean difference ± 95% | seeds | shows |",
                "|---|---|---|---|---|"]
        for label, a, b, r in pairs:
            out += stats.paired_table([(label, a, b)], [(f"loss_r{r}", False),
                                                        (f"rougeL_r{r}", True)])[2:]
        for r in rounds[1:]:
            out += stats.paired_table([(f"r{r}: AdapEmu - AdapEmu no alignment", v[BIOT],
                                        v[NOALIGN])],
                                      [(f"emu_loss_r{r}", False), (f"emu_rougeL_r{r}", True)])[2:]
        for r in rounds[1:]:  # within a run, against its own round 0 (same seed)
            for name, measure, label in ((BIOT, "emu_loss", "AdapEmu loss"),
                                         (BIOT, "loss", "AdapFu loss"),
                                         (CONTROL, "loss", "control loss"),
                                         (FEDIT, "loss", "FedIT loss")):
                mean, half, n = stats.paired(stats.by_seed(v[name], f"{measure}_r{r}"),
                                             stats.by_seed(v[name], f"{measure}_r0"))
                if n:
                    out.append(f"| {label}: round {r} - round 0 | {measure}_r{r} "
                               f"| {stats.fmt(mean, half)} | {n} "
                               f"| {stats.verdict(mean, half, higher_is_better=False)} |")
        times = ", ".join(f"{name} {_cell(v[name], 'wall_s', 0)} s" for name in VARIANTS if v[name])
        align = _cell(v[BIOT], "align_s", 0)
        out += ["", f"Whole run (mean ± 95%): {times}; of FedBiOT's, alignment {align} s.", ""]
    return "\n".join(out) if out else f"no records in {path}\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="the Dolly 10-client split folder")
    p.add_argument("--report", action="store_true", help="print the tables and stop")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--quick", action="store_true", help="tiny model (6 layers): plumbing only")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=5, help="local steps per round")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--loss-rows", type=int, default=300)
    p.add_argument("--rouge-rows", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--adapter-layers", type=int, default=2, help="K")
    p.add_argument("--pre-align-steps", type=int, default=0)
    p.add_argument("--align-steps", type=int, default=10, help="per round")
    p.add_argument("--align-lr", type=float, default=1e-3)
    p.add_argument("--public-samples", type=int, default=256)
    p.add_argument("--public-partition", type=int, default=9)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--runs-dir", help="keep the run folders here (default: a temp folder)")
    args = p.parse_args()
    if args.quick:
        args.model, args.clients, args.rounds, args.steps = "tiny", 2, 2, 2
        args.loss_rows, args.rouge_rows, args.max_new_tokens = 8, 4, 4
        args.public_samples, args.align_steps = 16, 2
    if not args.report and not (args.data and (Path(args.data) / "global_test.json").is_file()):
        p.error("--data: the Dolly split folder (with global_test.json) is needed")
    if not args.report and not args.clients <= args.public_partition <= 9:
        p.error("--public-partition must be a partition no client holds (>= --clients, <= 9)")
    args.num_layers = 6 if args.quick else 30  # tiny LLaMA as configured; SmolLM2-135M
    if args.data:
        args.data = str(Path(args.data).resolve())
    return args


def main() -> None:
    args = parse_args()
    if args.report:
        print(report(args.results))
        return
    with tempfile.TemporaryDirectory(prefix="study-fedbiot-") as tmp:
        runs = Path(args.runs_dir).resolve() if args.runs_dir else Path(tmp) / "runs"
        data = Path(tmp) / "data"
        info = write_data(args, data)
        print(f"data: {info}", flush=True)
        for seed in args.seeds:
            run_seed(args, seed, data, runs, info)
    print("\n" + report(args.results))


if __name__ == "__main__":
    main()
