"""A round's exchange against Flower's own in-memory SuperLink state and Grid: replies are
collected until the round's timeout, lost nodes are named, a quorum below min_replies fails the
round, and a node that comes back late finds no stale message of a round that is over."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from uuid import uuid4

import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedinstruct.server.messaging import RoundFailed, exchange


class Federation:
    """A SuperLink's in-memory state with registered nodes; `serve` answers like SuperNodes."""

    def __init__(self, num_nodes: int) -> None:
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                                   ObjectStoreFactory())
        self.state = factory.state()
        run = Run.create_empty(run_id=generate_rand_int_from_bytes(8))
        run.primary_task_id, run.federation_id = 1, NOOP_FEDERATION_ID
        self.state.run_ids[run.run_id] = RunRecord(run=run)
        self.state.task_store[1] = Task(task_id=1, run_id=run.run_id)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, 1
        self.grid = InMemoryGrid(factory)
        self.grid.set_run(run)
        self.nodes = []
        for _ in range(num_nodes):
            node = self.state.create_node("owner", "owner", secrets.token_bytes(32),
                                          heartbeat_interval=60)
            self.state.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=60)
            self.nodes.append(node)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def messages(self) -> list[Message]:
        return [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                        dst_node_id=node, message_type="train") for node in self.nodes]

    def serve(self, node: int, delay: float = 0.0, fail: bool = False) -> None:
        """Answer node's messages (after delay s), with an error reply when fail."""

        def loop() -> None:
            while not self._stop.wait(0.05):
                for msg in self.state.get_message_ins(node_id=node, limit=1):
                    time.sleep(delay)
                    reply = (Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom"),
                                     reply_to=msg) if fail else
                             Message(RecordDict({"m": MetricRecord({"num-examples": 1})}),
                                     reply_to=msg))
                    reply.metadata.__dict__["_message_id"] = str(uuid4())
                    self.state.store_message_res(reply)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)


@pytest.fixture
def federation():
    made: list[Federation] = []

    def make(num_nodes: int = 3) -> Federation:
        made.append(Federation(num_nodes))
        return made[-1]

    yield make
    for fed in made:
        fed.close()


def test_all_replies_end_the_round_at_once_and_messages_live_only_for_the_round(federation):
    fed = federation(3)
    for node in fed.nodes:
        fed.serve(node)
    messages = fed.messages()
    start = time.monotonic()
    replies = exchange(fed.grid, messages, timeout=30, min_replies=3, label="round 1 train")
    assert time.monotonic() - start < 5
    assert sorted(r.metadata.src_node_id for r in replies) == sorted(fed.nodes)
    assert all(m.metadata.ttl == 30 for m in messages)


def test_a_silent_node_is_named_and_the_round_goes_on_at_the_timeout(federation, caplog):
    fed = federation(3)
    silent = fed.nodes[2]
    for node in fed.nodes[:2]:
        fed.serve(node)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fedinstruct.server.messaging"):
        replies = exchange(fed.grid, fed.messages(), timeout=1.5, min_replies=2,
                           label="round 4 train")
    assert 1.5 <= time.monotonic() - start < 5
    assert len(replies) == 2
    assert f"round 4 train: node {silent} lost: no reply within" in caplog.text
    # The node comes back after the round: the round's message has expired, nothing stale.
    assert fed.state.get_message_ins(node_id=silent, limit=1) == []


def test_too_few_replies_fail_the_round(federation):
    fed = federation(3)
    fed.serve(fed.nodes[0])
    fed.serve(fed.nodes[1], fail=True)
    with pytest.raises(RoundFailed, match=r"1 of 3 nodes replied, fewer than "
                                          r"federation.min_replies=2"):
        exchange(fed.grid, fed.messages(), timeout=1.0, min_replies=2, label="round 2 train")
    with pytest.raises(RoundFailed, match="only 3 nodes were sampled"):
        exchange(fed.grid, fed.messages(), timeout=1.0, min_replies=4, label="round 3 train")


def test_an_offline_node_gets_flowers_error_reply_before_the_timeout(federation, caplog):
    fed = federation(2)
    fed.serve(fed.nodes[0], delay=0.3)
    fed.state.deactivate_node(fed.nodes[1])  # what a lapsed heartbeat (or a clean stop) does
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fedinstruct.server.messaging"):
        replies = exchange(fed.grid, fed.messages(), timeout=30, min_replies=1,
                           label="round 2 train")
    assert time.monotonic() - start < 5
    assert [r.metadata.src_node_id for r in replies] == [fed.nodes[0]]
    assert f"node {fed.nodes[1]} lost: Error: Node Unavailable" in caplog.text


def test_waiting_for_nodes_is_bounded_and_says_why(federation, tiny_config, caplog,
                                                   monkeypatch):
    """Flower's sampling waits forever for min_available_nodes; the round loop gives up after
    federation.node_wait_timeout, naming how many nodes came and how many were needed."""
    from fedinstruct.methods.base import server_method
    from fedinstruct.server.loop import FederatedRun
    from fedinstruct.server.output import RunOutput

    monkeypatch.setattr(logging.getLogger("fedinstruct"), "propagate", True)
    fed = federation(2)
    cfg = tiny_config("federation.min_available_nodes=3", "federation.node_wait_timeout=1")
    run = FederatedRun(cfg, fed.grid, server_method(cfg), RunOutput(cfg.output_dir))
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="fedinstruct"), pytest.raises(
            RoundFailed, match="2 nodes connected after 1 s, fewer than the 3"):
        run._wait_for_nodes(poll_interval=0.05)
    assert time.monotonic() - start < 5
    assert "waiting for nodes: 2 of 3 connected" in caplog.text
