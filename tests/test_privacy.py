"""What leaves a client: only adapter tensors (LoRA names), centroids, integer ids and numbers.

The real ClientApp handlers run on real messages; every record of every reply is inspected.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedinstruct.client_app import handle_select, handle_train
from fedinstruct.model import initial_adapter_state
from fedinstruct.protocol import layout_of, pack, unpack


def _context(partition_id: int = 0) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": partition_id, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )


def _message(state, message_type: str = "train") -> Message:
    content = RecordDict(
        {"arrays": pack(state), "config": ConfigRecord({"server-round": 1})}
    )
    return Message(content, dst_node_id=7, message_type=message_type)


def _assert_only_numbers(content: RecordDict) -> None:
    assert not content.config_records, "a client reply carries a ConfigRecord (strings could leak)"
    for record in content.metric_records.values():
        for key, value in record.items():
            assert isinstance(value, (int, float)), f"metric {key} is not a number"


def test_train_reply_holds_only_lora_tensors_and_numbers(tiny_config, flower_identity):
    cfg = tiny_config("train.local_steps=1")
    state = initial_adapter_state(cfg.model, cfg.seed)
    msg = _message(state)
    reply = handle_train(cfg, msg, _context())
    content = reply.content
    _assert_only_numbers(content)
    assert list(content.array_records) == ["arrays"]
    # packed on the wire: one float32 array, exactly as long as the adapter
    (packed,) = content["arrays"].values()
    assert packed.numpy().dtype == np.float32 and packed.numpy().ndim == 1
    assert packed.numpy().size == sum(t.numel() for t in state.values())
    arrays = unpack(content["arrays"], layout_of(state))
    assert set(arrays.keys()) == set(state), "the reply holds tensors other than the adapter's"
    for key in arrays:
        assert ".lora_A." in key or ".lora_B." in key
    assert any(not np.array_equal(arrays[k].numpy(), state[k].numpy()) for k in state), \
        "the reply is not the trained adapter"


def test_select_reply_holds_only_centroids_and_integer_ids(tiny_config, flower_identity):
    cfg = tiny_config("selection=fedhds", "selection.fedhds.reducer=pca")
    msg = _message(initial_adapter_state(cfg.model, cfg.seed), "train.select")
    reply = handle_select(cfg, msg, _context())
    content = reply.content
    _assert_only_numbers(content)
    assert list(content.array_records) == ["centroids"]
    record = content["centroids"]
    assert set(record.keys()) == {"centroids", "cluster_ids", "weights"}
    centroids, ids = record["centroids"].numpy(), record["cluster_ids"].numpy()
    num_samples = int(next(iter(content.metric_records.values()))["local-samples"])
    assert centroids.dtype == np.float32 and centroids.shape[1] == 2, "centroids are not 2-D"
    assert centroids.shape[0] < num_samples, "one vector per sample would leak per-sample features"
    assert ids.dtype == np.int64 and sorted(ids.tolist()) == list(range(len(ids)))


@pytest.mark.parametrize("selection", ["all", "random"])
def test_no_token_ids_in_any_reply(tiny_config, flower_identity, selection):
    """No integer array at all comes back from training, so no token id can."""
    cfg = tiny_config(f"selection={selection}", "train.local_steps=1")
    state = initial_adapter_state(cfg.model, cfg.seed)
    msg = _message(state)
    reply = handle_train(cfg, msg, _context())
    for record in reply.content.array_records.values():
        for array in record.values():
            assert np.issubdtype(array.numpy().dtype, np.floating)
