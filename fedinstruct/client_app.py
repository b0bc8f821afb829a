"""fedinstruct ClientApp: local LoRA training, FedHDS selection and evaluation.

Message types handled:
  train         global adapter in -> trained adapter + numbers out
  train.select  global adapter in -> cluster centroids + integer ids out (FedHDS)
  evaluate      global adapter in -> loss on the client's held-out share out

What leaves the client is only adapter tensors, centroids, integer ids and numbers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import get_peft_model_state_dict

from fedinstruct.client_selection import select_rows, summarize_local_data
from fedinstruct.config import RunConfig, config_from_run_config
from fedinstruct.local_client import LoadedModel, client_model, local_client, shared_model
from fedinstruct.logs import setup_logging
from fedinstruct.modeling import process_cache
from fedinstruct.prewarm import leave_hint
from fedinstruct.wire import layout_of, pack, unpack

log = logging.getLogger(__name__)

_CONFIGS: dict[str, RunConfig] = {}


def run_config_of(context: Context) -> RunConfig:
    """The nested config, rebuilt once per process from Flower's flat run_config."""
    key = repr(sorted(context.run_config.items()))
    if key not in _CONFIGS:
        _CONFIGS[key] = config_from_run_config(context.run_config)
    return _CONFIGS[key]


def _global_state(msg: Message, loaded: LoadedModel) -> dict:
    """The adapter the server sent, unpacked against this client's own model's LoRA."""
    layout = layout_of(get_peft_model_state_dict(loaded.model))
    try:
        return unpack(msg.content["arrays"], layout).to_torch_state_dict()
    except ValueError as err:
        raise ValueError(f"the server's adapter does not fit this client's model: {err}") from err


def _proximal_weight(cfg: RunConfig, config) -> float:
    """FedBiOT's eps, or FedProx's mu / 2 when the strategy sends `proximal-mu`."""
    if cfg.strategy.name == "fedbiot":
        return cfg.strategy.fedbiot.proximal_eps
    return float(config.get("proximal-mu", 0.0)) / 2


def handle_train(cfg: RunConfig, msg: Message, context: Context) -> Message:
    client = local_client(cfg, dict(context.node_config))
    loaded, fresh = client_model(cfg, msg)
    client.prepare(loaded.tokenizer)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    start = time.perf_counter()
    rows = select_rows(cfg, client, context, config, server_round)
    select_seconds = time.perf_counter() - start
    state, result = client.train(
        loaded.model,
        loaded.tokenizer,
        _global_state(msg, loaded),
        rows,
        server_round=server_round,
        proximal_weight=_proximal_weight(cfg, config),
    )
    if loaded.upload is not None:
        state = loaded.upload(state)
    metrics = MetricRecord(
        {
            "num-examples": result.distinct_examples,
            "examples-seen": result.examples_seen,
            "train-loss": result.loss if result.steps else 0.0,
            "train-steps": result.steps,
            "train-tokens": result.tokens,
            "local-samples": len(client.dataset),
            "truncated": client.token_stats.get("truncated", 0),
            "dropped": client.token_stats.get("dropped", 0),
            "time-train": result.seconds,
            "time-load": loaded.load_seconds if fresh else 0.0,
            "time-select-local": select_seconds,
            "partition-id": client.partition_id,
        }
    )
    content = RecordDict({"arrays": pack(state), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def handle_select(cfg: RunConfig, msg: Message, context: Context) -> Message:
    """FedHDS's client side: cluster local samples, send centroids and their ids only."""
    client = local_client(cfg, dict(context.node_config))
    loaded, _ = client_model(cfg, msg)
    client.prepare(loaded.tokenizer)
    start = time.perf_counter()
    server_round = int(msg.content["config"]["server-round"])
    centroids = summarize_local_data(
        cfg, client, context, loaded, _global_state(msg, loaded), server_round
    )
    metrics = MetricRecord(
        {"local-samples": len(client.dataset), "time-select": time.perf_counter() - start}
    )
    content = RecordDict({"centroids": centroids, "metrics": metrics})
    return Message(content=content, reply_to=msg)


def handle_evaluate(cfg: RunConfig, msg: Message, context: Context) -> Message:
    client = local_client(cfg, dict(context.node_config))
    loaded, _ = client_model(cfg, msg)
    client.prepare(loaded.tokenizer)
    loss, count = client.evaluate(loaded.model, loaded.tokenizer, _global_state(msg, loaded))
    metrics = MetricRecord({"eval-loss": loss, "num-examples": count})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def prewarm(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> None:
    """Load the run's base model before the next task is forked (warm app server hook).

    Only on CPU hosts: a process that has touched CUDA cannot fork usable children, so GPU
    nodes load in each task (from the node's pre-quantized copy). FedBiOT clients build their
    model from the emulator that comes with the messages and are not prewarmed.
    """
    cfg = config_from_run_config(run_config)
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # asks without initialising
    if cfg.strategy.name == "fedbiot" or torch.cuda.is_available():
        return
    models = process_cache("base-models")
    if repr(cfg.model) not in models:
        models.clear()  # one run's model at a time
    shared_model(cfg)


Handler = Callable[[RunConfig, Message, Context], Message]


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp for `cfg`, or (None) one that reads Flower's run_config."""
    client_app = ClientApp()

    def run(handler: Handler, msg: Message, context: Context) -> Message:
        setup_logging()
        reply = handler(cfg if cfg is not None else run_config_of(context), msg, context)
        leave_hint(__name__, Path(__file__).resolve().parents[1], context.run_config,
                   context.node_config)
        return reply

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return run(handle_train, msg, context)

    @client_app.train("select")
    def select(msg: Message, context: Context) -> Message:
        return run(handle_select, msg, context)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return run(handle_evaluate, msg, context)

    return client_app


app = make_client_app()
