#!/usr/bin/env python3
"""`make docker-test`: build the CPU image and run federations with the shipped Compose files.

Needs a Docker engine (and `docker compose`, v2 or the v1 `docker-compose`) and this checkout's
virtualenv (`make setup`: `flwr` on the host submits the runs, and the same run as processes
is the baseline). It is not part of .ci/run: the engine is not always there. What it does, from
a clean checkout, failing at the first step that does not hold:

 1. wheelhouse: downloads every wheel the image needs into wheels/ (git-ignored) unless it is
    there, so the build reaches no index (the Dockerfile's air-gapped mode);
 2. builds docker/Dockerfile with no cache (timed; image size), checks the image runs as uid
    1000 and holds no private key or certificate file;
 3. plain docker/compose.yaml: SuperLink + 2 SuperNodes, each with its own data folder; a
    4-round FedIT run of model=tiny submitted with `flwr run` from the host; the run folder
    (metrics.jsonl, adapters/final) is copied out of the `outputs` volume; `down -v` leaves no
    container, volume or network;
 4. the same federation as processes (fedinstruct.deploy.LocalDeployment, loopback, at the
    engine's niceness), the same run: round times side by side;
 5. compose.yaml + compose.tls.yaml (TLS, SuperNode auth, `register` one-shot service): which
    files each container holds (ca.crt, the node's own key; ca.key nowhere), a 2-round run,
    then a run in which supernode-1 is killed mid-round, started again, and rejoins;
    `down -v` again;
 6. `config` of the GPU overlay with this Compose;
 7. prints the figures and writes them into docker/README.md (between the docker-test marks).

Everything it starts is removed at the end, also on failure; the image is kept
(`docker image rm fedinstruct:cpu`). Options: --reuse-image (skip the build), --keep (leave
.docker-test/ for a look).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
WORK = REPO / ".docker-test"
PROJECT = "fedinstruct-test"  # never the user's own `fedinstruct` project
IMAGE = "fedinstruct:cpu"
TORCH, TORCH_CPU_INDEX = "torch==2.13.0", "https://download.pytorch.org/whl/cpu"
PLAIN = ("compose.yaml",)
SECURE = ("compose.yaml", "compose.tls.yaml")
GPU = ("compose.yaml", "compose.tls.yaml", "compose.gpu.yaml")
NODES = ("supernode-0", "supernode-1")
# The run of tests/test_deployment_e2e.py: tiny LLaMA, 2 nodes, short rounds.
TINY = {"model": "tiny", "train.local_steps": 2, "train.max_length": 96,
        "eval.max_samples": 4, "eval.max_new_tokens": 4, "federation.num_clients": 2,
        "federation.min_train_nodes": 2}
OVERRIDES = "dataset.samples_per_client=16 federation.min_available_nodes=2"
TIMED_ROUNDS = 4  # the plain run in containers and the same run as processes
MARK_BEGIN, MARK_END = "<!-- docker-test figures: begin -->", "<!-- docker-test figures: end -->"

figures: dict[str, object] = {}
T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[docker-test {time.monotonic() - T0:6.0f} s] {message}", flush=True)


def sh(*argv: str, check: bool = True, env: dict | None = None, timeout: float = 900,
       quiet: bool = False) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})}, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(argv)}\n"
                         f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    if not quiet and result.returncode != 0:
        say(f"(exit {result.returncode}) {' '.join(argv)}: {result.stderr.strip()[-300:]}")
    return result.stdout


def compose_cli() -> list[str]:
    for cli in (["docker", "compose"], ["docker-compose"]):
        try:
            if subprocess.run([*cli, "version"], capture_output=True).returncode == 0:
                return cli
        except FileNotFoundError:
            pass
    raise SystemExit("no `docker compose` (v2) and no `docker-compose` (v1)")


class Compose:
    """One Compose project made of the shipped files, with this test's certs, keys and data."""

    def __init__(self, files: tuple[str, ...]) -> None:
        self.files = files
        self.env = {"FEDINSTRUCT_CERTS": str(WORK / "certs"),
                    "FEDINSTRUCT_KEYS": str(WORK / "keys"),
                    "FEDINSTRUCT_DATA": str(WORK / "data"),
                    "FEDINSTRUCT_IMAGE": IMAGE, "HF_HUB_OFFLINE": "1"}

    def argv(self, *args: str) -> list[str]:
        files = [a for name in self.files for a in ("-f", str(DOCKER / name))]
        return [*CLI, "-p", PROJECT, *files, *args]

    def __call__(self, *args: str, check: bool = True, timeout: float = 900) -> str:
        return sh(*self.argv(*args), check=check, env=self.env, timeout=timeout)

    def container(self, service: str) -> str:
        cid = self("ps", "-q", service).strip()
        if not cid:
            raise SystemExit(f"no container for {service}")
        return cid

    def down(self) -> None:
        self("down", "-v", "--remove-orphans", "--timeout", "10", check=False)


def leftovers() -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={PROJECT}"
    return {kind: sh("docker", kind, "ls", "-q", "--filter", label, *(
        ["-a"] if kind == "container" else [])).split()
        for kind in ("container", "volume", "network")}


def down_leaves_nothing(compose: Compose) -> None:
    compose.down()
    left = leftovers()
    if any(left.values()):
        raise SystemExit(f"`down -v` left {left}")
    say("down -v: no container, volume or network of the project is left")


# ------------------------------------------------------------------------------- the image
def wheelhouse() -> None:
    wheels = REPO / "wheels"
    names = [p.name for p in wheels.glob("*.whl")] if wheels.is_dir() else []
    if any(n.startswith("torch-") for n in names) and any(n.startswith("flwr-") for n in names):
        say(f"wheelhouse: wheels/ has {len(names)} wheels, kept")
        return
    say("wheelhouse: downloading the image's wheels into wheels/ (host pip)")
    start = time.monotonic()
    req = [sys.executable, str(DOCKER / "requirements.py"), str(REPO / "pyproject.toml")]
    deps = sh(*req).split()
    build = sh(*req, "--build").split()
    pip = [sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels)]
    # torch's CPU build: from its own index, else what this pip finds (PyPI's Linux torch is
    # the CUDA build, which the image does not want).
    if subprocess.run([*pip, "--no-deps", TORCH, "--index-url", TORCH_CPU_INDEX],
                      capture_output=True, timeout=3600).returncode != 0:
        sh(*pip, "--no-deps", TORCH, timeout=3600)
    if not any("+cpu" in p.name for p in wheels.glob("torch-*.whl")):
        raise SystemExit(f"no CPU build of {TORCH} in wheels/: put one there "
                         f"(pip download --no-deps {TORCH} --index-url {TORCH_CPU_INDEX})")
    sh(*pip, "--find-links", str(wheels), TORCH, "setuptools", "wheel", *build, "-c",
       str(DOCKER / "constraints.txt"), *deps, timeout=3600)
    sh(*pip, "--no-deps", *sh(*req, "--no-deps-only").split(), timeout=3600)
    figures["wheelhouse_s"] = round(time.monotonic() - start)


def build_image(reuse: bool) -> None:
    if reuse and subprocess.run(["docker", "image", "inspect", IMAGE],
                                capture_output=True).returncode == 0:
        say(f"reusing {IMAGE}")
    else:
        say(f"building {IMAGE} from docker/Dockerfile, no cache, from the wheelhouse")
        start = time.monotonic()
        log = sh("docker", "build", "--no-cache", "-f", "docker/Dockerfile", "-t", IMAGE,
                 str(REPO), timeout=3600)
        figures["build_s"] = round(time.monotonic() - start)
        if "installing from the wheelhouse only" not in log:
            raise SystemExit("the build did not take the wheelhouse-only path")
        say(f"built in {figures['build_s']} s (no index reached: --no-index)")
    size = int(sh("docker", "image", "inspect", "-f", "{{.Size}}", IMAGE))
    base = int(sh("docker", "image", "inspect", "-f", "{{.Size}}", "python:3.11-slim"))
    figures["image_mb"], figures["base_mb"] = round(size / 1e6), round(base / 1e6)
    say(f"image {size / 1e6:.0f} MB (base python:3.11-slim {base / 1e6:.0f} MB)")

    user = sh("docker", "image", "inspect", "-f", "{{.Config.User}}", IMAGE).strip()
    uid = sh("docker", "run", "--rm", "--entrypoint", "id", IMAGE, "-u").strip()
    if user != "app" or uid != "1000":
        raise SystemExit(f"the image runs as {user!r} (uid {uid}), not app (1000)")
    # No key or certificate file of anyone's in the image (CA bundles are public certificates).
    found = sh("docker", "run", "--rm", "--entrypoint", "sh", IMAGE, "-c",
               "find / -xdev -type f \\( -name '*.key' -o -name 'node-*' -o -name '*.p12' "
               "-o -name 'id_rsa*' -o -name 'id_ecdsa*' \\) 2>/dev/null; "
               "grep -rlE 'BEGIN (RSA |EC |OPENSSH |ENCRYPTED )?PRIVATE KEY' --exclude='*.py' "
               "--exclude='*.pyc' --exclude='*.so*' /app /home /root /etc /state /cache /opt "
               "2>/dev/null || true").split()
    if found:
        raise SystemExit(f"the image holds key files: {found}")
    say("image runs as app (uid 1000) and holds no private key")


# ----------------------------------------------------------------------------- federations
def prepare() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "flwr-home").mkdir(parents=True)
    sh("bash", str(REPO / "scripts/make-certs.sh"), str(WORK / "certs"), "superlink",
       "localhost", "127.0.0.1")
    sh("bash", str(REPO / "scripts/make-node-keys.sh"), str(WORK / "keys"), "node-0", "node-1")
    for i in range(2):  # each node's own data folder (a file a data-path run would read)
        folder = WORK / "data" / f"node-{i}"
        folder.mkdir(parents=True)
        (folder / "README").write_text(f"node-{i}'s data\n")
    # The containers run as uid 1000: the server key and node keys must be readable by it.
    readable = [WORK / "certs" / "server.key", *(WORK / "keys").glob("node-?")]
    if os.geteuid() == 0:
        for path in [WORK, *WORK.rglob("*")]:
            os.chown(path, 1000, 1000)
    elif os.geteuid() != 1000:
        for path in readable:
            path.chmod(0o644)  # development keys of a throwaway federation
    for name, tls in (("plain", False), ("tls", True)):
        extra = (f'root-certificates = "{WORK / "certs" / "ca.crt"}"\n' if tls
                 else "insecure = true\n")
        (WORK / "flwr-home" / name).mkdir()
        (WORK / "flwr-home" / name / "config.toml").write_text(
            f'[superlink]\ndefault = "c"\n\n[superlink.c]\naddress = "127.0.0.1:9093"\n{extra}')


def flwr_env(name: str) -> dict[str, str]:
    return {"FLWR_HOME": str(WORK / "flwr-home" / name),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def flwr_json(name: str, *args: str) -> dict:
    out = sh("flwr", *args, "c", "--format", "json", env=flwr_env(name), check=False,
             quiet=True, timeout=60)
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return {}


def wait_until(condition, timeout: float, what: str, step: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(step)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def online_nodes(name: str) -> list[dict]:
    nodes = flwr_json(name, "supernode", "ls").get("nodes", [])
    return [n for n in nodes if n.get("status") == "online"]


class Run:
    """`flwr run . c --stream` from the host; each line of the stream timestamped."""

    def __init__(self, name: str, config: dict) -> None:
        value = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        self.proc = subprocess.Popen(
            ["flwr", "run", str(REPO), "c", "--stream", "--run-config", value],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
            env={**os.environ, **flwr_env(name)})
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip()))

    def seen(self, pattern: str) -> float | None:
        return next((t for t, line in self.lines if re.search(pattern, line)), None)

    def log(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait(self, timeout: float) -> str:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise SystemExit(f"the run did not finish in {timeout:.0f} s:\n"
                             f"{self.log()[-3000:]}") from None
        self.reader.join(10)
        return self.log()


def run_config(output_dir: str, rounds: int, *overrides: str) -> dict:
    return {**TINY, "num_rounds": rounds, "output_dir": output_dir,
            "overrides": " ".join([OVERRIDES, *overrides])}


def copy_out(compose: Compose, folder: str, to: Path) -> list[dict]:
    """The run folder, out of the `outputs` volume, as the user would get it."""
    sh("docker", "cp", f"{compose.container('superlink')}:/app/outputs/{folder}", str(to))
    rows = [json.loads(line) for line in (to / "metrics.jsonl").read_text().splitlines()]
    if not (to / "adapters" / "final" / "adapter_model.safetensors").is_file():
        raise SystemExit(f"{folder}: no adapters/final/adapter_model.safetensors")
    return rows


def check_completed(rows: list[dict], rounds: int, what: str) -> list[dict]:
    trained = [r for r in rows if r.get("round", 0) >= 1]
    if [r["round"] for r in trained] != list(range(1, rounds + 1)):
        raise SystemExit(f"{what}: rounds {[r['round'] for r in rows]}")
    if any(r["nodes_replied"] != 2 or r["train_samples"] <= 0 for r in trained):
        raise SystemExit(f"{what}: not every node trained every round: {trained}")
    return trained


def record(side: str, first_round_s: float, rows: list[dict]) -> None:
    """One timed run's figures, with the host's load average (other work on the machine)."""
    entry = figures.setdefault(side, [])
    assert isinstance(entry, list)
    entry.append({"first_round_s": round(first_round_s, 1),
                  "round_s": [round(r["time_round"], 2) for r in rows],
                  "load": round(os.getloadavg()[0], 1)})


def plain_federation(pair: int) -> None:
    compose = Compose(PLAIN)
    start = time.monotonic()
    compose("up", "-d", "--no-build")
    wait_until(lambda: len(online_nodes("plain")) == 2, 300, "2 SuperNodes online (plain)")
    say(f"plain: SuperLink and 2 SuperNodes online after {time.monotonic() - start:.0f} s")
    for i, service in enumerate(NODES):  # its own data folder, nobody else's
        listing = sh("docker", "exec", compose.container(service), "cat", "/data/README")
        if listing.strip() != f"node-{i}'s data":
            raise SystemExit(f"{service} sees {listing!r} in /data")
    n = TIMED_ROUNDS
    run = Run("plain", run_config("/app/outputs/plain", n))
    log = run.wait(900)
    first = run.seen(rf"round 1/{n} \|")
    if first is None or run.seen(rf"round {n}/{n} \|") is None:
        raise SystemExit(f"plain run did not complete {n} rounds:\n{log[-3000:]}")
    out = WORK / f"out-plain-{pair}"
    rows = check_completed(copy_out(compose, "plain", out), n, "plain")
    record("containers", first - start, rows)
    say(f"plain: {n} FedIT rounds, round times {[round(r['time_round'], 2) for r in rows]} s; "
        f"run folder copied out of the outputs volume to {out}")
    runs = flwr_json("plain", "ls").get("runs", [])
    if len(runs) != 1 or runs[0].get("status") != "finished:completed":
        raise SystemExit(f"plain: run status {runs}")
    down_leaves_nothing(compose)


def process_baseline(pair: int) -> None:
    sys.path.insert(0, str(REPO))
    import psutil

    from fedinstruct.deploy import LocalDeployment

    # The engine's processes may run niced (docker-offline.sh starts dockerd with nice 10, and
    # containers inherit it): the baseline runs at the same priority.
    engine = [p.nice() for p in psutil.process_iter(["name"]) if p.info["name"] == "dockerd"]
    if engine and engine[0] > os.nice(0):
        os.nice(engine[0] - os.nice(0))
    figures["nice"] = os.nice(0)
    folder = WORK / f"out-processes-{pair}"
    start = time.monotonic()
    # As in the containers: an empty model cache (the tiny model and SmolLM2's tokenizer are
    # made on first use), no model hub.
    env = {"FEDINSTRUCT_CACHE": str(WORK / f"processes-cache-{pair}"), "HF_HUB_OFFLINE": "1"}
    with LocalDeployment(REPO, num_nodes=2, tls=False, auth=False, isolation="loopback",
                         workdir=WORK / "processes", env=env) as dep:
        handle = dep.start_run(run_config(str(folder), TIMED_ROUNDS))
        metrics = folder / "metrics.jsonl"
        wait_until(lambda: metrics.exists() and '"round": 1' in metrics.read_text(), 900,
                   "the processes' round 1", step=0.2)
        first = time.monotonic()
        result = handle.wait(900)
        if not result.ok:
            raise SystemExit(f"the process run failed: {result.logs[-3000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = check_completed(rows, TIMED_ROUNDS, "processes")
    record("processes", first - start, rows)
    say(f"processes: round times {[round(r['time_round'], 2) for r in rows]} s")


def files_in(compose: Compose, service: str) -> set[str]:
    out = sh("docker", "exec", compose.container(service), "sh", "-c",
             "find /certs /keys -type f 2>/dev/null; find / -xdev -name ca.key 2>/dev/null; "
             "true")
    return set(out.split())


def secure_federation() -> None:
    compose = Compose(SECURE)
    compose("up", "-d", "--no-build")
    wait_until(lambda: len(online_nodes("tls")) == 2, 300, "2 SuperNodes online (TLS)")
    say("tls: register ran, both SuperNodes admitted with their keys")
    expect = {"superlink": {"/certs/ca.crt", "/certs/server.pem", "/certs/server.key"},
              "supernode-0": {"/certs/ca.crt", "/keys/node-0"},
              "supernode-1": {"/certs/ca.crt", "/keys/node-1"}}
    for service, wanted in expect.items():
        held = files_in(compose, service)
        if held != wanted:
            raise SystemExit(f"{service} holds {sorted(held)}, expected {sorted(wanted)}")
    say("tls: each container holds ca.crt and its own key only; ca.key is in none")

    run = Run("tls", run_config("/app/outputs/tls", 2))
    log = run.wait(900)
    if run.seen(r"round 2/2 \|") is None:
        raise SystemExit(f"TLS run did not complete 2 rounds:\n{log[-3000:]}")
    check_completed(copy_out(compose, "tls", WORK / "out-tls"), 2, "tls")
    say("tls: 2 FedIT rounds completed, run folder copied out")

    # A node killed mid-round: left out of that round, started again, it rejoins.
    run = Run("tls", run_config("/app/outputs/faults", 8, "eval.every=0",
                                "federation.round_timeout=60", "federation.min_replies=1",
                                "federation.min_available_nodes=1"))
    superlink = compose.container("superlink")

    def rows() -> list[dict]:
        out = sh("docker", "exec", superlink, "cat", "/app/outputs/faults/metrics.jsonl",
                 check=False, quiet=True)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    wait_until(lambda: len(rows()) >= 1, 600, "round 1 of the fault run", 0.5)
    node = compose.container("supernode-1")

    def received() -> int:
        result = subprocess.run(["docker", "logs", node], capture_output=True, text=True)
        return (result.stdout + result.stderr).count("Receiving: train message")

    before = received()
    wait_until(lambda: received() > before, 120, "supernode-1's next train message", 0.2)
    sh("docker", "kill", node)
    killed_at = time.monotonic()
    say("faults: supernode-1 killed (SIGKILL) mid-round; starting it again")
    compose("start", "supernode-1")  # refused until its heartbeat lapses; restart: on-failure
    # The round it was killed in (2, or 3 when round 2's message had come before we looked)
    # ends without it.
    wait_until(lambda: any(r["nodes_replied"] == 1 for r in rows()), 300,
               "the round supernode-1 was killed in to end without it")
    after = len(rows())  # the next round may start before the node is admitted again
    wait_until(lambda: len(rows()) >= after + 2, 600, "two rounds after the restart")
    rejoined = time.monotonic()
    for entry in flwr_json("tls", "ls").get("runs", []):  # the fault run: 8 rounds are not needed
        if not entry["status"].startswith("finished"):
            sh("flwr", "stop", str(entry["run-id"]), "c", env=flwr_env("tls"), check=False)
    run.wait(120)
    replied = [r["nodes_replied"] for r in rows()]
    lost_round = replied.index(1) + 1
    lost = run.seen(rf"round {lost_round} train: node \d+ lost")
    if (lost is None or lost_round < 2 or set(replied[:lost_round - 1]) != {2}
            or replied[after + 1] != 2):
        raise SystemExit(f"faults: nodes_replied per round {replied}; log:\n{run.log()[-3000:]}")
    figures["rejoin_s"] = round(rejoined - killed_at)  # kill to the 2nd round after restart
    say(f"faults: round {lost_round} went on without it (logged lost), nodes_replied "
        f"{replied}: rejoined")
    down_leaves_nothing(compose)


def gpu_overlay() -> None:
    Compose(GPU)("config", "-q")
    say("compose.gpu.yaml: `config` accepts its reservations (deploy.resources.reservations)")


# --------------------------------------------------------------------------------- report
def table() -> str:
    f = figures

    def side(name: str) -> tuple[float, str, str, str]:
        runs = f[name]
        rounds = [x for run in runs for x in run["round_s"]]
        return (sum(rounds) / len(rounds),
                "; ".join(", ".join(f"{x:.2f}" for x in run["round_s"]) for run in runs),
                ", ".join(f"{run['first_round_s']}" for run in runs),
                ", ".join(f"{run['load']}" for run in runs))

    mean_c, rounds_c, first_c, load_c = side("containers")
    mean_p, rounds_p, first_p, load_p = side("processes")
    f["ratio"] = round(mean_c / mean_p, 2)
    build = f"{f['build_s']} s" if "build_s" in f else "(image reused)"
    pairs, n = len(f["containers"]), TIMED_ROUNDS
    return "\n".join([
        f"Last `make docker-test` ({time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"{os.cpu_count()} CPU cores, no GPU, {CLI_NAME}). The same {n}-round FedIT run of "
        "`model=tiny` (2 nodes, tests/test_deployment_e2e.py's settings, no TLS) in containers "
        f"and as processes (LocalDeployment, loopback), alternated {pairs} times, each with an "
        f"empty model cache, all at nice {f['nice']} (the engine's); the load average (1 min) "
        "at the end of each run shows what else the machine was doing:",
        "",
        "| figure | containers | processes |",
        "|---|---|---|",
        f"| image build, no cache, from the wheelhouse (no index) | {build} | |",
        f"| image size (`docker image inspect`) | {f['image_mb']} MB (base "
        f"python:3.11-slim {f['base_mb']} MB) | |",
        f"| time to first round (`up -d` or LocalDeployment start to round 1's result), per "
        f"run | {first_c} s | {first_p} s |",
        f"| round time (`time_round`, rounds 1-{n}), per run | {rounds_c} s | {rounds_p} s |",
        f"| mean round time | {mean_c:.2f} s | {mean_p:.2f} s |",
        f"| **containers / processes** | **{f['ratio']:.2f}x** (target <= 1.2x) | |",
        f"| load average per run | {load_c} | {load_p} |",
        f"| SuperNode container killed mid-round (TLS, node auth): kill to the 2nd round "
        f"after the one it was lost in | {f['rejoin_s']} s | |",
    ])


def write_readme(text: str) -> None:
    path = DOCKER / "README.md"
    readme = path.read_text()
    if MARK_BEGIN not in readme:
        say("docker/README.md has no docker-test marks: figures not written")
        return
    head, rest = readme.split(MARK_BEGIN, 1)
    _, tail = rest.split(MARK_END, 1)
    path.write_text(f"{head}{MARK_BEGIN}\n{text}\n{MARK_END}{tail}")
    say("figures written into docker/README.md")


def main() -> None:
    global CLI, CLI_NAME
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse-image", action="store_true", help="skip the build if present")
    parser.add_argument("--keep", action="store_true", help="keep .docker-test/")
    parser.add_argument("--pairs", type=int, default=2,
                        help="timed runs in containers and as processes, alternated")
    args = parser.parse_args()
    os.chdir(REPO)
    sh("docker", "info", "--format", "{{.ServerVersion}}")
    CLI = compose_cli()
    version = sh(*CLI, "version", "--short").strip()
    CLI_NAME = f"Docker {sh('docker', 'version', '--format', '{{.Server.Version}}').strip()}, " \
               f"Compose {version}"
    say(f"{CLI_NAME} ({' '.join(CLI)})")
    for files in (PLAIN, SECURE):
        Compose(files).down()  # a previous run's leftovers
    try:
        wheelhouse()
        build_image(args.reuse_image)
        prepare()
        gpu_overlay()
        for pair in range(args.pairs):  # alternated: both sides see the same outside load
            plain_federation(pair)
            process_baseline(pair)
        secure_federation()
    finally:
        for files in (PLAIN, SECURE):
            Compose(files).down()
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)
    text = table()
    print("\n" + text + "\n")
    write_readme(text)
    say("all checks passed")


CLI: list[str] = []
CLI_NAME = ""

if __name__ == "__main__":
    main()
