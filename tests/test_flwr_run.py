"""The ordinary Flower way: `flwr run .` against a local simulation SuperLink."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow  # `flwr run` of a whole federation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_superlinks_of(flwr_home: Path) -> None:
    """`flwr run` leaves a detached SuperLink; stop the one this test started, and its children."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            for child in proc.children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait(timeout=30)


def test_flwr_run_simulation(tmp_path, repo_root):
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        "options.num-supernodes = 2\n"
    )
    out = tmp_path / "run"
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    run_config = (
        f'model="tiny" num_rounds=1 output_dir="{out}" "train.local_steps"=2 '
        '"federation.min_train_nodes"=2 "eval.max_samples"=4 "eval.max_new_tokens"=4 '
        'overrides="federation.min_available_nodes=2 dataset.samples_per_client=16"'
    )
    flwr = shutil.which("flwr", path=env["PATH"])
    try:
        result = subprocess.run(
            [flwr, "run", str(repo_root), "--run-config", run_config, "--stream"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    finally:
        _stop_superlinks_of(flwr_home)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 1 and rows[-1]["nodes_replied"] == 2
    assert (out / "adapters" / "final" / "adapter_model.safetensors").exists()
    leftovers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(flwr_home) in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftovers, f"processes left behind: {leftovers}"
