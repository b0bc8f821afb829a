"""The wire contract between the ServerApp and the ClientApps.

Every message type, the records and keys it carries, and what each may hold are defined here;
both apps build and read message content only through this module. A reply that does not fit
is refused with a `ProtocolError` that names the field, before anything else touches it.

Adapters travel packed: one float32 array per message instead of one array per tensor. Flower
stores and moves every Array of an ArrayRecord as an object of its own (in deployment an HTTPS
request and a few SQL transactions on the SuperLink, and again between a SuperNode and its
ClientApp); a LoRA adapter has a hundred tensors or more, so per-object costs, not bytes,
dominated a deployment's round. The receiver unpacks the array against names and shapes it
already knows (its own model's adapter, or the reference the server sent), so no names travel.

With `wire.format` other than fp32 (or `wire.top_k` > 0) the adapter record is encoded instead
(`fedinstruct.wire`: a header, the codes, per-block scales, top-k indices; four arrays at
most): the server sends the global adapter encoded (`seal`), a client sends its update as a
delta from the adapter it received (`train_reply`, with error feedback in the node's state),
and the server decodes it to float32 against the global adapter it sent (`read_train_reply`)
before the same checks run on the result. fp32 stays the packed array described above.

Message types:
  train          down: adapter + config        up: adapter (or FedBiOT's adapter part) + metrics
  train.select   down: adapter + config        up: cluster centroids, ids, weights + metrics
  evaluate       down: adapter + config        up: metrics (loss, count)
FedBiOT messages also carry the emulator's fingerprint and split plan in their config, and, once
per node, the emulator itself (`EMULATOR_RECORD`, `EMULATOR_TOKENIZER_RECORD`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedinstruct.wire import DELTA, FULL, Codec, ErrorFeedback, PayloadError, decode, is_encoded

# -- message types ----------------------------------------------------------------------------
TRAIN = MessageType.TRAIN
SELECT = f"{MessageType.TRAIN}.select"
EVALUATE = MessageType.EVALUATE

# -- records ----------------------------------------------------------------------------------
ADAPTER_RECORD = "arrays"  # the record name Flower's strategies give the global arrays
CONFIG_RECORD = "config"
METRICS_RECORD = "metrics"
CENTROIDS_RECORD = "centroids"
EMULATOR_RECORD = "emulator"  # FedBiOT: compressed base weights (once per node)
EMULATOR_TOKENIZER_RECORD = "emulator-tokenizer"  # FedBiOT: tokenizer files as uint8

# -- config keys, server -> client ------------------------------------------------------------
SERVER_ROUND = "server-round"  # set by Flower's strategies
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
SELECTED_CLUSTERS = "selected-clusters"  # FedHDS: this node's winning local cluster ids
RANDOM_COUNTS = "random-counts"  # Random at another run's counts: rows per partition id
FEDBIOT_FINGERPRINT = "fedbiot-fingerprint"  # which emulator this message's LoRA belongs to
FEDBIOT_PLAN = "fedbiot-split-plan"  # split plan JSON
FEDBIOT_MODEL_CONFIG = "fedbiot-model-config"  # compressed model config JSON (with the weights)

# -- metric keys, client -> server ------------------------------------------------------------
WEIGHT = "num-examples"  # a reply's weight in the average: samples trained on
TRAIN_METRICS = (
    WEIGHT, "examples-seen", "train-loss", "train-steps", "train-tokens", "local-samples",
    "truncated", "dropped", "time-train", "time-load", "time-select-local", "partition-id",
)
SELECT_METRICS = ("local-samples", "time-select")
EVALUATE_METRICS = ("eval-loss", WEIGHT)
CENTROID_ARRAYS = ("centroids", "cluster_ids", "weights")
MAX_PARTITION_ID = 1 << 20  # a partition id is a list index on the server (match_run)
MAX_CENTROID_DIM = 4096  # FedHDS clusters in a reduced space (t-SNE: 2-D)
INTEGER_METRICS = (WEIGHT, "examples-seen", "train-steps", "train-tokens", "local-samples",
                   "truncated", "dropped", "partition-id")

PACKED = "packed"  # the one array of a packed adapter record

Layout = Mapping[str, tuple[int, ...]]


class ProtocolError(ValueError):
    """A message does not fit the protocol; the message names the record or key."""


# -- packing ----------------------------------------------------------------------------------
def layout_of(state: Mapping[str, torch.Tensor | np.ndarray | Array]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of an adapter: what a receiver unpacks a packed record against."""
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def pack(state: ArrayRecord | Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """One float32 array: every tensor flattened, in sorted-name order."""
    if isinstance(state, ArrayRecord) and list(state.keys()) == [PACKED]:
        return state  # packed already (messages of one round may share their records)
    return ArrayRecord({PACKED: Array(flatten(state))})


def flatten(state: ArrayRecord | Mapping[str, torch.Tensor | np.ndarray | Array]) -> np.ndarray:
    """Every tensor as float32, flattened and concatenated in sorted-name order (a packed
    record: its one array)."""
    if isinstance(state, ArrayRecord) and list(state.keys()) == [PACKED]:
        return state[PACKED].numpy().astype(np.float32, copy=False)
    tensors = {name: _as_numpy(t) for name, t in state.items()}
    flat = [tensors[name].astype(np.float32, copy=False).ravel() for name in sorted(tensors)]
    return np.concatenate(flat) if flat else np.zeros(0, np.float32)


def _as_numpy(tensor: torch.Tensor | np.ndarray | Array) -> np.ndarray:
    if isinstance(tensor, Array):
        return tensor.numpy()
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().cpu().numpy()
    return np.asarray(tensor)


def unpack(record: ArrayRecord, layout: Layout) -> ArrayRecord:
    """The named tensors of a packed record, checked against `layout` (and in its order).

    Raises ProtocolError, naming both counts, when the record is not one packed float32 array
    of exactly the layout's size.
    """
    if list(record.keys()) != [PACKED]:
        raise ProtocolError(f"the adapter record holds {sorted(record.keys())[:3]}, not one "
                            f"'{PACKED}' array")
    flat = _numpy(record[PACKED], f"'{PACKED}'")
    if flat.dtype != np.float32:
        raise ProtocolError(f"the packed adapter is {flat.dtype}, not float32")
    total = _layout_size(layout)
    if flat.ndim != 1 or flat.size != total:
        raise ProtocolError(f"the packed adapter holds {flat.size} values of shape {flat.shape}; "
                            f"{len(layout)} tensors need {total}")
    return _split(flat, layout)


def _layout_size(layout: Layout) -> int:
    return sum(math.prod(shape) for shape in layout.values())


def _split(flat: np.ndarray, layout: Layout) -> ArrayRecord:
    """A flat float32 vector of the layout's size as its named tensors."""
    arrays, start = {}, 0
    for name in sorted(layout):
        size = math.prod(layout[name])
        arrays[name] = Array(np.ascontiguousarray(flat[start:start + size]).reshape(layout[name]))
        start += size
    # in the layout's own order: Flower's DP clipping pairs an update with the global arrays
    # by position
    return ArrayRecord({name: arrays[name] for name in layout})


# -- encoded adapters (wire.format) -----------------------------------------------------------
def codec_of(wire: Any) -> Codec:
    """The transport codec of `wire` (a WireSettings or a Codec; None: plain fp32)."""
    if wire is None:
        return Codec()
    return wire if isinstance(wire, Codec) else Codec.of(wire)


def encode(state: ArrayRecord | Mapping[str, torch.Tensor | np.ndarray], wire: Any,
           kind: int = FULL) -> ArrayRecord:
    """The adapter (or, kind DELTA, an update as a flat vector's tensors) in `wire`'s format:
    a packed record for plain fp32, otherwise the few arrays of `fedinstruct.wire`."""
    codec = codec_of(wire)
    if codec.plain:
        return pack(state)
    arrays, _ = codec.encode(flatten(state), kind)
    return _record(arrays)


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def read_adapter(record: ArrayRecord, layout: Layout, *, wire: Any = None, kind: int = FULL,
                 reference: ArrayRecord | Mapping[str, Any] | None = None) -> ArrayRecord:
    """The float32 tensors of an adapter record, packed or encoded, checked against `layout`.

    `wire`: the format the reader expects (None: a packed record, or any encoded format, as a
    client reads the server's adapter). kind DELTA: the record is an update from `reference`
    (the adapter the sender started from; only `layout`'s names of it are used), and the
    result is reference + update. Raises ProtocolError naming the field.
    """
    codec = codec_of(wire)
    encoded = is_encoded(record.keys())
    if not encoded:
        if wire is not None and not codec.plain:
            raise ProtocolError(f"the adapter record holds {sorted(record.keys())[:3]}, not an "
                                f"encoded adapter (wire.format={codec.format}, "
                                f"wire.top_k={codec.top_k:g})")
        return unpack(record, layout)
    if wire is not None and codec.plain:
        raise ProtocolError("the adapter record is encoded; wire.format=fp32 expects one "
                            f"'{PACKED}' array")
    arrays = {name: _numpy(array, f"'{name}'") for name, array in record.items()}
    try:
        flat = decode(arrays, _layout_size(layout), kind, codec if wire is not None else None)
    except PayloadError as err:
        raise ProtocolError(f"the encoded adapter: {err}") from err
    if kind == DELTA:
        if reference is None:
            raise ValueError("an encoded update is read against the adapter it started from")
        missing = sorted(set(layout) - set(reference.keys()))
        if missing:
            raise ValueError(f"the reference adapter lacks {missing[:3]}")
        flat = flatten({name: reference[name] for name in layout}) + flat
    return _split(flat, layout)


def seal(msg: Message, wire: Any = None,
         sealed: dict[int, tuple[ArrayRecord, ArrayRecord]] | None = None) -> Message:
    """Pack (or encode in `wire`'s format) the adapter of an outgoing server message in place
    (other records as they are). `sealed`: records encoded so far by this exchange, by the id
    of the original, so the messages of a round that share one record encode it once."""
    if ADAPTER_RECORD not in msg.content.array_records:
        return msg
    record = msg.content[ADAPTER_RECORD]
    codec = codec_of(wire)
    if codec.plain or is_encoded(record.keys()):
        msg.content[ADAPTER_RECORD] = pack(record) if codec.plain else record
        return msg
    if sealed is not None and id(record) in sealed:
        msg.content[ADAPTER_RECORD] = sealed[id(record)][1]
        return msg
    encoded = encode(record, codec.downlink(), FULL)
    if sealed is not None:
        sealed[id(record)] = (record, encoded)  # keeps the original alive: its id stays unique
    msg.content[ADAPTER_RECORD] = encoded
    return msg


# -- server -> client -------------------------------------------------------------------------
@dataclass
class Instruction:
    """What a client reads from a server message."""

    server_round: int
    adapter: ArrayRecord  # packed or encoded; read against the client's own model's layout
    config: ConfigRecord = field(default_factory=ConfigRecord)
    content: RecordDict = field(default_factory=RecordDict)  # FedBiOT reads its records

    def adapter_state(self, layout: Layout) -> dict[str, torch.Tensor]:
        """The global adapter as float32 tensors (decoded when the server encoded it)."""
        try:
            return read_adapter(self.adapter, layout).to_torch_state_dict()
        except ProtocolError as err:
            raise ProtocolError(f"the server's adapter does not fit this client's model: {err}"
                                ) from err

    def ints(self, key: str) -> list[int] | None:
        """An integer list of the config (None when absent)."""
        if key not in self.config:
            return None
        values = self.config[key]
        if not isinstance(values, list) or not all(isinstance(v, int) for v in values):
            raise ProtocolError(f"config '{key}' must be a list of integers")
        return [int(v) for v in values]

    def number(self, key: str, default: float = 0.0) -> float:
        value = self.config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"config '{key}' must be a number, got {type(value).__name__}")
        return float(value)


def read_instruction(msg: Message) -> Instruction:
    content = msg.content
    if ADAPTER_RECORD not in content.array_records or CONFIG_RECORD not in content.config_records:
        raise ProtocolError(f"a '{msg.metadata.message_type}' message needs an "
                            f"'{ADAPTER_RECORD}' and a '{CONFIG_RECORD}' record")
    config = content[CONFIG_RECORD]
    server_round = config.get(SERVER_ROUND)
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise ProtocolError(f"config '{SERVER_ROUND}' must be an integer >= 0")
    return Instruction(int(server_round), content[ADAPTER_RECORD], config, content)


def with_config(msg: Message, entries: Mapping[str, object]) -> Message:
    """The message with `entries` added to a copy of its config (records are shared by the
    messages of a round, so they are never changed in place)."""
    records = dict(msg.content.items())
    config = ConfigRecord(dict(records.get(CONFIG_RECORD, ConfigRecord())))
    config.update(entries)
    records[CONFIG_RECORD] = config
    msg.content = RecordDict(records)
    return msg


# -- client -> server: replies ----------------------------------------------------------------
def train_reply(msg: Message, adapter: Mapping[str, torch.Tensor], metrics: Mapping[str, float],
                *, wire: Any = None, reference: Mapping[str, torch.Tensor] | None = None,
                state: RecordDict | None = None) -> Message:
    """The trained adapter, packed; or with `wire` (a WireSettings) other than plain fp32, the
    update `adapter - reference` encoded in its format, where `reference` is the adapter the
    client started from (the one the server sent, as the client decoded it). `state` (the
    node's context.state) keeps the error-feedback residual when `wire.error_feedback`."""
    codec = codec_of(wire)
    if codec.plain:
        return _reply(msg, {ADAPTER_RECORD: pack(adapter)}, metrics, TRAIN_METRICS)
    if reference is None:
        raise ValueError("an encoded update is a delta: train_reply needs the reference adapter")
    delta = flatten(adapter) - flatten({name: reference[name] for name in adapter})
    feedback = ErrorFeedback(state if getattr(wire, "error_feedback", False) else None)
    corrected = feedback.corrected(delta)
    arrays, sent = codec.encode(corrected, DELTA)
    feedback.keep(corrected, sent)
    return _reply(msg, {ADAPTER_RECORD: _record(arrays)}, metrics, TRAIN_METRICS)


def select_reply(msg: Message, centroids: np.ndarray, cluster_ids: np.ndarray,
                 weights: np.ndarray, metrics: Mapping[str, float]) -> Message:
    arrays = {"centroids": centroids.astype(np.float32),
              "cluster_ids": cluster_ids.astype(np.int64),
              "weights": weights.astype(np.float32)}
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return _reply(msg, {CENTROIDS_RECORD: record}, metrics, SELECT_METRICS)


def evaluate_reply(msg: Message, loss: float, count: int) -> Message:
    return _reply(msg, {}, {"eval-loss": loss, WEIGHT: count}, EVALUATE_METRICS)


def _reply(msg: Message, arrays: dict[str, ArrayRecord], metrics: Mapping[str, float],
           allowed: tuple[str, ...]) -> Message:
    unknown = set(metrics) - set(allowed)
    if unknown:
        raise ProtocolError(f"metrics {sorted(unknown)} are not part of the protocol")
    content = RecordDict({**arrays, METRICS_RECORD: MetricRecord(dict(metrics))})
    return Message(content, reply_to=msg)


# -- client -> server: reading replies --------------------------------------------------------
@dataclass
class TrainUpdate:
    """A validated train reply: the unpacked adapter update and its numbers."""

    node_id: int
    adapter: ArrayRecord
    metrics: dict[str, float]
    reply: Message

    @property
    def weight(self) -> float:
        return self.metrics[WEIGHT]

    def for_aggregation(self, weight: float) -> Message:
        """The reply as a Flower strategy averages it: the adapter and its weight only."""
        content = RecordDict({ADAPTER_RECORD: self.adapter,
                              METRICS_RECORD: MetricRecord({WEIGHT: weight,
                                                            "train-loss": self.metrics.get(
                                                                "train-loss", 0.0)})})
        return Message(content=content, metadata=self.reply.metadata)


@dataclass
class Centroids:
    """A validated selection reply."""

    node_id: int
    cluster_ids: np.ndarray
    centroids: np.ndarray
    weights: np.ndarray
    metrics: dict[str, float]


def read_train_reply(reply: Message, layout: Layout, *, wire: Any = None,
                     reference: ArrayRecord | Mapping[str, Any] | None = None) -> TrainUpdate:
    """The update of a train reply, validated against the adapter `layout` clients send.

    `wire` (a WireSettings; None: plain fp32): the format the server configured. An encoded
    reply is the delta from `reference`, the global adapter of the round (the server's float32
    copy, not the rounded one it sent: its rounding never enters the average); it is decoded
    to reference + delta before the checks below."""
    metrics = _metrics(reply, TRAIN_METRICS, required=(WEIGHT,))
    record = _only_array_record(reply, ADAPTER_RECORD)
    adapter = read_adapter(record, layout, wire=codec_of(wire), kind=DELTA, reference=reference)
    for key, array in adapter.items():
        if not np.all(np.isfinite(array.numpy())):
            raise ProtocolError(f"'{key}' holds NaN or Inf")
    return TrainUpdate(reply.metadata.src_node_id, adapter, metrics, reply)


def read_select_reply(reply: Message, max_centroids: int) -> Centroids:
    """The centroids of a selection reply: k float32 rows of one dimension, k distinct int64
    ids >= 0 and k finite float32 weights >= 0, with k at most `max_centroids`."""
    metrics = _metrics(reply, SELECT_METRICS)
    record = _only_array_record(reply, CENTROIDS_RECORD)
    if set(record.keys()) != set(CENTROID_ARRAYS):
        raise ProtocolError(f"'{CENTROIDS_RECORD}' must hold exactly {list(CENTROID_ARRAYS)}")
    arrays = {k: _numpy(record[k], f"'{k}'") for k in CENTROID_ARRAYS}
    centroids, ids, weights = arrays["centroids"], arrays["cluster_ids"], arrays["weights"]
    for name, array, dtype, ndim in (("centroids", centroids, np.float32, 2),
                                     ("cluster_ids", ids, np.int64, 1),
                                     ("weights", weights, np.float32, 1)):
        if array.dtype != dtype or array.ndim != ndim:
            raise ProtocolError(f"'{name}' must be a {ndim}-D {np.dtype(dtype)} array, got "
                                f"{array.ndim}-D {array.dtype}")
    count = len(ids)
    if count > max_centroids:
        raise ProtocolError(f"{count} centroids, more than selection.fedhds.max_centroids="
                            f"{max_centroids}")
    if centroids.shape[0] != count or len(weights) != count:
        raise ProtocolError(f"{centroids.shape[0]} centroids, {count} ids and {len(weights)} "
                            "weights: the counts must agree")
    if count and not 1 <= centroids.shape[1] <= MAX_CENTROID_DIM:
        raise ProtocolError(f"centroids of dimension {centroids.shape[1]}")
    if not (np.isfinite(centroids).all() and np.isfinite(weights).all()) or (weights < 0).any():
        raise ProtocolError("centroids and weights must be finite, weights >= 0")
    if (ids < 0).any() or len(np.unique(ids)) != count:
        raise ProtocolError("cluster ids must be distinct and >= 0")
    return Centroids(reply.metadata.src_node_id, ids, centroids, weights, metrics)


def read_evaluate_reply(reply: Message) -> tuple[float, float]:
    """(loss, count) of an evaluate reply."""
    metrics = _metrics(reply, EVALUATE_METRICS, required=EVALUATE_METRICS)
    return metrics["eval-loss"], metrics[WEIGHT]


def _only_array_record(reply: Message, name: str) -> ArrayRecord:
    records = reply.content.array_records
    if list(records) != [name]:
        raise ProtocolError(f"the reply must carry exactly one array record '{name}', "
                            f"got {sorted(records)}")
    return records[name]


def _metrics(reply: Message, allowed: tuple[str, ...], required: tuple[str, ...] = ()
             ) -> dict[str, float]:
    records = reply.content.metric_records
    if list(records) != [METRICS_RECORD] or reply.content.config_records:
        raise ProtocolError(f"the reply must carry exactly one metric record '{METRICS_RECORD}' "
                            "and no config record")
    metrics: dict[str, float] = {}
    for key, value in records[METRICS_RECORD].items():
        if key not in allowed:
            raise ProtocolError(f"metric '{key}' is not part of the protocol")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0:
            raise ProtocolError(f"metric '{key}' must be a finite number >= 0, got {value!r}")
        if key in INTEGER_METRICS and value != int(value):
            raise ProtocolError(f"metric '{key}' must be a whole number, got {value!r}")
        metrics[key] = float(value)
    if metrics.get("partition-id", 0) >= MAX_PARTITION_ID:
        raise ProtocolError(f"metric 'partition-id' must be below {MAX_PARTITION_ID}")
    missing = [key for key in required if key not in metrics]
    if missing:
        raise ProtocolError(f"the reply has no metric {missing}")
    return metrics


def _numpy(array: Array, name: str) -> np.ndarray:
    try:
        return array.numpy()
    except Exception as err:  # a non-NumPy payload: Flower raises TypeError or ValueError
        raise ProtocolError(f"{name} is not a NumPy array: {err}") from err
