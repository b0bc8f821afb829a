"""Compressed adapter transport and 1,000-client federations: what each wire format costs and
keeps, and what idle virtual clients cost a simulation.

    python bench/bench_wire.py                       # CPU default: ~15-20 min on 2 cores
    python bench/bench_wire.py --rounds 10 --steps 10 --batch-size 4 --max-length 512 \\
        --sampled 5 --quantization 4bit --eval-samples 80 --scale 10,100,1000,5000  # a GPU host

Three tables, markdown on stdout (and --out):

1. bytes per message, each format over fp32, for the run's adapter (scales and headers in);
2. FedIT on the Dolly FedIT-10 split (../shared/data/dolly15k-fedit10) with SmolLM2, every
   format from the same seed in this one invocation: bytes per client per round down and up as
   measured by the round loop's ledger (ratio to fp32), held-out loss after N rounds, and the
   time spent encoding and decoding as a share of the rounds. The federation runs in process
   (the real ClientApp handlers behind a Grid that calls them, sequentially): no Ray, so the
   formats differ only in what they send. The CPU default is small: SmolLM2 unquantized (on 2
   CPU cores a 4-bit step takes ~25 s against ~2 s, bench/results/fedit.md), 2 rounds of 2
   steps of batch 2 at 128 tokens, 2 of 10 clients a round, loss on 24 held-out rows: enough to
   compare the formats' bytes and see whether one departs from fp32, not to tune a model;
3. scale: real Flower simulations (Ray, two actors) of the tiny model with 10, 100, 1,000
   virtual clients, 10 sampled a round, each in a fresh subprocess: peak RSS of the whole
   simulation (the process and all of Ray's), the server process's own peak RSS, and seconds
   per round (the median of rounds 2..N; round 1 loads the model in each actor), and the CPU
   seconds the server process spends per round (start-up included). The last row reruns the
   largest with Flower's own message pump (O(nodes) every 0.1 s) for reference: on an idle
   machine its cost hides in spare cores; it shows in the CPU column, and in round time once
   the cores are busy.

Targets (the issue's): fp16 <= 0.51x, int8 <= 0.27x, nf4 <= 0.15x of fp32; RSS and round time at
1,000 clients <= 1.2x those at 10.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO.parent / "shared" / "data" / "dolly15k-fedit10"
FORMATS = ("fp32", "fp16", "bf16", "int8", "nf4")
TARGETS = {"fp16": 0.51, "bf16": 0.51, "int8": 0.27, "nf4": 0.15}


# -- 1. bytes per message ---------------------------------------------------------------------
def message_table(model: list[str], top_k: float) -> list[str]:
    from fedinstruct.compose import compose_config
    from fedinstruct.config import WireSettings
    from fedinstruct.model import initial_adapter_state
    from fedinstruct.protocol import encode, pack
    from fedinstruct.wire import DELTA, FULL

    cfg = compose_config(model)
    state = initial_adapter_state(cfg.model, 0)
    size = sum(t.numel() for t in state.values())

    def nbytes(record) -> int:
        return sum(len(a.data) for a in record.values())

    fp32 = nbytes(pack(state))
    lines = [f"### Bytes per message: {cfg.model.name_or_path} adapter, {size:,} values "
             f"({len(state)} tensors)", "",
             "| format | arrays | bytes down | bytes up | down / fp32 | up / fp32 | target |",
             "|---|---|---|---|---|---|---|"]
    variants = [(f, 0.0) for f in FORMATS] + ([("int8", top_k), ("nf4", top_k)] if top_k else [])
    for fmt, k in variants:
        wire = WireSettings(format=fmt, top_k=k)
        down, up = encode(state, wire, FULL), encode(state, wire, DELTA)
        name = fmt + (f" + top-{k:g}" if k else "")
        target = f"<= {TARGETS[fmt]}" if fmt in TARGETS and not k else ""
        lines.append(f"| {name} | {len(up)} | {nbytes(down):,} | {nbytes(up):,} | "
                     f"{nbytes(down) / fp32:.3f} | {nbytes(up) / fp32:.3f} | {target} |")
    return lines


# -- 2. formats on Dolly ----------------------------------------------------------------------
class InProcessGrid:
    """The real ClientApp train/evaluate handlers behind a Grid, one Context per node (so error
    feedback persists), called in turn."""

    def __init__(self, cfg, num_nodes: int) -> None:
        from flwr.app import Context, RecordDict

        self.cfg = cfg
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(),
                                          run_config={}, node_config={
                                              "partition-id": i, "num-partitions": num_nodes})
                         for i in range(num_nodes)}
        self.replies: dict = {}
        self.count = 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        from fedinstruct.client_app import handle_evaluate, handle_train

        ids = []
        for msg in messages:
            self.count += 1
            msg_id = f"m{self.count}"
            msg.metadata.__dict__["_message_id"] = msg_id
            handler = handle_evaluate if msg.metadata.message_type == "evaluate" else handle_train
            self.replies[msg_id] = handler(self.cfg, msg, self.contexts[msg.metadata.dst_node_id])
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids) -> list:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


class CodecClock:
    """Seconds spent in the wire codecs (encode and decode), both sides: they run in this
    process here."""

    def __init__(self) -> None:
        import fedinstruct.protocol as protocol
        import fedinstruct.wire as wire

        self.seconds = 0.0
        self._protocol, self._wire = protocol, wire
        self._encode, self._decode = wire.Codec.encode, protocol.decode

    def __enter__(self) -> CodecClock:
        clock, encode, decode = self, self._encode, self._decode

        def timed_encode(codec, flat, kind):
            start = time.perf_counter()
            try:
                return encode(codec, flat, kind)
            finally:
                clock.seconds += time.perf_counter() - start

        def timed_decode(*args, **kwargs):
            start = time.perf_counter()
            try:
                return decode(*args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - start

        self._wire.Codec.encode, self._protocol.decode = timed_encode, timed_decode
        return self

    def __exit__(self, *exc) -> None:
        self._wire.Codec.encode, self._protocol.decode = self._encode, self._decode


def run_format(args, fmt: str, top_k: float, folder: Path) -> dict:
    from flwr.supercore.task_identity import TaskIdentity

    from fedinstruct.compose import compose_config
    from fedinstruct.methods.base import server_method
    from fedinstruct.server.loop import FederatedRun
    from fedinstruct.server.output import RunOutput

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    cfg = compose_config([
        f"model={args.model}", f"model.quantization={args.quantization}",
        "dataset=dolly", "dataset.partitioner=prepartitioned", f"dataset.source={args.data}",
        f"federation.num_clients={args.clients}",
        f"federation.fraction_train={args.sampled / args.clients}",
        f"federation.min_train_nodes={args.sampled}", f"federation.min_available_nodes="
        f"{args.sampled}", f"num_rounds={args.rounds}", f"train.local_steps={args.steps}",
        f"train.max_length={args.max_length}", f"train.batch_size={args.batch_size}",
        f"seed={args.seed}",
        f"eval.every={args.rounds}", "eval.metrics=[loss]", f"eval.max_samples={args.eval_samples}",
        f"wire.format={fmt}", f"wire.top_k={top_k}", f"output_dir={folder}",
    ])
    grid = InProcessGrid(cfg, args.clients)
    start = time.perf_counter()
    with CodecClock() as clock:
        FederatedRun(cfg, grid, server_method(cfg), RunOutput(folder)).run()
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["round"] > 0]
    return {
        "format": fmt + (f" + top-{top_k:g}" if top_k else ""),
        "down": statistics.mean(r["bytes_per_client_down"] for r in trained),
        "up": statistics.mean(r["bytes_per_client_up"] for r in trained),
        "loss0": rows[0].get("eval_loss"), "loss": rows[-1].get("eval_loss"),
        "train_loss": trained[-1].get("train_loss"), "mb_total": trained[-1]["mb_total"],
        "round_s": sum(r["time_round"] for r in trained), "codec_s": clock.seconds,
        "seconds": seconds,
    }


def format_table(args) -> list[str]:
    variants = [(f, 0.0) for f in args.formats.split(",")]
    if args.top_k:
        variants.append(("int8", args.top_k))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, k in variants:
            print(f"[wire] {fmt} top_k={k:g}: {args.rounds} rounds ...", file=sys.stderr,
                  flush=True)
            results.append(run_format(args, fmt, k, Path(tmp) / f"{fmt}-{k:g}"))
            print(f"[wire]   {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    base = next(r for r in results if r["format"] == "fp32")
    lines = [f"### FedIT on Dolly (FedIT-10 split): {args.model} (quantization "
             f"{args.quantization}), {args.clients} clients, {args.sampled} sampled, "
             f"{args.rounds} rounds x {args.steps} steps x batch {args.batch_size}, "
             f"{args.max_length} tokens, seed {args.seed}, held-out loss on "
             f"{args.eval_samples} rows", "",
             "| format | B/client/round down | up | down / fp32 | up / fp32 | eval loss round 0 "
             f"| eval loss round {args.rounds} | vs fp32 | train loss | MB total | "
             "codec share of rounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['format']} | {r['down']:,.0f} | {r['up']:,.0f} | {r['down'] / base['down']:.3f}"
            f" | {r['up'] / base['up']:.3f} | {r['loss0']:.4f} | {r['loss']:.4f} | "
            f"{r['loss'] - base['loss']:+.4f} | {r['train_loss']:.4f} | {r['mb_total']:.2f} | "
            f"{100 * r['codec_s'] / r['round_s']:.2f}% ({r['codec_s']:.2f} of {r['round_s']:.0f} s)"
            " |")
    return lines


# -- 3. scale ---------------------------------------------------------------------------------
PROBE = r"""
import json, sys, threading, time
import psutil
if sys.argv[2] == "flower":  # Flower's own message pump, for reference
    import fedinstruct.simulation as simulation
    simulation._poll_only_waiting_nodes = lambda: (lambda: None)
from fedinstruct.compose import compose_config
from fedinstruct.simulation import simulate

cfg = compose_config(json.loads(sys.argv[1]))
me, peak, done = psutil.Process(), [0, 0], threading.Event()

def sample():
    while not done.is_set():
        own = me.memory_info().rss
        total = own
        for proc in me.children(recursive=True):
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        peak[0], peak[1] = max(peak[0], total), max(peak[1], own)
        done.wait(0.25)

threading.Thread(target=sample, daemon=True).start()
cpu = sum(me.cpu_times()[:2])
folder = simulate(cfg)
cpu = sum(me.cpu_times()[:2]) - cpu  # the server process: ServerApp, LinkState, Ray driver
done.set()
rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
print("RESULT " + json.dumps({"rows": rows, "peak_rss_mb": peak[0] / 1e6,
      "server_rss_mb": peak[1] / 1e6, "server_cpu_s": cpu}))
"""


def simulate_scale(clients: int, rounds: int, folder: Path, pump: str = "fedinstruct") -> dict:
    overrides = [
        "model=tiny", f"num_rounds={rounds}", f"federation.num_clients={clients}",
        f"federation.fraction_train={10 / clients}", "federation.min_train_nodes=10",
        "federation.min_available_nodes=10",
        f"federation.client_cpus={max(1, (os.cpu_count() or 2) // 2)}",  # two actors
        "train.local_steps=1", "train.max_length=64", "dataset.samples_per_client=8",
        "eval.every=0", f"output_dir={folder}",
    ]
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(overrides), pump],
                          capture_output=True, text=True, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{clients} clients failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    rows = result["rows"]
    result["round_s"] = statistics.median(r["time_round"] for r in rows[1:])
    result["client_s"] = statistics.median(r["time_client_train"] for r in rows[1:])
    result["cpu_per_round"] = result["server_cpu_s"] / len(rows)
    return result


def scale_table(args) -> list[str]:
    sizes = [int(n) for n in args.scale.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            print(f"[scale] {n} virtual clients ...", file=sys.stderr, flush=True)
            results[n] = simulate_scale(n, args.scale_rounds, Path(tmp) / f"n{n}")
        if args.flower_pump:
            n = max(sizes)
            print(f"[scale] {n} virtual clients, Flower's pump ...", file=sys.stderr, flush=True)
            results["flower"] = simulate_scale(n, args.scale_rounds, Path(tmp) / "flower",
                                               pump="flower")
    base = results[min(sizes)]
    lines = [f"### Scale: tiny model, 10 sampled a round, {args.scale_rounds} rounds, "
             f"{os.cpu_count()} CPUs, two Ray actors", "",
             "| virtual clients | peak RSS, whole simulation MB | x | server process peak RSS MB"
             " | x | s per round | x | clients' training s per round | server process CPU s "
             "per round |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        name = f"{max(sizes)} (Flower's pump)" if key == "flower" else f"{key}"
        lines.append(f"| {name} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f} | {r['server_rss_mb']:.0f} | "
                     f"{r['server_rss_mb'] / base['server_rss_mb']:.2f} | {r['round_s']:.2f} | "
                     f"{r['round_s'] / base['round_s']:.2f} | {r['client_s']:.2f} | "
                     f"{r['cpu_per_round']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--quantization", default="none", choices=("none", "4bit", "8bit"))
    parser.add_argument("--data", default=str(DOLLY))
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--sampled", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=24)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--top-k", type=float, default=0.1,
                        help="also run int8 with this top-k fraction (0: not)")
    parser.add_argument("--scale", default="10,100,1000")
    parser.add_argument("--scale-rounds", type=int, default=4)
    parser.add_argument("--flower-pump", action=argparse.BooleanOptionalAction, default=True,
                        help="rerun the largest federation with Flower's own message pump")
    parser.add_argument("--skip-formats", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--out", default=None, help="also write the tables here (markdown)")
    args = parser.parse_args()

    start = time.perf_counter()
    tables = [message_table([f"model={args.model}"], args.top_k)]
    if not args.skip_formats:
        tables.append(format_table(args))
    if not args.skip_scale:
        tables.append(scale_table(args))
    text = "\n\n".join("\n".join(t) for t in tables)
    text += f"\n\n(bench/bench_wire.py, {time.perf_counter() - start:.0f} s)\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
