"""The server's round loop: selection stage, training, aggregation, evaluation, checkpoint.

Flower's `Strategy.start` runs a fixed train/evaluate loop; FedHDS needs a selection exchange
before training and every run needs a checkpoint and a metrics row per round, so the loop is
written out here. It asks the run's method (`fedinstruct.methods`) what to send and how to
merge, drives the method's Flower strategy through its public `configure_*`/`aggregate_*` API,
and reads every reply through `fedinstruct.protocol` before the strategy sees it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedinstruct.config import RunConfig
from fedinstruct.methods.base import ServerMethod
from fedinstruct.protocol import (
    SELECTED_CLUSTERS,
    ProtocolError,
    TrainUpdate,
    codec_of,
    encode,
    read_evaluate_reply,
    seal,
    with_config,
)
from fedinstruct.server.messaging import (
    MB,
    RoundFailed,
    encoded_update_size,
    exchange,
    read_updates,
    record_bytes,
    record_size,
    within_caps,
)
from fedinstruct.server.output import RunOutput

log = logging.getLogger(__name__)


def _bytes_so_far(rows: list[dict[str, Any]]) -> list[int]:
    """[down, up] of a resumed run's completed rounds (runs before the ledger: their sum)."""
    with_totals = [r for r in rows if "bytes_down_total" in r]
    if with_totals:
        return [int(with_totals[-1]["bytes_down_total"]), int(with_totals[-1]["bytes_up_total"])]
    return [sum(int(r.get("bytes_down", 0)) for r in rows),
            sum(int(r.get("bytes_up", 0)) for r in rows)]


class Sender:
    """One round's exchanges: address (the method), pack (the protocol), send, count bytes."""

    def __init__(self, run: FederatedRun) -> None:
        self.run = run
        self.bytes_down = self.bytes_up = 0
        self.sealed: dict[int, tuple[ArrayRecord, ArrayRecord]] = {}  # encoded once a round

    def node_ids(self) -> list[int]:
        return list(self.run.grid.get_node_ids())

    def __call__(self, messages: list[Message], label: str, min_replies: int | None = None
                 ) -> list[Message]:
        method, fed = self.run.method, self.run.cfg.federation
        messages = [seal(m, self.run.cfg.wire, self.sealed) for m in method.address(messages)]
        quorum = fed.min_replies if min_replies is None else min_replies
        replies = exchange(self.run.grid, messages, timeout=fed.round_timeout,
                           min_replies=quorum, label=label)
        method.delivered(messages, replies)
        self.bytes_down += sum(record_bytes(m) for m in messages)  # as sent: packed/encoded
        self.bytes_up += sum(record_bytes(r) for r in replies)
        return replies


class FederatedRun:
    def __init__(self, cfg: RunConfig, grid: Grid, method: ServerMethod, output: RunOutput
                 ) -> None:
        self.cfg, self.grid, self.method, self.output = cfg, grid, method, output
        self.strategy = method.strategy
        self.bytes_total = [0, 0]  # down, up: every exchange of the run so far
        self._last_round_bytes = 0

    def run(self) -> ArrayRecord:
        start_round, arrays = self._start()
        if start_round > 1:  # resumed: the ledger goes on from the last completed round
            self.bytes_total = _bytes_so_far(self.output.read_metrics())
        for server_round in range(start_round, self.cfg.num_rounds + 1):
            if self._budget_spent(server_round) or self._wire_budget_spent(server_round,
                                                                            arrays):
                break
            arrays = self._round(server_round, arrays)
        log.info("Run finished; %.3f MB exchanged (down %.3f MB, up %.3f MB); outputs in %s",
                 sum(self.bytes_total) / MB, self.bytes_total[0] / MB, self.bytes_total[1] / MB,
                 self.output.folder)
        return arrays

    def _wire_budget_spent(self, server_round: int, arrays: ArrayRecord) -> bool:
        """Whether the next round would take the run's traffic past wire.budget_mb (FlowerTune's
        rule: a round that would exceed the budget is not started; the last checkpoint is the
        previous round's). The round's cost is the larger of the last round's and the
        adapter's encoded size down and up, times the nodes sampled."""
        budget = self.cfg.wire.budget_mb
        if budget is None:
            return False
        population = len(list(self.grid.get_node_ids())) or self.cfg.federation.num_clients
        per_node = (record_size(encode(arrays, codec_of(self.cfg.wire).downlink()))
                    + encoded_update_size(self.method.upload_layout(arrays), self.cfg.wire))
        planned = max(self._last_round_bytes, self._sampled(population) * per_node)
        spent = sum(self.bytes_total)
        if spent + planned <= budget * MB:
            return False
        log.warning("round %d would take the run's traffic to about %.3f MB (%.3f MB so far, "
                    "about %.3f MB a round), more than wire.budget_mb=%g: the run stops here",
                    server_round, (spent + planned) / MB, spent / MB, planned / MB, budget)
        return True

    def _budget_spent(self, server_round: int) -> bool:
        """Whether the next round would spend more than privacy.target_epsilon (the run then
        ends here: the last checkpoint is the previous round's)."""
        privacy = self.method.privacy
        population = len(list(self.grid.get_node_ids())) or self.cfg.federation.num_clients
        if privacy is None or not privacy.would_exceed(self._sampled(population), population):
            return False
        log.warning("round %d would spend more than privacy.target_epsilon=%g (spent so far: "
                    "%.3f at delta %g): the run stops here", server_round, privacy.budget,
                    privacy.accountant.epsilon(), privacy.delta)
        return True

    def _sampled(self, population: int) -> int:
        fed = self.cfg.federation
        return min(population, max(int(fed.fraction_train * population), fed.min_train_nodes))

    # -- phases -----------------------------------------------------------------------------
    def _start(self) -> tuple[int, ArrayRecord]:
        checkpoint = self.output.load_checkpoint() if self.cfg.resume else None
        if checkpoint is None:  # resume=true without one fails earlier (server.resume)
            arrays = self.method.initial_arrays()
            if self.cfg.eval.every > 0:
                row = {"round": 0, **self.method.evaluate(0, arrays)}
                self.output.append_metrics(row)
                log.info("round 0 | %s", _summary(row))
            return 1, arrays
        done, tensors, state = checkpoint

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.method.selection.restore(part("selection/"), state)
        self.strategy.load_state_arrays({k: v.numpy() for k, v in part("strategy/").items()})
        self.method.load_state_tensors(part("server/"))
        if self.method.privacy is not None and "privacy/releases" in tensors:
            self.method.privacy.restore(tensors["privacy/releases"].numpy(), self.strategy)
        self.output.truncate_metrics(done)
        if "row" in state and all(r.get("round") != done for r in self.output.read_metrics()):
            self.output.append_metrics(state["row"])  # stopped between checkpoint and metrics
        log.info("Resuming %s after round %d", self.output.folder, done)
        return done + 1, ArrayRecord(part("global/"))

    def _round(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        cfg, method = self.cfg, self.method
        row: dict[str, Any] = {"round": server_round}
        round_start = time.perf_counter()
        send = Sender(self)

        t = time.perf_counter()
        arrays, server_metrics = method.before_round(server_round, arrays)
        row.update(server_metrics)
        row["time_server_prep"] = time.perf_counter() - t

        self._wait_for_nodes()
        random.seed(cfg.seed * 1_000_003 + server_round)  # node sampling replays on resume
        selected = method.selection.stage(server_round, arrays, send, row)

        t = time.perf_counter()
        config = ConfigRecord(method.selection.train_config(server_round))
        messages = list(self.strategy.configure_train(server_round, arrays, config, self.grid))
        if selected is not None:
            messages = [with_config(m, {SELECTED_CLUSTERS: selected.get(
                m.metadata.dst_node_id, []) or [-1]}) for m in messages]
        replies = send(messages, f"round {server_round} train")
        row["time_train_phase"] = time.perf_counter() - t
        label = f"round {server_round}"
        updates = within_caps(read_updates(replies, method.upload_layout(arrays), label,
                                           wire=cfg.wire, reference=arrays),
                              method.weight_cap, label)
        if len(replies) < len(messages):
            log.warning("round %d: %d of %d nodes did not reply in time or failed",
                        server_round, len(messages) - len(replies), len(messages))
        if len(updates) < cfg.federation.min_replies:
            raise RoundFailed(f"{label}: {len(updates)} usable updates of {len(messages)} "
                              f"sampled nodes, fewer than federation.min_replies="
                              f"{cfg.federation.min_replies}")

        t = time.perf_counter()
        if updates and all(u.weight <= 0 for u in updates):
            # not an attack: the selection left every node without a sample (FedHDS when
            # the server's clustering finds only noise), so the round keeps the adapter
            log.warning("%s: no node had a sample to train on; the global adapter is unchanged",
                        label)
            aggregated, train_metrics = None, None
        else:
            aggregated, train_metrics = self.strategy.aggregate_train(
                server_round, [u.for_aggregation(method.weight(u)) for u in updates])
            if aggregated is None and cfg.federation.min_replies > 0:
                raise RoundFailed(f"{label}: every update was rejected; nothing to checkpoint")
        if aggregated is not None:
            arrays = method.after_aggregation(arrays, aggregated)
        row["time_aggregate"] = time.perf_counter() - t

        row.update(self._training_row(updates, train_metrics))
        row.update({
            "bytes_down": send.bytes_down,
            "bytes_up": send.bytes_up,
            "nodes_replied": len(replies),
            "nodes_sampled": len(messages),
            "bytes_per_client_down": send.bytes_down / max(len(messages), 1),
            "bytes_per_client_up": send.bytes_up / max(len(replies), 1),
        })
        if cfg.eval.federated:
            row.update(self._federated_evaluation(server_round, arrays, send))
        # the run's ledger: every exchange of the round (selection, training, evaluation)
        self._close_round(server_round, arrays, row, (send.bytes_down, send.bytes_up),
                          round_start)
        return arrays

    def _training_row(self, updates: list[TrainUpdate], train_metrics) -> dict[str, Any]:
        """The round's training metrics, and the privacy charged for releasing its aggregate."""
        row = _train_row(updates, train_metrics)
        if self.method.privacy is not None:  # the noised mean of this round is released
            population = len(list(self.grid.get_node_ids()))
            row.update(self.method.privacy.charge(len(updates), self._sampled(population),
                                                  population))
        return row

    def _close_round(self, server_round: int, arrays: ArrayRecord, row: dict[str, Any],
                     round_bytes: tuple[int, int], round_start: float) -> None:
        """Book the round's bytes, evaluate, export, checkpoint and log it: the end of every
        round, whatever loop (plain or secure) ran it."""
        bytes_down, bytes_up = round_bytes
        self._last_round_bytes = bytes_down + bytes_up
        self.bytes_total = [self.bytes_total[0] + bytes_down, self.bytes_total[1] + bytes_up]
        row.update({"bytes_down_total": self.bytes_total[0],
                    "bytes_up_total": self.bytes_total[1],
                    "mb_total": sum(self.bytes_total) / MB})
        row.update(self.method.evaluate(server_round, arrays))

        t = time.perf_counter()
        self.method.export(self.output, server_round, arrays)
        self._checkpoint(server_round, arrays, row)
        row["time_checkpoint"] = time.perf_counter() - t
        row["time_round"] = time.perf_counter() - round_start
        self.output.append_metrics(row)
        self.output.plot()
        log.info("round %d/%d | %s", server_round, self.cfg.num_rounds, _summary(row))

    def _wait_for_nodes(self, poll_interval: float = 1.0) -> None:
        """Wait for the nodes sampling needs, saying so every minute, for a bounded time
        (Flower's own sampling waits forever)."""
        fed = self.cfg.federation
        needed = max(fed.min_available_nodes, fed.min_train_nodes)
        start, last_log = time.monotonic(), -math.inf
        while (connected := len(list(self.grid.get_node_ids()))) < needed:
            waited = time.monotonic() - start
            if waited >= fed.node_wait_timeout:
                raise RoundFailed(
                    f"{connected} nodes connected after {waited:.0f} s, fewer than the "
                    f"{needed} that federation.min_available_nodes / min_train_nodes need "
                    f"(federation.node_wait_timeout={fed.node_wait_timeout:g})")
            if time.monotonic() - last_log >= 60:
                log.info("waiting for nodes: %d of %d connected (%.0f s)", connected, needed,
                         waited)
                last_log = time.monotonic()
            time.sleep(poll_interval)

    def _federated_evaluation(self, server_round: int, arrays: ArrayRecord, send: Sender
                              ) -> dict[str, Any]:
        messages = list(self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(),
                                                         self.grid))
        losses = []
        for reply in send(messages, f"round {server_round} evaluation", min_replies=0):
            try:
                losses.append(read_evaluate_reply(reply))
            except ProtocolError as err:
                log.warning("evaluation: node %s sent an invalid reply: %s",
                            reply.metadata.src_node_id, err)
        total = sum(count for _, count in losses)
        if not total:
            return {}
        return {"fed_eval_loss": sum(loss * count for loss, count in losses) / total}

    def _checkpoint(self, server_round: int, arrays: ArrayRecord, row: dict[str, Any]) -> None:
        tensors = {f"global/{k}": v for k, v in arrays.to_torch_state_dict().items()}
        selection, selection_state = self.method.selection.checkpoint()
        state: dict[str, Any] = {"num_rounds": self.cfg.num_rounds, "row": dict(row),
                                 **selection_state}
        tensors.update({f"selection/{k}": v for k, v in selection.items()})
        tensors.update({f"strategy/{k}": torch.from_numpy(np.ascontiguousarray(v))
                        for k, v in self.strategy.state_arrays().items()})
        tensors.update({f"server/{k}": v for k, v in self.method.state_tensors().items()})
        if self.method.privacy is not None:
            tensors["privacy/releases"] = torch.from_numpy(self.method.privacy.state())
        self.output.save_checkpoint(server_round, tensors, state)


def _train_row(updates: list[TrainUpdate], train_metrics) -> dict[str, Any]:
    def total(key: str) -> float:
        return sum(u.metrics.get(key, 0.0) for u in updates)

    samples = {int(u.metrics.get("partition-id", 0)): int(u.weight) for u in updates}
    local = total("local-samples")
    row: dict[str, Any] = {
        "train_samples": sum(samples.values()),
        "train_samples_per_client": {str(k): v for k, v in sorted(samples.items())},
        "train_fraction_of_data": sum(samples.values()) / local if local else 0.0,
        "train_tokens": int(total("train-tokens")),
        "truncated": int(total("truncated")),
        "dropped": int(total("dropped")),
        "time_client_train": total("time-train"),
        "time_client_train_max": max((u.metrics.get("time-train", 0.0) for u in updates),
                                     default=0.0),
        "time_client_load": total("time-load"),
    }
    if train_metrics is not None and "train-loss" in train_metrics:
        row["train_loss"] = float(train_metrics["train-loss"])
    return row


def _summary(row: dict[str, Any]) -> str:
    parts = []
    for key, fmt in (
        ("eval_loss", "eval_loss {:.4f}"),
        ("eval_rougeL", "rougeL {:.4f}"),
        ("emu_eval_rougeL", "emu_rougeL {:.4f}"),
        ("eval_exact_match", "exact_match {:.4f}"),
        ("eval_numeric_match", "numeric_match {:.4f}"),
        ("eval_choice_accuracy", "choice_acc {:.4f}"),
        ("train_loss", "train_loss {:.4f}"),
        ("train_samples", "samples {}"),
        ("dp_epsilon", "epsilon {:.3f}"),
        ("dp_centroid_epsilon", "centroid epsilon {:.3f}"),
        ("bytes_up", "up {:,} B"),
        ("mb_total", "{:.3f} MB in all"),
        ("time_round", "{:.1f} s"),
    ):
        if key in row:
            parts.append(fmt.format(row[key]))
    return " | ".join(parts)
