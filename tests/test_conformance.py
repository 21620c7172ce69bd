"""bus-conformance (issue #13): our own agents and the page's minimal agent pass it, and an
agent that breaks one rule fails exactly that check."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentbus_zmq.busbench.conformance import CHECKS
from tests.conftest import cli_env
from tests.test_spec import _minimal_agent


def _conformance(*command: str, world: tuple[str, ...] = ()) -> dict:
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.busbench.conformance", "--format", "json", *world, "--",
                        *command],
                       capture_output=True, text=True, env=cli_env(), timeout=180, stdin=subprocess.DEVNULL)
    report = json.loads(r.stdout)
    assert r.returncode == (0 if report["passed"] else 1)
    assert [c["name"] for c in report["checks"]] == list(CHECKS)
    return report


def _failed(report: dict) -> list[str]:
    return [c["name"] for c in report["checks"] if not c["passed"]]


@pytest.mark.parametrize("kind", ["null", "explorer"])
def test_our_agent_kinds_pass(kind):
    report = _conformance(sys.executable, "-m", "agentbus_zmq.agents", "--kind", kind, "--log-level", "ERROR")
    assert _failed(report) == [], report


def test_an_agent_passes_in_a_world_of_arrays_too():
    report = _conformance(sys.executable, "-m", "agentbus_zmq.agents", "--kind", "random", "--log-level", "ERROR",
                          world=("--world", "pettingzoo:mpe2.simple_spread_v3", "--world-arg", "N=2"))
    assert _failed(report) == [], report


def test_an_agent_that_answers_twice_fails_exactly_that_check(tmp_path):
    code = _minimal_agent()
    twice = "send(ACTION, msg[2], 4, 0); send(ACTION, msg[2], 4, 0)"
    assert "send(ACTION, msg[2], 4, 0)" in code
    script = tmp_path / "twice.py"
    script.write_text(code.replace("send(ACTION, msg[2], 4, 0)", twice, 1))
    report = _conformance(sys.executable, str(script))
    assert _failed(report) == ["one_action_per_observation"]
    (check,) = [c for c in report["checks"] if c["name"] == "one_action_per_observation"]
    assert "twice" in check["detail"]


def test_the_pages_minimal_agent_passes_one_line_per_check(tmp_path):
    script = tmp_path / "minimal.py"
    script.write_text(_minimal_agent())
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.busbench.conformance", "--", sys.executable, str(script)],
                       capture_output=True, text=True, env=cli_env(), timeout=180, stdin=subprocess.DEVNULL)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == len(CHECKS) + 1 and all(line.startswith("PASS") for line in lines[:-1])
    assert lines[-1] == f"{len(CHECKS)}/{len(CHECKS)} checks passed"


def test_an_agent_that_exits_fails_every_check_and_says_so():
    report = _conformance(sys.executable, "-c", "raise SystemExit(5)")
    assert _failed(report) == list(CHECKS)
    assert any("exited (status 5)" in c["detail"] for c in report["checks"])
