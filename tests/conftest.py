"""Shared fixtures: offline hub, Flower's task identity for building messages, tiny configs,
the repository root, finding a deployment's processes, and writing small Flower apps.

Tests take what they share from here as fixtures; no test module imports another.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
APPS = Path(__file__).resolve().parent / "apps"  # Flower apps the tests run (importable)
sys.path.insert(0, str(APPS))

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


def _processes_with_home_under(root: Path) -> list[psutil.Process]:
    """Every live process whose FLWR_HOME lies under root (all deployment processes have one)."""
    found = []
    for proc in psutil.process_iter():
        try:
            home = proc.environ().get("FLWR_HOME", "")
            if home.startswith(str(root)) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _write_flower_app(root: Path, name: str, modules: dict[str, str], *,
                      config: dict[str, object], description: str,
                      components: dict[str, str] | None = None) -> Path:
    """A Flower app project at root: package `name` with modules (module name -> source,
    dedented) and a pyproject.toml (hatchling) whose components default to
    `{name}.server:app` and `{name}.client:app`, and whose run config is config."""
    import tomli_w

    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    for module, source in modules.items():
        (root / name / f"{module}.py").write_text(textwrap.dedent(source))
    app = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": name, "version": "1.0.0", "description": description,
                    "license": "Apache-2.0", "dependencies": ["flwr>=1.41"]},
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"packages": [name]}}}},
            "flwr": {"app": {
                "publisher": "fedinstruct",
                "components": components or {"serverapp": f"{name}.server:app",
                                             "clientapp": f"{name}.client:app"},
                "config": config,
            }},
        },
    }
    (root / "pyproject.toml").write_text(tomli_w.dumps(app))
    return root


@pytest.fixture(scope="session")
def write_flower_app():
    """`write(root, name, modules, config=..., description=..., components=None)`: a small
    Flower app project (package + pyproject.toml) for tests that deploy or import one."""
    return _write_flower_app


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository (the Flower app's folder: pyproject.toml, conf/, scripts/, docker/)."""
    return REPO


@pytest.fixture
def tiny_run() -> list[str]:
    """Hydra overrides for a small, fast end-to-end run with model=tiny (a fresh list)."""
    return list(TINY_RUN)


@pytest.fixture(scope="session")
def processes_with_home_under():
    """`find(root)`: every live process whose FLWR_HOME lies under root, for leftover checks."""
    return _processes_with_home_under


@pytest.fixture
def flower_identity():
    """Flower's runtime sets the task identity before apps build messages; do the same."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


@pytest.fixture
def tiny_config(tmp_path):
    from fedinstruct.compose import compose_config

    def make(*overrides: str):
        return compose_config([*TINY_RUN, f"output_dir={tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture(scope="session")
def hostile_app_dir(tmp_path_factory) -> Path:
    """A Flower app folder (for `flwr run`) whose ClientApp is tests/apps/hostile_app.py,
    declaring fedinstruct's run-config keys and the hostile app's own."""
    import shutil

    import tomli_w

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    folder = tmp_path_factory.mktemp("hostile-app")
    shutil.copy(APPS / "hostile_app.py", folder / "hostile_app.py")
    app = {
        "build-system": project["build-system"],
        "project": {"name": "hostileapp", "version": "1.0.0", "dependencies": ["flwr>=1.41"],
                    "description": "fedinstruct with hostile nodes", "license": "Apache-2.0"},
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"only-include": ["hostile_app.py"]}}}},
            "flwr": {"app": {
                "publisher": "fedinstruct",
                "components": {"serverapp": "hostile_app:server",
                               "clientapp": "hostile_app:client"},
                "config": {**project["tool"]["flwr"]["app"]["config"],
                           "hostile-mode": "bad", "hostile-nodes": 1},
            }},
        },
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(app))
    return folder
