"""deploy/kubernetes: every kustomization built with kubectl and each resource checked,
strictly, against the Kubernetes API schemas (kubernetes-validate, offline); then what
the schemas cannot see: the agent count, the settings' names, and the containers' own
commands, environment and probes run for real against a CURVE bus on this machine."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from agentbus_zmq.bus.client import ControlClient
from agentbus_zmq.bus.security import ClientKeys, generate
from tests.conftest import cli_env, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
#: the oldest Kubernetes the manifests are for (policy/v1 PodDisruptionBudget: 1.21)
KUBERNETES = "1.25.0"
OVERLAYS = sorted(p.parent for p in (ROOT / "overlays").glob("*/kustomization.yaml"))


def build(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to build the kustomizations (.ci/run installs Debian's kubernetes-client)"
    r = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [doc for doc in yaml.safe_load_all(r.stdout) if doc]


def by_kind(resources: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["kind"], r["metadata"]["name"]): r for r in resources}


def container(resources: list[dict], deployment: str) -> dict:
    (c,) = by_kind(resources)[("Deployment", deployment)]["spec"]["template"]["spec"]["containers"]
    return c


def settings(resources: list[dict]) -> dict[str, str]:
    return by_kind(resources)[("ConfigMap", "agentbus-settings")]["data"]


@pytest.mark.parametrize("directory", [ROOT / "base", *OVERLAYS], ids=lambda p: p.name)
def test_every_resource_passes_the_kubernetes_schemas_strictly(directory):
    resources = build(directory)
    kinds = sorted(r["kind"] for r in resources)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Namespace", "PodDisruptionBudget", "Service"], kinds
    for r in resources:
        kubernetes_validate.validate(r, KUBERNETES, strict=True)
    # strict means strict: a misspelt field is caught, not ignored
    bad = copy.deepcopy(by_kind(resources)[("Deployment", "agentbus-agents")])
    bad["spec"]["replica"] = bad["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES, strict=True)


@pytest.mark.parametrize("directory", OVERLAYS, ids=lambda p: p.name)
def test_an_overlay_runs_the_agents_its_name_says(directory):
    resources = build(directory)
    data = settings(resources)
    replicas = by_kind(resources)[("Deployment", "agentbus-agents")]["spec"]["replicas"]
    per_pod, per_host = int(data["BUS_AGENT_REPLICAS"]), int(data["BUS_AGENT_PER_HOST"])
    assert per_pod % per_host == 0, "a pod holds whole agent hosts"
    assert replicas * per_pod == int(re.fullmatch(r"agents-(\d+)", directory.name).group(1))
    # the live efficiency's C: one core (the CPU request) per host process
    cores = replicas * per_pod // per_host * float(container(resources, "agentbus-agents")["resources"]["requests"]["cpu"])
    assert int(data["BUS_AGENT_CORES"]) == cores


def _envvars(command) -> set[str]:
    names = set()
    for param in command.params:
        names.update([param.envvar] if isinstance(param.envvar, str) else param.envvar or [])
    for sub in getattr(command, "commands", {}).values():
        names |= _envvars(sub)
    return names


def test_every_setting_is_one_the_commands_read():
    """A misspelt BUS_* variable would be ignored in silence: each must be an option's."""
    from agentbus_zmq.agents.__main__ import cli as agent
    from agentbus_zmq.bus.ctl import cli as ctl
    from agentbus_zmq.coordinator.__main__ import cli as coordinator

    known = _envvars(agent) | _envvars(ctl) | _envvars(coordinator)
    resources = build(ROOT / "base")
    names = set(settings(resources))
    for deployment in ("agentbus-coordinator", "agentbus-agents"):
        names |= {e["name"] for e in container(resources, deployment)["env"] if e["name"].startswith("BUS_")}
    assert names - known == set()


def _environment(c: dict, data: dict, paths: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """The container's environment as Kubernetes would give it (the ConfigMap, then its
    own env), its mount paths mapped to directories here."""
    env = {**cli_env(), **data, **extra}
    for e in c["env"]:
        if "value" in e:
            value = e["value"]
            for mount in sorted(paths, key=len, reverse=True):   # a path under a mount: once
                if value == mount or value.startswith(mount + "/"):
                    value = paths[mount] + value[len(mount):]
                    break
            env[e["name"]] = value
    for k, v in list(env.items()):      # $(VAR) references, as the kubelet expands them
        env[k] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), v)
    return env


def _mount_secret(volume: dict, files: dict[str, Path], where: Path) -> None:
    """A Secret volume as the kubelet lays it out: its items (or every key) under ``where``."""
    items = volume["secret"].get("items") or [{"key": k, "path": k} for k in files]
    for item in items:
        target = where / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(files[item["key"]], target)


def _probe(c: dict, name: str, env: dict, paths: dict[str, str]) -> subprocess.CompletedProcess:
    argv = [paths.get(a, a) for a in c[name]["exec"]["command"]]
    argv = [sys.executable if a == "python" else a for a in argv]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_the_containers_commands_environment_and_probes_work_as_written(tmp_path):
    """The coordinator and an agent pod started here with the environment, the Secret
    layout and the arguments the manifests give them (only mount paths and the Service's
    address mapped to this machine): the agents register over CURVE with the pod's name
    as their id, and every probe passes as written (tests/test_health.py shows the
    readiness probe failing until the agents are registered)."""
    resources = build(OVERLAYS[0])
    data = {**settings(resources), "BUS_AGENT_REPLICAS": "4", "BUS_AGENT_PER_HOST": "2", "BUS_AGENT_KIND": "null"}
    coordinator_c, agents_c = container(resources, "agentbus-coordinator"), container(resources, "agentbus-agents")
    keys = tmp_path / "keys"
    coordinator_pub, coordinator_secret = generate(keys, "coordinator")
    agents_pub, agents_secret = generate(keys / "agents", "agents", agents=["agentbus-agents-*"])
    probe_pub, probe_secret = generate(keys / "probe", "probe")
    files = {"coordinator.key": coordinator_pub, "coordinator.key_secret": coordinator_secret,
             "agents.key": agents_pub, "agents.key_secret": agents_secret, "probe.key": probe_pub,
             "probe.key_secret": probe_secret}
    specs = {d: by_kind(resources)[("Deployment", d)]["spec"]["template"]["spec"]
             for d in ("agentbus-coordinator", "agentbus-agents")}
    port = free_port()
    procs = []
    try:
        # the coordinator's pod
        mounts = {m["mountPath"]: str(tmp_path / "coordinator" / m["name"]) for m in coordinator_c["volumeMounts"]}
        (secret_volume,) = [v for v in specs["agentbus-coordinator"]["volumes"] if "secret" in v]
        _mount_secret(secret_volume, files, Path(mounts["/etc/agentbus/curve"]))
        env = _environment(coordinator_c, data, mounts, {})
        env["BUS_ENDPOINT"] = env["BUS_ENDPOINT"].replace("0.0.0.0:5555", f"127.0.0.1:{port}")
        env["BUS_METRICS"] = "127.0.0.1:0"
        ping = [a.replace(":5555", f":{port}") for a in coordinator_c["readinessProbe"]["exec"]["command"]]
        coordinator_probe = {**coordinator_c, "readinessProbe": {"exec": {"command": ping}}}
        procs.append(subprocess.Popen(coordinator_c["command"], env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / "coordinator.log", "w")))
        wait_until(lambda: _probe(coordinator_probe, "readinessProbe", env, {}).returncode == 0, 60,
                   "the coordinator's probe (busctl ping over CURVE) to pass")

        # an agent pod
        mounts = {m["mountPath"]: str(tmp_path / "agents" / m["name"]) for m in agents_c["volumeMounts"]}
        (secret_volume,) = [v for v in specs["agentbus-agents"]["volumes"] if "secret" in v]
        _mount_secret(secret_volume, {k: files[k] for k in ("coordinator.key", "agents.key_secret")},
                      Path(mounts["/etc/agentbus/curve"]))
        pod = "agentbus-agents-7d9f8b6c5-x2x4q"
        env = _environment(agents_c, data, mounts, {"POD_NAME": pod})
        env["BUS_ENDPOINT"] = env["BUS_ENDPOINT"].replace("agentbus-coordinator:5555", f"127.0.0.1:{port}")
        args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in agents_c["args"]]
        procs.append(subprocess.Popen([*agents_c["command"], *args], env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / "agents.log", "w")))
        health = mounts["/run/agentbus"]
        wait_until(lambda: _probe(agents_c, "startupProbe", env, mounts).returncode == 0, 60, "the agents' startup probe")
        wait_until(lambda: _probe(agents_c, "readinessProbe", env, mounts).returncode == 0, 60,
                   "the agents' readiness probe (registered and stepping)")
        assert _probe(agents_c, "livenessProbe", env, mounts).returncode == 0
        assert sorted(os.listdir(health)) == [f"{pod}-host1.json", f"{pod}-host2.json"]
        with ControlClient(f"tcp://127.0.0.1:{port}", curve=ClientKeys.load(coordinator_pub, probe_secret)) as client:
            stats = client.request("stats", timeout=10)
        assert sorted(stats["agent_ids"]) == [f"{pod}-{i}" for i in range(1, 5)] and stats["hosts"] == 2, stats
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def test_the_image_recipe_installs_every_package_and_runs_as_the_manifests_user():
    """deploy/container/Containerfile is not built in CI (no image registry is reachable):
    what can drift from the rest is checked instead."""
    import tomllib

    recipe = (ROOT.parent / "container" / "Containerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \1$", recipe, re.M))
    with open(ROOT.parent.parent / "pyproject.toml", "rb") as f:
        package_dirs = set(tomllib.load(f)["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= copied, package_dirs - copied
    assert "--require-hashes -r requirements/all.txt" in recipe
    user = re.search(r"^USER (\d+):(\d+)$", recipe, re.M)
    for deployment in ("agentbus-coordinator", "agentbus-agents"):
        spec = by_kind(build(ROOT / "base"))[("Deployment", deployment)]["spec"]["template"]["spec"]
        assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == \
            (int(user.group(1)), int(user.group(2)))
