"""fedinstruct ClientApp: local LoRA training, FedHDS selection and evaluation.

Message types handled (see `fedinstruct.protocol`):
  train         global adapter in -> trained adapter + numbers out
  train.select  global adapter in -> cluster centroids + integer ids out (FedHDS)
  evaluate      global adapter in -> loss on the client's held-out share out

What leaves the client is only adapter tensors, centroids, integer ids and numbers; in a secure
run (privacy.secure_aggregation) `train` answers Flower's SecAgg+ stages instead, and the update
leaves only masked (`fedinstruct.privacy.secagg_client`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from peft import get_peft_model_state_dict

from fedinstruct.client.local import NODE, LoadedModel, LocalClient
from fedinstruct.compose import config_from_run_config
from fedinstruct.config import RunConfig
from fedinstruct.logs import setup_logging
from fedinstruct.methods.base import client_method
from fedinstruct.privacy import secagg_client
from fedinstruct.privacy.dp import clipping_mod
from fedinstruct.protocol import (
    WEIGHT,
    Instruction,
    evaluate_reply,
    layout_of,
    read_instruction,
    select_reply,
    train_reply,
)


def _prepare(cfg: RunConfig, msg: Message, context: Context
             ) -> tuple[Instruction, LocalClient, LoadedModel, bool]:
    """The message read, this partition's data and the model to work on."""
    instruction = read_instruction(msg)
    client = NODE.client(cfg, context.node_config)
    loaded, fresh = client_method(cfg)[0].model(instruction, context.node_config)
    client.prepare(loaded.tokenizer)
    return instruction, client, loaded, fresh


def _global_state(instruction: Instruction, loaded: LoadedModel) -> dict:
    """The adapter the server sent, unpacked against this client's own model's LoRA."""
    return instruction.adapter_state(layout_of(get_peft_model_state_dict(loaded.model)))


def handle_train(cfg: RunConfig, msg: Message, context: Context) -> Message:
    method, selection = client_method(cfg)
    instruction, client, loaded, fresh = _prepare(cfg, msg, context)
    start = time.perf_counter()
    rows = selection.rows(client, context, instruction)
    select_seconds = time.perf_counter() - start
    received = _global_state(instruction, loaded)  # an encoded update is the delta from it
    state, result = client.train(
        loaded.model,
        loaded.tokenizer,
        received,
        rows,
        server_round=instruction.server_round,
        proximal_weight=method.proximal_weight(instruction),
    )
    if loaded.upload is not None:
        state = loaded.upload(state)
    return train_reply(msg, state, {
        WEIGHT: result.distinct_examples,
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
    }, wire=cfg.wire, reference=received, state=context.state)


def handle_select(cfg: RunConfig, msg: Message, context: Context) -> Message:
    """FedHDS's client side: cluster local samples, send centroids and their ids only."""
    instruction, client, loaded, _ = _prepare(cfg, msg, context)
    start = time.perf_counter()
    centroids, ids, weights = client_method(cfg)[1].summarize(client, context, loaded,
                                                              instruction)
    metrics = {"time-select": time.perf_counter() - start}
    if not cfg.privacy.centroid_dp:  # an exact count is outside the centroids' guarantee
        metrics["local-samples"] = len(client.dataset)
    return select_reply(msg, centroids, ids, weights, metrics)


def handle_evaluate(cfg: RunConfig, msg: Message, context: Context) -> Message:
    instruction, client, loaded, _ = _prepare(cfg, msg, context)
    loss, count = client.evaluate(loaded.model, loaded.tokenizer,
                                  _global_state(instruction, loaded))
    return evaluate_reply(msg, loss, count)


def prewarm(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> None:
    """Load the run's model before the next message (called by a warm app server)."""
    del node_config
    client_method(config_from_run_config(run_config))[0].prewarm()


Handler = Callable[[RunConfig, Message, Context], Message]


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp for `cfg`, or (None) one that reads Flower's run_config."""
    client_app = ClientApp(mods=[clipping_mod])  # clips updates when the server asks (dp)

    def run(handler: Handler, msg: Message, context: Context) -> Message:
        setup_logging()
        return handler(cfg if cfg is not None else NODE.config(context.run_config), msg, context)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        if secagg_client.is_secagg(msg):  # a secure run: Flower's SecAgg+ around the training
            return secagg_client.serve(msg, context, lambda m, c: run(handle_train, m, c))
        return run(handle_train, msg, context)

    @client_app.train("select")
    def select(msg: Message, context: Context) -> Message:
        return run(handle_select, msg, context)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return run(handle_evaluate, msg, context)

    return client_app


app = make_client_app()
