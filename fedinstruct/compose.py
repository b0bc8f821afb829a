"""The typed config from Hydra's `conf/` tree, or from Flower's flat run_config.

Hydra composes `conf/` against `RunConfig` (registered as the `schema` node), so an unknown key
or a value of the wrong type fails at compose time; `OmegaConf.to_object` then builds the
dataclasses, whose `__post_init__` checks value ranges. Both apps rebuild the same nested
config from Flower's run_config through `config_from_run_config`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedinstruct.config import ConfigError, RunConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
RUN_CONFIG_OVERRIDES_KEY = "overrides"  # the Flower run_config key that is no Hydra key

ConfigStore.instance().store(name="schema", node=RunConfig)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Validate a composed DictConfig and turn it into typed settings."""
    try:
        OmegaConf.resolve(cfg)
        run_config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from err
    assert isinstance(run_config, RunConfig)
    return run_config


def compose_config(overrides: Iterable[str] = ()) -> RunConfig:
    """Compose `conf/` with Hydra overrides (`key=value`), validated."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_omegaconf_message(err)) from err
    finally:
        GlobalHydra.instance().clear()
    return to_run_config(cfg)


def overrides_from_run_config(run_config: Mapping[str, Any]) -> list[str]:
    """Flower's flat run_config as Hydra overrides: `model = "tiny"` picks a group file,
    `train.lr = 0.001` sets a value, "" keeps the configured value, and `overrides` carries
    any further Hydra overrides, separated by spaces."""
    overrides: list[str] = []
    extra = str(run_config.get(RUN_CONFIG_OVERRIDES_KEY, "") or "")
    for key, value in run_config.items():
        if key == RUN_CONFIG_OVERRIDES_KEY or value == "":
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        overrides.append(f"{key}={value}")
    overrides.extend(extra.split())
    return overrides


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """What both apps call: rebuild the nested config from Flower's flat run_config."""
    return compose_config(overrides_from_run_config(run_config))


def to_container(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (for saving the resolved config)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _omegaconf_message(err: Exception) -> str:
    """Hydra/OmegaConf errors are long; keep the line that names the key and the cause."""
    causes: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ConfigError):
            return str(cause)
        causes.append(cause)
        cause = cause.__cause__
    first_line = str(err).strip().splitlines()[0]
    if unknown := re.match(r"Could not override '([^']+)'", first_line):
        return f"unknown config key '{unknown.group(1)}'"
    details = [str(c).strip().splitlines()[0] for c in causes[1:] if str(c).strip()]
    return "; ".join(["invalid configuration: " + first_line, *details])
