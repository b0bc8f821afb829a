"""FedBiOT against FedIT: client memory and step time, bytes on the wire, AdapFu / AdapEmu
quality, and the server's alignment cost.

    python bench/bench_fedbiot.py --data ../shared/data/dolly15k-fedit10   # ~40 min, 2 cores
    python bench/bench_fedbiot.py --data ../shared/data/dolly15k-fedit10 --pre-align-steps 200 \
        --public-samples 512 --align-steps 5   # the README's run, ~54 min
    python bench/bench_fedbiot.py --data ../shared/data/dolly15k-fedit10 --quick   # tiny model

Four federations on the same clients, rounds and seed: FedIT, FedBiOT (K=2 adapter layers,
drop ratio 0.5), FedBiOT without alignment (offsite-tuning), and a capacity control: FedIT with
LoRA on the adapter layers only (``model.lora.layers_to_transform``), i.e. FedBiOT's trainable
set trained on the full model. FedBiOT's AdapFu against the control shows what the emulator
costs; the control against FedIT shows what training only the last K layers costs.

The defaults are the paper's setting scaled down to fit two CPU cores: SmolLM2-135M-Instruct (30
layers), 3 of the 10 Dolly clients, 3 rounds of 5 local steps (batch 4, max length 128), 16 of
the 80 held-out rows with 32 new tokens, and 10 alignment steps before round 1 then 3 per round
(lr 1e-3) on 64 rows of a Dolly partition that no participating client holds (the server's
public data).
Client memory and time per local step are measured in a fresh subprocess per variant that
builds the client model the way a client does and trains on a client's data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONTROL = "FedIT, adapter layers only"
VARIANTS = ("FedIT", "FedBiOT", "FedBiOT, no alignment", CONTROL)


def overrides(
    args: argparse.Namespace, variant: str, folder: Path, public: Path | None
) -> list[str]:
    """The Hydra overrides of one variant; everything but the strategy is shared."""
    common = [
        f"seed={args.seed}",
        f"num_rounds={args.rounds}",
        f"output_dir={folder}",
        f"federation.num_clients={args.clients}",
        f"federation.min_train_nodes={args.clients}",
        f"federation.min_available_nodes={args.clients}",
        "federation.client_cpus=1",
        f"train.local_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.max_length={args.max_length}",
        f"eval.max_samples={args.eval_samples}",
        f"eval.max_new_tokens={args.new_tokens}",
    ]
    if args.quick:
        common += ["model=tiny", "model.tiny.num_hidden_layers=6", "dataset=synthetic",
                   "dataset.samples_per_client=32"]
    else:
        common += ["model=smollm2", "dataset=dolly", "dataset.partitioner=prepartitioned",
                   f"dataset.source={Path(args.data).resolve()}"]
    if variant == "FedIT":
        return [*common, "strategy=fedit"]
    if variant == CONTROL:
        layers = list(range(args.num_layers - args.adapter_layers, args.num_layers))
        return [*common, "strategy=fedit",
                f"model.lora.layers_to_transform=[{','.join(map(str, layers))}]"]
    fedbiot = [
        *common,
        "strategy=fedbiot",
        f"strategy.fedbiot.adapter_layers={args.adapter_layers}",
        "strategy.fedbiot.drop_ratio=0.5",
        f"strategy.fedbiot.pre_align_steps={args.pre_align_steps}",
        f"strategy.fedbiot.align_lr={args.align_lr}",
        f"strategy.fedbiot.align_steps={args.align_steps}",
        f"strategy.fedbiot.public_samples={args.public_samples}",
        f"strategy.fedbiot.public_dataset={public or 'synthetic'}",
    ]
    return fedbiot + (["strategy.fedbiot.align=false"] if variant.endswith("no alignment") else [])


def public_rows(args: argparse.Namespace, folder: Path) -> Path | None:
    """Alignment data: a Dolly partition outside the federation (the server's public data)."""
    if args.quick:
        return None
    source = Path(args.data) / f"local_training_{args.public_partition}.json"
    if args.public_partition < args.clients:
        raise SystemExit(f"--public-partition {args.public_partition} is a participating client")
    target = folder / "public.json"
    rows = json.loads(source.read_text())[: 4 * args.public_samples]
    target.write_text(json.dumps(rows))
    return target


def federate(cfg_overrides: list[str]) -> list[dict]:
    from fedinstruct.compose import compose_config
    from fedinstruct.server.output import read_metrics
    from fedinstruct.simulation import simulate

    return read_metrics(simulate(compose_config(cfg_overrides)))


def emulator_folder(cfg_overrides: list[str]) -> Path:
    """The emulator the FedBiOT clients cached (its plan and vocabulary match this model's)."""
    from transformers import AutoConfig

    from fedinstruct.compose import compose_config
    from fedinstruct.methods.fedbiot.split import SplitPlan, load_split_plan
    from fedinstruct.model import cache_root, resolve_model_path

    cfg = compose_config(cfg_overrides)
    config = AutoConfig.from_pretrained(resolve_model_path(cfg.model))
    s = cfg.strategy.fedbiot
    plan = SplitPlan.from_config(config.num_hidden_layers, s.adapter_layers, s.drop_ratio)
    matches = [
        folder
        for folder in (cache_root() / "emulators").glob("*")
        if (folder / "config.json").is_file()
        and load_split_plan(folder) == plan
        and json.loads((folder / "config.json").read_text())["vocab_size"] == config.vocab_size
        and json.loads((folder / "config.json").read_text())["hidden_size"] == config.hidden_size
    ]
    if not matches:
        raise SystemExit("no cached emulator found: did the FedBiOT federation run?")
    return max(matches, key=lambda p: p.stat().st_mtime)


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. getrusage's ru_maxrss would also count the
    parent's peak, which Linux carries over into a child across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def client_probe(cfg_overrides: list[str], emulator: str | None, steps: int) -> dict[str, float]:
    """In a fresh process: build the client's model as a client does, time local steps."""
    import torch
    from peft import get_peft_model_state_dict

    from fedinstruct.client.local import LocalClient, shared_model
    from fedinstruct.compose import compose_config
    from fedinstruct.methods.fedbiot.client import load_client_model
    from fedinstruct.model import model_bytes

    torch.set_num_threads(1)  # what a client with one CPU gets in the simulation
    cfg = compose_config(cfg_overrides)
    node = {"partition-id": 0, "num-partitions": cfg.federation.num_clients}
    client = LocalClient.create(cfg, node)
    baseline = _status_mb("VmRSS")
    loaded = load_client_model(cfg, emulator) if emulator else shared_model(cfg)[0]
    weights = model_bytes(loaded.model)
    client.prepare(loaded.tokenizer)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(loaded.model).items()}
    eps = cfg.strategy.fedbiot.proximal_eps if emulator else 0.0
    rows = list(range(len(client.dataset)))
    cfg.train.local_steps = 1  # warm-up
    client.train(loaded.model, loaded.tokenizer, state, rows, server_round=1, proximal_weight=eps)
    cfg.train.local_steps = steps
    _, result = client.train(
        loaded.model, loaded.tokenizer, state, rows, server_round=2, proximal_weight=eps
    )
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    return {
        "peak_rss_mb": _status_mb("VmHWM"),
        "baseline_rss_mb": baseline,
        "model_mb": weights / 2**20,
        "step_s": result.seconds / result.steps,
        "load_s": loaded.load_seconds,
        "trainable": trainable,
    }


def probe(cfg_overrides: list[str], emulator: Path | None, steps: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--probe", json.dumps(
        {"overrides": cfg_overrides, "emulator": emulator and str(emulator), "steps": steps}
    )]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(rows: list[dict]) -> dict[str, float]:
    last, later = rows[-1], rows[2:] or rows[1:]
    return {
        "down1": rows[1]["bytes_per_client_down"] / 1e6,
        "down": _mean([r["bytes_per_client_down"] for r in later]) / 1e6,
        "up": _mean([r["bytes_per_client_up"] for r in rows[1:]]) / 1e6,
        "loss": last.get("eval_loss", float("nan")),
        "rouge": last.get("eval_rougeL", float("nan")),
        "emu_loss": last.get("emu_eval_loss", float("nan")),
        "emu_rouge": last.get("emu_eval_rougeL", float("nan")),
        "align1": rows[1].get("time_align", 0.0),
        "align": _mean([r.get("time_align", 0.0) for r in later]),
        "align_loss": (last.get("align_loss_before"), last.get("align_loss_after")),
        "round_s": _mean([r["time_round"] for r in rows[1:]]),
        "base_rouge": rows[0].get("eval_rougeL", float("nan")),
    }


def report(args, results: dict[str, dict], probes: dict[str, dict]) -> None:
    model = "tiny LLaMA (6 layers)" if args.quick else "SmolLM2-135M-Instruct (30 layers)"
    data = "synthetic" if args.quick else "Dolly-15k FedIT split"
    print(f"\n## FedBiOT vs FedIT: {model}, {data}, {args.clients} clients, {args.rounds} rounds x "
          f"{args.steps} steps x batch {args.batch_size}, seed {args.seed}, "
          f"{args.eval_samples} held-out rows x {args.new_tokens} new tokens, max length "
          f"{args.max_length}; alignment: {args.pre_align_steps} steps before round 1, "
          f"{args.align_steps} per round, lr {args.align_lr:g}; CPU\n")
    print("| variant | client peak RSS MB | over baseline MB | model MB | trainable | s / step "
          "| down MB/client r1 | down MB/client later | up MB/client | AdapFu loss "
          "| AdapFu Rouge-L | AdapEmu loss | AdapEmu Rouge-L | align s r1 / later |")
    print("|---|" + "---|" * 13)
    for name in VARIANTS:
        r, p = results[name], probes[name]
        align = f"{r['align1']:.1f} / {r['align']:.1f}" if name == "FedBiOT" else "-"
        emu = (f"{r['emu_loss']:.3f} | {r['emu_rouge']:.4f}" if name.startswith("FedBiOT")
               else "- | -")
        print(f"| {name} | {p['peak_rss_mb']:.0f} | {p['peak_rss_mb'] - p['baseline_rss_mb']:.0f} "
              f"| {p['model_mb']:.1f} | {p['trainable']:,} | {p['step_s']:.2f} | {r['down1']:.3f} "
              f"| {r['down']:.3f} | {r['up']:.3f} | {r['loss']:.3f} | {r['rouge']:.4f} | {emu} "
              f"| {align} |")
    fedit, biot, off, control = (results[v] for v in VARIANTS)
    pf, pb = probes["FedIT"], probes["FedBiOT"]
    mem = pb["peak_rss_mb"] / pf["peak_rss_mb"]
    over = {name: p["peak_rss_mb"] - p["baseline_rss_mb"] for name, p in probes.items()}
    mem_delta = over["FedBiOT"] / over["FedIT"]
    step = pb["step_s"] / pf["step_s"]
    print("\nBoth servers evaluate on the unquantized full model (FedIT: base + adapter; "
          f"FedBiOT AdapFu: base + adapter layers' LoRA). Base model without adapter: Rouge-L "
          f"{biot['base_rouge']:.4f}; clients train on 4-bit bases.")
    if biot["align_loss"][0] is not None:
        print(f"Alignment loss in the last round: {biot['align_loss'][0]:.4f} -> "
              f"{biot['align_loss'][1]:.4f}; seconds per round (FedIT / FedBiOT / no alignment): "
              f"{fedit['round_s']:.1f} / {biot['round_s']:.1f} / {off['round_s']:.1f}.")
    print(f"Capacity control ({CONTROL}: FedBiOT's trainable set on the full model): AdapFu "
          f"Rouge-L {biot['rouge'] / max(control['rouge'], 1e-9):.2f}x the control's, loss "
          f"{biot['loss']:.3f} vs {control['loss']:.3f}; the control reaches "
          f"{control['rouge'] / max(fedit['rouge'], 1e-9):.2f}x FedIT's Rouge-L.")
    print("\n| target | measured | met |")
    print("|---|---|---|")
    vs_fedit = biot["rouge"] / max(fedit["rouge"], 1e-9)
    checks = [
        ("client peak RSS <= 0.6x FedIT", f"{mem:.2f}x (over baseline {mem_delta:.2f}x)",
         mem <= 0.6),
        ("client s/step <= 0.6x FedIT", f"{step:.2f}x", step <= 0.6),
        ("AdapFu Rouge-L >= 0.95x FedIT", f"{vs_fedit:.2f}x", vs_fedit >= 0.95),
        ("AdapFu Rouge-L > no alignment", f"{biot['rouge']:.4f} vs {off['rouge']:.4f}",
         biot["rouge"] > off["rouge"]),
    ]
    for name, value, met in checks:
        print(f"| {name} | {value} | {'yes' if met else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="the Dolly 10-client split folder (local_training_<i>.json)")
    parser.add_argument("--quick", action="store_true", help="tiny model on synthetic data")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--pre-align-steps", type=int, default=10)
    parser.add_argument("--align-steps", type=int, default=3)
    parser.add_argument("--align-lr", type=float, default=1e-3)
    parser.add_argument("--public-samples", type=int, default=64)
    parser.add_argument("--public-partition", type=int, default=9)
    parser.add_argument("--probe-steps", type=int, default=5)
    parser.add_argument("--adapter-layers", type=int, default=2, help="K")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        spec = json.loads(args.probe)
        print(json.dumps(client_probe(spec["overrides"], spec["emulator"], spec["steps"])))
        return
    if not args.quick and not args.data:
        parser.error("--data is required (the Dolly 10-client split folder), or use --quick")
    args.num_layers = 6 if args.quick else 30  # tiny LLaMA as configured above; SmolLM2-135M

    results, probes = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-fedbiot-") as tmp:
        public = public_rows(args, Path(tmp))
        configs = {
            v: overrides(args, v, Path(tmp) / f"run{i}", public) for i, v in enumerate(VARIANTS)
        }
        for variant in VARIANTS:
            print(f"\n### federation: {variant}", flush=True)
            results[variant] = summarize(federate(configs[variant]))
        emulator = emulator_folder(configs["FedBiOT"])
        for variant in ("FedIT", "FedBiOT", CONTROL):  # no alignment: FedBiOT's client
            print(f"\n### client probe: {variant}", flush=True)
            probes[variant] = probe(configs[variant], emulator if variant == "FedBiOT" else None,
                                    args.probe_steps)
        probes[VARIANTS[2]] = probes["FedBiOT"]
    report(args, results, probes)


if __name__ == "__main__":
    main()
