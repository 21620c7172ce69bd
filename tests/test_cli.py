"""The operator's and developer's entry points: the Procfile under honcho, busbench,
and the commands' option handling."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import click
import psutil
import pytest

from agentbus_zmq.busbench.run import spin_plan
from agentbus_zmq.bus.client import ControlClient
from agentbus_zmq.bus.config import dotenv_defaults, read_dotenv
from tests.conftest import cli_env as _env, descendants as _descendants, reap as _reap, wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_procfile_runs_a_live_bus_under_honcho(tmp_path):
    if shutil.which("bus-coordinator", path=_env()["PATH"]) is None:
        pytest.fail("bus-coordinator is not installed: run the README's test command (pip install .[test])")
    shutil.copy(ROOT / "Procfile", tmp_path / "Procfile")
    endpoint = f"ipc://{tmp_path}/bus.ipc"
    (tmp_path / ".env").write_text(f"BUS_ENDPOINT={endpoint}\nBUS_AGENT_KIND=null\n")
    honcho = subprocess.Popen([sys.executable, "-m", "honcho", "start", "-c", "agent=2"], cwd=tmp_path, env=_env(),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    procs: list[psutil.Process] = []
    try:
        with ControlClient(endpoint) as client:
            client.wait_ready(20)
            stats = wait_until(lambda: (s := client.request("stats"))["ready"] == 2 and s, 30, "2 agents under honcho")
        assert stats["agent_ids"] == ["agent.1", "agent.2"]  # ids from $HONCHO_PROCESS_NAME
        procs = _descendants(honcho.pid)
        assert len(procs) >= 3
        honcho.send_signal(signal.SIGTERM)
        honcho.wait(60)
        gone, alive = psutil.wait_procs(procs, timeout=30)
        assert alive == [], f"still running after honcho stopped: {alive}"
        output = honcho.stdout.read().decode(errors="replace")
        assert "registered" in output
        # The Procfile execs its commands: the signal reaches them, not a shell, and every
        # clean stop shows as one (under `sh -c` honcho reported rc=-15 for each).
        for name in ("coordinator.1", "agent.1", "agent.2"):
            assert f"{name} stopped (rc=0)" in output, output[-2000:]
    finally:
        _reap(honcho, procs)


def test_honcho_exports_the_procfile_as_systemd_units(tmp_path):
    # deploy/README.md suggests it: it needs honcho's `export` extra (jinja2), in the lock.
    shutil.copy(ROOT / "Procfile", tmp_path / "Procfile")
    (tmp_path / ".env").write_text("BUS_ENDPOINT=ipc:///run/agentbus/bus.ipc\n")
    r = subprocess.run([sys.executable, "-m", "honcho", "export", "systemd", str(tmp_path / "out"), "-a", "agentbus",
                        "-c", "agent=2"], cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    units = {p.name: p.read_text() for p in (tmp_path / "out").iterdir()}
    assert {"agentbus-coordinator-1.service", "agentbus-agent-1.service", "agentbus-agent-2.service"} <= set(units)
    assert "exec bus-agent --endpoint" in units["agentbus-agent-2.service"]


UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))


def _unit(path: Path) -> dict[str, list[str]]:
    """A unit file's settings, each key with every value it is given."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_the_units_are_hardened_and_never_restart_what_cannot_heal(path):
    from agentbus_zmq.agents.runtime import EXIT_ID_TAKEN, EXIT_NOT_ALLOWED, EXIT_REPLACED

    unit = _unit(path)
    assert unit["Wants"] == ["network-online.target"] and unit["After"] == ["network-online.target"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "CapabilityBoundingSet": "", "RestrictNamespaces": "yes"}.items():
        assert unit.get(key) == [value], (key, unit.get(key))
    prevent = set(unit["RestartPreventExitStatus"][0].split())
    assert "2" in prevent                                         # a usage error
    if "bus-agent" in unit["ExecStart"][0]:
        assert {str(EXIT_REPLACED), str(EXIT_NOT_ALLOWED), str(EXIT_ID_TAKEN)} <= prevent
        assert "%i" in unit["ExecStart"][0].split("--id", 1)[1]  # two instances on one host: distinct ids
    # systemd gives up before a crash loop turns slow: its window holds its burst of restarts
    interval, burst, delay = (int(unit[k][0]) for k in ("StartLimitIntervalSec", "StartLimitBurst", "RestartSec"))
    assert burst * delay < interval


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_rates_the_units_exposure_at_most_3(path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None or subprocess.run([analyze, "security", "--help"], capture_output=True, text=True,
                                         timeout=60).stdout.find("--offline") < 0:
        pytest.skip("no systemd-analyze with --offline (systemd 250 or later) on this machine")
    # --threshold counts tenths: 30 is an exposure of 3.0; above it the command fails.
    r = subprocess.run([analyze, "security", "--offline=true", "--threshold=30", "--no-pager", str(path)],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    overall = [line for line in r.stdout.splitlines() if "Overall exposure level" in line]
    assert r.returncode == 0 and overall, r.stdout[-3000:] + r.stderr
    assert float(overall[0].split(":")[1].split()[0]) <= 3.0, overall


def _busbench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentbus_zmq.busbench", *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_busbench_json_reports_every_key(tmp_path):
    out_file = tmp_path / "result.json"
    r = _busbench("--agents", "2", "--agent-kind", "null", "--duration", "1", "--warmup", "10", "--format", "json",
                  "--output", str(out_file))
    assert r.returncode == 0, r.stderr
    result = json.loads(out_file.read_text())
    assert result["cores"] == len(os.sched_getaffinity(0)) and result["single_agent_rate"] > 0
    for key in ("python", "pyzmq", "libzmq", "msgpack", "pymdp", "numpy", "host"):
        assert result[key]
    (run,) = result["runs"]
    assert run["agents"] == 2 and run["registered"] == 2 and run["errors"] == []
    assert run["rate"] > 0 and run["lost_steps"] == 0 and run["balanced"]
    assert run["repeats"][0]["ledger"]["balanced"] and run["repeat"] == 1
    assert run["efficiency"] == pytest.approx(run["rate"] / (min(2, result["cores"]) * result["single_agent_rate"]))
    assert run["efficiency_peer"] == pytest.approx(run["rate"] / (2 * result["single_agent_rate"]))
    # the peer (Gymnasium's AsyncVectorEnv) beside every run: a contract for scripts
    assert run["peer"] == "gym" and run["peer_rate"] > 0
    assert run["efficiency_peer_rate"] == pytest.approx(run["rate"] / run["peer_rate"])
    assert run["efficiency_median_r1"] == pytest.approx(
        run["rate"] / (min(2, result["cores"]) * result["single_agent"]["rate"]))
    assert set(run["latency_ms"]) == {"p50", "p95", "p99"}
    assert run["latency_ms"]["p50"] <= run["latency_ms"]["p95"] <= run["latency_ms"]["p99"]
    assert run["memory_mb"]["processes"] == 2 and run["memory_mb"]["rss_per_agent"] > 0
    assert run["memory_mb"]["pss_per_agent"] > 0 and run["ready_s"] > 0
    agents_us, coordinator_us = spin_plan("auto", 2, result["cores"])  # the default, recorded per run
    assert run["spin_us"] == {"agents": agents_us, "coordinator": coordinator_us}
    assert result["notes"][0].startswith("verdict: none on efficiency: a null step")


def test_busbench_explorer_table(tmp_path):
    r = _busbench("--agents", "2", "--duration", "1", "--warmup", "10")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:9] == ["agents", "K", "steps/s", "E(N)", "E_peer", "R_pool", "E_pool", "R_peer", "R/R_peer"]
    agents, k, rate, _, _, pool, e_pool, peer, versus = lines[1].split()[:9]
    assert (agents, k) == ("2", "1") and float(rate) > 0 and float(pool) > 0 and float(peer) > 0
    assert float(e_pool.rstrip("%")) == pytest.approx(100 * float(rate) / float(pool), abs=1.5)
    assert float(versus) == pytest.approx(float(rate) / float(peer), abs=0.01)
    assert "kind explorer (numpy" in r.stdout
    # it explains itself: a verdict, and every column defined
    assert any(line.startswith("verdict: ") for line in lines)
    legend = lines[lines.index("columns (docs/busbench.md defines each, with its JSON key):") + 1:]
    defined = {name.strip() for line in legend for name in line[:19].split(",")}
    for column in ("agents", "K", "steps/s", "E(N)", "E_peer", "R_pool", "E_pool", "R_peer", "R/R_peer", "E_live",
                   "p50/p95/p99 ms", "coord us/step", "RSS MB", "PSS MB", "ready s", "lost"):
        assert column in defined, column


def test_busbench_refuses_more_agents_than_every_arena_holds():
    r = _busbench("--agents", "300000", "--per-host", "auto")
    assert r.returncode == 2 and "300000 agents do not fit the world grid" in r.stderr and "room for 230000" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_busbench_interrupted_stops_everything(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-m", "agentbus_zmq.busbench", "--agents", "3", "--agent-kind", "null",
                             "--duration", "60"], env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    procs: list[psutil.Process] = []
    try:
        # The coordinator, the launcher and its 3 agents.
        procs = wait_until(lambda: len(d := _descendants(proc.pid)) >= 5 and d, 60, "busbench's processes")
        proc.send_signal(sig)
        try:  # its output read meanwhile (a full pipe must not hold it up), and where it hangs if it does
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy = shutil.which("py-spy", path=os.path.dirname(sys.executable))
            dump = subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True,
                                  timeout=30).stdout if spy else "(no py-spy)"
            pytest.fail(f"busbench still running 60 s after signal {sig}; its stack:\n{dump}")
        assert proc.returncode == 130, err[-2000:]
        gone, alive = psutil.wait_procs(procs, timeout=10)
        assert alive == []
    finally:
        _reap(proc, procs)


def _bound_endpoint(tmp_path, env: dict, *args: str) -> str:
    """Start a coordinator in ``tmp_path`` and return the endpoint it actually bound."""
    path = tmp_path / f"endpoint-{len(list(tmp_path.iterdir()))}"
    proc = subprocess.Popen([sys.executable, "-m", "agentbus_zmq.coordinator", "--endpoint-file", str(path), *args], env=env,
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return wait_until(lambda: path.exists() and path.read_text().strip(), 20, "the coordinator to bind")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        _reap(proc, [])


def test_configuration_precedence_cli_then_environment_then_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(f"# comment\nBUS_ENDPOINT='ipc://{tmp_path}/dotenv.ipc'  # inline\nBUS_MODE=async\nBROKEN\n")
    assert read_dotenv(env_file) == {"BUS_ENDPOINT": f"ipc://{tmp_path}/dotenv.ipc", "BUS_MODE": "async"}
    assert dotenv_defaults({"bind": "BUS_ENDPOINT", "seed": "BUS_SEED"}, env_file) == {
        "bind": f"ipc://{tmp_path}/dotenv.ipc"}
    env = _env()
    env.pop("BUS_ENDPOINT", None)
    assert _bound_endpoint(tmp_path, env) == f"ipc://{tmp_path}/dotenv.ipc"
    env["BUS_ENDPOINT"] = f"ipc://{tmp_path}/environ.ipc"
    assert _bound_endpoint(tmp_path, env) == f"ipc://{tmp_path}/environ.ipc"
    assert _bound_endpoint(tmp_path, env, "--bind", f"ipc://{tmp_path}/cli.ipc") == f"ipc://{tmp_path}/cli.ipc"


@pytest.mark.unit
def test_our_commands_read_dotenv_as_honcho_does(tmp_path):
    """One .env, one meaning: honcho (for the Procfile) and our commands (python-dotenv)
    agree on every form deploy/env.example uses; honcho drops `export`, so we do not use it."""
    from honcho.environ import parse

    text = ("# agentbus\n\nBUS_ENDPOINT=tcp://127.0.0.1:5555   # the coordinator\n"
            "BUS_MODE=\"async\"\nBUS_LOG_LEVEL='DEBUG'\nBUS_CURVE_CLIENTS=\"/etc/agentbus/allowed keys\"\n"
            "BUS_SEED=7\n")
    (tmp_path / ".env").write_text(text)
    ours = read_dotenv(tmp_path / ".env")
    assert ours == parse(text)
    assert ours["BUS_ENDPOINT"] == "tcp://127.0.0.1:5555" and ours["BUS_CURVE_CLIENTS"] == "/etc/agentbus/allowed keys"


def test_bad_options_are_usage_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.coordinator", "--mode", "bogus"], capture_output=True, text=True,
                       env=_env(), cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "bogus" in r.stderr
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.agents", "--id", "has space"], capture_output=True, text=True,
                       env=_env(), cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "invalid agent id" in r.stderr


def test_unusable_endpoints_are_refused_with_what_to_use(tmp_path):
    for module, option in (("agentbus_zmq.agents", "--endpoint"), ("agentbus_zmq.coordinator", "--bind"),
                           ("agentbus_zmq.busbench", "--connect")):
        r = subprocess.run([sys.executable, "-m", module, option, "nonsense://x"], capture_output=True, text=True,
                           env=_env(), cwd=tmp_path, timeout=60)
        assert r.returncode == 2 and "tcp://HOST:PORT" in r.stderr, (module, r.stderr)
        assert "Traceback" not in r.stderr


def test_a_busy_address_is_a_clear_error(bus):
    endpoint = bus.coordinator("tcp://127.0.0.1:*")
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.coordinator", "--bind", endpoint], capture_output=True, text=True,
                       env=_env(), timeout=60)
    assert r.returncode == 1 and "Address already in use" in r.stderr and "choose another --bind" in r.stderr
    assert "Traceback" not in r.stderr


def test_every_command_says_its_version_and_the_protocols():
    from importlib.metadata import version

    from agentbus_zmq.bus.protocol import PROTOCOL_VERSION

    bindir = os.path.dirname(sys.executable)
    for command in ("bus-coordinator", "bus-agent", "busbench", "busctl", "bus-keys", "bus-conformance"):
        r = subprocess.run([os.path.join(bindir, command), "--version"], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL, env=_env())
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{command} (agentbus-zmq {version('agentbus-zmq')}, protocol {PROTOCOL_VERSION})"


@pytest.mark.parametrize("module", ["agentbus_zmq.coordinator.__main__", "agentbus_zmq.agents.__main__",
                                    "agentbus_zmq.bus.ctl", "agentbus_zmq.busbench.__main__"])
def test_every_option_says_what_it_does_and_which_variable_sets_it(module):
    import importlib

    from click.testing import CliRunner

    command = importlib.import_module(module).cli
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in ("help", "version"):
            assert param.help, f"{module} --{param.name} has no help"
    text = " ".join(CliRunner().invoke(command, ["--help"]).output.split())   # unwrapped
    assert "%%" not in text
    if module != "agentbus_zmq.busbench.__main__":   # busbench reads BUSBENCH_*, named in its text
        named = [p for p in command.params if isinstance(p, click.Option) and p.envvar]
        assert named and all(f"env var: {p.envvar}" in text for p in named)
    else:
        assert "env var: BUSBENCH_AGENTS" in text
