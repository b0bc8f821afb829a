"""Messages with the nodes: push and collect with a deadline and a quorum, read train replies
through the protocol, hold weight claims to their caps, and count the bytes on the wire."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedinstruct.protocol import (
    WEIGHT,
    Layout,
    ProtocolError,
    TrainUpdate,
    codec_of,
    pack,
    read_train_reply,
)
from fedinstruct.wire import DELTA, message_bytes

log = logging.getLogger(__name__)

MB = 1e6  # wire.budget_mb and the ledger's MB: decimal megabytes


def record_bytes(msg: Message) -> int:
    """Bytes of the tensors a message carries (the serialized arrays, headers included)."""
    return sum(record_size(record) for record in msg.content.array_records.values())


def record_size(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


def encoded_update_size(layout: Layout, wire: Any) -> int:
    """Bytes of one client's update of `layout` in `wire`'s format (headers included)."""
    size = sum(math.prod(shape) for shape in layout.values())
    codec = codec_of(wire)
    if codec.plain:
        return record_size(pack({"x": np.zeros(size, np.float32)}))
    return message_bytes(codec.encode(np.zeros(size, np.float32), DELTA)[0])


class RoundFailed(RuntimeError):
    """Too few nodes replied in a round; the message says how many and why."""


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    min_replies: int,
    label: str,
    poll_interval: float = 0.2,
) -> list[Message]:
    """Push `messages`, return the successful replies received within `timeout` seconds.

    Failed and missing nodes are logged by node id with Flower's reason; fewer than
    `min_replies` successful replies (or fewer messages than that) raise RoundFailed.
    """
    messages = list(messages)
    if not messages:
        return []
    if len(messages) < min_replies:
        raise RoundFailed(
            f"{label}: only {len(messages)} nodes were sampled but federation.min_replies is "
            f"{min_replies}"
        )
    for msg in messages:
        msg.metadata.ttl = timeout
    pushed = {msg_id for msg_id in grid.push_messages(messages) if msg_id}
    # pushing sets each message's id; a grid may leave out (or give None for) a refused one
    destinations = {m.metadata.message_id: m.metadata.dst_node_id for m in messages
                    if m.metadata.message_id in pushed}
    failures = {m.metadata.dst_node_id: "the message could not be sent" for m in messages
                if m.metadata.message_id not in pushed}
    pending = set(destinations)
    too_late = f"no reply within federation.round_timeout={timeout:g} s"
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(pending):
            msg_id = reply.metadata.reply_to_message_id
            pending.discard(msg_id)
            if reply.has_error():  # the message expires with the round: "unavailable"
                expired = reply.error.code == ErrorCode.MESSAGE_UNAVAILABLE
                failures[destinations[msg_id]] = too_late if expired else reply.error.reason
            else:
                replies.append(reply)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval)
    for msg_id in pending:
        failures[destinations[msg_id]] = too_late
    for node_id, reason in failures.items():
        log.warning("%s: node %s lost: %s", label, node_id, reason)
    if len(replies) < min_replies:
        raise RoundFailed(
            f"{label}: {len(replies)} of {len(messages)} nodes replied, fewer than "
            f"federation.min_replies={min_replies} (failed: {sorted(failures)})"
        )
    return replies


def read_updates(replies: list[Message], layout: Layout, label: str, *, wire: Any = None,
                 reference: ArrayRecord | None = None) -> list[TrainUpdate]:
    """The train replies that fit the protocol; each one that does not is logged and left out.
    Encoded replies (`wire`) are decoded against `reference`, the round's global adapter."""
    updates = []
    for reply in replies:
        try:
            updates.append(read_train_reply(reply, layout, wire=wire, reference=reference))
        except ProtocolError as err:
            log.warning("%s: rejected update from node %s: %s", label,
                        reply.metadata.src_node_id, err)
    return updates


def within_caps(updates: list[TrainUpdate], cap_of: Callable[[int], int | None], label: str
                ) -> list[TrainUpdate]:
    """Updates whose weight claim is within what the round allowed the node.

    A claim over the cap is no honest mistake (a client reports the samples it drew) and the
    reply is left out. Where no cap is known (local epochs over all local rows), a claim is
    clipped to the largest of the others', so no single reply outweighs every other.
    """
    kept = []
    for update in updates:
        cap = cap_of(update.node_id)
        if cap is not None and update.weight > cap:
            log.warning("%s: rejected update from node %s: it claims %d samples, the round "
                        "allowed at most %d", label, update.node_id, update.weight, cap)
            continue
        kept.append(update)
    claims = [u.weight for u in kept]
    for i, update in enumerate(kept):
        others = claims[:i] + claims[i + 1:]
        if cap_of(update.node_id) is None and others and update.weight > max(others):
            log.warning("%s: node %s's weight %d clipped to %d, the largest of the others'",
                        label, update.node_id, update.weight, max(others))
            update.metrics[WEIGHT] = max(others)
    return kept
