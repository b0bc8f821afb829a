"""The server's round loop: selection stage, training, aggregation, evaluation, checkpoint.

Flower's `Strategy.start` runs a fixed train/evaluate loop; FedHDS needs a selection exchange
before training and every run needs a checkpoint and a metrics row per round, so the loop is
written out here and drives the strategy through its public `configure_*`/`aggregate_*` API.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedinstruct.client_selection import RANDOM_COUNTS_KEY, SELECTED_KEY
from fedinstruct.config import ConfigError, RunConfig
from fedinstruct.messaging import exchange
from fedinstruct.run_output import RunOutput
from fedinstruct.selection import matched_counts, select_global
from fedinstruct.server_model import AdapterServer
from fedinstruct.wire import pack_message

log = logging.getLogger(__name__)

SELECT_MESSAGE = f"{MessageType.TRAIN}.select"


def record_bytes(content: RecordDict) -> int:
    """Bytes of the tensors a message carries (the serialized arrays, headers included)."""
    return sum(
        len(array.data) for record in content.array_records.values() for array in record.values()
    )


def _metric(msg: Message, key: str, default: float = 0.0) -> float:
    metrics = next(iter(msg.content.metric_records.values()), None)
    return float(metrics.get(key, default)) if metrics is not None else default


def random_count_schedule(cfg: RunConfig) -> dict[int, list[int]] | None:
    """`selection.random.match_run`: per round, the rows each partition trained on there."""
    source = cfg.selection.random.match_run
    if cfg.selection.name != "random" or source is None:
        return None
    try:
        return matched_counts(source, cfg.num_rounds)
    except (OSError, ValueError) as err:
        raise ConfigError(f"selection.random.match_run: {err}") from err


class FederatedRun:
    def __init__(
        self,
        cfg: RunConfig,
        grid: Grid,
        strategy: Strategy,
        server: AdapterServer,
        output: RunOutput,
    ) -> None:
        self.cfg, self.grid, self.strategy, self.server, self.output = (
            cfg,
            grid,
            strategy,
            server,
            output,
        )
        # FedHDS: the round and adapter of the last selection stage (checkpointed, so that a
        # resumed run can replay it: clients keep their clustering only for one run)
        self._selection: tuple[int, ArrayRecord] | None = None
        self._replay_selection = False
        # read now: a bad match_run fails before any model is loaded (models load lazily)
        self._random_counts = random_count_schedule(cfg)

    # -- public -----------------------------------------------------------------------------
    def run(self) -> ArrayRecord:
        start_round, arrays = self._start()
        for server_round in range(start_round, self.cfg.num_rounds + 1):
            arrays = self._round(server_round, arrays)
        log.info("Run finished; outputs in %s", self.output.folder)
        return arrays

    # -- phases -----------------------------------------------------------------------------
    def _start(self) -> tuple[int, ArrayRecord]:
        checkpoint = self.output.load_checkpoint() if self.cfg.resume else None
        if checkpoint is None:
            if self.cfg.resume:
                log.info(
                    "resume=true but %s holds no checkpoint: starting fresh", self.output.folder
                )
            arrays = self.server.initial_arrays()
            if self.cfg.eval.every > 0:
                row = {"round": 0, **self.server.evaluate(0, arrays)}
                self.output.append_metrics(row)
                log.info("round 0 | %s", _summary(row))
            return 1, arrays
        done, tensors, state = checkpoint
        adapter = {k[len("global/") :]: v for k, v in tensors.items() if k.startswith("global/")}
        selection = {
            k[len("selection/") :]: v for k, v in tensors.items() if k.startswith("selection/")
        }
        if selection and "selection_round" in state:
            self._selection = (int(state["selection_round"]), ArrayRecord(selection))
            self._replay_selection = True
        strategy_state = {
            k[len("strategy/") :]: v.numpy()
            for k, v in tensors.items()
            if k.startswith("strategy/")
        }
        server_state = {
            k[len("server/") :]: v for k, v in tensors.items() if k.startswith("server/")
        }
        if hasattr(self.strategy, "load_state_arrays"):
            self.strategy.load_state_arrays(strategy_state)
        self.server.load_state_tensors(server_state)
        self.output.truncate_metrics(done)
        if "row" in state and all(r.get("round") != done for r in self.output.read_metrics()):
            self.output.append_metrics(state["row"])  # stopped between checkpoint and metrics
        log.info("Resuming %s after round %d", self.output.folder, done)
        return done + 1, ArrayRecord(adapter)

    def _round(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        cfg = self.cfg
        row: dict[str, Any] = {"round": server_round}
        round_start = time.perf_counter()

        t = time.perf_counter()
        arrays, server_metrics = self.server.before_round(server_round, arrays)
        row.update(server_metrics)
        row["time_server_prep"] = time.perf_counter() - t

        random.seed(cfg.seed * 1_000_003 + server_round)  # node sampling replays on resume
        selected: dict[int, list[int]] | None = None
        bytes_down = bytes_up = 0
        if cfg.selection.name == "fedhds" and (
            (server_round - 1) % cfg.selection.reselect_every == 0 or self._replay_selection
        ):
            t = time.perf_counter()
            if (server_round - 1) % cfg.selection.reselect_every == 0 or self._selection is None:
                self._selection = (server_round, arrays)
            else:  # resumed between selections: the same selection, as it was then
                log.info(
                    "round %d: replaying the selection of round %d",
                    server_round,
                    self._selection[0],
                )
            self._replay_selection = False
            selected, sel_down, sel_up = self._selection_stage(*self._selection, row)
            bytes_down += sel_down
            bytes_up += sel_up
            row["time_selection"] = time.perf_counter() - t

        t = time.perf_counter()
        train_config = ConfigRecord()
        if self._random_counts is not None:
            train_config[RANDOM_COUNTS_KEY] = self._random_counts[server_round]
        messages = list(
            self.strategy.configure_train(server_round, arrays, train_config, self.grid)
        )
        if selected is not None:
            messages = [
                _with_selection(msg, selected.get(msg.metadata.dst_node_id, [])) for msg in messages
            ]
        replies = self._exchange(messages, f"round {server_round} train")
        row["time_train_phase"] = time.perf_counter() - t
        ok = [r for r in replies if not r.has_error()]
        bytes_down += sum(record_bytes(m.content) for m in messages)  # as sent: packed
        bytes_up += sum(record_bytes(r.content) for r in ok)
        missing = len(messages) - len(ok)
        if missing:
            log.warning(
                "round %d: %d of %d nodes did not reply in time or failed",
                server_round,
                missing,
                len(messages),
            )

        t = time.perf_counter()
        aggregated, train_metrics = self.strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = self.server.after_aggregation(arrays, aggregated)
        row["time_aggregate"] = time.perf_counter() - t

        row.update(self._train_row(ok, train_metrics))
        row.update(
            {
                "bytes_down": bytes_down,
                "bytes_up": bytes_up,
                "nodes_replied": len(ok),
                "nodes_sampled": len(messages),
            }
        )
        row["bytes_per_client_down"] = bytes_down / max(len(messages), 1)
        row["bytes_per_client_up"] = bytes_up / max(len(ok), 1)

        if cfg.eval.federated:
            row.update(self._federated_evaluation(server_round, arrays))
        row.update(self.server.evaluate(server_round, arrays))

        t = time.perf_counter()
        self.server.export(self.output, server_round, arrays)
        self._checkpoint(server_round, arrays, row)
        row["time_checkpoint"] = time.perf_counter() - t
        row["time_round"] = time.perf_counter() - round_start
        self.output.append_metrics(row)
        self.output.plot()
        log.info("round %d/%d | %s", server_round, cfg.num_rounds, _summary(row))
        return arrays

    def _selection_stage(
        self, server_round: int, arrays: ArrayRecord, row: dict[str, Any]
    ) -> tuple[dict[int, list[int]], int, int]:
        """FedHDS: centroids up, server clustering, winning local cluster ids down (in train)."""
        settings = self.cfg.selection.fedhds
        nodes = list(self.grid.get_node_ids())
        config = ConfigRecord({"server-round": server_round})
        messages = [
            Message(
                RecordDict({"arrays": arrays, "config": config}),
                dst_node_id=n,
                message_type=SELECT_MESSAGE,
            )
            for n in nodes
        ]
        if hasattr(self.strategy, "add_node_payload"):  # FedBiOT: the emulator, once per node
            messages = self.strategy.add_node_payload(messages)
        replies = self._exchange(messages, f"round {server_round} selection")
        payload = {}
        for reply in replies:
            c = reply.content["centroids"]
            payload[reply.metadata.src_node_id] = (
                c["cluster_ids"].numpy(),
                c["centroids"].numpy(),
                c["weights"].numpy(),
            )
        t = time.perf_counter()
        selected = select_global(
            payload,
            min_cluster_size=settings.server_min_cluster_size,
            keep_noise=settings.keep_noise,
        )
        row["time_server_clustering"] = time.perf_counter() - t
        row["local_clusters"] = int(sum(len(p[0]) for p in payload.values()))
        row["selected_clusters"] = int(sum(len(v) for v in selected.values()))
        row["time_select_clients"] = max((_metric(r, "time-select") for r in replies), default=0.0)
        down = sum(record_bytes(m.content) for m in messages)
        up = sum(record_bytes(r.content) for r in replies)
        return selected, down, up

    def _train_row(self, replies: list[Message], train_metrics) -> dict[str, Any]:
        samples = {
            int(_metric(r, "partition-id")): int(_metric(r, "num-examples")) for r in replies
        }
        local = sum(_metric(r, "local-samples") for r in replies)
        row: dict[str, Any] = {
            "train_samples": sum(samples.values()),
            "train_samples_per_client": {str(k): v for k, v in sorted(samples.items())},
            "train_fraction_of_data": sum(samples.values()) / local if local else 0.0,
            "train_tokens": int(sum(_metric(r, "train-tokens") for r in replies)),
            "truncated": int(sum(_metric(r, "truncated") for r in replies)),
            "dropped": int(sum(_metric(r, "dropped") for r in replies)),
            "time_client_train": sum(_metric(r, "time-train") for r in replies),
            "time_client_train_max": max((_metric(r, "time-train") for r in replies), default=0.0),
            "time_client_load": sum(_metric(r, "time-load") for r in replies),
        }
        if train_metrics is not None and "train-loss" in train_metrics:
            row["train_loss"] = float(train_metrics["train-loss"])
        return row

    def _federated_evaluation(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        messages = self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), self.grid)
        replies = self._exchange(messages, f"round {server_round} evaluation", min_replies=0)
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        return (
            {"fed_eval_loss": float(metrics["eval-loss"])}
            if metrics and "eval-loss" in metrics
            else {}
        )

    def _exchange(
        self, messages: Iterable[Message], label: str, min_replies: int | None = None
    ) -> list[Message]:
        """Send (adapters packed, see fedinstruct.wire), then collect the replies within
        round_timeout (see fedinstruct.messaging)."""
        fed = self.cfg.federation
        quorum = fed.min_replies if min_replies is None else min_replies
        messages = [pack_message(msg) for msg in messages]
        return exchange(
            self.grid, messages, timeout=fed.round_timeout, min_replies=quorum, label=label
        )

    def _checkpoint(self, server_round: int, arrays: ArrayRecord, row: dict[str, Any]) -> None:
        tensors = {f"global/{k}": v for k, v in arrays.to_torch_state_dict().items()}
        state: dict[str, Any] = {"num_rounds": self.cfg.num_rounds, "row": dict(row)}
        if self._selection is not None:
            state["selection_round"] = self._selection[0]
            selection = self._selection[1].to_torch_state_dict()
            tensors.update({f"selection/{k}": v for k, v in selection.items()})
        if hasattr(self.strategy, "state_arrays"):
            tensors.update(
                {
                    f"strategy/{k}": torch.from_numpy(np.ascontiguousarray(v))
                    for k, v in self.strategy.state_arrays().items()
                }
            )
        tensors.update({f"server/{k}": v for k, v in self.server.state_tensors().items()})
        self.output.save_checkpoint(server_round, tensors, state)


def _with_selection(msg: Message, cluster_ids: Iterable[int]) -> Message:
    """A copy of a train message whose config carries this node's winning cluster ids."""
    config = ConfigRecord(dict(msg.content["config"]))
    config[SELECTED_KEY] = [int(i) for i in cluster_ids] or [-1]
    records = dict(msg.content.items())  # keep any other record (FedBiOT's emulator)
    records["config"] = config
    msg.content = RecordDict(records)
    return msg


def _summary(row: dict[str, Any]) -> str:
    parts = []
    for key, fmt in (
        ("eval_loss", "eval_loss {:.4f}"),
        ("eval_rougeL", "rougeL {:.4f}"),
        ("emu_eval_rougeL", "emu_rougeL {:.4f}"),
        ("train_loss", "train_loss {:.4f}"),
        ("train_samples", "samples {}"),
        ("bytes_up", "up {:,} B"),
        ("time_round", "{:.1f} s"),
    ):
        if key in row:
            parts.append(fmt.format(row[key]))
    return " | ".join(parts)
