"""FedIT's aggregation: the hand-computed sample-weighted mean, and rejected updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedinstruct.compose import compose_config
from fedinstruct.methods.fedit import build_fedit
from fedinstruct.protocol import layout_of, pack
from fedinstruct.server.messaging import read_updates

KEYS = [
    "base_model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.layers.0.self_attn.q_proj.lora_B.weight",
]


class NodeList:
    """The part of a Grid that sampling reads: the connected node ids."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return self.node_ids


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        KEYS[0]: torch.randn(4, 8, generator=g) * scale,
        KEYS[1]: torch.randn(8, 4, generator=g) * scale,
    }


def _round(strategy, global_state, client_states, samples):
    grid = NodeList(list(range(1, len(client_states) + 1)))
    messages = list(strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), grid))
    replies = []
    for msg, state, n in zip(messages, client_states, samples, strict=False):
        content = RecordDict(  # packed, as a client sends it (fedinstruct.protocol)
            {"arrays": pack(state), "metrics": MetricRecord({"num-examples": n})}
        )
        replies.append(Message(content, reply_to=msg))
    # what the round loop does: read each reply through the protocol, then aggregate
    updates = read_updates(replies, layout_of(global_state), "round 1")
    return strategy.aggregate_train(1, [u.for_aggregation(u.weight) for u in updates])


@pytest.fixture
def strategy(flower_identity):
    return build_fedit(
        compose_config(["federation.min_train_nodes=1", "federation.min_available_nodes=1"])
    )


def test_fedavg_equals_hand_computed_weighted_mean(strategy):
    clients = [_state(i) for i in range(1, 4)]
    samples = [10, 30, 60]
    arrays, _ = _round(strategy, _state(0), clients, samples)
    result = arrays.to_torch_state_dict()
    for key in KEYS:
        expected = sum(c[key] * n for c, n in zip(clients, samples, strict=False)) / sum(samples)
        torch.testing.assert_close(result[key], expected, rtol=1e-6, atol=1e-6)


def test_client_with_no_samples_is_left_out(strategy):
    clients = [_state(1), _state(2)]
    arrays, _ = _round(strategy, _state(0), clients, [5, 0])
    torch.testing.assert_close(arrays.to_torch_state_dict()[KEYS[0]], clients[0][KEYS[0]])


@pytest.mark.parametrize("defect", ["nan", "shape", "norm", "keys"])
def test_bad_update_never_reaches_the_global_adapter(strategy, defect, caplog):
    clients = [_state(i) for i in range(1, 5)]
    bad = {k: v.clone() for k, v in clients[0].items()}
    if defect == "nan":
        bad[KEYS[0]][0, 0] = float("nan")
    elif defect == "shape":
        bad[KEYS[0]] = torch.zeros(5, 8)
    elif defect == "norm":
        bad = {k: v * 1000 for k, v in bad.items()}
    else:
        bad = {"base_model.model.layers.9.mlp.lora_A.weight": torch.zeros(2, 2)}
    with caplog.at_level("WARNING"):
        arrays, _ = _round(strategy, _state(0), [bad, *clients[1:]], [10, 10, 10, 10])
    expected = sum(c[KEYS[1]] for c in clients[1:]) / 3
    torch.testing.assert_close(arrays.to_torch_state_dict()[KEYS[1]], expected)
    assert "rejected update" in caplog.text
    assert np.isfinite(arrays[KEYS[0]].numpy()).all()


def test_server_optimizers_are_selectable(flower_identity):
    for name in ("fedadam", "fedyogi", "fedavgm", "fedprox"):
        cfg = compose_config(
            [
                f"strategy.server_optimizer={name}",
                "federation.min_train_nodes=1",
                "federation.min_available_nodes=1",
            ]
        )
        strategy = build_fedit(cfg)
        arrays, _ = _round(strategy, _state(0), [_state(1), _state(2)], [1, 1])
        assert set(arrays.keys()) == set(KEYS)
        if name == "fedprox":
            msg = next(iter(strategy.configure_train(2, arrays, ConfigRecord(), NodeList([1]))))
            assert msg.content["config"]["proximal-mu"] > 0


def test_packed_adapter_round_trips_and_a_misfit_is_refused():
    from fedinstruct.protocol import PACKED, unpack

    rng = np.random.default_rng(0)
    state = {"b.lora_B.weight": rng.normal(size=(8, 2)).astype(np.float32),
             "a.lora_A.weight": rng.normal(size=(2, 8)).astype(np.float32)}
    packed = pack(state)
    assert list(packed.keys()) == [PACKED] and packed[PACKED].numpy().shape == (32,)
    # sorted-name order: a's values come first, whatever order the dict had
    np.testing.assert_array_equal(packed[PACKED].numpy()[:16], state["a.lora_A.weight"].ravel())
    assert pack(packed) is packed
    back = unpack(packed, layout_of(state))
    for name, tensor in state.items():
        np.testing.assert_array_equal(back[name].numpy(), tensor)
    with pytest.raises(ValueError, match="holds 32 values.*need 48"):
        unpack(packed, {**layout_of(state), "c.lora_A.weight": (2, 8)})
