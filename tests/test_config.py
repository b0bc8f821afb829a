"""The Hydra config tree, its typed validation, and the bridge from Flower's run_config."""

from __future__ import annotations

import pytest
import tomllib

from fedinstruct.config import (
    ConfigError,
    compose_config,
    config_from_run_config,
    overrides_from_run_config,
)
from tests.conftest import REPO


def test_default_config_composes():
    cfg = compose_config()
    assert cfg.model.quantization == "4bit"
    assert cfg.strategy.name == "fedit"
    assert cfg.dataset.name == "synthetic"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrx=1"], "unknown config key 'train.lrx'"),
        (["model.quantization=3bit"], "model.quantization must be one of"),
        (["train.lr=-1"], "train.lr must be > 0"),
        (["num_rounds=abc"], "num_rounds"),
        (["model=nope"], "model/nope"),
        (["selection=random", "selection.random.ratio=0.5"], "exactly one of selection.random"),
        (["dataset=dolly", "dataset.partitioner=foo"], "dataset.partitioner"),
        (["dataset=custom"], "dataset.source"),
        (["model.lora.layers_to_transform=[-1]"], "model.lora.layers_to_transform must"),
        (["strategy=fedbiot", "model.lora.layers_to_transform=[1]"],
         "layers_to_transform must be null with strategy=fedbiot"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        compose_config(overrides)


def test_bad_config_fails_before_any_model_is_loaded(monkeypatch):
    """Validation is pure config work: a model loader that explodes is never reached."""
    import fedinstruct.modeling as modeling

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(modeling, "load_base_model", boom)
    with pytest.raises(ConfigError):
        config_from_run_config({"model": "tiny", "overrides": "train.batch_size=0"})


def test_run_config_bridge():
    run_config = {
        "model": "tiny",
        "strategy": "fedit",
        "num_rounds": 5,
        "train.lr": 0.001,
        "resume": True,
        "seed": "",
        "overrides": "model.lora.r=16 eval.max_new_tokens=12",
    }
    assert "seed=" not in " ".join(overrides_from_run_config(run_config))
    cfg = config_from_run_config(run_config)
    assert cfg.model.name_or_path == "tiny"
    assert cfg.num_rounds == 5
    assert cfg.train.lr == pytest.approx(0.001)
    assert cfg.resume is True
    assert cfg.model.lora.r == 16
    assert cfg.eval.max_new_tokens == 12


def test_every_pyproject_run_config_key_is_a_config_key():
    """`flwr run --run-config` only accepts keys declared in pyproject; each must be valid."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    from flwr.common.config import flatten_dict

    keys = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    samples = {"model": "tiny", "dataset": "synthetic", "strategy": "fedit", "selection": "all"}
    for key, default in keys.items():
        if key == "overrides" or key in samples:
            continue
        assert default == "", f"{key} should default to '' (keep conf/'s value)"
        cfg = compose_config([])
        value = cfg
        for part in key.split("."):
            assert hasattr(value, part), f"pyproject run-config key {key!r} is not in conf/"
            value = getattr(value, part)
