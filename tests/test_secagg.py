"""Secure aggregation with Flower's SecAgg+: the server holds only the sum of the updates.

Fast: the real SecAgg+ workflow and client mod, driven over an in-process grid whose nodes
answer through fedinstruct's client side (`secagg_client.serve`) with known updates, with a
node lost at each stage. Slow: a simulation of FedIT with SecAgg+ against the same run without
it, and a loopback deployment in which a node is killed in the middle of a secure round.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from types import SimpleNamespace
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from safetensors.torch import load_file

from fedinstruct.compose import compose_config
from fedinstruct.config import ConfigError, PrivacySettings, RunConfig
from fedinstruct.privacy import secagg_server
from fedinstruct.privacy.secagg_client import WEIGHT_CAP, client_update, client_weight, serve
from fedinstruct.protocol import ADAPTER_RECORD, PACKED, WEIGHT, train_reply

DIM = 500


def _cfg(shares: int = 3, threshold: int = 2) -> RunConfig:
    return dataclasses.replace(RunConfig(), privacy=PrivacySettings(
        secure_aggregation=True, secagg_num_shares=shares,
        secagg_reconstruction_threshold=threshold))


class LocalNodes:
    """A grid whose nodes run in this process: each SecAgg+ message is answered through
    `secagg_client.serve`, training being `trained = global + update[node]`. A node in `drops`
    goes down on receiving that stage's message (and answers nothing from then on)."""

    run = SimpleNamespace(run_id=1)

    def __init__(self, updates: dict[int, np.ndarray], samples: dict[int, int],
                 drops: dict[int, str]) -> None:
        self.updates, self.samples, self.drops = updates, samples, drops
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={},
                                       state=RecordDict(), run_config={}) for node in updates}
        self.down: set[int] = set()
        self.replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.updates)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            msg.content = copy.deepcopy(msg.content)  # as if sent: messages share records
            node = msg.metadata.dst_node_id
            if self.drops.get(node) == msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]:
                self.down.add(node)
            if node not in self.down:
                replies.append(serve(msg, self.contexts[node], self.train))
        self.replies += replies
        return replies

    def train(self, msg: Message, context: Context) -> Message:
        node = msg.metadata.dst_node_id
        global_flat = msg.content[ADAPTER_RECORD][PACKED].numpy()
        return train_reply(msg, {"w": torch.from_numpy(global_flat + self.updates[node])},
                           {WEIGHT: self.samples[node], "train-loss": 1.0})


def secure_round(nodes: LocalNodes, cfg: RunConfig, cap: int, clip: float | None = None,
                 flower: type[SecAggPlusWorkflow] | None = None
                 ) -> secagg_server.Released | None:
    """One SecAgg+ round over `nodes`, as SecureRun drives it; what reaches the server."""
    strategy = secagg_server._SumOnly()
    config = {"server-round": 1, WEIGHT_CAP: cap}
    if clip is not None:
        config[KEY_CLIPPING_NORM] = clip
    global_flat = np.linspace(-0.1, 0.1, DIM, dtype=np.float32)
    strategy.instructions = [
        (GridClientProxy(node_id=node, grid=nodes, run_id=1),
         FitIns(ndarrays_to_parameters([global_flat]), dict(config)))
        for node in nodes.updates]
    base = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, config=ServerConfig(num_rounds=1), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    max_weight = float(cap) if cap > 0 else 1.0
    if flower is None:
        workflow = secagg_server.workflow(cfg, max_weight)
    else:
        workflow = flower(cfg.privacy.secagg_num_shares,
                          cfg.privacy.secagg_reconstruction_threshold, max_weight=max_weight)
    workflow(nodes, context)
    return strategy.released


def _updates(num_nodes: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {100 + i: rng.normal(0, 0.01, DIM).astype(np.float32) for i in range(num_nodes)}


@pytest.mark.parametrize(("num_nodes", "shares", "threshold", "drops"), [
    (3, 3, 2, {}),
    (3, 3, 2, {101: Stage.SETUP}),
    (3, 3, 2, {101: Stage.SHARE_KEYS}),
    (3, 3, 2, {101: Stage.COLLECT_MASKED_VECTORS}),  # lost while it trains
    (3, 3, 2, {101: Stage.UNMASK}),  # its masked vector is in the sum already
    (5, 5, 3, {101: Stage.SETUP, 103: Stage.COLLECT_MASKED_VECTORS}),
])
def test_the_server_gets_the_weighted_mean_of_the_survivors(flower_identity, num_nodes, shares,
                                                            threshold, drops):
    updates = _updates(num_nodes)
    samples = {node: 8 + 7 * i for i, node in enumerate(updates)}  # 8, 15, 22, ... capped at 20
    nodes = LocalNodes(updates, samples, drops)
    cfg = _cfg(shares, threshold)
    released = secure_round(nodes, cfg, cap=20)

    assert released is not None, "the round halted"
    summed = [n for n in updates if drops.get(n) not in (Stage.SETUP, Stage.SHARE_KEYS,
                                                         Stage.COLLECT_MASKED_VECTORS)]
    weights = [min(samples[n], 20) for n in summed]
    assert sorted(c.node_id for c in released.clients) == sorted(summed)
    assert sorted(released.weights) == sorted(weights)
    exact = sum(w * updates[n].astype(np.float64) for n, w in zip(summed, weights, strict=True))
    bound = secagg_server.error_bound(cfg, weights, 20.0)
    assert 0 < bound < 1e-5
    np.testing.assert_allclose(released.total, exact, rtol=0, atol=bound * sum(weights))
    np.testing.assert_allclose(released.mean, exact / sum(weights), rtol=0, atol=bound)
    # nothing a node sent is an update: no arrays, and the masked vectors are integers mod 2**32
    masked = 0
    for reply in nodes.replies:
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in configs:  # the weight, then the packed update, masked
            weight, vector = (bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS])
            assert vector.shape == (DIM,) and weight.shape == (1,)
            assert vector.dtype.kind in "iu" and vector.min() >= 0 and vector.max() < 2**32
            masked += 1
    assert masked == len(summed)  # one per node that answered the collect stage


def test_client_clipping_bounds_each_update_in_the_sum(flower_identity):
    updates = _updates(3, seed=1)
    updates[102] *= 50  # far over the clip
    cfg, clip = _cfg(), 0.05
    released = secure_round(LocalNodes(updates, dict.fromkeys(updates, 16), {}), cfg, cap=0,
                            clip=clip)
    assert released is not None and released.weights == [1.0, 1.0, 1.0]  # uniform with DP
    clipped = [client_update(u, np.zeros(DIM, np.float32), clip) for u in updates.values()]
    assert all(np.linalg.norm(c) <= clip * (1 + 1e-6) for c in clipped)
    np.testing.assert_allclose(released.mean, np.mean(clipped, axis=0), rtol=0,
                               atol=secagg_server.error_bound(cfg, [1.0] * 3, 1.0))


def test_too_many_dropouts_fail_the_round(flower_identity):
    nodes = LocalNodes(_updates(3), dict.fromkeys(range(100, 103), 10),
                       {101: Stage.COLLECT_MASKED_VECTORS, 102: Stage.COLLECT_MASKED_VECTORS})
    assert secure_round(nodes, _cfg(), cap=20) is None


def test_flower_alone_fails_a_round_whose_node_was_lost_at_setup(flower_identity):
    """Why `SecAggPlus` exists: Flower 1.41's workflow keeps a node lost before sharing its
    keys as a dropout to unmask, asks its neighbours for shares nobody has, and halts."""
    nodes = LocalNodes(_updates(3), dict.fromkeys(range(100, 103), 10), {101: Stage.SETUP})
    with pytest.raises(KeyError):  # a neighbour has no share of node 101's key
        secure_round(nodes, _cfg(), cap=20, flower=SecAggPlusWorkflow)


def test_client_weight_is_capped_or_uniform():
    assert client_weight(30, 20) == 20 and client_weight(12, 20) == 12
    assert client_weight(0, 20) == 0 and client_weight(30, 0) == 1
    update = client_update(np.full(4, 2.0, np.float32), np.ones(4, np.float32), None)
    np.testing.assert_array_equal(update, np.ones(4))


def test_secure_run_refuses_what_secagg_cannot_run():
    cfg = _cfg()
    assert secagg_server.secure_run(cfg) is secagg_server.SecureRun
    with pytest.raises(ConfigError, match="privacy.secagg_"):  # Flower: threshold < shares
        _cfg(shares=3, threshold=3)


@pytest.mark.parametrize("override, field", [
    ("strategy.aggregation=median", "strategy.aggregation=median"),
    ("federation.min_train_nodes=1", "federation.min_train_nodes"),
    ("privacy.dp=central", "privacy.dp=client"),
    ("selection=fedhds", "selection"),
])
def test_config_refuses_what_secure_aggregation_cannot_mean(override, field):
    with pytest.raises(ConfigError, match=field):
        compose_config(["privacy.secure_aggregation=true", override])


# -- slow: a simulation and a deployment ------------------------------------------------------
SAME_RUN = ("model.quantization=none", "model.lora.dropout=0",  # bit-reproducible training
            "dataset.partitioner=dirichlet", "train.local_steps=6",  # unequal weights
            "eval.every=0")


@pytest.mark.slow
def test_simulation_server_holds_only_the_sum_equal_to_the_plain_mean(tiny_config, tmp_path,
                                                                      monkeypatch):
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedinstruct.protocol import pack
    from fedinstruct.simulation import simulate

    replies: list[Message] = []  # every message the grid hands the server
    pull = InMemoryGrid.pull_messages

    def recording_pull(self, message_ids):
        got = list(pull(self, message_ids))
        replies.extend(got)
        return got

    monkeypatch.setattr(InMemoryGrid, "pull_messages", recording_pull)
    released = []
    aggregate_fit = secagg_server._SumOnly.aggregate_fit

    def spy(self, server_round, results, failures):
        out = aggregate_fit(self, server_round, results, failures)
        released.append((server_round, self.released))
        return out

    monkeypatch.setattr(secagg_server._SumOnly, "aggregate_fit", spy)

    secure = simulate(tiny_config("num_rounds=2", "privacy.secure_aggregation=true", *SAME_RUN))
    secure_replies = list(replies)
    plain_cfg = tiny_config("num_rounds=1", "strategy.norm_bound=0", *SAME_RUN)
    plain_cfg.output_dir = str(tmp_path / "plain")
    plain = simulate(plain_cfg)

    # the unmasked aggregate reached server code once per round, as one sum of 3 updates
    assert [r for r, _ in released] == [1, 2]
    assert all(len(rel.clients) == 3 for _, rel in released)
    # and nothing else derived from an update: every train reply holds masked integers only
    train = [r for r in secure_replies if not r.has_error() and r.metadata.message_type == "train"]
    assert len(train) == 4 * 3 * 2  # 4 SecAgg+ stages, 3 nodes, 2 rounds
    masked = 0
    for reply in train:
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        assert set(configs) <= {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.DESTINATION_LIST,
                                Key.CIPHERTEXT_LIST, Key.MASKED_PARAMETERS, Key.NODE_ID_LIST,
                                Key.SHARE_LIST}
        if Key.MASKED_PARAMETERS in configs:  # the weight, then the packed update, masked
            assert all(bytes_to_ndarray(b).dtype.kind in "iu"
                       for b in configs[Key.MASKED_PARAMETERS])
            masked += 1
    assert masked == 3 * 2

    rows = [json.loads(line) for line in (secure / "metrics.jsonl").read_text().splitlines()]
    plain_rows = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    weights = sorted(plain_rows[0]["train_samples_per_client"].values())
    assert len(set(weights)) > 1, "the clients should weigh differently"
    assert sorted(released[0][1].weights) == weights  # the samples each trained on (cap 24)
    bound = rows[0]["secagg_error_bound"]
    assert 0 < bound < 1e-5 and rows[0]["nodes_replied"] == 3 and rows[0]["bytes_up"] > 0

    # the aggregate equals the plain run's weighted mean of the same clients' updates
    from fedinstruct.model import initial_adapter_state

    initial = pack(initial_adapter_state(plain_cfg.model, plain_cfg.seed))[PACKED].numpy()
    adapters = {}
    for name, folder in (("secure", secure), ("plain", plain)):
        state = load_file(str(folder / "adapters" / "round_001" / "adapter_model.safetensors"))
        adapters[name] = pack(state)[PACKED].numpy().astype(np.float64)
    plain_mean = adapters["plain"] - initial
    assert np.abs(plain_mean).max() > 100 * bound, "round 1 changed the adapter too little"
    np.testing.assert_allclose(released[0][1].mean, plain_mean, rtol=0, atol=bound + 1e-7)
    np.testing.assert_allclose(adapters["secure"], adapters["plain"], rtol=0, atol=bound + 1e-7)


@pytest.mark.slow
def test_a_node_killed_in_a_secure_round_leaves_a_round_that_completes(repo_root, tmp_path):
    from fedinstruct.deploy import LocalDeployment

    folder = tmp_path / "secure"
    run_config = {
        "model": "tiny", "num_rounds": 1, "output_dir": str(folder),
        "train.local_steps": 2, "train.max_length": 96,
        "federation.num_clients": 3, "federation.min_train_nodes": 3,
        "overrides": " ".join([
            "dataset.samples_per_client=16", "eval.every=0", "federation.min_available_nodes=3",
            "federation.min_replies=2", "federation.round_timeout=90",
            "privacy.secure_aggregation=true", "privacy.secagg_num_shares=3",
            "privacy.secagg_reconstruction_threshold=2"]),
    }
    with LocalDeployment(repo_root, num_nodes=3, isolation="loopback",
                         workdir=tmp_path / "deploy") as deployment:
        run = deployment.start_run(run_config)
        node_log = deployment.nodes["node-2"].process.log_path
        deadline = time.monotonic() + 300
        while "Receiving: train message" not in node_log.read_text():  # SecAgg+'s setup
            assert time.monotonic() < deadline, "node-2 received no SecAgg+ message"
            time.sleep(0.2)
        lost = deployment.nodes["node-2"].node_id
        deployment.kill_node(2)  # SIGKILL: a crash in the middle of the round
        result = run.wait(timeout=600)
        assert result.ok, result.logs[-3000:]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1]
    assert rows[0]["nodes_sampled"] == 3 and rows[0]["nodes_replied"] == 2
    # it died before sharing its keys (setup or share keys): left out, not unmasked
    assert f"SecAgg+: node {lost} went silent before sharing its keys" in result.logs
    assert (folder / "adapters" / "final" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_secure_run_with_client_dp_noises_the_sum_and_charges_the_ledger(tiny_config):
    from fedinstruct.model import initial_adapter_state
    from fedinstruct.privacy.dp import PrivacyLedger
    from fedinstruct.protocol import pack
    from fedinstruct.simulation import simulate

    z, clip = 0.5, 0.01
    cfg = tiny_config("num_rounds=1", "eval.every=0", "privacy.secure_aggregation=true",
                      "privacy.dp=client", f"privacy.clip={clip}", f"privacy.noise_multiplier={z}")
    folder = simulate(cfg)
    (row,) = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert row["nodes_replied"] == row["nodes_sampled"] == 3
    expected = PrivacyLedger(z, clip, cfg.privacy.delta, None).charge(3, 3, 3)
    assert row["dp_epsilon"] == pytest.approx(expected["dp_epsilon"])
    assert row["dp_clip"] == clip and row["dp_noise_multiplier"] == z

    state = load_file(str(folder / "adapters" / "round_001" / "adapter_model.safetensors"))
    change = (pack(state)[PACKED].numpy().astype(np.float64)
              - pack(initial_adapter_state(cfg.model, cfg.seed))[PACKED].numpy())
    # the mean of 3 updates clipped to `clip` is at most clip long (RMS ~1e-4 a value here):
    # what shows is the noise, std z*clip on the sum, z*clip/3 on the mean
    assert np.linalg.norm(change - change.mean()) > clip
    assert np.std(change) == pytest.approx(z * clip / 3, rel=0.05)
