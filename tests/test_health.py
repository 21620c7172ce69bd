"""Health files and the probe that reads them (agents.health): the sans-IO rules with
a fake clock, then a real bus-agent whose probe follows the coordinator coming and going."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

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


@pytest.mark.unit
def test_a_link_planted_in_a_shared_health_directory_is_never_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)                                 # sticky and world-writable, as /tmp
    (shared / "a1.json").symlink_to(victim)              # planted at the file's own name
    for pid in range(os.getpid() - 5, os.getpid() + 5):  # and at every name the old code's temporary could take
        (shared / f"a1.{pid}.tmp").symlink_to(victim)
    h = HealthFile(shared, "a1")
    h.write(10.0, True, 3)
    assert victim.read_text() == "precious"
    assert not (shared / "a1.json").is_symlink() and json.loads((shared / "a1.json").read_text())["steps"] == 3


@pytest.mark.unit
def test_a_health_directory_anyone_may_write_to_is_refused_unless_sticky(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(ValueError, match="writable by every user and not sticky"):
        HealthFile(open_dir, "a1")
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.agents", "--endpoint", f"ipc://{tmp_path}/x.ipc",
                        "--kind", "null", "--health-dir", str(open_dir)], capture_output=True, text=True,
                       env=cli_env(), timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "not sticky" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.unit
def test_the_probe_opens_only_regular_files_and_never_blocks(tmp_path):
    HealthFile(tmp_path, "good").write(100.0, True, 1)
    os.mkfifo(tmp_path / "fifo.json")                     # opening it for reading would block for ever
    started = time.monotonic()
    r = _probe(tmp_path, "--max-age", "1e9")
    assert r.returncode == 1 and "fifo.json: unreadable (not a regular file)" in r.stderr
    assert time.monotonic() - started < 30
    os.unlink(tmp_path / "fifo.json")
    (tmp_path / "link.json").symlink_to(tmp_path / "good.json")
    assert "link.json: unreadable (a link, not a file)" in check(tmp_path, 1e9, False, 100.0)
    os.unlink(tmp_path / "link.json")
    (tmp_path / "huge.json").write_text("{" + " " * 10**6)
    assert "huge.json: unreadable" in check(tmp_path, 1e9, False, 100.0)


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
