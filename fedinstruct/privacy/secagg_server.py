"""Secure aggregation of FedIT's adapter updates with Flower's SecAgg+: the server only ever
sees the weighted sum of the sampled clients' updates.

`SecureRun` is the plain round loop (`fedinstruct.server.loop.FederatedRun`: start and resume,
node wait, sampling by the method's Flower strategy, privacy budget, evaluation, export,
checkpoint, metrics row) with one phase replaced: the train exchange and the sum run through
Flower's `SecAggPlusWorkflow` (setup, share keys, collect masked vectors, unmask), driven on
the run's Grid with a `LegacyContext` whose legacy strategy (`_SumOnly`) only hands out the
round's instructions and receives the unmasked aggregate. The clients answer with
`secaggplus_mod` around their ordinary training (`fedinstruct.privacy.secagg_client`).

What the server holds, per round:
- the masked vectors, key shares and public keys of the protocol (never an update);
- the aggregate: sum_i w_i * u_i / sum_i w_i over the clients whose masked vector entered the
  sum, u_i = trained - global (the client's update), w_i its weight: the samples it trained
  on, capped as a plain run caps them (train.local_steps * batch_size * grad_accum, and what
  the selection allowed). Each client multiplies its update by w_i / max_weight (max_weight:
  the round's largest cap) and sends the weight as one more masked value; the workflow
  divides the unmasked sum by the unmasked sum of weights. With privacy.dp=client, or when
  no cap is known (train.local_epochs), every client weighs 1;
- in the clear, as in a plain run: each reply's weight and numbers (loss, tokens, times).

Quantization: SecAgg+ clips each weighted update value to +-privacy.secagg_clipping_range (c)
and rounds it stochastically to one of privacy.secagg_quantization_range (Q) levels. The
aggregate is off from the exact weighted mean by at most n * (2c/Q) / sum_i(w_i/max_weight)
per value (n clients): with the defaults and equal weights, 2*8/2**22 = 3.8e-6, against
LoRA updates of 1e-4 to 1e-2. Each round's bound is in the row (`secagg_error_bound`).

What cannot run under SecAgg: every screen that needs individual updates (the norm-ratio
rejection and the norm bound of `fedinstruct.methods.fedit`, median and trimmed mean). They
are off; pair secure aggregation with privacy.dp=client, whose clip on the client bounds what
one update can do, and whose Gaussian noise the server adds to the unmasked aggregate (the
run's DP wrapper: std z*C/m on the mean of k surviving updates, z*C on their sum when all m
sampled survive), charged to the `PrivacyLedger` exactly as in a plain run. Without DP only
SecAgg+'s per-value clipping range bounds an update, and a weight claim cannot be checked.

Dropouts: a node lost before it shared its keys is left out of the round (`SecAggPlus`); one
lost later (while it trains, typically) is unmasked through the shares of its neighbours, as
long as each node left keeps privacy.secagg_reconstruction_threshold live neighbours (itself
included); otherwise the round fails.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedinstruct.config import ConfigError, RunConfig
from fedinstruct.methods.base import ServerMethod
from fedinstruct.privacy.secagg_client import WEIGHT_CAP
from fedinstruct.protocol import (
    CONFIG_RECORD,
    INTEGER_METRICS,
    PACKED,
    TRAIN_METRICS,
    WEIGHT,
    TrainUpdate,
    layout_of,
    pack,
    unpack,
)
from fedinstruct.server.loop import FederatedRun, Sender
from fedinstruct.server.messaging import RoundFailed, exchange, record_bytes
from fedinstruct.server.output import RunOutput

log = logging.getLogger(__name__)


def secure_run(cfg: RunConfig) -> type[SecureRun]:
    """The round loop of a secure run; raises ConfigError for what Flower's SecAgg+ refuses
    (call it before anything is written; RunConfig has refused the rest)."""
    workflow(cfg, 1.0)  # Flower's own checks of the SecAgg+ parameters
    return SecureRun


class SecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, with the nodes that go silent before they have shared their
    keys left out of the round (Flower 1.41 keeps them as dropouts to unmask, for which no
    shares exist, and fails the round).

    A node that sent no public keys (setup) or no encrypted key shares (share keys) holds no
    share of anyone's secrets, nobody holds a share of its secrets, and no other node masks
    its vector with it (masks pair only with the nodes whose shares a node received), so the
    round goes on as if it had never been sampled: nothing about it is unmasked. The threshold
    check then applies to the nodes left, as before.
    """

    def setup_stage(self, grid, context, state) -> bool:
        passed = super().setup_stage(grid, context, state)
        if not state.nid_to_neighbours:  # nothing sampled, or fewer than two nodes
            return passed
        return _forget_silent(state) and self._check_threshold(state)

    def share_keys_stage(self, grid, context, state) -> bool:
        super().share_keys_stage(grid, context, state)
        return _forget_silent(state) and self._check_threshold(state)


def _forget_silent(state: WorkflowState) -> bool:
    """Leave the nodes that did not answer this stage out of the round (see SecAggPlus)."""
    live = set(state.active_node_ids)
    for node in state.sampled_node_ids - live:
        log.warning("SecAgg+: node %s went silent before sharing its keys; left out", node)
    state.sampled_node_ids = live
    state.nid_to_neighbours = {node: neighbours & live
                               for node, neighbours in state.nid_to_neighbours.items()
                               if node in live}
    return True


def workflow(cfg: RunConfig, max_weight: float) -> SecAggPlus:
    """Flower's SecAgg+ workflow for one round of `cfg`."""
    p = cfg.privacy
    try:
        return SecAggPlus(
            p.secagg_num_shares, p.secagg_reconstruction_threshold, max_weight=max_weight,
            clipping_range=p.secagg_clipping_range, quantization_range=p.secagg_quantization_range,
            timeout=cfg.federation.round_timeout)
    except ValueError as err:
        raise ConfigError(f"privacy.secagg_*: {err}") from err


def error_bound(cfg: RunConfig, weights: list[float], max_weight: float) -> float:
    """Largest difference, per value, between the SecAgg+ aggregate and the exact weighted mean
    of the same updates (stochastic rounding: under one level per client)."""
    step = 2 * cfg.privacy.secagg_clipping_range / cfg.privacy.secagg_quantization_range
    total = sum(w / max_weight for w in weights)
    return len(weights) * step / total if total > 0 else math.inf


def payload_bytes(msg: Message) -> int:
    """Bytes a message carries: its tensors, and the bytes of its config records (SecAgg+'s
    keys, shares and masked vectors travel there)."""
    if msg.has_error():
        return 0
    total = record_bytes(msg)
    for record in msg.content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, bytes | str) else 0
    return total


@dataclass
class Released:
    """What SecAgg+ releases to the server in a round: the weighted mean of the surviving
    clients' updates (one packed vector), their weights, and per client the numbers a reply
    carries in the clear (each `TrainUpdate` holds no adapter)."""

    mean: np.ndarray
    weights: list[float]
    clients: list[TrainUpdate]

    @property
    def total(self) -> np.ndarray:
        """The weighted sum of the updates (the mean times the summed weights)."""
        return self.mean * sum(self.weights)


class _SumOnly(Strategy):
    """The legacy strategy `SecAggPlusWorkflow` drives: it hands out the round's prepared
    instructions and receives the unmasked aggregate (`aggregate_fit`, once per round: the one
    point where anything computed from the clients' updates reaches server code)."""

    def __init__(self) -> None:
        self.instructions: list[tuple[GridClientProxy, FitIns]] = []
        self.released: Released | None = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return self.instructions

    def aggregate_fit(self, server_round, results, failures):
        """`results`: per surviving client its FitRes, each holding the same `parameters`:
        the workflow's unmasked, dequantized weighted mean (one packed vector)."""
        aggregate = results[0][1].parameters if results else None
        if aggregate is None or any(res.parameters is not aggregate for _, res in results):
            raise RoundFailed(f"round {server_round}: SecAgg+ released no single aggregate")
        clients = [TrainUpdate(proxy.node_id, ArrayRecord(), _clear_metrics(res.metrics),
                               Message(RecordDict(), dst_node_id=proxy.node_id,
                                       message_type=MessageType.TRAIN))
                   for proxy, res in results]
        (mean,) = parameters_to_ndarrays(aggregate)
        self.released = Released(np.asarray(mean, dtype=np.float64),
                                 [float(res.num_examples) for _, res in results], clients)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def _clear_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """A reply's clear numbers that are part of the protocol (finite, >= 0); others dropped."""
    kept = {}
    for key, value in metrics.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if key in TRAIN_METRICS and number and math.isfinite(value) and value >= 0 and (
                key not in INTEGER_METRICS or value == int(value)):
            kept[key] = float(value)
    kept.setdefault(WEIGHT, 0.0)
    return kept


class _StageGrid:
    """The Grid as the workflow sees it: each stage is one `exchange` of the plain loop (TTL,
    round timeout, lost nodes logged by reason), and every message's bytes are counted. The
    key stages take milliseconds on a node: their replies are polled for 4x as often as the
    training's."""

    KEY_STAGE_POLL = 0.05  # s; the training stage polls as a plain round does

    def __init__(self, grid: Grid, server_round: int, timeout: float) -> None:
        self.grid, self.server_round, self.timeout = grid, server_round, timeout
        self.bytes_down = self.bytes_up = 0

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        stage = next((m.content.config_records[RECORD_KEY_CONFIGS].get(SecAggKey.STAGE)
                      for m in messages if RECORD_KEY_CONFIGS in m.content.config_records), "")
        poll = {} if stage == Stage.COLLECT_MASKED_VECTORS else {
            "poll_interval": self.KEY_STAGE_POLL}
        replies = exchange(self.grid, messages, timeout=timeout or self.timeout, min_replies=0,
                           label=f"round {self.server_round} SecAgg+ {stage}", **poll)
        self.bytes_down += sum(payload_bytes(m) for m in messages)
        self.bytes_up += sum(payload_bytes(r) for r in replies)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


class SecureRun(FederatedRun):
    """The plain round loop with the train exchange and the sum run through SecAgg+."""

    def __init__(self, cfg: RunConfig, grid: Grid, method: ServerMethod, output: RunOutput
                 ) -> None:
        super().__init__(cfg, grid, method, output)
        inner = getattr(self.strategy, "strategy", self.strategy)  # inside a DP wrapper
        inner.reject_norm_ratio, inner.norm_bound = math.inf, 0.0  # no update to screen
        self.legacy = _SumOnly()
        context = Context(run_id=grid.run.run_id, node_id=0, node_config={},
                          state=RecordDict(), run_config={})
        self.context = LegacyContext(context, config=ServerConfig(num_rounds=cfg.num_rounds),
                                     strategy=self.legacy, client_manager=SimpleClientManager())

    def _round(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        cfg, method = self.cfg, self.method
        row: dict[str, Any] = {"round": server_round}
        round_start = time.perf_counter()
        arrays, server_metrics = method.before_round(server_round, arrays)
        row.update(server_metrics)
        row["time_server_prep"] = time.perf_counter() - round_start
        self._wait_for_nodes()
        random.seed(cfg.seed * 1_000_003 + server_round)  # sampling and neighbours replay

        t = time.perf_counter()
        config = ConfigRecord(method.selection.train_config(server_round))
        messages = list(self.strategy.configure_train(server_round, arrays, config, self.grid))
        flat = pack(arrays)[PACKED].numpy()
        max_weight = self._instruct(messages, flat)
        grid = _StageGrid(self.grid, server_round, cfg.federation.round_timeout)
        state = self.context.state
        state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round})
        state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # the instructions carry it
        workflow(cfg, max_weight)(grid, self.context)  # type: ignore[arg-type]
        released, self.legacy.released = self.legacy.released, None
        row["time_train_phase"] = time.perf_counter() - t
        label = f"round {server_round}"
        if released is None:
            raise RoundFailed(f"{label}: SecAgg+ halted with {len(messages)} sampled nodes (too "
                              "few live neighbours for privacy.secagg_reconstruction_threshold="
                              f"{cfg.privacy.secagg_reconstruction_threshold}; see the log)")
        if len(released.clients) < cfg.federation.min_replies:
            raise RoundFailed(f"{label}: {len(released.clients)} updates in the sum, fewer than "
                              f"federation.min_replies={cfg.federation.min_replies}")

        t = time.perf_counter()
        mean = (flat.astype(np.float64) + released.mean).astype(np.float32)
        aggregate = unpack(ArrayRecord({PACKED: Array(mean)}), layout_of(arrays))
        for client in released.clients:  # the strategy gets the aggregate once per client
            client.adapter = aggregate
        aggregated, train_metrics = self.strategy.aggregate_train(
            server_round, [c.for_aggregation(method.weight(c)) for c in released.clients])
        if aggregated is None:
            raise RoundFailed(f"{label}: the strategy rejected the secure aggregate")
        arrays = method.after_aggregation(arrays, aggregated)
        row["time_aggregate"] = time.perf_counter() - t

        row.update(self._training_row(released.clients, train_metrics))
        bytes_down, bytes_up = grid.bytes_down, grid.bytes_up
        if cfg.eval.federated:
            send = Sender(self)
            row.update(self._federated_evaluation(server_round, arrays, send))
            bytes_down, bytes_up = bytes_down + send.bytes_down, bytes_up + send.bytes_up
        row.update({
            "bytes_down": bytes_down,
            "bytes_up": bytes_up,
            "nodes_replied": len(released.clients),
            "nodes_sampled": len(messages),
            "bytes_per_client_down": bytes_down / max(len(messages), 1),
            "bytes_per_client_up": bytes_up / max(len(released.clients), 1),
            "secagg_error_bound": error_bound(cfg, released.weights, max_weight),
        })
        self._close_round(server_round, arrays, row, (bytes_down, bytes_up), round_start)
        return arrays

    def _instruct(self, messages: list[Message], flat: np.ndarray) -> float:
        """The round's FitIns for the workflow, one per sampled node (the packed global adapter
        and the train message's config, plus the node's weight cap); the round's max_weight."""
        caps = {m.metadata.dst_node_id: self.method.weight_cap(m.metadata.dst_node_id)
                for m in messages}
        uniform = self.method.privacy is not None or None in caps.values()
        max_weight = 1.0 if uniform else float(max([1, *caps.values()]))
        parameters = ndarrays_to_parameters([flat])
        self.legacy.instructions = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            proxy = GridClientProxy(node_id=node, grid=self.grid, run_id=self.grid.run.run_id)
            self.context.client_manager.register(proxy)
            config = {**msg.content[CONFIG_RECORD], WEIGHT_CAP: 0 if uniform else caps[node]}
            self.legacy.instructions.append((proxy, FitIns(parameters, config)))
        return max_weight
