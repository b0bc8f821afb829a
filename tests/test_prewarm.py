"""Prewarming by the warm app server: forked ClientApp tasks leave hints, the server runs the
hinted app's `prewarm` hook, and the next task is forked with what the hook loaded.

The app under test is a tiny Flower app written to tmp_path: it knows nothing of the warm
server (no hint of its own), it only exports a `prewarm(run_config, node_config)` function.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import re
import sys
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedinstruct.deploy import LocalDeployment
from fedinstruct.deploy.warm import WarmServer
from fedinstruct.deploy.warm_task import app_location, leave_hints, take_hint, write_hint

CLIENT = """
import json
import os
import sys
import types

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

CACHE = "_warmapp_cache"  # outside the app's package: the warm server keeps it for its children

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    cache = sys.modules.get(CACHE)
    report = {"prewarmed-by": getattr(cache, "pid", 0), "pid": os.getpid()}
    return Message(RecordDict({"report": MetricRecord(report)}), reply_to=msg)


@app.query("fail")
def fail(msg: Message, context: Context) -> Message:
    raise RuntimeError("this task fails")


def prewarm(run_config, node_config):
    cache = sys.modules.setdefault(CACHE, types.ModuleType(CACHE))
    cache.pid = os.getpid()
    with open(run_config["record"], "a") as record:
        record.write(json.dumps({"pid": os.getpid(), "run_config": dict(run_config),
                                 "node_config": dict(node_config)}) + "\\n")
"""

SERVER = """
import os
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + float(context.run_config["wait-s"])
    node_ids = list(grid.get_node_ids())
    while not node_ids and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    for round_ in (1, 2):
        message = Message(RecordDict({"cfg": ConfigRecord({"round": round_})}),
                          dst_node_id=node_ids[0], message_type="query")
        (reply,) = grid.send_and_receive([message], timeout=60)
        report = reply.content["report"]
        print(f"ROUND {round_} prewarmed-by={int(report['prewarmed-by'])} "
              f"pid={int(report['pid'])}", flush=True)
        # the first task's hint makes the warm server prewarm before it forks the next one
        while not os.path.exists(context.run_config["record"]):
            if time.monotonic() > deadline:
                raise RuntimeError("the node's warm server did not prewarm")
            time.sleep(0.2)
"""


@pytest.fixture
def app_dir(tmp_path, write_flower_app) -> Path:
    """The app's folder (a Flower app project named warmapp)."""
    return write_flower_app(
        tmp_path / "app", "warmapp", {"client": CLIENT, "server": SERVER},
        config={"record": "", "wait-s": 60},
        description="Reports whether its task was forked with a prewarmed process")


@pytest.fixture
def warmapp(app_dir, monkeypatch):
    """The app's folder, importable here; ClientApp and sys.modules restored afterwards."""
    root = app_dir
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(ClientApp, "__call__", ClientApp.__call__)  # undoes leave_hints
    yield root
    for name in [n for n in sys.modules if n.split(".")[0] in ("warmapp", "_warmapp_cache")]:
        del sys.modules[name]
    gc.unfreeze()  # the server's drop_app_modules freezes the garbage collector


def query(message_type: str = "query") -> Message:
    return Message(RecordDict(), dst_node_id=0, message_type=message_type)


def test_clientapp_calls_leave_a_hint_only_after_a_handled_message(warmapp, tmp_path,
                                                                  flower_identity):
    app = importlib.import_module("warmapp.client").app
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 1}, state=RecordDict(),
                      run_config={"model": "tiny", "num-rounds": 2})
    hint = tmp_path / "node.hint.json"
    app(query(), context)
    assert not hint.exists()  # no warm server asked for hints: the app leaves none itself

    leave_hints(hint, ["not.imported", "warmapp.client"])
    with pytest.raises(RuntimeError, match="this task fails"):
        app(query("query.fail"), context)
    assert not hint.exists()  # a failed task names nothing to prewarm
    assert app(query(), context).content["report"]["pid"] == os.getpid()
    assert take_hint(hint) == {"module": "warmapp.client", "app_dir": str(warmapp),
                               "run_config": {"model": "tiny", "num-rounds": 2},
                               "node_config": {"partition-id": 1}}
    assert not hint.exists() and take_hint(hint) is None  # taken once


def test_hints_name_the_app_as_imported_and_torn_ones_are_ignored(warmapp, tmp_path):
    assert app_location(["warmapp.client"]) is None  # not imported (yet): nothing to name
    importlib.import_module("warmapp.client")
    assert app_location(["nope", "warmapp.client"]) == ("warmapp.client", warmapp)
    assert app_location(["warmapp"]) == ("warmapp", warmapp)  # a package's __init__
    hint = tmp_path / "node.hint.json"
    for torn in ['{"module": ', '["warmapp.client"]', '{"module": "warmapp.client"}']:
        hint.write_text(torn)  # a torn or foreign file is ignored, not trusted
        assert take_hint(hint) is None


def test_the_server_runs_the_hinted_apps_prewarm_hook_once_per_hint(warmapp, tmp_path):
    record = tmp_path / "record.jsonl"
    server = WarmServer(tmp_path / "node.sock", ["flwr-clientapp"], prewarm=True,
                        apps=["warmapp.client"])
    assert server.hint is not None
    run_config, node_config = {"record": str(record)}, {"partition-id": 0}
    write_hint(server.hint, "warmapp.client", warmapp, run_config, node_config)
    server._prewarm()
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls == [{"pid": os.getpid(), "run_config": run_config, "node_config": node_config}]
    assert "warmapp" not in sys.modules  # children import the app from their run's FAB
    assert sys.modules["_warmapp_cache"].pid == os.getpid()  # what the hook loaded stays

    write_hint(server.hint, "warmapp.client", warmapp, run_config, node_config)
    server._prewarm()  # the same run again: already prewarmed
    write_hint(server.hint, "os", warmapp, run_config, node_config)
    server._prewarm()  # not an app this server was started for
    assert len(record.read_text().splitlines()) == 1 and not server.hint.exists()


@pytest.mark.slow
def test_a_warm_node_prewarms_after_its_first_task_and_forks_the_next_from_it(tmp_path, app_dir):
    app, record = app_dir, tmp_path / "record.jsonl"
    with LocalDeployment(app, num_nodes=1, tls=False, auth=False, isolation="loopback",
                         workdir=tmp_path / "deploy", run_config={"record": str(record)},
                         warm=True) as dep:
        result = dep.run(timeout=180)
        warm = dep.nodes["node-0"].warm
        assert warm is not None
        warm_log = warm.log_text()
    assert result.ok, result.logs
    rounds = {int(r): (int(by), int(pid)) for r, by, pid in
              re.findall(r"ROUND (\d) prewarmed-by=(\d+) pid=(\d+)", result.logs)}
    assert rounds[1][0] == 0, result.logs  # the first task started cold
    assert rounds[2][0] == warm.pid != rounds[2][1], result.logs  # forked after the prewarm
    (call,) = [json.loads(line) for line in record.read_text().splitlines()]  # once per run
    assert call["pid"] == warm.pid  # the hook ran in the warm server, between the two tasks
    assert call["run_config"]["record"] == str(record)
    assert call["node_config"]["partition-id"] == 0
    assert "prewarmed warmapp.client" in warm_log, warm_log[-3000:]
