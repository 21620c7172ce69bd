"""Agents of an integrator's own kind (issue #13): by module path and by entry point,
launched with bus-agent and measured with busbench; what cannot be used is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentbus_zmq.agents.kinds import KindUnavailable, available_kinds, kind_class
from tests.conftest import cli_env
from tests.kinds_demo import Walker


def _dist_with_entry_point(root, name: str = "demo", target: str = "tests.kinds_demo:Walker"):
    """An installed distribution, as pip leaves it, declaring one agentbus kind."""
    info = root / "agentbus_demo_kinds-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: agentbus-demo-kinds\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[agentbus.kinds]\n{name} = {target}\n")
    return root


@pytest.mark.unit
def test_a_kind_by_module_path_or_entry_point(tmp_path, monkeypatch):
    assert kind_class("tests.kinds_demo:Walker") is Walker
    monkeypatch.syspath_prepend(str(_dist_with_entry_point(tmp_path)))
    assert available_kinds()["demo"] == "tests.kinds_demo:Walker" and kind_class("demo") is Walker
    assert available_kinds()["null"].endswith(":NullAgent")          # built-ins cannot be taken over


@pytest.mark.unit
@pytest.mark.parametrize("kind, message", [
    ("no_such_module:Agent", "cannot import no_such_module: ModuleNotFoundError"),
    ("tests.kinds_demo:Missing", "tests.kinds_demo has no Missing"),
    ("tests.kinds_demo:NotAnAgent", "is not an agent (subclass agentbus_zmq.agents.sdk.Agent"),
    ("json:JSONDecoder", "is not an agent"),
    ("no-such-kind", "unknown agent kind 'no-such-kind': use one of explorer, learner, null, random"),
    ("bad target:X", "is not package.module:ClassName"),
])
def test_a_kind_that_cannot_be_used_says_why(kind, message):
    with pytest.raises(KindUnavailable, match=message.replace("(", r"\(").replace("?", r"\?")):
        kind_class(kind)


def test_the_commands_take_a_custom_kind_and_say_in_one_line_when_they_cannot(tmp_path):
    env = {**cli_env(), "PYTHONPATH": str(_dist_with_entry_point(tmp_path))}
    for module, option in (("agentbus_zmq.agents", "--kind"), ("agentbus_zmq.busbench", "--agent-kind")):
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env,
                           timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0 and "demo" in r.stdout and "package.module:ClassName" in r.stdout, r.stdout
        r = subprocess.run([sys.executable, "-m", module, option, "tests.kinds_demo:NotAnAgent"],
                           capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 2 and "is not an agent" in r.stderr and "Traceback" not in r.stderr


def test_bus_agent_runs_a_custom_kind(bus):
    bus.coordinator()
    bus.agents(2, "--kind", "tests.kinds_demo:Walker", "--per-host", "1", agent_id="walker")
    bus.wait_agents(2)
    rows = bus.client.request("agents", {"page": 0})["agents"]
    assert {r["kind"] for r in rows} == {"walker"} and all(r["steps"] > 0 for r in rows)


def test_busbench_measures_a_custom_kind_with_its_r1(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.busbench", "--agents", "2", "--agent-kind",
                        "tests.kinds_demo:Walker", "--duration", "1", "--format", "json", "--output", str(out)],
                       capture_output=True, text=True, env=cli_env(), timeout=180, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["config"]["kind"] == "tests.kinds_demo:Walker" and result["single_agent_rate"] > 0
    (run,) = result["runs"]
    assert run["rate"] > 0 and run["balanced"] and run["lost_steps"] == 0
