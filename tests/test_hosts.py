"""Agent hosts on a real bus: mixed with single agents and with a host written from
docs/protocol.md alone, killed mid-tick, with a failing member, and sending bad frames."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgpack
import numpy as np
import psutil
import pytest
import zmq

from agentbus_zmq.agents.host import Host
from agentbus_zmq.agents.layout import auto_per_host, host_layout
from agentbus_zmq.agents.sdk import Agent
from agentbus_zmq.bus import protocol as P
from tests.conftest import cli_env, wait_until

DEALER_LINGER = 0


class SpecHost:
    """A host written from docs/protocol.md alone, with nothing but pyzmq and msgpack
    (no agentbus code): the page's types, field orders and array encoding."""

    HOST_HELLO, HOST_WELCOME, HOST_OBSERVATION, HOST_ACTION, HOST_BYE = 10, 11, 12, 13, 14
    HEARTBEAT, ERROR = 5, 7

    def __init__(self, endpoint: str, host_id: str, prefix: str, first: int, count: int):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, DEALER_LINGER)
        self.sock.connect(endpoint)
        self.hello = [1, self.HOST_HELLO, host_id, "spec", os.getpid(), prefix, first, count]
        self.count = count
        self.frames = 0
        self.errors: list[list] = []

    @staticmethod
    def array(values: list[int], dtype: str = "|u1") -> msgpack.ExtType:
        """An array as the page says: extension type 1, payload [dtype, shape, bytes]."""
        size = int(dtype[2:])
        raw = b"".join(v.to_bytes(size, "little") for v in values)
        return msgpack.ExtType(1, msgpack.packb([dtype, [len(values)], raw], use_bin_type=True))

    @staticmethod
    def unarray(ext: msgpack.ExtType) -> tuple[str, list[int], bytes]:
        assert ext.code == 1
        dtype, shape, raw = msgpack.unpackb(ext.data, raw=False)
        return dtype, shape, raw

    def send(self, msg: list) -> None:
        self.sock.send(msgpack.packb(msg, use_bin_type=True))

    def recv(self, timeout_ms: int = 5000) -> list | None:
        if not self.sock.poll(timeout_ms):
            return None
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def register(self) -> list:
        """HOST_HELLO (repeated each heartbeat until answered), then HEARTBEAT: ready."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            self.send(self.hello)
            msg = self.recv(500)
            if msg and msg[1] == self.HOST_WELCOME:
                dtype, shape, _ = self.unarray(msg[5])
                assert dtype[1] == "u" and shape == [self.count]
                self.send([1, self.HEARTBEAT])
                return msg
        raise AssertionError("no HOST_WELCOME")

    def step(self, frames: int, actions=None) -> None:
        """Answer ``frames`` HOST_OBSERVATIONs with `stay` for every listed member."""
        done = 0
        deadline = time.monotonic() + 30
        while done < frames and time.monotonic() < deadline:
            msg = self.recv(1000)
            if msg is None:
                self.send([1, self.HEARTBEAT])
                continue
            if msg[1] == self.ERROR:
                self.errors.append(msg)
            if msg[1] != self.HOST_OBSERVATION:
                continue
            dtype, shape, raw = self.unarray(msg[3])
            n = shape[0]
            obs_dtype, obs_shape, _ = self.unarray(msg[4])
            assert obs_shape[0] == n and obs_dtype[1] == "u"
            acts = actions(n) if actions else [4] * n
            self.send([1, self.HOST_ACTION, msg[2], self.array(acts), 0])
            done += 1
            self.frames += 1
        assert done == frames, f"answered {done} of {frames} frames"

    def close(self) -> None:
        self.send([1, 6, "spec host leaving"])
        self.sock.close(0)
        self.ctx.term()


def test_hosts_agents_and_a_spec_only_host_share_one_bus_with_the_ledger_balanced(bus):
    bus.coordinator()
    bus.agents(4, "--kind", "null", "--per-host", "2", agent_id="hosted")
    bus.agents(2, "--kind", "null", agent_id="single")
    spec = SpecHost(bus.endpoint, "spec-host", "spec-", 1, 3)
    try:
        spec.register()
        request = bus.client.send("measure", {"agents": 9, "warmup_steps": 90, "steps": 900})
        spec.step(60)
        result = bus.client.wait(request, 60, lambda: spec.step(1), "measure")
        stats = bus.stats()
    finally:
        spec.close()
    assert stats["agents"] == 9 and stats["hosts"] == 3
    assert sorted(stats["agent_hosts"]) == ["hosted-1", "hosted-2", "hosted-3", "hosted-4", "spec-1", "spec-2", "spec-3"]
    assert set(stats["host_ids"]) == {"hosted-host1", "hosted-host2", "spec-host"}
    assert result["steps"] >= 900 and result["window"]["missing"] == 0 and result["ledger"]["balanced"]
    assert spec.errors == []


def test_a_host_killed_mid_tick_takes_its_agents_and_the_rest_go_on(bus):
    bus.coordinator()
    bus.agents(6, "--kind", "null", "--per-host", "3")
    stats = bus.wait_agents(6)
    victim = stats["agent_pids"]["t-1"]
    assert stats["agent_pids"]["t-2"] == stats["agent_pids"]["t-3"] == victim  # one host, three agents
    os.kill(victim, signal.SIGKILL)
    stats = bus.wait_agents(3, timeout=20)  # dropped together, when its connection is found gone
    assert sorted(stats["agent_ids"]) == ["t-4", "t-5", "t-6"] and "expired" not in stats["ledger"]["errors"]
    assert stats["ledger"]["balanced"] and stats["hosts"] == 1
    tick = stats["tick"]
    wait_until(lambda: bus.stats()["tick"] > tick + 50, 10, "the other host to go on stepping")


def test_a_killed_host_is_restarted_and_its_agents_rejoin_under_their_ids(bus):
    bus.coordinator()
    launcher = bus.agents(6, "--kind", "null", "--per-host", "3", "--restart", "--restart-backoff", "0.1")
    stats = bus.wait_agents(6)
    victim = stats["agent_pids"]["t-4"]
    os.kill(victim, signal.SIGKILL)
    stats = wait_until(lambda: (s := bus.stats())["ready"] == 6 and s["agent_pids"]["t-4"] != victim and s, 30,
                       "the restarted host to rejoin")
    assert stats["restarts"] == {"t-4": 1, "t-5": 1, "t-6": 1} and stats["ledger"]["balanced"]
    assert "t-host2 (pid %d) exited with status -9: restart 1 in" % victim in launcher.log_path.read_text()
    assert launcher.proc.poll() is None


FLAKY_HOST = """
import sys
from agentbus_zmq.agents.host import Host
from agentbus_zmq.agents.runtime import Runtime
from agentbus_zmq.agents.sdk import Agent
from agentbus_zmq.bus.config import configure_logging

class Flaky(Agent):
    kind = "flaky"
    made = 0
    def __init__(self):
        Flaky.made += 1
        self.index, self.steps = Flaky.made - 1, 0
    def step(self, obs):
        self.steps += 1
        if self.index == 1 and self.steps == 20:
            raise ValueError("member 1 trips on its 20th step")
        return 4

configure_logging()
sys.exit(Runtime(Host(Flaky, "flaky-", 1, 3), sys.argv[1], "flaky-host").run())
"""


def test_a_member_whose_step_raises_is_dropped_and_its_host_mates_keep_stepping(bus, tmp_path):
    bus.coordinator()
    log = open(tmp_path / "flaky.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", FLAKY_HOST, bus.endpoint], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, env=cli_env(), start_new_session=True)
    try:
        stats = wait_until(lambda: (s := bus.stats())["agents"] == 2 and s["tick"] > 100 and s, 30,
                           "the failing member to leave while the others step on")
        assert sorted(stats["agent_ids"]) == ["flaky-1", "flaky-3"] and stats["ledger"]["balanced"]
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        log.close()
    text = (tmp_path / "flaky.log").read_text()
    assert "agent flaky-2: step raised ValueError: member 1 trips on its 20th step; it leaves, its host-mates go on" in text
    assert "host flaky-host: 1 agent left (flaky-2): step raised ValueError" in bus.coordinator_child.log_path.read_text()


def test_a_mis_sized_or_malformed_host_frame_gets_a_clear_error_and_nothing_else_breaks(bus):
    bus.coordinator()
    bus.agents(2, "--kind", "null")
    bus.wait_agents(2)
    spec = SpecHost(bus.endpoint, "bad-host", "bad-", 1, 3)
    try:
        spec.register()
        spec.step(1, actions=lambda n: [4] * (n + 2))             # two actions too many
        wait_until(lambda: spec.errors or spec.step(1) or spec.errors, 10, "an ERROR for the bad frame")
        code, reason = spec.errors[0][2], spec.errors[0][3]
        assert code == 4 and "has 5 actions; the observation listed 3 members" in reason
        spec.send([1, 13, 0, [4, 4, 4], 0])                     # a list where an array belongs
        spec.step(20)                                           # the host is still served
        assert any("actions must be" in e[3] for e in spec.errors[1:])
        tick = bus.stats()["tick"]
        wait_until(lambda: bus.stats()["tick"] > tick + 20 or spec.step(1), 10, "the bus to keep ticking")
    finally:
        spec.close()
    stats = bus.stats()
    assert stats["ledger"]["balanced"] and stats["ledger"]["errors"]["BAD_FIELD"] >= 2 and stats["agents"] == 2


def test_peer_text_reaches_the_log_as_one_escaped_line_and_a_host_bye_as_one_line(bus):
    """A reason with a newline and escape codes cannot forge a log line or reach a
    terminal raw; a HOST_BYE naming 300 members is one line, not 300."""
    bus.coordinator()
    spec = SpecHost(bus.endpoint, "bye-host", "bye-", 1, 300)
    forged = "bye\n2026-12-06 00:00:00,000 CRITICAL agentbus forged line\x1b[2J\u2028more"
    try:
        spec.register()
        spec.send([1, spec.HOST_BYE, list(range(300)), forged])
        stats = wait_until(lambda: (s := bus.stats())["agents"] == 0 and s, 10, "the members to leave")
        raw = SpecHost(bus.endpoint, "raw-host", "raw-", 1, 1)
        raw.register()
        raw.send([1, 7, 1, forged])                        # an ERROR with the same text
        raw.send([1, 6, forged])                           # a BYE with it
        wait_until(lambda: bus.stats()["agents"] == 0, 10, "the BYE")
    finally:
        spec.close()
    assert stats["ledger"]["balanced"]
    log = bus.coordinator_child.log_path.read_bytes().decode()
    assert b"\x1b" not in bus.coordinator_child.log_path.read_bytes() and "\u2028" not in log
    lines = log.splitlines()
    assert not any(line.startswith("2026-12-06 00:00:00,000 CRITICAL") for line in lines)
    left = [line for line in lines if "bye-host" in line and "agents left (" in line]
    assert len(left) == 1 and "300 agents left (bye-1 .. bye-300): bye\\x0a2026-12-06" in left[0], left
    assert "\\x1b[2J\\u2028more" in left[0] and not any("agent bye-2 " in line for line in lines)
    assert sum("reported error" in line and "\\x0a" in line for line in lines) == 1


@pytest.mark.parametrize("layout", [[], ["--per-host", "2"]])
def test_forked_agents_and_hosts_say_bye_when_their_launcher_is_stopped(bus, layout):
    """systemctl stop of a --replicas launcher: every forked agent (or host) says BYE
    before it exits, so the coordinator counts departures, not dead connections."""
    bus.coordinator()
    launcher = bus.agents(4, "--kind", "null", *layout)
    bus.wait_agents(4)
    launcher.proc.send_signal(signal.SIGTERM)
    assert launcher.proc.wait(20) == 0
    stats = wait_until(lambda: (s := bus.stats())["agents"] == 0 and s, 10, "every agent to leave")
    errors = stats["ledger"]["errors"]
    assert errors.get("connection_closed", 0) == 0 and errors.get("expired", 0) == 0, errors
    log = bus.coordinator_child.log_path.read_text()
    assert log.count(" left: agent stopping") == (4 if not layout else 2), log[-2000:]
    assert "connection is gone; dropped" not in log


def test_hosts_use_no_more_processes_than_asked(bus):
    bus.coordinator()
    launcher = bus.agents(10, "--kind", "null", "--per-host", "auto")
    bus.wait_agents(10)
    hosts = psutil.Process(launcher.pid).children()
    assert len(hosts) == min(10, len(os.sched_getaffinity(0)))
    assert bus.stats()["hosts"] == len(hosts)


@pytest.mark.parametrize("mode", ["async", "lockstep"])
def test_a_host_process_of_two_lanes_is_two_hosts_to_the_coordinator_and_one_process(bus, mode):
    """--lanes 2: each host process registers its agents as two hosts (one socket, one
    session each, one loop); both step, a kill takes both, a restart brings both back."""
    bus.coordinator(None, "--mode", mode)
    launcher = bus.agents(7, "--kind", "null", "--per-host", "4", "--lanes", "2", "--restart", "--restart-backoff",
                          "0.1")
    stats = bus.wait_agents(7)
    assert sorted(stats["host_ids"]) == ["t-host1-1", "t-host1-2", "t-host2-1", "t-host2-2"]
    processes = psutil.Process(launcher.pid).children()
    assert len(processes) == 2 and {stats["agent_pids"][f"t-{i}"] for i in range(1, 8)} == {p.pid for p in processes}
    request = bus.client.send("measure", {"agents": 7, "warmup_steps": 70, "steps": 1400})
    result = bus.client.wait(request, 60, None, "measure")
    assert result["steps"] >= 1400 and result["window"]["missing"] == 0 and result["ledger"]["balanced"]
    victim = stats["agent_pids"]["t-1"]
    os.kill(victim, signal.SIGKILL)
    stats = wait_until(lambda: (s := bus.stats())["ready"] == 7 and s["agent_pids"]["t-1"] != victim and s, 30,
                       "the restarted process's two lanes to rejoin")
    assert stats["restarts"] == {"t-1": 1, "t-2": 1, "t-3": 1, "t-4": 1} and stats["hosts"] == 4
    assert stats["ledger"]["balanced"]


# --- without a bus -------------------------------------------------------------------

@pytest.mark.unit
def test_host_layouts_are_even_and_cover_every_agent_once():
    assert host_layout(10, 3) == [(1, 3), (4, 3), (7, 2), (9, 2)]
    assert host_layout(20, 10) == [(1, 10), (11, 10)]
    for n, k in ((1, 1), (7, 2), (1000, 500), (10_001, 4096)):
        layout = host_layout(n, k)
        assert [f for f, _ in layout] == [1 + sum(c for _, c in layout[:i]) for i in range(len(layout))]
        assert sum(c for _, c in layout) == n and max(c for _, c in layout) <= k
    assert auto_per_host(20, 2) == 10 and auto_per_host(2, 16) == 1 and auto_per_host(10_000, 2) == 3334


class _Raising(Agent):
    kind = "raising"

    def __init__(self):
        self.calls = 0

    def step(self, obs):
        self.calls += 1
        if obs[0] == 99:
            raise RuntimeError("bad cell")
        return obs[0] % 5


@pytest.mark.unit
def test_a_host_steps_its_members_in_frame_order_and_isolates_a_failure():
    host = Host(_Raising, "r-", 1, 4)
    obs = np.array([[1, 0], [99, 0], [3, 0]], dtype=np.uint16)
    result = host.step(P.HostObservation(0, np.array([0, 1, 3], np.uint16), obs))
    assert result.failed == [1] and "RuntimeError: bad cell" in result.reason
    assert result.actions.tolist() == [1, 3] and host.alive.tolist() == [True, False, True, True]
    assert [a.calls for a in host.agents] == [1, 1, 0, 1]


@pytest.mark.unit
def test_a_host_refuses_sizes_the_protocol_cannot_carry():
    with pytest.raises(ValueError):
        Host(_Raising, "r-", 1, P.MAX_HOST_AGENTS + 1)
