"""One exchange of a round: send messages to nodes, collect replies within the round's time.

Flower's `grid.send_and_receive` waits for every reply until its timeout and checks for
replies every 3 s. A round here instead:

- gives each message a time to live of `federation.round_timeout`, so a node that restarts
  after a crash is never handed a stale message of a round that is over (a SuperNode works
  through its messages one at a time, so a stale one would delay the current round);
- checks for replies every `poll_interval` seconds, so a round ends as soon as the last reply
  is in;
- stops waiting when the timeout passes and logs every node that failed or did not reply
  (for a crashed node the SuperLink answers "Node Unavailable" once its heartbeat lapses,
  which can take up to a minute; the timeout decides sooner);
- raises `RoundFailed` when fewer than `federation.min_replies` nodes replied, so a run never
  goes on from a quorum it did not reach (resume=true restarts from the last checkpoint).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

log = logging.getLogger(__name__)


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
