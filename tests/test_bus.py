"""End to end: a real coordinator process, real agent processes, real sockets."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import zmq

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus import sockets
from agentbus_zmq.bus.protocol import ErrorCode
from tests.conftest import wait_until


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_agents_register_and_every_step_is_accounted(bus, transport):
    bind = "tcp://127.0.0.1:*" if transport == "tcp" else None
    endpoint = bus.coordinator(bind)
    assert endpoint.startswith(transport)
    bus.agents(3, "--kind", "null")
    r = bus.client.request("measure", {"agents": 3, "warmup_steps": 30, "steps": 600}, timeout=60)
    assert r["agents"] == 3 and r["steps"] == 600
    w = r["window"]
    assert w["received"] == 600 and w["missing"] == 0 and w["late"] == 0 and w["undeliverable"] == 0
    assert r["ledger"]["balanced"]
    assert r["ticks"] >= 200  # lock-step: every tick has all three agents
    assert sorted(bus.stats()["agent_ids"]) == ["t-1", "t-2", "t-3"]


def test_explorer_agents_step_through_the_bus(bus):
    bus.coordinator()
    bus.agents(2, "--kind", "explorer")
    r = bus.client.request("measure", {"agents": 2, "warmup_steps": 20, "steps": 200}, timeout=90)
    assert r["steps"] == 200 and r["window"]["missing"] == 0
    assert r["compute_s"] > 0  # agents report their own compute time
    stats = bus.stats()
    assert stats["ledger"]["balanced"] and stats["ledger"]["received"] >= 200 + 20


def _agent_pids(launcher) -> list[int]:
    return [p.pid for p in psutil.Process(launcher.pid).children()]


def test_a_sigkilled_agent_is_dropped_when_its_connection_closes_and_the_others_go_on(bus):
    bus.coordinator()
    launcher = bus.agents(3, "--kind", "null")
    bus.wait_agents(3)
    victim = wait_until(lambda: len(_agent_pids(launcher)) == 3 and _agent_pids(launcher)[0], 10, "3 agent pids")
    os.kill(victim, signal.SIGKILL)
    bus.wait_agents(2, timeout=10)
    # Not by liveness (that is for a peer whose connection stays open: test_faults' hung
    # agent): the kernel closed its connection, and the probe that followed found it gone.
    stats = bus.stats()
    assert "expired" not in stats["ledger"]["errors"] and stats["connections"]["disconnected"] >= 1
    assert "its connection is gone; dropped" in bus.coordinator_child.log_path.read_text()
    tick = bus.stats()["tick"]
    wait_until(lambda: bus.stats()["tick"] > tick + 50, 10, "ticks to go on without the dead agent")
    assert bus.stats()["ledger"]["balanced"]


def test_sigterm_makes_an_agent_say_bye_at_once(bus):
    bus.coordinator()
    agent = bus.agents(1, "--kind", "null")
    bus.wait_agents(1)
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(5) == 0
    # Gone by its BYE, not by liveness expiry (which the ledger would count): the wait is
    # generous for a loaded machine, the ledger says which it was.
    stats = bus.wait_agents(0, timeout=10, ready=False)
    assert "expired" not in stats["ledger"]["errors"]


def test_garbage_gets_errors_and_the_bus_keeps_serving(bus):
    endpoint = bus.coordinator()
    bus.agents(2, "--kind", "null")
    bus.wait_agents(2)
    evil = sockets.dealer(endpoint)
    try:
        cases = {
            ErrorCode.MALFORMED: [b"\xc1garbage"],
            ErrorCode.BAD_FRAMING: [b"one", b"two", b"three"],
            ErrorCode.UNKNOWN_TYPE: [P.pack([P.PROTOCOL_VERSION, 42])],
            ErrorCode.UNSUPPORTED_VERSION: [P.pack([9, 1, "x", "y", 0])],
            ErrorCode.BAD_FIELD: [P.pack([P.PROTOCOL_VERSION, 1, "bad id!", "k", 0])],
            ErrorCode.NOT_REGISTERED: [P.encode(P.Action(0, 1, 0))],
        }
        for code, frames in cases.items():
            evil.send_multipart(frames)
            assert evil.poll(5000), f"no answer to a {code.name} message"
            reply = P.decode(evil.recv())
            assert type(reply) is P.Error and reply.code == code and reply.reason
        # Bigger than MAXMSGSIZE: libzmq drops that connection; nothing reaches Python.
        evil.send(b"\x00" * (P.MAX_MESSAGE_BYTES + 4096))
    finally:
        evil.close(linger=0)
    tick = bus.stats()["tick"]
    wait_until(lambda: bus.stats()["tick"] > tick + 50, 10, "the agents to keep stepping")
    stats = bus.stats()
    assert stats["agents"] == 2 and stats["ledger"]["balanced"]
    assert sum(stats["ledger"]["errors"].values()) >= len(cases)


def test_agent_started_before_the_coordinator_waits_for_it(bus, tmp_path):
    bind = f"ipc://{tmp_path}/late.ipc"
    bus.agents(1, "--kind", "null", endpoint=bind)
    time.sleep(0.3)  # the agent is up and knocking; the coordinator is not (a real delay, not a sync)
    bus.coordinator(bind)
    bus.wait_agents(1, timeout=10)


def test_agents_rejoin_a_restarted_coordinator(bus):
    endpoint = bus.coordinator()
    bus.agents(2, "--kind", "null")
    bus.wait_agents(2)
    first = bus.stats()["session"]
    old = bus.coordinator_child
    old.proc.send_signal(signal.SIGKILL)
    old.proc.wait(5)
    bus.coordinator(endpoint)  # same ipc path, a new session
    stats = bus.wait_agents(2, timeout=15)
    assert stats["session"] != first and stats["ledger"]["balanced"]


def test_coordinator_stops_cleanly_on_sigterm_and_agents_stay_up(bus):
    bus.coordinator()
    agents = bus.agents(2, "--kind", "null")
    bus.wait_agents(2)
    coord = bus.coordinator_child
    coord.proc.send_signal(signal.SIGTERM)
    assert coord.proc.wait(5) == 0
    # Agents outlive the coordinator: told BYE, they back off and wait for the next one.
    wait_until(lambda: all(f"t-{i}: coordinator left" in agents.log_path.read_text() for i in (1, 2)), 10,
               "both agents to hear the coordinator's BYE")
    assert agents.proc.poll() is None


def test_one_context_per_process_even_after_fork():
    ctx = sockets.context()
    pid = os.fork()
    if pid == 0:
        os._exit(0 if sockets.context() is not ctx else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sockets.context() is ctx and isinstance(ctx, zmq.Context)


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _idle(proc: psutil.Process, window: float = 0.5) -> bool:
    """Whether ``proc`` used under a fifth of a core over ``window`` s: a spinner takes
    the whole core it is given (half of one with two such processes per core), a
    process that sleeps between messages almost none.  Callers wait for it (bounded),
    so a moment of load beside it only delays the answer."""
    before = _cpu_s(proc)
    time.sleep(window)  # the interval a CPU rate is measured over
    return _cpu_s(proc) - before < window / 5

def test_spinning_is_bounded_and_loses_nothing(bus):
    """--spin-us keeps processes busy-polling after each message, but only for that long:
    a spinning agent whose coordinator goes quiet, and a spinning coordinator with no
    agents, go back to sleep."""
    bus.coordinator(None, "--spin-us", "2000")
    launcher = bus.agents(2, "--kind", "null", "--spin-us", "2000")
    r = bus.client.request("measure", {"agents": 2, "warmup_steps": 20, "steps": 400}, timeout=60)
    assert r["steps"] == 400 and r["window"]["missing"] == 0 and r["ledger"]["balanced"]

    agents = [psutil.Process(pid) for pid in _agent_pids(launcher)]
    assert len(agents) == 2
    coordinator = psutil.Process(bus.coordinator_child.pid)
    coordinator.suspend()  # SIGSTOP: no more observations
    try:
        for agent in agents:  # each goes back to sleep: its CPU time stops growing
            wait_until(lambda a=agent: _idle(a), 10, f"agent {agent.pid} to stop spinning")
    finally:
        coordinator.resume()

    tick = bus.stats()["tick"]
    wait_until(lambda: bus.stats()["tick"] > tick + 20, 10, "the agents to step again")
    launcher.proc.send_signal(signal.SIGTERM)
    assert launcher.proc.wait(5) == 0
    bus.wait_agents(0, timeout=5, ready=False)
    wait_until(lambda: _idle(coordinator), 10, "the idle coordinator to stop spinning")
