"""Health files and the probe that reads them (agents.health): the sans-IO rules with
a fake clock, then a real bus-agent whose probe follows the coordinator coming and going."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agentbus_zmq.agents.health import HealthFile, check
from tests.conftest import cli_env, wait_until


@pytest.mark.unit
def test_a_health_file_says_alive_then_stepping_then_stalled(tmp_path):
    assert "no health files" in check(tmp_path, 10, False, 0.0)
    h = HealthFile(tmp_path, "pod-7/host1")            # an id is made a safe file name

    def turn(now, registered, steps):                   # what the runtime's loop does each turn
        if h.due(now):
            h.write(now, registered, steps)

    turn(100.0, registered=False, steps=0)
    assert (tmp_path / "pod-7_host1.json").exists()
    assert check(tmp_path, 10, False, 105.0) is None                      # alive
    assert "not registered" in check(tmp_path, 10, True, 105.0)           # not ready
    turn(100.5, registered=True, steps=2)                                 # within a second: not written
    assert "not registered" in check(tmp_path, 10, True, 105.0)
    turn(101.0, registered=True, steps=3)
    assert check(tmp_path, 10, True, 105.0) is None                       # ready: registered, stepped at 101
    turn(109.0, registered=True, steps=3)                                 # registered, no step since 101
    assert check(tmp_path, 10, True, 110.0) is None
    assert "no step for more than 10 s" in check(tmp_path, 10, True, 112.0)
    assert check(tmp_path, 10, False, 112.0) is None                      # still alive
    assert "has not turned for 13 s" in check(tmp_path, 10, False, 122.0)  # the loop stopped
    (tmp_path / "other.json").write_text("{not json")
    assert "other.json: unreadable" in check(tmp_path, 100, False, 110.0)


def _probe(directory, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentbus_zmq.agents.health", str(directory), *args],
                          capture_output=True, text=True, env=cli_env(), timeout=60)


def test_the_probe_follows_a_real_agent_host_and_its_coordinator(bus, tmp_path):
    """Live and not ready while the coordinator is missing; ready once it steps; live
    and not ready again when the coordinator goes (the agent waits for it: restarting
    it would not help)."""
    health = tmp_path / "health"
    bus.endpoint = f"ipc://{tmp_path}/bus.ipc"
    bus.agents(4, "--kind", "null", "--per-host", "2", "--health-dir", str(health))
    wait_until(lambda: len(list(health.glob("*.json"))) == 2, 60, "two hosts' health files")
    assert _probe(health, "--max-age", "30").returncode == 0
    r = _probe(health, "--stepping", "--max-age", "30")
    assert r.returncode == 1 and "not registered with the coordinator" in r.stderr
    bus.coordinator(bus.endpoint)
    bus.wait_agents(4)
    wait_until(lambda: _probe(health, "--stepping", "--max-age", "30").returncode == 0, 60, "the probe to say stepping")
    bus.coordinator_child.stop()
    wait_until(lambda: "not registered" in _probe(health, "--stepping", "--max-age", "30").stderr, 60,
               "the probe to say not registered")
    assert _probe(health, "--max-age", "30").returncode == 0
