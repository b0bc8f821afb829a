"""Compressed adapter transport (fedinstruct/wire.py, protocol.encode/read_adapter): each format
round-trips within its error, costs what it should against fp32, error feedback keeps the
transmitted sum on the true one, and a malformed encoded reply is refused naming the field.
The last tests drive the round loop with the real ClientApp handlers (tiny model, in process):
encoded both ways, a cumulative byte ledger, and a byte budget that stops the run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedinstruct.compose import compose_config
from fedinstruct.config import ConfigError, WireSettings
from fedinstruct.protocol import (
    ADAPTER_RECORD,
    PACKED,
    Instruction,
    ProtocolError,
    encode,
    pack,
    read_adapter,
    read_train_reply,
    seal,
    train_reply,
)
from fedinstruct.server.messaging import read_updates
from fedinstruct.wire import (
    ABSMAX,
    CODES,
    DELTA,
    FORMATS,
    FULL,
    HEADER,
    INDICES,
    RESIDUAL_RECORD,
    Codec,
    PayloadError,
    decode,
    message_bytes,
)

# relative L2 error of one encode/decode of Gaussian values (measured: fp16 2e-4, bf16 1.7e-3,
# int8 1.1e-2, nf4 9.2e-2), with room
REL_ERROR = {"fp32": 0.0, "fp16": 1e-3, "bf16": 4e-3, "int8": 0.02, "nf4": 0.11}
# bytes of an encoded message over the packed fp32 one (the targets)
TARGET_RATIO = {"fp16": 0.51, "bf16": 0.51, "int8": 0.27, "nf4": 0.15}
LAYOUT = {"m.lora_A.weight": (8, 64), "m.lora_B.weight": (96, 8), "n.lora_A.weight": (8, 37)}
METRICS = {"num-examples": 8, "train-loss": 1.0, "partition-id": 1}


def _values(size: int, seed: int = 0, scale: float = 0.01) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(size) * scale).astype(np.float32)


def _state(seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in LAYOUT.items()}


def _flat(state) -> np.ndarray:
    return np.concatenate([np.asarray(state[k]).ravel() for k in sorted(state)])


def _instruction(node: int = 7) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                   message_type="train")


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# -- codecs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", [1, 3, 257, 14_373])
def test_each_format_round_trips_within_its_error(fmt, size):
    values = _values(size, seed=size)
    codec = Codec(fmt)
    for kind in (FULL, DELTA):
        arrays, sent = codec.encode(values, kind)
        assert set(arrays) <= {HEADER, CODES, ABSMAX} and len(arrays) <= 3
        decoded = decode(arrays, size, kind, codec)
        assert decoded.dtype == np.float32 and decoded.shape == (size,)
        np.testing.assert_array_equal(decoded, sent)  # what the sender believes it sent
        assert _rel(decoded, values) <= REL_ERROR[fmt] + (0.02 if size < 8 else 0)


def test_quantized_error_is_per_block_not_per_tensor():
    """A block of tiny values next to a block of large ones keeps its own scale."""
    values = np.concatenate([_values(256, scale=1e-4), _values(256, seed=1, scale=10.0)])
    for fmt in ("int8", "nf4"):
        decoded = decode(Codec(fmt).encode(values, FULL)[0], values.size, FULL)
        assert _rel(decoded[:256], values[:256]) <= REL_ERROR[fmt]


def test_fp16_clamps_instead_of_overflowing():
    values = np.array([1e6, -1e6, 1.0], np.float32)
    decoded = decode(Codec("fp16").encode(values, DELTA)[0], 3, DELTA)
    assert np.isfinite(decoded).all() and decoded[0] == 65504 and decoded[2] == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_top_k_sends_the_largest_entries_as_indices_and_values(fmt):
    values = _values(10_000, seed=3)
    codec = Codec(fmt, top_k=0.05)
    arrays, sent = codec.encode(values, DELTA)
    assert set(arrays) >= {HEADER, CODES, INDICES} and len(arrays) <= 4
    kept = arrays[INDICES]
    assert kept.size == 500 and (np.diff(kept) > 0).all()
    threshold = np.sort(np.abs(values))[-500]
    assert (np.abs(values[kept]) >= threshold).all()
    decoded = decode(arrays, values.size, DELTA, codec)
    np.testing.assert_array_equal(decoded, sent)
    assert np.count_nonzero(decoded) <= 500
    assert _rel(decoded[kept], values[kept]) <= REL_ERROR[fmt]
    assert codec.encode(values, FULL)[0].keys() == Codec(fmt).encode(values, FULL)[0].keys()


# -- bytes on the wire --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_adapter():
    from fedinstruct.model import initial_adapter_state

    cfg = compose_config(["model=tiny"])
    return {k: v.numpy() for k, v in initial_adapter_state(cfg.model, 0).items()}


def _bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "int8", "nf4"])
def test_message_bytes_against_fp32(fmt, tiny_adapter):
    """Scales and headers included, down (the global adapter) and up (an update), for the
    tiny model's adapter (14k values: headers weigh most here) and a SmolLM2-sized one."""
    smollm2 = {"flat": _values(921_600)}  # SmolLM2-135M, r=8 on q/k/v/o of 30 layers
    for state in (tiny_adapter, smollm2):
        fp32 = _bytes(pack(state))
        settings = WireSettings(format=fmt)
        down = _bytes(encode(state, settings, FULL))
        up = _bytes(encode(state, settings, DELTA))
        assert down == up
        assert down / fp32 <= TARGET_RATIO[fmt], (fmt, down / fp32)
        assert len(encode(state, settings)) <= 3  # a few arrays, never one per tensor
    assert _bytes(encode(tiny_adapter, WireSettings())) == _bytes(pack(tiny_adapter))


def test_top_k_shrinks_updates_further(tiny_adapter):
    fp32 = _bytes(pack(tiny_adapter))
    sparse = _bytes(encode(tiny_adapter, WireSettings(format="int8", top_k=0.1), DELTA))
    assert sparse / fp32 <= 0.15  # 10 % of the values: one code byte + a 4-byte index each
    assert message_bytes(Codec("int8", 0.1).encode(_flat(tiny_adapter), DELTA)[0]) == sparse


# -- protocol: down and up ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["bf16", "nf4"])
def test_server_adapter_is_encoded_once_and_decoded_by_the_client(fmt, flower_identity):
    global_record = ArrayRecord({k: Array(v) for k, v in _state(1).items()})
    messages = [Message(RecordDict({ADAPTER_RECORD: global_record,
                                    "config": ConfigRecord({"server-round": 1})}),
                        dst_node_id=node, message_type="train") for node in (1, 2, 3)]
    sealed: dict = {}
    for msg in messages:
        seal(msg, WireSettings(format=fmt), sealed)
    records = {id(m.content[ADAPTER_RECORD]) for m in messages}
    assert len(records) == 1 and len(sealed) == 1  # encoded once for the round
    record = messages[0].content[ADAPTER_RECORD]
    assert HEADER in record and PACKED not in record
    state = Instruction(1, record).adapter_state(LAYOUT)
    assert list(state) == list(LAYOUT)
    for name, tensor in state.items():
        assert tuple(tensor.shape) == LAYOUT[name]
        assert _rel(tensor.numpy(), global_record[name].numpy()) <= REL_ERROR[fmt]
    plain = Message(RecordDict({ADAPTER_RECORD: global_record}), dst_node_id=1,
                    message_type="train")
    assert list(seal(plain).content[ADAPTER_RECORD].keys()) == [PACKED]  # fp32: as before


@pytest.mark.parametrize("fmt", FORMATS)
def test_update_travels_as_a_delta_and_is_rebuilt_on_the_servers_float32_global(
        fmt, flower_identity):
    wire = WireSettings(format=fmt, top_k=0.0 if fmt != "fp32" else 0.25)
    server_global = _state(1, scale=0.5)
    # the client trained from the adapter as it decoded it, not the server's float32 copy
    received = read_adapter(encode(server_global, wire), LAYOUT).to_numpy_ndarrays()
    received = dict(zip(LAYOUT, received, strict=True))
    true_update = _state(2)
    trained = {k: received[k] + true_update[k] for k in LAYOUT}
    reply = train_reply(_instruction(), trained, METRICS, wire=wire, reference=received,
                        state=RecordDict())
    assert HEADER in reply.content[ADAPTER_RECORD]
    update = read_train_reply(reply, LAYOUT, wire=wire, reference=ArrayRecord(
        {k: Array(v) for k, v in server_global.items()}))
    rebuilt = _flat({k: a.numpy() for k, a in update.adapter.items()})
    sent = rebuilt - _flat(server_global)
    if fmt == "fp32":  # top-k: the largest quarter, exactly
        assert np.count_nonzero(sent) <= math.ceil(0.25 * sent.size)
    else:  # the downlink's rounding does not enter the update: only the delta's error does
        assert _rel(sent, _flat(true_update)) <= REL_ERROR[fmt] + 1e-6


@pytest.mark.parametrize(("fmt", "top_k"), [("nf4", 0.0), ("int8", 0.1), ("fp16", 0.05)])
def test_error_feedback_keeps_the_transmitted_sum_on_the_true_sum(fmt, top_k, flower_identity):
    """Over 30 rounds of updates with a persistent direction, the gap between what arrived
    and the true sum levels off (at about one round's error for dense formats, at the few
    rounds' worth a top-k residual holds); without feedback it grows every round."""
    rounds, reference = 30, {k: np.zeros(s, np.float32) for k, s in LAYOUT.items()}
    drift = _state(100)
    server = ArrayRecord({k: Array(v) for k, v in reference.items()})
    gaps = {}
    for feedback in (True, False):
        wire = WireSettings(format=fmt, top_k=top_k, error_feedback=feedback)
        node_state = RecordDict()
        true_sum, sent_sum, gap = 0, 0, []
        for t in range(rounds):
            update = {k: drift[k] + 0.3 * v for k, v in _state(t).items()}
            reply = train_reply(_instruction(), update, METRICS, wire=wire, reference=reference,
                                state=node_state)
            got = read_train_reply(reply, LAYOUT, wire=wire, reference=server)
            true_sum = true_sum + _flat(update)
            sent_sum = sent_sum + _flat({k: a.numpy() for k, a in got.adapter.items()})
            gap.append(float(np.linalg.norm(sent_sum - true_sum)))
        assert (RESIDUAL_RECORD in node_state.array_records) == feedback
        gaps[feedback] = gap
    with_ef, without = gaps[True], gaps[False]
    assert without[-1] > 4 * without[0]  # the error accumulates without feedback
    assert with_ef[-1] - with_ef[-11] < 0.25 * (without[-1] - without[-11])  # levelled off
    assert with_ef[-1] < 0.5 * without[-1]
    if not top_k:
        assert with_ef[-1] <= 1.5 * with_ef[0]  # one round's quantization error, not 30


def test_residual_of_another_size_is_dropped(flower_identity):
    stale = ArrayRecord({"residual": Array(np.ones(5, np.float32))})  # another layout's
    node_state = RecordDict({RESIDUAL_RECORD: stale})
    reference = {k: np.zeros(s, np.float32) for k, s in LAYOUT.items()}
    reply = train_reply(_instruction(), _state(1), METRICS, wire=WireSettings(format="int8"),
                        reference=reference, state=node_state)
    got = read_train_reply(reply, LAYOUT, wire=WireSettings(format="int8"),
                           reference=ArrayRecord({k: Array(v) for k, v in reference.items()}))
    assert _rel(_flat({k: a.numpy() for k, a in got.adapter.items()}), _flat(_state(1))) < 0.02
    assert node_state[RESIDUAL_RECORD]["residual"].numpy().size == _flat(reference).size


# -- malformed encoded replies ------------------------------------------------------------------
def _spoiled(kind: str, fmt: str = "int8", top_k: float = 0.1) -> tuple[RecordDict, str]:
    """An encoded train reply spoiled in one way, and a word the refusal must contain."""
    arrays, _ = Codec(fmt, top_k).encode(_flat(_state(4)), DELTA)
    arrays = {k: v.copy() for k, v in arrays.items()}
    words = kind
    if kind == "format":
        arrays[HEADER][1], words = 2, "format"
    elif kind == "version":
        arrays[HEADER][0], words = 9, "version"
    elif kind == "kind":
        arrays[HEADER][2], words = FULL, "kind"
    elif kind == "size":
        arrays[HEADER][3], words = 10**9, "size"
    elif kind == "kept":
        arrays[HEADER][4], words = 10**6, "kept"
    elif kind == "blocksize":
        arrays[HEADER][5], words = 8, "blocksize"
    elif kind == "header-dtype":
        arrays[HEADER], words = arrays[HEADER].astype(np.int64), "'header'"
    elif kind == "codes-short":
        arrays[CODES], words = arrays[CODES][:-1], "'codes'"
    elif kind == "codes-2d":
        arrays[CODES], words = arrays[CODES].reshape(1, -1), "'codes'"
    elif kind == "codes-dtype":
        arrays[CODES], words = arrays[CODES].astype(np.float32), "'codes'"
    elif kind == "absmax-nan":
        arrays[ABSMAX][0], words = np.nan, "'absmax'"
    elif kind == "absmax-negative":
        arrays[ABSMAX][0], words = -1.0, "'absmax'"
    elif kind == "absmax-missing":
        del arrays[ABSMAX]
        words = "absmax"
    elif kind == "absmax-long":
        arrays[ABSMAX], words = np.ones(10**5, np.float32), "'absmax'"
    elif kind == "indices-unsorted":
        arrays[INDICES][[0, 1]] = arrays[INDICES][[1, 0]]
        words = "'indices'"
    elif kind == "indices-out-of-range":
        arrays[INDICES][-1], words = 10**7, "'indices'"
    elif kind == "indices-negative":
        arrays[INDICES][0], words = -1, "'indices'"
    elif kind == "extra-array":
        arrays["secret"], words = np.zeros(3, np.float32), "secret"
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return RecordDict({ADAPTER_RECORD: record, "metrics": MetricRecord(METRICS)}), words


SPOILS = ["format", "version", "kind", "size", "kept", "blocksize", "header-dtype", "codes-short",
          "codes-2d", "codes-dtype", "absmax-nan", "absmax-negative", "absmax-missing",
          "absmax-long", "indices-unsorted", "indices-out-of-range", "indices-negative",
          "extra-array"]


@pytest.mark.parametrize("kind", SPOILS)
def test_a_malformed_encoded_reply_is_refused_naming_the_field(kind, flower_identity):
    wire = WireSettings(format="int8", top_k=0.1)
    reference = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in LAYOUT.items()})
    content, words = _spoiled(kind)
    reply = Message(content, reply_to=_instruction())
    with pytest.raises(ProtocolError, match=words):
        read_train_reply(reply, LAYOUT, wire=wire, reference=reference)
    assert read_updates([reply], LAYOUT, "round 1", wire=wire, reference=reference) == []


def test_the_wrong_encoding_is_refused(flower_identity):
    reference = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in LAYOUT.items()})
    packed = Message(RecordDict({ADAPTER_RECORD: pack(_state(1)),
                                 "metrics": MetricRecord(METRICS)}), reply_to=_instruction())
    with pytest.raises(ProtocolError, match="not an encoded adapter"):
        read_train_reply(packed, LAYOUT, wire=WireSettings(format="nf4"), reference=reference)
    encoded, _ = _spoiled("none")
    encoded_reply = Message(encoded, reply_to=_instruction())
    with pytest.raises(ProtocolError, match="encoded"):
        read_train_reply(encoded_reply, LAYOUT, reference=reference)  # the server runs fp32
    with pytest.raises(ProtocolError, match="kept"):  # dense, where top-k was asked for
        dense = Codec("int8").encode(_flat(_state(1)), DELTA)[0]
        read_train_reply(Message(RecordDict({
            ADAPTER_RECORD: ArrayRecord({k: Array(v) for k, v in dense.items()}),
            "metrics": MetricRecord(METRICS)}), reply_to=_instruction()), LAYOUT,
            wire=WireSettings(format="int8", top_k=0.1), reference=reference)
    sparse_full = Codec("nf4", top_k=0.5).encode(_flat(_state(1)), DELTA)[0]
    sparse_full[HEADER][2] = FULL  # a client takes the server's adapter whole, never sparse
    with pytest.raises(PayloadError, match="full adapter"):
        decode(sparse_full, _flat(_state(1)).size, FULL)
    nan = Codec("fp16").encode(_flat(_state(1)), DELTA)[0]
    nan[CODES][3] = np.float16(np.inf)
    with pytest.raises(PayloadError, match="NaN or Inf"):
        decode(nan, _flat(_state(1)).size, DELTA)


def test_the_ledger_resumes_and_sizes_an_update_before_sending_it(tiny_adapter):
    from fedinstruct.server.loop import _bytes_so_far
    from fedinstruct.server.messaging import encoded_update_size, record_size

    rows = [{"round": 0}, {"round": 1, "bytes_down": 10, "bytes_up": 4,
                           "bytes_down_total": 10, "bytes_up_total": 4},
            {"round": 2, "bytes_down": 10, "bytes_up": 5, "bytes_down_total": 20,
             "bytes_up_total": 9}]
    assert _bytes_so_far(rows) == [20, 9]
    assert _bytes_so_far([{"round": 1, "bytes_down": 3, "bytes_up": 2}] * 2) == [6, 4]  # older
    layout = {k: v.shape for k, v in tiny_adapter.items()}
    for wire in (WireSettings(), WireSettings(format="nf4"), WireSettings("int8", top_k=0.1)):
        assert encoded_update_size(layout, wire) == record_size(
            encode(tiny_adapter, wire, DELTA))


# -- config -------------------------------------------------------------------------------------
def test_wire_settings_are_validated():
    for bad in ({"format": "int4"}, {"top_k": 1.0}, {"top_k": -0.1}, {"budget_mb": 0.0}):
        with pytest.raises(ConfigError, match="wire"):
            WireSettings(**bad)
    assert compose_config(["wire.format=nf4", "wire.top_k=0.1"]).wire.format == "nf4"
    with pytest.raises(ConfigError, match="wire.format=fp32"):
        compose_config(["wire.format=int8", "privacy.dp=client"])
    with pytest.raises(ConfigError, match="wire.format=fp32"):
        compose_config(["wire.top_k=0.1", "privacy.secure_aggregation=true"])
    assert compose_config(["wire.format=int8", "privacy.dp=central"]).wire.format == "int8"


# -- the round loop, in process -----------------------------------------------------------------
class InProcessGrid:
    """Each pushed message goes straight to the real ClientApp train handler (one Context per
    node, so error feedback persists between rounds)."""

    def __init__(self, cfg, num_nodes: int) -> None:
        self.cfg = cfg
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                             node_config={"partition-id": i, "num-partitions": num_nodes})
            for i in range(num_nodes)
        }
        self.log: list[tuple[Message, Message]] = []
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        from fedinstruct.client_app import handle_train

        ids = []
        for msg in messages:
            msg_id = f"m{len(self.log)}"
            msg.metadata.__dict__["_message_id"] = msg_id
            reply = handle_train(self.cfg, msg, self.contexts[msg.metadata.dst_node_id])
            self.log.append((msg, reply))
            self.replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def _run(tmp_path, *overrides):
    from fedinstruct.methods.base import server_method
    from fedinstruct.server.loop import FederatedRun
    from fedinstruct.server.output import RunOutput

    cfg = compose_config(["model=tiny", "federation.num_clients=3", "train.local_steps=2",
                          "train.max_length=96", "dataset.samples_per_client=16",
                          "eval.every=0", f"output_dir={tmp_path}", *overrides])
    grid = InProcessGrid(cfg, num_nodes=3)
    FederatedRun(cfg, grid, server_method(cfg), RunOutput(tmp_path)).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return grid, rows


@pytest.mark.slow
def test_round_loop_encodes_both_ways_and_keeps_a_ledger(tmp_path, flower_identity):
    grid, rows = _run(tmp_path / "nf4", "num_rounds=2", "wire.format=nf4")
    _, plain = _run(tmp_path / "fp32", "num_rounds=1")
    assert [r["round"] for r in rows] == [1, 2]
    for msg, reply in grid.log:
        for record in (msg.content[ADAPTER_RECORD], reply.content[ADAPTER_RECORD]):
            assert HEADER in record and len(record) == 3
    assert all(RESIDUAL_RECORD in c.state.array_records for c in grid.contexts.values())
    for key in ("bytes_down", "bytes_up"):
        assert rows[0][key] / plain[0][key] <= TARGET_RATIO["nf4"]
    assert rows[1]["bytes_down_total"] == rows[0]["bytes_down"] + rows[1]["bytes_down"]
    assert rows[1]["bytes_up_total"] == rows[0]["bytes_up"] + rows[1]["bytes_up"]
    assert rows[1]["mb_total"] == pytest.approx(
        (rows[1]["bytes_down_total"] + rows[1]["bytes_up_total"]) / 1e6)
    assert rows[1]["train_loss"] > 0


@pytest.mark.slow
def test_byte_budget_stops_the_run_before_the_round_that_would_exceed_it(tmp_path, caplog,
                                                                           flower_identity,
                                                                           monkeypatch):
    import logging

    _, one = _run(tmp_path / "probe", "num_rounds=1", "wire.format=int8")
    per_round = (one[0]["bytes_down"] + one[0]["bytes_up"]) / 1e6
    monkeypatch.setattr(logging.getLogger("fedinstruct"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="fedinstruct"):
        _, rows = _run(tmp_path / "budget", "num_rounds=5", "wire.format=int8",
                       f"wire.budget_mb={2.5 * per_round}")
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[-1]["mb_total"] <= 2.5 * per_round
    assert "wire.budget_mb" in caplog.text and "round 3" in caplog.text
    state = json.loads((tmp_path / "budget" / "checkpoint" / "state.json").read_text())
    assert state["round"] == 2
