"""A fedinstruct federation in which some nodes are hostile: a Flower app for tests.

Nodes whose partition id is below `hostile-nodes` misbehave. With `hostile-mode = "bad"` each
reply is spoiled in one way, a different way each round (every kind of bad train and FedHDS
selection reply the protocol must refuse); with `"raise"` the node's ClientApp fails every
message. The other nodes, and the server, are fedinstruct's own. The test that uses it checks
that both federations end with the same adapter: a hostile reply counts for nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedinstruct.client_app import handle_evaluate, handle_select, handle_train
from fedinstruct.compose import config_from_run_config
from fedinstruct.config import RunConfig
from fedinstruct.protocol import PACKED
from fedinstruct.server_app import run_server

MODE, NODES = "hostile-mode", "hostile-nodes"

def bad_train_content(kind: str, packed: ArrayRecord, metrics: dict) -> RecordDict:
    """A train reply's content, spoiled in one way (kind); `packed` is an honest update."""
    metrics, records = dict(metrics), {"arrays": packed}
    flat = packed[PACKED].numpy()
    if kind == "huge-weight":
        metrics["num-examples"] = 10**9
    elif kind == "nan-weight":
        metrics["num-examples"] = float("nan")
    elif kind == "negative-weight":
        metrics["num-examples"] = -5
    elif kind == "list-weight":
        metrics["num-examples"] = [1, 2]
    elif kind == "absurd-partition":
        metrics["partition-id"] = 10**12
    elif kind == "extra-metric":
        metrics["secret"] = 1.0
    elif kind == "float64":
        records["arrays"] = ArrayRecord({PACKED: Array(flat.astype(np.float64))})
    elif kind == "nan-tensor":
        records["arrays"] = ArrayRecord({PACKED: Array(np.full_like(flat, np.nan))})
    elif kind == "wrong-size":
        records["arrays"] = ArrayRecord({PACKED: Array(np.concatenate([flat, flat]))})
    elif kind == "not-numpy":
        records["arrays"] = ArrayRecord({PACKED: Array(dtype="float32", shape=flat.shape,
                                                       stype="torch_raw", data=flat.tobytes())})
    elif kind == "extra-record":
        records["stolen"] = ArrayRecord({"x": Array(np.zeros(3, np.float32))})
    elif kind == "config-record":
        records["notes"] = ConfigRecord({"text": "a row of private data"})
    return RecordDict({**records, "metrics": MetricRecord(metrics)})


TRAIN_KINDS = ["huge-weight", "nan-weight", "negative-weight", "list-weight", "absurd-partition",
               "extra-metric", "float64", "nan-tensor", "wrong-size", "not-numpy",
               "extra-record", "config-record"]


def bad_select_content(kind: str, honest: RecordDict) -> RecordDict:
    """A selection reply's content, spoiled in one way (kind)."""
    arrays = {k: a.numpy() for k, a in honest["centroids"].items()}
    if kind == "too-many":
        arrays = {"centroids": np.zeros((5000, 2), np.float32),
                  "cluster_ids": np.arange(5000, dtype=np.int64),
                  "weights": np.ones(5000, np.float32)}
    elif kind == "float64-centroids":
        arrays["centroids"] = arrays["centroids"].astype(np.float64)
    elif kind == "missing-weights":
        del arrays["weights"]
    elif kind == "nan-centroid":
        arrays["centroids"] = np.full_like(arrays["centroids"], np.nan)
    elif kind == "duplicate-ids":
        arrays["cluster_ids"] = np.zeros_like(arrays["cluster_ids"])
    elif kind == "other-dimension":
        arrays["centroids"] = np.zeros((len(arrays["cluster_ids"]), 7), np.float32)
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return RecordDict({"centroids": record, "metrics": honest["metrics"]})


SELECT_KINDS = ["too-many", "float64-centroids", "missing-weights", "nan-centroid",
                "duplicate-ids", "other-dimension"]


def fedinstruct_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The run's fedinstruct config: the run config without this app's own keys."""
    return config_from_run_config({k: v for k, v in run_config.items() if k not in (MODE, NODES)})


Setup = Callable[[Context], tuple[RunConfig, str, int]]


def hostile_client_app(setup: Setup) -> ClientApp:
    """Partitions below the hostile count misbehave: `bad` spoils each reply one way (a new
    way each round), `raise` fails every message; the others run the real handlers.
    `setup(context)` gives the run's config, the mode and the hostile count."""
    app = ClientApp()

    def kind_of(kinds: list[str], msg: Message, partition: int, hostile: int) -> str:
        server_round = int(msg.content["config"]["server-round"])
        return kinds[(hostile * (server_round - 1) + partition) % len(kinds)]

    def handle(handler, spoil, kinds: list[str], msg: Message, context: Context) -> Message:
        cfg, mode, hostile = setup(context)
        partition = int(context.node_config["partition-id"])
        if partition >= hostile:
            return handler(cfg, msg, context)
        if mode == "raise":
            raise RuntimeError("this node fails every round")
        honest = handler(cfg, msg, context).content  # a real reply, then spoiled
        return Message(spoil(kind_of(kinds, msg, partition, hostile), honest), reply_to=msg)

    def spoil_train(kind: str, honest: RecordDict) -> RecordDict:
        return bad_train_content(kind, honest["arrays"], dict(honest["metrics"]))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle(handle_train, spoil_train, TRAIN_KINDS, msg, context)

    @app.train("select")
    def select(msg: Message, context: Context) -> Message:
        return handle(handle_select, bad_select_content, SELECT_KINDS, msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(setup(context)[0], msg, context)

    return app


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, fedinstruct_config(context.run_config))


client = hostile_client_app(lambda context: (
    fedinstruct_config(context.run_config), str(context.run_config[MODE]),
    int(context.run_config[NODES])))
