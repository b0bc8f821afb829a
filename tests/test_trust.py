"""The trust boundary: what a client's reply or a server's message may do, and may not.

Every kind of bad reply is refused by `fedinstruct.protocol` with a reason naming the field, or
by the round's weight caps; robust aggregation bounds what a valid but hostile update can do;
a server message cannot make a client write outside its cache folder. The federation test runs
hostile ClientApps next to honest ones in a real Flower simulation.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation
from hostile_app import (  # tests/apps: the hostile Flower app these tests run
    SELECT_KINDS,
    TRAIN_KINDS,
    bad_select_content,
    bad_train_content,
    hostile_client_app,
)
from safetensors.torch import load_file

from fedinstruct.compose import compose_config
from fedinstruct.methods.fedbiot.package import emulator_folder
from fedinstruct.methods.fedit import build_fedit
from fedinstruct.protocol import (
    CONFIG_RECORD,
    EMULATOR_RECORD,
    EMULATOR_TOKENIZER_RECORD,
    FEDBIOT_FINGERPRINT,
    FEDBIOT_MODEL_CONFIG,
    FEDBIOT_PLAN,
    ProtocolError,
    layout_of,
    pack,
    read_select_reply,
    read_train_reply,
)
from fedinstruct.server.messaging import read_updates, within_caps
from fedinstruct.server_app import make_server_app

LAYOUT = {"a.lora_A.weight": (2, 4), "b.lora_B.weight": (4, 2)}
HONEST_METRICS = {"num-examples": 8, "train-loss": 1.0, "partition-id": 1}


def _state(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in LAYOUT.items()}


def _record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in state.items()})


def _reply(content: RecordDict, node: int = 7) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(content, reply_to=instruction)


@pytest.mark.parametrize("kind", TRAIN_KINDS)
def test_every_bad_train_reply_is_refused_with_a_reason(kind, flower_identity, caplog,
                                                        monkeypatch):
    honest = _reply(bad_train_content("none", pack(_state(1)), HONEST_METRICS))
    assert len(read_updates([honest], LAYOUT, "round 1")) == 1
    bad = _reply(bad_train_content(kind, pack(_state(1)), HONEST_METRICS))
    monkeypatch.setattr(logging.getLogger("fedinstruct"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="fedinstruct"):
        updates = within_caps(read_updates([bad], LAYOUT, "round 1"), lambda node: 16, "round 1")
    assert updates == []
    assert "rejected update from node" in caplog.text


def test_protocol_errors_name_the_field(flower_identity):
    cases = {"nan-weight": "num-examples", "extra-metric": "secret", "float64": "float64",
             "wrong-size": "values", "extra-record": "exactly one array record",
             "absurd-partition": "partition-id", "not-numpy": "not a NumPy array"}
    for kind, words in cases.items():
        bad = _reply(bad_train_content(kind, pack(_state(1)), HONEST_METRICS))
        with pytest.raises(ProtocolError, match=words):
            read_train_reply(bad, LAYOUT)


@pytest.mark.parametrize("kind", SELECT_KINDS[:-1])
def test_every_bad_selection_reply_is_refused(kind, flower_identity):
    ids = np.arange(3, dtype=np.int64)
    honest = RecordDict({
        "centroids": ArrayRecord({"centroids": Array(np.zeros((3, 2), np.float32)),
                                  "cluster_ids": Array(ids),
                                  "weights": Array(np.ones(3, np.float32))}),
        "metrics": MetricRecord({"local-samples": 10}),
    })
    read_select_reply(_reply(honest), max_centroids=4096)
    with pytest.raises(ProtocolError):
        read_select_reply(_reply(bad_select_content(kind, honest)), max_centroids=4096)


def test_weight_claims_above_the_cap_are_refused_and_unknown_caps_clip(flower_identity):
    replies = [_reply(bad_train_content("none", pack(_state(i)), {**HONEST_METRICS,
                                                                  "num-examples": n}), node=i)
               for i, n in ((1, 8), (2, 12), (3, 500))]
    updates = read_updates(replies, LAYOUT, "round 1")
    assert [u.node_id for u in within_caps(updates, lambda node: 16, "r")] == [1, 2]
    clipped = within_caps(read_updates(replies, LAYOUT, "round 1"), lambda node: None, "r")
    assert [u.weight for u in clipped] == [8, 12, 12]


def test_with_two_replies_a_far_update_is_bounded_not_averaged_in_whole(flower_identity):
    cfg = compose_config(["federation.min_train_nodes=1", "federation.min_available_nodes=1",
                          "strategy.norm_bound=3"])
    strategy = build_fedit(cfg)
    global_state = _state(0)

    class Nodes:
        def get_node_ids(self):
            return [1, 2]

    messages = list(strategy.configure_train(1, _record(global_state), ConfigRecord(),
                                             Nodes()))
    honest = {k: v + 0.01 for k, v in global_state.items()}
    attack = {k: v + 1000.0 for k, v in global_state.items()}
    replies = [Message(RecordDict({"arrays": pack(s), "metrics": MetricRecord(
        {"num-examples": 8})}), reply_to=m) for m, s in zip(messages, (honest, attack),
                                                           strict=True)]
    updates = read_updates(replies, layout_of(global_state), "round 1")
    arrays, _ = strategy.aggregate_train(1, [u.for_aggregation(u.weight) for u in updates])
    moved = math.sqrt(sum(float(np.sum((arrays[k].numpy() - global_state[k]) ** 2))
                          for k in LAYOUT))
    honest_norm = math.sqrt(sum(float(np.sum((honest[k] - global_state[k]) ** 2))
                                for k in LAYOUT))
    # the attacker is scaled to 3x the honest distance: the mean moves at most 2x that
    assert moved <= 2 * honest_norm + 1e-5


@pytest.mark.parametrize("aggregation", ["median", "trimmed_mean"])
def test_robust_aggregation_ignores_one_outlier_of_five(aggregation, flower_identity):
    cfg = compose_config(["federation.min_train_nodes=1", "federation.min_available_nodes=1",
                          f"strategy.aggregation={aggregation}", "strategy.norm_bound=0",
                          "strategy.reject_norm_ratio=1000"])
    strategy = build_fedit(cfg)

    class Nodes:
        def get_node_ids(self):
            return [1, 2, 3, 4, 5]

    global_state = _state(0)
    messages = list(strategy.configure_train(1, _record(global_state), ConfigRecord(),
                                             Nodes()))
    states = [{k: v + 0.1 * i for k, v in global_state.items()} for i in range(1, 5)]
    states.append({k: v + 1e6 for k, v in global_state.items()})
    replies = [Message(RecordDict({"arrays": pack(s), "metrics": MetricRecord(
        {"num-examples": 8})}), reply_to=m) for m, s in zip(messages, states, strict=True)]
    updates = read_updates(replies, layout_of(global_state), "round 1")
    arrays, _ = strategy.aggregate_train(1, [u.for_aggregation(u.weight) for u in updates])
    for key in LAYOUT:
        assert np.abs(arrays[key].numpy() - global_state[key]).max() < 1.0


@pytest.mark.parametrize("name", ["../escaped.json", "/tmp/x/absolute.json", ".hidden",
                                  "sub/dir.json", "config.json"])
def test_a_server_message_cannot_write_outside_the_cache(name, tmp_path, monkeypatch):
    """The emulator's tokenizer files come with names from the message: a traversal name
    is refused before anything is written, and the cache holds nothing afterwards."""
    from fedinstruct.methods.fedbiot.package import fingerprint_of
    from fedinstruct.methods.fedbiot.split import SplitPlan

    cache = tmp_path / "node-cache"
    monkeypatch.setenv("FEDINSTRUCT_CACHE", str(cache))
    plan = SplitPlan.from_config(4, adapter_layers=1, drop_ratio=0.0)
    state = {"model.embed_tokens.weight": torch.zeros(2, 2)}
    state.update({f"model.layers.{i}.w": torch.zeros(1) for i in range(4)})
    model_config = '{"num_hidden_layers": 4}'
    fingerprint = fingerprint_of(state, model_config, plan)
    import json

    config = ConfigRecord({FEDBIOT_FINGERPRINT: fingerprint, FEDBIOT_MODEL_CONFIG: model_config,
                           FEDBIOT_PLAN: json.dumps(plan.to_dict())})
    content = RecordDict({
        CONFIG_RECORD: config,
        EMULATOR_RECORD: ArrayRecord({k: Array(v.numpy()) for k, v in state.items()}),
        EMULATOR_TOKENIZER_RECORD: ArrayRecord(
            {name: Array(np.frombuffer(b"{}", dtype=np.uint8).copy())}),
    })
    before = set(tmp_path.parent.rglob("*"))
    with pytest.raises(ValueError, match="not a plain file name"):
        emulator_folder(None, content)
    assert not (cache / "emulators" / fingerprint).exists()
    assert set(tmp_path.parent.rglob("*")) - before <= {cache}
    assert not (tmp_path / "escaped.json").exists() and not (tmp_path.parent / "escaped.json"
                                                             ).exists()
    with pytest.raises(ValueError, match="32 hex digits"):
        config[FEDBIOT_FINGERPRINT] = "../../etc"
        emulator_folder(None, content)
    config[FEDBIOT_FINGERPRINT] = fingerprint
    with pytest.raises(ValueError, match="accepts only emulator"):
        emulator_folder(None, content, pin="f" * 32)


def _run_with(cfg, client_app: ClientApp) -> list[str]:
    """A real Flower simulation with `client_app`; the server's warnings, as logged."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("fedinstruct")
    logger.addHandler(handler)
    try:
        run_simulation(server_app=make_server_app(cfg), client_app=client_app,
                       num_supernodes=cfg.federation.num_clients,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        logger.removeHandler(handler)
    return records


@pytest.mark.slow
def test_hostile_clients_never_change_the_result_nor_stop_the_run(tmp_path, tiny_run):
    """Two of four nodes send every kind of bad reply, round after round (train and FedHDS
    selection): the run completes, each bad reply is logged, and the final adapter equals
    that of the same federation in which those two nodes' ClientApp raised every time."""
    rounds = 6
    settings = [*tiny_run, "federation.num_clients=4", "federation.min_train_nodes=4",
                "federation.min_available_nodes=4", "federation.min_replies=1",
                f"num_rounds={rounds}", "eval.every=0", "train.local_steps=2",
                "selection=fedhds", "selection.fedhds.reducer=pca",
                "selection.fedhds.keep_noise=true",
                # bitsandbytes' CPU 4-bit path is not bit-reproducible across a process's call
                # history (the hostile nodes' own work changes the honest nodes' 5th digit)
                "model.quantization=none"]
    adapters = {}
    for mode in ("bad", "raise"):
        cfg = compose_config([*settings, f"output_dir={tmp_path / mode}"])
        cfg.output_dir = str(tmp_path / mode)
        warnings = _run_with(cfg, hostile_client_app(
            lambda context, cfg=cfg, mode=mode: (cfg, mode, 2)))
        rows = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == rounds, f"{mode}: the run did not complete every round"
        adapters[mode] = load_file(str(tmp_path / mode / "adapters" / "final" /
                                       "adapter_model.safetensors"))
        if mode == "bad":
            rejected = [w for w in warnings if "rejected update" in w]
            left_out = [w for w in warnings if "invalid reply, left out" in w
                        or "centroids, the others" in w]
            assert len(rejected) == 2 * rounds, rejected
            assert len(left_out) == 2 * rounds, left_out
    for key, expected in adapters["raise"].items():
        torch.testing.assert_close(adapters["bad"][key], expected, rtol=1e-5, atol=1e-6,
                                   msg=key)
