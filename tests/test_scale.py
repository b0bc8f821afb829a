"""1,000 virtual clients on one machine: 10 sampled per round, the server's round time and memory
do not grow with the 990 that sit idle.

Each federation runs in a fresh subprocess (peak RSS is per process): the tiny model, 10 and
1,000 virtual clients, 10 sampled, two Ray actors. The ratios are printed; the bounds here are
generous (a shared CI machine is noisy), bench/bench_wire.py measures against the targets.
The fast tests check the two parts that made idle clients cost something: the simulation's
message pump and the partitioning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

PROBE = r"""
import json, sys, threading, time
import psutil
from fedinstruct.compose import compose_config
from fedinstruct.simulation import simulate

cfg = compose_config(json.loads(sys.argv[1]))
me, peak, done = psutil.Process(), [0, 0], threading.Event()

def sample():  # the whole simulation: this process, Ray's processes and its actors
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
start = time.perf_counter()
folder = simulate(cfg)
seconds = time.perf_counter() - start
done.set()
rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
print("RESULT " + json.dumps({
    "rows": rows, "seconds": seconds, "peak_rss_mb": peak[0] / 1e6,
    "server_rss_mb": peak[1] / 1e6}))
"""


def _simulate(tmp_path, clients: int, rounds: int) -> dict:
    actors = 2
    overrides = [
        "model=tiny", f"num_rounds={rounds}", f"federation.num_clients={clients}",
        f"federation.fraction_train={10 / clients}", "federation.min_train_nodes=10",
        "federation.min_available_nodes=10",
        f"federation.client_cpus={max(1, (os.cpu_count() or 2) // actors)}",
        "train.local_steps=1", "train.max_length=64", "dataset.samples_per_client=8",
        "eval.every=0", f"output_dir={tmp_path / f'run{clients}'}",
    ]
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(overrides)],
                          capture_output=True, text=True, timeout=1200)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow  # two real Flower simulations
def test_a_thousand_virtual_clients_ten_sampled(tmp_path):
    rounds = 3  # round 1 loads the model in each actor; rounds 2-3 are compared
    small, large = _simulate(tmp_path, 10, rounds), _simulate(tmp_path, 1000, rounds)
    for result in (small, large):
        rows = result["rows"]
        assert [r["round"] for r in rows] == list(range(1, rounds + 1))
        for row in rows:
            assert row["nodes_sampled"] == row["nodes_replied"] == 10
            assert len(row["train_samples_per_client"]) == 10  # one key per sampled client
            assert row["bytes_down_total"] > 0
    # 1,000 clients: 10 distinct partitions a round, out of 1,000
    ids = [set(r["train_samples_per_client"]) for r in large["rows"]]
    assert all(int(i) < 1000 for s in ids for i in s) and len(set.union(*ids)) > 10

    def round_time(result: dict) -> float:
        return min(r["time_round"] for r in result["rows"][1:])

    time_ratio = round_time(large) / round_time(small)
    rss_ratio = large["server_rss_mb"] / small["server_rss_mb"]
    peak_ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    print(f"\nround time: {round_time(small):.2f} s at 10 clients, {round_time(large):.2f} s at "
          f"1000 (x{time_ratio:.2f})\nserver process peak RSS: {small['server_rss_mb']:.0f} MB "
          f"-> {large['server_rss_mb']:.0f} MB (x{rss_ratio:.2f}); whole simulation: "
          f"{small['peak_rss_mb']:.0f} MB -> {large['peak_rss_mb']:.0f} MB (x{peak_ratio:.2f})")
    assert time_ratio <= 3.0, f"a round at 1000 clients took x{time_ratio:.2f} the time at 10"
    assert rss_ratio <= 1.5, f"the server's RSS grew x{rss_ratio:.2f} from 10 to 1000 clients"
    assert peak_ratio <= 1.5, f"the simulation's RSS grew x{peak_ratio:.2f}"


def test_the_message_pump_asks_only_the_nodes_with_messages():
    """fedinstruct.simulation's pump: one pass over the stored messages per cycle, then
    `get_message_ins` for the nodes that have one waiting; Flower's asks all 1,000 nodes."""
    from flwr.server.superlink.fleet.vce import vce_api

    from fedinstruct.simulation import _poll_only_waiting_nodes

    def message(node: int, delivered: str = "") -> SimpleNamespace:
        return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at=delivered))

    asked: list[int] = []
    store = {"a": message(7), "b": message(9, delivered="earlier"), "c": message(12)}

    class State:
        lock = threading.Lock()
        message_ins_store = store

        def get_message_ins(self, node_id: int, limit: int) -> list:
            asked.append(node_id)
            found = [m for m in store.values()
                     if m.metadata.dst_node_id == node_id and not m.metadata.delivered_at][:limit]
            for m in found:
                m.metadata.delivered_at = "now"
            return found

    original = vce_api.add_messages_to_queue
    restore = _poll_only_waiting_nodes()
    try:
        queue, stop = [], threading.Event()
        pump = threading.Thread(target=vce_api.add_messages_to_queue, args=(
            State(), SimpleNamespace(put=queue.append), dict.fromkeys(range(1000), 0), stop))
        pump.start()
        stop.wait(0.35)  # three or four cycles
        stop.set()
        pump.join(5)
    finally:
        restore()
    assert vce_api.add_messages_to_queue is original
    assert sorted(asked) == [7, 12]  # once each: never the 998 idle nodes, nor node 9 again
    assert [m.metadata.dst_node_id for m in queue] == [7, 12]


def test_pathological_partitions_are_dealt_on_demand_and_cover_the_data():
    from fedinstruct.data import make_synthetic_dataset
    from fedinstruct.data.partition import CategoryShardPartitioner

    data = make_synthetic_dataset(2000, seed=1)
    partitioner = CategoryShardPartitioner(500, "category", shards_per_partition=2, seed=3)
    partitioner.dataset = data
    assert len(partitioner.load_partition(499)) == 4
    seen = [i for p in range(500) for i in partitioner.partition_indices(p)]
    assert sorted(seen) == list(range(2000))  # every row once
    with pytest.raises(ValueError, match="out of range"):
        partitioner.load_partition(500)


def test_the_server_builds_no_training_pool_for_its_synthetic_test_set(tiny_config):
    from fedinstruct.data import federated

    cfg = tiny_config("federation.num_clients=1000", "federation.fraction_train=0.01",
                      "federation.min_train_nodes=10", "federation.min_available_nodes=10")
    federated._POOLS.clear()
    test = federated.test_dataset(cfg)
    assert not federated._POOLS  # 1,000 clients' shares were not generated for it
    assert len(test) == min(cfg.eval.max_samples, cfg.dataset.test_samples)
    _, with_pool = federated._train_and_test(cfg.dataset, 5, cfg.seed)  # as before: same rows
    alone = federated._synthetic_test(cfg.dataset, cfg.seed)
    assert alone["instruction"] == with_pool["instruction"]
