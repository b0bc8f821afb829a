"""Prewarming: a finished task's hint, and the warm app server's model reaching a forked task."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from fedinstruct.prewarm import HINT_ENV, leave_hint, take_hint

REPO = Path(__file__).resolve().parents[1]


def test_a_task_leaves_a_hint_only_for_a_warm_server_that_asked(tmp_path, monkeypatch):
    hint = tmp_path / "node.hint.json"
    run_config, node_config = {"model": "tiny", "num_rounds": 2}, {"partition-id": 1}
    monkeypatch.delenv(HINT_ENV, raising=False)
    leave_hint("fedinstruct.client_app", REPO, run_config, node_config)
    assert not hint.exists() and not list(tmp_path.iterdir())

    monkeypatch.setenv(HINT_ENV, str(hint))
    leave_hint("fedinstruct.client_app", REPO, run_config, node_config)
    assert take_hint(hint) == {"module": "fedinstruct.client_app", "app_dir": str(REPO),
                               "run_config": run_config, "node_config": node_config}
    assert not hint.exists() and take_hint(hint) is None  # taken once
    hint.write_text('{"module": ')  # a torn or foreign file is ignored, not trusted
    assert take_hint(hint) is None


FORKED_TASK = """
import os, sys, time
import torch
from fedinstruct.deploy.warm import drop_app_modules, single_threaded
import fedinstruct.client_app as app

run_config = {"model": "tiny", "output_dir": sys.argv[1],
              "overrides": "dataset.samples_per_client=8"}
app.prewarm(run_config, {})                      # what the warm server does between tasks
held = id(sys.modules["_fedinstruct_process_cache"].__dict__["base-models"])
drop_app_modules(["fedinstruct.client_app"])
assert not any(name.startswith("fedinstruct") for name in sys.modules)
threads = single_threaded()
pid = os.fork()
if pid == 0:                                     # the next task: imports the app afresh
    torch.set_num_threads(2)
    from fedinstruct.client_app import run_config_of
    from fedinstruct.local_client import shared_model
    from fedinstruct.modeling import process_cache

    class Context:
        pass

    context = Context()
    context.run_config = run_config
    loaded, fresh = shared_model(run_config_of(context))
    ids = torch.arange(12).reshape(2, 6)
    start = time.perf_counter()
    loss = loaded.model(input_ids=ids, labels=ids).loss
    loss.backward()                              # OpenMP with 2 threads after the fork
    print("fresh", fresh, "same-cache", id(process_cache("base-models")) == held,
          "threads", torch.get_num_threads(), "finite", bool(torch.isfinite(loss)), flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_the_prewarmed_model_reaches_a_forked_task_that_reimports_the_app(tmp_path):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(FORKED_TASK), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fresh False same-cache True threads 2 finite True" in result.stdout
