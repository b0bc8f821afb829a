"""Client-level differential privacy: the accountant's numbers, clipping where it should
happen, and a run that reports a rising epsilon and stops at its budget."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedinstruct.client_app import make_client_app
from fedinstruct.compose import compose_config
from fedinstruct.config import ConfigError
from fedinstruct.methods.base import server_method
from fedinstruct.model import initial_adapter_state
from fedinstruct.privacy.accountant import Accountant, Release, noise_for_epsilon
from fedinstruct.protocol import layout_of, pack, read_train_reply, unpack
from fedinstruct.server.messaging import read_updates
from fedinstruct.simulation import simulate


def classic_rdp_epsilon(z: float, rounds: int, delta: float) -> float:
    """The Gaussian mechanism composed `rounds` times, without sampling: RDP of order a is
    rounds * a / (2 z^2), converted with eps = rdp + log(1/delta) / (a - 1) (Mironov 2017)."""
    return min(rounds * a / (2 * z * z) + math.log(1 / delta) / (a - 1)
               for a in np.linspace(1.01, 200, 20000))


@pytest.mark.parametrize("z,rounds", [(1.0, 10), (0.8, 3), (2.0, 50)])
def test_epsilon_without_sampling_matches_the_closed_form(z, rounds):
    ours = Accountant(1e-5, [Release(z)] * rounds).epsilon()
    classic = classic_rdp_epsilon(z, rounds, 1e-5)
    # dp-accounting converts RDP to (eps, delta) with a tighter bound than the classic one
    assert 0.85 * classic <= ours <= classic * 1.0001


def test_subsampled_epsilon_agrees_with_the_pld_accountant():
    """RDP (what runs report) is an upper bound within a few tens of percent of the tighter
    PLD accountant of the same library, for the same subsampled Gaussian releases."""
    z, q, rounds, delta = 1.0, 0.1, 50, 1e-5
    ours = Accountant(delta, [Release(z, q)] * rounds).epsilon()
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
                count=rounds)
    reference = pld.get_epsilon(delta)
    assert reference <= ours <= 1.5 * reference


def test_target_epsilon_picks_the_noise_for_the_planned_rounds():
    z = noise_for_epsilon(8.0, 20, 0.1, 1e-5)
    assert Accountant(1e-5, [Release(z, 0.1)] * 20).epsilon() <= 8.0
    assert Accountant(1e-5, [Release(z * 0.95, 0.1)] * 20).epsilon() > 8.0
    assert noise_for_epsilon(2.0, 20, 0.1, 1e-5) > z  # a smaller budget needs more noise


def test_dp_combinations_that_would_not_mean_what_they_say_are_refused():
    for overrides, words in (
        (["strategy=fedbiot"], "needs strategy=fedit"),
        (["strategy.server_optimizer=fedadam"], "plain mean"),
        (["strategy.aggregation=median", "strategy.server_optimizer=none"], "plain mean"),
    ):
        with pytest.raises(ConfigError, match=words):
            compose_config(["privacy.dp=central", *overrides])


def _message(state, clip: float | None) -> Message:
    config = {"server-round": 1, **({KEY_CLIPPING_NORM: clip} if clip else {})}
    content = RecordDict({"arrays": pack(state), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=7, message_type="train")


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(np.sum((np.asarray(a[k]) - np.asarray(b[k])) ** 2)) for k in a))


def test_client_mode_clips_the_update_before_it_leaves_the_node(tiny_config, flower_identity):
    """The real ClientApp with Flower's fixedclipping_mod: the update on the wire is within
    the clip norm the server asked for; without the ask, it is the unclipped update."""
    cfg = tiny_config("train.local_steps=2", "train.lr=0.05")
    app = make_client_app(cfg)
    state = initial_adapter_state(cfg.model, cfg.seed)
    layout = layout_of(state)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    sent = {k: v.numpy() for k, v in state.items()}

    def update_norm(reply: Message) -> float:
        got = unpack(reply.content["arrays"], layout)
        return _distance({k: a.numpy() for k, a in got.items()}, sent)

    free = update_norm(app(_message(state, None), context))
    clip = free / 10
    clipped = update_norm(app(_message(state, clip), context))
    assert free > clip and clipped <= clip * (1 + 1e-5)


def test_central_mode_clips_every_update_in_the_sum(flower_identity):
    cfg = compose_config(["privacy.dp=central", "privacy.noise_multiplier=0", "privacy.clip=0.1",
                          "federation.num_clients=3", "federation.min_train_nodes=3",
                          "federation.min_available_nodes=3"])
    method = server_method(cfg)
    layout = {"a.lora_A.weight": (4, 8)}
    global_state = {"a.lora_A.weight": np.zeros((4, 8), np.float32)}

    class Nodes:
        def get_node_ids(self):
            return [1, 2, 3]

    messages = list(method.strategy.configure_train(
        1, ArrayRecord({k: Array(v) for k, v in global_state.items()}), ConfigRecord(), Nodes()))
    updates = [np.full((4, 8), 5.0, np.float32), np.full((4, 8), -5.0, np.float32),
               np.full((4, 8), 5.0, np.float32)]
    replies = [Message(RecordDict({"arrays": pack({"a.lora_A.weight": u}),
                                   "metrics": MetricRecord({"num-examples": n})}), reply_to=m)
               for m, u, n in zip(messages, updates, (1, 5, 40), strict=True)]
    read = read_updates(replies, layout, "round 1")
    assert all(read_train_reply(r, layout) for r in replies)
    arrays, _ = method.strategy.aggregate_train(
        1, [u.for_aggregation(method.weight(u)) for u in read])
    mean = arrays["a.lora_A.weight"].numpy()
    # each update clipped to norm 0.1, equal weights whatever the sample counts: (+c - c + c)/3
    expected = np.full((4, 8), 0.1 / math.sqrt(32) / 3, np.float32)
    np.testing.assert_allclose(mean, expected, rtol=1e-5)


@pytest.mark.slow
def test_a_dp_run_reports_rising_epsilon_and_stops_at_its_budget(tmp_path, tiny_run):
    """A FedIT run with central DP on model=tiny picks its noise for the planned 2 rounds and
    reports epsilon each round; extended to 4 rounds by a resume, it stops at the budget with
    the checkpoint of round 2 (the noise it started with, not one for 4 rounds)."""
    folder = tmp_path / "dp"
    settings = [*tiny_run, "privacy.dp=central", "privacy.target_epsilon=3", "privacy.clip=0.5",
                "eval.every=0", f"output_dir={folder}"]
    simulate(compose_config([*settings, "num_rounds=2"]))
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    epsilons = [r["dp_epsilon"] for r in rows]
    assert 0 < epsilons[0] < epsilons[1] <= 3.0
    assert all(r["dp_delta"] == 1e-5 and r["dp_clip"] == 0.5 for r in rows)
    z = rows[0]["dp_noise_multiplier"]
    assert z == pytest.approx(noise_for_epsilon(3.0, 2, 1.0, 1e-5))
    assert epsilons[1] == pytest.approx(Accountant(1e-5, [Release(z)] * 2).epsilon())

    simulate(compose_config([*settings, "num_rounds=4", "resume=true"]))
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2], "the run went on past its budget"
    state = json.loads((folder / "checkpoint" / "state.json").read_text())
    assert state["round"] == 2
