"""The Hydra config tree, its typed validation, and the bridge from Flower's run_config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from fedinstruct.compose import (
    CONF_DIR,
    compose_config,
    config_from_run_config,
    overrides_from_run_config,
    to_container,
)
from fedinstruct.config import ConfigError, FederationSettings, RunConfig, StrategySettings

# What only conf/config.yaml holds besides picked values.
HYDRA_ONLY_KEYS = ("defaults", "hydra")


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
        # settings that could only wait forever, or fail every round
        (["federation.num_clients=2", "federation.min_train_nodes=5"],
         "federation.min_train_nodes=5 is more than federation.num_clients=2"),
        (["federation.min_available_nodes=4"],
         "federation.min_available_nodes=4 is more than federation.num_clients=3"),
        (["federation.min_replies=4"], "federation.min_replies=4 is more than"),
        # ranges
        (["strategy.reject_norm_ratio=1"], "strategy.reject_norm_ratio must be > 1, got 1.0"),
        (["strategy.reject_norm_ratio=0"], "strategy.reject_norm_ratio must be > 1"),
        (["strategy.server_momentum=1"], "strategy.server_momentum must be in [0, 1)"),
        (["strategy.beta_1=-0.1"], "strategy.beta_1 must be in [0, 1)"),
        (["strategy.beta_2=1"], "strategy.beta_2 must be in [0, 1)"),
        (["strategy.tau=0"], "strategy.tau must be > 0"),
        (["strategy.proximal_mu=-1"], "strategy.proximal_mu must be >= 0"),
        (["train.max_grad_norm=-1"], "train.max_grad_norm must be >= 0"),
        (["train.weight_decay=-0.1"], "train.weight_decay must be >= 0"),
        (["federation.min_available_nodes=0"], "federation.min_available_nodes must be > 0"),
        (["federation.client_gpus=-1"], "federation.client_gpus must be >= 0"),
        (["model.lora.dropout=1"], "model.lora.dropout must be in [0, 1)"),
        (["model.tiny.num_attention_heads=3"], "hidden_size must be a multiple of"),
        (["dataset.test_fraction=0"], "dataset.test_fraction must be in (0, 1)"),
        (["selection.fedhds.feature_batch_size=0"], "selection.fedhds.feature_batch_size"),
        (["seed=-1"], "seed must be >= 0"),
        (["train.lr=nan"], "train.lr must be > 0, got nan"),
        # the new keys
        (["strategy.aggregation=mode"], "strategy.aggregation must be one of"),
        (["strategy.aggregation=median", "strategy.server_optimizer=fedadam"],
         "strategy.server_optimizer must be 'none' with strategy.aggregation=median"),
        (["strategy.trim_fraction=0.5"], "strategy.trim_fraction must be in [0, 0.5)"),
        (["strategy.norm_bound=-1"], "strategy.norm_bound must be >= 0"),
        (["federation.node_wait_timeout=0"], "federation.node_wait_timeout must be > 0"),
        (["selection.fedhds.max_centroids=0"], "selection.fedhds.max_centroids must be > 0"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config(overrides)


def test_defaults_and_the_new_keys_are_valid():
    cfg = RunConfig()
    assert cfg.federation.min_train_nodes <= cfg.federation.num_clients
    assert cfg.federation.min_available_nodes <= cfg.federation.num_clients
    assert (cfg.strategy.aggregation, cfg.strategy.trim_fraction, cfg.strategy.norm_bound) == (
        "mean", 0.2, 3.0)
    assert cfg.federation.node_wait_timeout == 600.0
    assert cfg.selection.fedhds.max_centroids == 4096
    for aggregation in ("median", "trimmed_mean"):
        strategy = compose_config([f"strategy.aggregation={aggregation}",
                                   "strategy.trim_fraction=0", "strategy.norm_bound=0"]).strategy
        assert strategy.aggregation == aggregation and strategy.server_optimizer == "none"
    fed = compose_config(["federation.num_clients=5", "federation.min_train_nodes=5",
                          "federation.min_available_nodes=5"]).federation
    assert fed.min_train_nodes == fed.min_available_nodes == fed.num_clients == 5


def test_the_dataclasses_validate_without_hydra_too():
    with pytest.raises(ConfigError, match="federation.min_train_nodes=5 is more than"):
        FederationSettings(num_clients=2, min_train_nodes=5)
    with pytest.raises(ConfigError, match=re.escape("strategy.server_momentum must be in [0, 1)")):
        StrategySettings(server_momentum=1.5)


def test_bad_config_fails_before_any_model_is_loaded(monkeypatch):
    """Validation is pure config work: a model loader that explodes is never reached."""
    import fedinstruct.model as model_module

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(model_module, "load_base_model", boom)
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


def test_every_pyproject_run_config_key_is_a_config_key(repo_root):
    """`flwr run --run-config` only accepts keys declared in pyproject; each must be valid."""
    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text())
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


# --- defaults live in the dataclasses; conf/ only picks --------------------------------------


def _conf_values(path: Path) -> dict[str, Any]:
    """A conf/ file's values, placed where they land in the composed config."""
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if path.parent == CONF_DIR:
        return {k: v for k, v in values.items() if k not in HYDRA_ONLY_KEYS}
    return {path.parent.name: values}


def _leaves(node: Any, prefix: tuple[str, ...] = ()):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, (*prefix, key))
    else:
        yield prefix, node


@pytest.mark.parametrize(
    "path", sorted(CONF_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF_DIR))
)
def test_conf_files_only_pick_values_the_dataclasses_do_not_default_to(path):
    defaults = to_container(RunConfig())
    for keys, value in _leaves(_conf_values(path)):
        name, default = ".".join(keys), defaults
        for key in keys:
            assert isinstance(default, dict) and key in default, f"{path}: {name} is no config key"
            default = default[key]
        assert value != default, (
            f"{path.relative_to(CONF_DIR)} sets {name}={value!r}, the default in "
            "fedinstruct/config.py: delete it there (defaults live in the dataclasses)"
        )


def _default_choices() -> dict[str, str]:
    entries = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))["defaults"]
    return {k: v for entry in entries if isinstance(entry, dict) for k, v in entry.items()}


@pytest.mark.parametrize(
    "choice",
    [None] + [f"{p.parent.name}={p.stem}" for p in sorted(CONF_DIR.glob("*/*.yaml"))],
)
def test_composed_config_is_the_dataclass_defaults_plus_the_chosen_files(choice):
    choices = _default_choices()
    if choice is not None:
        group, option = choice.split("=")
        choices[group] = option
    files = [CONF_DIR / group / f"{option}.yaml" for group, option in choices.items()]
    expected = OmegaConf.merge(
        OmegaConf.structured(RunConfig),
        *(_conf_values(path) for path in [*files, CONF_DIR / "config.yaml"]),
    )
    overrides = [] if choice is None else [choice]
    for path in files:  # a mandatory value (`???`, e.g. dataset.source) needs an override
        for keys, value in _leaves(_conf_values(path)):
            if value == "???":
                OmegaConf.update(expected, ".".join(keys), "data.json")
                overrides.append(f"{'.'.join(keys)}=data.json")
    composed = to_container(compose_config(overrides))
    assert composed.pop("output_dir").startswith("outputs/")
    expected = OmegaConf.to_container(expected, resolve=False)
    expected.pop("output_dir")
    assert composed == expected
