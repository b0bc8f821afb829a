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
    if isinstance(state, ArrayRecord):
        tensors = {name: array.numpy() for name, array in state.items()}
    else:
        tensors = {name: np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t)
                   for name, t in state.items()}
    flat = [tensors[name].astype(np.float32, copy=False).ravel() for name in sorted(tensors)]
    return ArrayRecord({PACKED: Array(np.concatenate(flat) if flat else np.zeros(0, np.float32))})


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
    sizes = [math.prod(layout[name]) for name in sorted(layout)]
    if flat.ndim != 1 or flat.size != sum(sizes):
        raise ProtocolError(f"the packed adapter holds {flat.size} values of shape {flat.shape}; "
                            f"{len(layout)} tensors need {sum(sizes)}")
    arrays, start = {}, 0
    for name, size in zip(sorted(layout), sizes, strict=True):
        arrays[name] = Array(np.ascontiguousarray(flat[start:start + size]).reshape(layout[name]))
        start += size
    # in the layout's own order: Flower's DP clipping pairs an update with the global arrays
    # by position
    return ArrayRecord({name: arrays[name] for name in layout})


def seal(msg: Message) -> Message:
    """Pack the adapter of an outgoing server message in place (other records as they are)."""
    if ADAPTER_RECORD in msg.content.array_records:
        msg.content[ADAPTER_RECORD] = pack(msg.content[ADAPTER_RECORD])
    return msg


# -- server -> client -------------------------------------------------------------------------
@dataclass
class Instruction:
    """What a client reads from a server message."""

    server_round: int
    adapter: ArrayRecord  # packed; unpack against the client's own model's layout
    config: ConfigRecord = field(default_factory=ConfigRecord)
    content: RecordDict = field(default_factory=RecordDict)  # FedBiOT reads its records

    def adapter_state(self, layout: Layout) -> dict[str, torch.Tensor]:
        try:
            return unpack(self.adapter, layout).to_torch_state_dict()
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
def train_reply(msg: Message, adapter: Mapping[str, torch.Tensor], metrics: Mapping[str, float]
                ) -> Message:
    return _reply(msg, {ADAPTER_RECORD: pack(adapter)}, metrics, TRAIN_METRICS)


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


def read_train_reply(reply: Message, layout: Layout) -> TrainUpdate:
    """The update of a train reply, validated against the adapter `layout` clients send."""
    metrics = _metrics(reply, TRAIN_METRICS, required=(WEIGHT,))
    record = _only_array_record(reply, ADAPTER_RECORD)
    adapter = unpack(record, layout)
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
