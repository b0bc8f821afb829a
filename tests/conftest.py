"""Shared fixtures: offline hub, Flower's task identity for building messages, tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

# Small, fast settings for end-to-end runs with model=tiny.
TINY_RUN = [
    "model=tiny",
    "federation.num_clients=3",
    "federation.min_train_nodes=3",
    "federation.min_available_nodes=3",
    "train.local_steps=4",
    "train.lr=3e-3",
    "train.max_length=96",
    "dataset.samples_per_client=24",
    "eval.max_samples=8",
    "eval.max_new_tokens=8",
]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, for fixtures that report on failure."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def flower_identity():
    """Flower's runtime sets the task identity before apps build messages; do the same."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


@pytest.fixture
def tiny_config(tmp_path):
    from fedinstruct.config import compose_config

    def make(*overrides: str):
        return compose_config([*TINY_RUN, f"output_dir={tmp_path / 'run'}", *overrides])

    return make
