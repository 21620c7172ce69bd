"""The world's door and its faults, through real processes (issue #26): a peer that
sends actions the world cannot take, in lock-step at the deadline and per arena; ``inf``
into a PettingZoo world; a world with an ordinary bug.  In each, the coordinator stays
up and the honest agents keep stepping.  Rates on this 2-core machine are noisy: the
tests assert that the honest agents go on stepping, not a ratio (busbench measures it)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus import sockets
from tests.conftest import wait_until


class Peer:
    """A raw DEALER that registers and answers as the test says."""

    def __init__(self, endpoint: str, agent_id: str):
        self.sock = sockets.dealer(endpoint)
        self.sock.send(P.encode(P.Hello(agent_id, "raw", 0)))
        self.errors: list[P.Error] = []
        self.welcome = self.next(P.Welcome)
        self.sock.send(P.encode(P.Heartbeat()))

    def next(self, mtype, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                msg = P.decode(self.sock.recv())
                if type(msg) is P.Error:
                    self.errors.append(msg)
                if type(msg) is mtype:
                    return msg
        pytest.fail(f"no {mtype.__name__} within {timeout} s")

    def answer(self, action, seconds: float) -> int:
        """Answer every observation with ``action`` for ``seconds``; how many were sent."""
        sent, end = 0, time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.sock.poll(min(left, 0.05) * 1000):
                msg = P.decode(self.sock.recv())
                if type(msg) is P.Observation:
                    self.sock.send(P.encode(P.Action(msg.tick, action, 0)))
                    sent += 1
                elif type(msg) is P.Error:
                    self.errors.append(msg)
        return sent

    def close(self) -> None:
        self.sock.send(P.encode(P.Bye("done")))
        self.sock.close(linger=100)


def _steps(bus, ids) -> int:
    return sum(r["steps"] for r in bus.client.request("agents", {"page": 0}, timeout=5)["agents"] if r["id"] in ids)


@pytest.mark.parametrize("scope", ["world", "arena"])
def test_array_actions_and_a_mute_peer_neither_stop_the_ticks_nor_the_coordinator(bus, scope):
    bus.coordinator(None, "--mode", "lockstep", "--lockstep-scope", scope, "--deadline", "0.4", "--drop-after", "0")
    bus.agents(2, "--kind", "null")
    bus.wait_agents(2)
    honest = {"t-1", "t-2"}
    evil, mute = Peer(bus.endpoint, "evil"), Peer(bus.endpoint, "mute")
    try:
        tick = bus.stats()["tick"]
        before = _steps(bus, honest)
        sent = evil.answer(np.array([1, 2]), 3.0)      # the mute one holds every tick to its deadline (0.4 s)
        assert bus.coordinator_child.proc.poll() is None, "the coordinator died"
        stats = bus.stats()
        assert stats["tick"] >= tick + 4 and _steps(bus, honest) >= before + 8
        assert sent >= 4 and len(evil.errors) >= sent - 1
        assert all(e.code == P.ErrorCode.BAD_FIELD and "one integer in [0, 5)" in e.reason for e in evil.errors)
        mute.close()                                  # without it, ticks run at the agents' pace again
        before = _steps(bus, honest)
        evil.answer(np.array([1, 2]), 1.5)
        assert _steps(bus, honest) >= before + 100
        rows = {r["id"]: r for r in bus.client.request("agents", {"page": 0}, timeout=5)["agents"]}
        assert rows["evil"]["bad_actions"] >= sent and rows["t-1"]["bad_actions"] == 0
        assert bus.stats()["ledger"]["errors"]["bad_actions"] >= sent
    finally:
        evil.close()


def test_inf_into_a_pettingzoo_world_is_refused_and_the_others_go_on(bus):
    bus.coordinator(None, "--world", "pettingzoo:mpe2.simple_spread_v3", "--world-arg", "N=3", "--mode", "lockstep")
    bus.agents(2, "--kind", "random")
    bus.wait_agents(2)
    evil = Peer(bus.endpoint, "evil")
    try:
        before = _steps(bus, {"t-1", "t-2"})
        sent = evil.answer(np.array(np.inf), 2.0)
        assert bus.coordinator_child.proc.poll() is None
        assert sent >= 20 and _steps(bus, {"t-1", "t-2"}) >= before + 20
        assert evil.errors and all(e.code == P.ErrorCode.BAD_FIELD for e in evil.errors)
        assert bus.stats()["world"]["faults"] == 0
    finally:
        evil.close()


def test_a_world_that_raises_leaves_the_other_arenas_stepping_and_names_itself(bus):
    bus.coordinator(None, "--world", "tests.faulty_world:grid", "--world-arg", "after=50", "--world-arg", "agents=4",
                    "--world-arg", "arena_agents=2", "--mode", "lockstep", "--deadline", "0.5")
    bus.agents(4, "--kind", "null")            # two arenas of two; arena 0 fails 50 ticks after all four are in
    world = wait_until(lambda: (w := bus.stats()["world"])["closed_arenas"] == 1 and w, 60, "arena 0 to be closed")
    assert world["faults"] >= 3
    stats = bus.stats()
    assert stats["agents"] == 2                 # arena 0's agents were dropped (and are refused until it reopens)
    steps = _steps(bus, set(stats["agent_ids"]))
    wait_until(lambda: _steps(bus, set(bus.stats()["agent_ids"])) >= steps + 50, 20, "the other arena to step on")
    assert bus.coordinator_child.proc.poll() is None
    log = bus.coordinator_child.log_path.read_text()
    assert "FaultyGrid raised in move_many in arena 0" in log and "ZeroDivisionError" in log
    assert "arena 0 closed" in log and log.count("Traceback") == 1
