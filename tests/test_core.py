"""The coordinator core, driven without sockets: registry, ticks, deadlines, liveness,
the ledger, measurement windows.  Time is a number the test advances."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.coordinator.core import (STATS_DETAIL_MAX, AgentEntry, AgentState, CoordinatorCore, HostEntry,
                                           IllegalTransition, Settings, TickPhase)
from agentbus_zmq.coordinator.metrics import Histogram
from agentbus_zmq.coordinator.world import GridWorld, WorldConfig

pytestmark = pytest.mark.unit


class Harness:
    """A core plus helpers that speak to it as agents would."""

    def __init__(self, **kw):
        self.now = 0.0
        self.core = CoordinatorCore(Settings(**kw), GridWorld(WorldConfig(seed=1)), "test",
                                    cpu_clock=lambda: (0.0, 0.0))

    def send(self, peer: bytes, msg) -> list:
        self.core.on_message(peer, msg, self.now)
        return self.take()

    def raw(self, peer: bytes, frames: list[bytes]) -> list:
        self.core.on_frames(peer, frames, self.now)
        return self.take()

    def take(self) -> list:
        out = self.core.take_outbox()
        return [(peer, P.decode(frame)) for peer, frame in out]

    def advance(self, seconds: float) -> list:
        self.now += seconds
        self.core.on_timer(self.now)
        return self.take()

    def hello(self, peer: bytes, agent_id: str) -> list:
        """HELLO, then the HEARTBEAT a real agent sends once its model is built."""
        return self.send(peer, P.Hello(agent_id, "test", 1)) + self.send(peer, P.Heartbeat())

    @property
    def ledger(self):
        return self.core.ledger


def observations(out, peer=None):
    return [m for p, m in out if type(m) is P.Observation and (peer is None or p == peer)]


def test_an_agent_is_scheduled_only_once_it_says_it_is_ready():
    h = Harness()
    out = h.send(b"p1", P.Hello("a1", "test", 1))
    assert [type(m) for _, m in out] == [P.Welcome]       # no observation while it builds its model
    assert all(type(m) is P.Heartbeat for _, m in h.advance(5.0))
    assert "a1" in h.core.agents                           # the setup grace outlasts liveness (1.5 s)
    out = h.send(b"p1", P.Heartbeat())
    assert [type(m) for _, m in out] == [P.Observation]
    h.advance(40.0)
    assert "a1" not in h.core.agents                       # ready now: ordinary liveness applies


def test_hello_gets_welcome_then_first_observation():
    h = Harness()
    out = h.hello(b"p1", "a1")
    assert [type(m) for _, m in out] == [P.Welcome, P.Observation]
    welcome = out[0][1]
    assert welcome.agent_id == "a1" and welcome.session == "test"
    assert welcome.params["world"]["width"] == 5 and welcome.params["mode"] == "lockstep"
    assert out[1][1].tick == 0 and out[1][1].obs[0] == h.core.world.positions()["a1"][1]
    assert welcome.params["arena"] == 0


def test_tick_closes_when_every_agent_answered():
    h = Harness()
    h.hello(b"p1", "a1")
    h.hello(b"p2", "a2")           # joins from the next tick
    out = h.send(b"p1", P.Action(0, 4, 10))
    assert h.core.tick == 1 and {p for p, _ in out} == {b"p1", b"p2"}
    assert h.send(b"p1", P.Action(1, 4, 10)) == []  # a2 still owes tick 1
    out = h.send(b"p2", P.Action(1, 4, 10))
    assert h.core.tick == 2 and len(observations(out)) == 2
    assert h.ledger.received == 3 and h.ledger.balanced()


def test_deadline_counts_missing_and_a_late_answer_as_late():
    h = Harness(deadline=1.0)
    h.hello(b"p1", "a1")
    h.hello(b"p2", "a2")
    h.send(b"p1", P.Action(0, 4, 0))
    h.send(b"p1", P.Action(1, 4, 0))
    out = h.advance(1.5)  # a2 never answered tick 1
    assert h.core.tick == 2 and len(observations(out)) == 2
    assert h.ledger.missing == 1 and h.ledger.balanced()
    assert h.send(b"p2", P.Action(1, 4, 0)) == []  # late: counted, dropped, not an error
    assert (h.ledger.missing, h.ledger.late) == (0, 1) and h.ledger.balanced()


def test_answer_for_a_tick_never_sent_is_refused():
    h = Harness()
    h.hello(b"p1", "a1")
    out = h.send(b"p1", P.Action(7, 4, 0))
    assert out[0][1].code == ErrorCode.STALE_TICK
    assert h.ledger.errors["STALE_TICK"] == 1 and h.ledger.received == 0


def test_silent_agent_expires_and_the_others_go_on():
    h = Harness(heartbeat=0.5, liveness=3, deadline=10.0)
    h.hello(b"p1", "a1")
    h.hello(b"p2", "a2")
    h.send(b"p1", P.Action(0, 4, 0))
    h.send(b"p1", P.Action(1, 4, 0))  # tick 1 now waits for a2 alone
    for _ in range(4):            # p1 keeps heartbeating, p2 says nothing
        h.send(b"p1", P.Heartbeat())
        h.advance(0.4)
    assert "a2" not in h.core.agents and "a1" in h.core.agents
    assert h.ledger.missing == 1 and h.ledger.errors["expired"] == 1
    assert h.core.tick == 2        # tick 1 closed without a2, tick 2 opened for a1 alone
    assert h.ledger.balanced()


def test_heartbeats_go_to_idle_agents():
    h = Harness(heartbeat=0.5, deadline=10.0)
    h.hello(b"p1", "a1")
    out = h.advance(0.6)
    assert any(type(m) is P.Heartbeat for _, m in out)


def test_same_id_from_a_new_peer_replaces_the_registration():
    h = Harness()
    h.hello(b"old", "a1")
    cell = h.core.world.positions()["a1"]
    out = h.hello(b"new", "a1")
    assert h.core.agents["a1"].peer == b"new" and len(h.core.agents) == 1
    assert h.core.world.positions()["a1"] == cell  # the same agent, where it was
    assert type(out[0][1]) is P.Welcome
    assert h.ledger.missing == 1                # the old registration's observation
    out = h.send(b"old", P.Action(0, 4, 0))
    assert out[0][1].code == ErrorCode.NOT_REGISTERED
    assert h.ledger.balanced()


def test_repeated_hello_from_the_same_peer_is_idempotent():
    h = Harness()
    h.hello(b"p1", "a1")
    out = h.send(b"p1", P.Hello("a1", "test", 1))
    assert [type(m) for _, m in out] == [P.Welcome]
    assert h.ledger.sent == 1 and h.ledger.missing == 0


def test_bye_frees_the_agent_and_its_cell_at_once():
    h = Harness()
    h.hello(b"p1", "a1")
    h.hello(b"p2", "a2")
    h.send(b"p1", P.Action(0, 4, 0))
    h.send(b"p2", P.Bye("done"))
    assert "a2" not in h.core.agents and "a2" not in h.core.world
    assert h.ledger.missing == 1 and h.ledger.balanced()


def test_garbage_gets_an_error_reply_and_the_core_keeps_serving():
    h = Harness()
    h.hello(b"p1", "a1")
    for frames in ([b"\xc1"], [b"a", b"b"], [P.encode(P.Observation(0, [1]))], [b"\x92\x02\x05"]):
        out = h.raw(b"evil", frames)
        assert len(out) == 1 and type(out[0][1]) is P.Error
    assert h.ledger.errors["MALFORMED"] == 1
    assert h.ledger.errors["BAD_FRAMING"] == 1
    assert h.ledger.errors["UNKNOWN_TYPE"] == 1
    assert h.ledger.errors["UNSUPPORTED_VERSION"] == 1
    out = h.send(b"p1", P.Action(0, 4, 0))
    assert len(observations(out)) == 1


def test_world_full_is_refused_with_a_clear_error():
    h = Harness()
    h.core.world = GridWorld(WorldConfig(width=2, height=1, obstacles=0, goals=0, max_arenas=1))
    h.hello(b"p1", "a1")
    h.hello(b"p2", "a2")
    out = h.hello(b"p3", "a3")
    assert out[0][1].code == ErrorCode.WORLD_FULL and "a3" not in h.core.agents


def test_async_mode_answers_each_action_with_the_next_observation():
    h = Harness(mode="async")
    h.hello(b"p1", "a1")
    h.hello(b"p2", "a2")
    for i in range(3):
        out = h.send(b"p1", P.Action(i, 4, 0))
        assert [(p, m.tick) for p, m in out] == [(b"p1", i + 1)]
    assert h.core.agents["a2"].pending == 0 and h.ledger.received == 3


def test_measure_window_is_opened_and_closed_by_steps():
    h = Harness()
    h.send(b"bench", P.Control(9, "measure", {"agents": 2, "warmup_steps": 4, "steps": 6}))
    h.hello(b"p1", "a1")
    h.hello(b"p2", "a2")
    replies = []
    for _ in range(20):
        for peer, agent in ((b"p1", "a1"), (b"p2", "a2")):
            e = h.core.agents[agent]
            if e.state is AgentState.STEPPING:
                h.now += 0.001
                replies += [m for _, m in h.send(peer, P.Action(e.pending, 4, 100)) if type(m) is P.Reply]
    assert len(replies) == 1 and replies[0].ok and replies[0].request_id == 9
    r = replies[0].result
    assert r["steps"] == 6 and r["agents"] == 2 and r["window"]["received"] == 6
    assert r["latency_samples"] == 6 and r["ledger"]["balanced"]


def test_measure_times_out_with_a_reason():
    h = Harness()
    h.send(b"bench", P.Control(1, "measure", {"agents": 3, "steps": 10, "timeout_s": 2}))
    out = h.advance(2.5)
    reply = [m for _, m in out if type(m) is P.Reply][0]
    assert not reply.ok and "waiting" in reply.result["error"]
    assert reply.result["code"] == ErrorCode.TIMED_OUT and reply.result["hint"]


def test_unknown_control_command_is_refused_with_a_code():
    h = Harness()
    out = h.send(b"c", P.Control(1, "reboot", {}))
    assert out[0][1].ok is False and "unknown command" in out[0][1].result["error"]
    assert out[0][1].result["code"] == ErrorCode.UNKNOWN_COMMAND == h.ledger.errors["UNKNOWN_COMMAND"] + 10


@pytest.mark.parametrize("args", [
    {"agents": float("inf"), "steps": 1}, {"agents": 1, "duration_s": float("nan")},
    {"agents": 1, "steps": 1, "timeout_s": 1e9}, {"agents": "2", "steps": 1}, {"agents": 1, "steps": 1.5},
    {"agents": True, "steps": 1}, {"agents": 0, "steps": 1}, {"agents": 1}, {"agents": 1, "steps": 1, "bogus": 1},
])
def test_measure_arguments_are_validated(args):
    h = Harness()
    (reply,) = [m for _, m in h.send(b"c", P.Control(3, "measure", args))]
    assert reply.ok is False and reply.result["code"] == ErrorCode.BAD_FIELD
    assert h.core._measure is None


def test_a_second_measurement_is_refused_as_busy():
    h = Harness()
    assert h.send(b"c", P.Control(1, "measure", {"agents": 1, "steps": 5})) == []
    (reply,) = [m for _, m in h.send(b"d", P.Control(2, "measure", {"agents": 1, "steps": 5}))]
    assert reply.result["code"] == ErrorCode.BUSY


def test_states_move_only_as_the_table_allows():
    h = Harness()
    h.send(b"p1", P.Hello("a1", "test", 1))
    entry = h.core.agents["a1"]
    assert entry.state is AgentState.JOINING
    with pytest.raises(IllegalTransition):
        entry.move("answer")
    h.send(b"p1", P.Heartbeat())
    assert entry.state is AgentState.STEPPING and h.core.phase is TickPhase.OPEN
    h.send(b"p1", P.Action(0, 4, 0))
    assert entry.state is AgentState.STEPPING and entry.pending == 1  # the next tick's observation


@pytest.mark.parametrize("mode", ["lockstep", "async"])
def test_an_action_past_its_deadline_is_late_even_if_the_timer_has_not_run(mode):
    h = Harness(mode=mode, deadline=0.05)
    h.hello(b"p1", "a1")
    h.now += 0.11                          # the driver was busy: no on_timer in between
    out = h.send(b"p1", P.Action(0, 4, 0))
    assert h.ledger.received == 0 and (h.ledger.late, h.ledger.missing) == (1, 0)
    assert [m.tick for m in observations(out)] == [1] and h.core.agents["a1"].pending == 1  # the next one
    assert h.ledger.balanced()


def test_async_deadlines_set_the_timeout_not_the_heartbeat_sweep():
    h = Harness(mode="async", deadline=0.05, heartbeat=0.5)
    h.hello(b"p1", "a1")
    h.advance(0.0)
    assert h.core.next_timeout(h.now) == pytest.approx(0.05)
    out = h.advance(0.05)
    assert [m.tick for m in observations(out)] == [1] and h.ledger.missing == 1


def test_a_window_counts_only_what_happened_inside_it():
    h = Harness(mode="async", deadline=0.05)
    h.hello(b"p1", "a1")
    h.hello(b"p2", "a2")
    h.advance(0.06)                        # both observations (tick 0) expire before the window
    h.send(b"bench", P.Control(5, "measure", {"agents": 1, "steps": 3}))
    h.send(b"p1", P.Action(1, 4, 0))       # a1's first step opens the window (no warm-up)
    h.send(b"p2", P.Action(0, 4, 0))       # late answer to a pre-window observation
    replies = []
    for tick in (2, 3, 4):
        replies += [m for _, m in h.send(b"p1", P.Action(tick, 4, 0)) if type(m) is P.Reply]
    (reply,) = replies
    w = reply.result["window"]
    assert (w["missing"], w["late"], w["received"]) == (0, 0, 3)
    assert h.ledger.late == 1


def test_restarts_are_counted_per_agent_in_stats():
    h = Harness()
    h.hello(b"p1", "a1")
    h.hello(b"p2", "a1")
    h.send(b"p2", P.Bye("gone"))
    h.hello(b"p3", "a1")
    h.hello(b"p4", "a2")
    stats = [m for _, m in h.send(b"c", P.Control(1, "stats", {}))][0].result
    assert stats["restarts"] == {"a1": 2}


def test_shutdown_says_bye_to_everyone():
    h = Harness()
    h.hello(b"p1", "a1")
    h.hello(b"p2", "a2")
    h.core.shutdown(h.now)
    out = h.take()
    assert {p for p, m in out if type(m) is P.Bye} == {b"p1", b"p2"}
    assert h.core.agents == {} and h.ledger.balanced()
    assert h.hello(b"p3", "a3")[0][1].code == ErrorCode.SHUTTING_DOWN


events = st.lists(st.tuples(st.sampled_from(["hello", "act", "late", "stale", "bye", "wait", "drift", "hb", "measure",
                                             "host", "host_act", "host_bad", "host_bye", "host_late"]),
                            st.integers(0, 3), st.floats(0.0, 1.0)), max_size=60)


def _owed(core) -> int:
    """Agent-steps outstanding, counted from the units (the ledger must agree)."""
    singles = sum(1 for u in core._by_peer.values() if type(u) is AgentEntry and u.state is AgentState.STEPPING)
    hosts = sum(len(u.pending_idx) for u in core._by_peer.values()
                if type(u) is HostEntry and u.state is AgentState.STEPPING)
    return singles + hosts


@pytest.mark.parametrize("mode", ["lockstep", "async"])
@settings(max_examples=200, deadline=None)
@given(script=events)
def test_ledger_always_balances(mode, script):
    """Agents and hosts (whose ids overlap: a host may take over an agent's id) in any
    order: the ledger balances, nothing goes negative, no late answer counts in time."""
    h = Harness(mode=mode, deadline=0.5, heartbeat=0.2)
    for kind, i, dt in script:
        peer, agent = f"p{i}".encode(), f"a{i}"
        entry = h.core.agents.get(agent)
        hpeer = f"hp{i % 2}".encode()
        host = h.core._by_peer.get(hpeer)
        host = host if type(host) is HostEntry else None
        if kind == "hello":
            h.hello(peer, agent)
        elif kind == "act" and type(entry) is AgentEntry and entry.state is AgentState.STEPPING:
            received, sent_at = h.ledger.received, entry.sent_at
            h.send(entry.peer, P.Action(entry.pending, i % 5, 5))
            if h.ledger.received > received:   # counted in time only if it was in time
                assert h.now - sent_at < 0.5
        elif kind == "late" and type(entry) is AgentEntry and entry.overdue:
            h.send(entry.peer, P.Action(entry.overdue[0][0], 0, 0))
        elif kind == "drift":                  # time passes; the driver has not run the timer
            h.now += dt
        elif kind == "measure":
            replies = [m for _, m in h.send(b"bench", P.Control(i, "measure", {"agents": 1, "steps": 1 + i}))]
            assert all(m.result.get("code") == ErrorCode.BUSY for m in replies if not m.ok)
        elif kind == "stale":
            h.send(peer, P.Action(10_000 + i, 0, 0))
        elif kind == "bye":
            h.send(peer, P.Bye(""))
        elif kind == "hb":
            h.send(peer, P.Heartbeat())
            h.send(hpeer, P.Heartbeat())
        elif kind == "host":                   # members a{i}..a{i+2}: may overlap agents
            h.send(hpeer, P.HostHello(f"h{i % 2}", "test", 1, "a", i, 3))
            h.send(hpeer, P.Heartbeat())
        elif kind in ("host_act", "host_bad") and host is not None and host.state is AgentState.STEPPING:
            n = len(host.pending_idx) + (kind == "host_bad")
            received, sent_at = h.ledger.received, host.sent_at
            h.send(hpeer, P.HostAction(host.pending, np.full(n, i, np.uint8), 5))
            if h.ledger.received > received:
                assert h.now - sent_at < 0.5 and kind == "host_act"
        elif kind == "host_late" and host is not None and host.overdue:
            h.send(hpeer, P.HostAction(host.overdue[0][0], np.zeros(host.overdue[0][1], np.uint8), 0))
        elif kind == "host_bye" and host is not None:
            h.send(hpeer, P.HostBye([i % 3], "failed"))
        else:
            h.advance(dt)
        ledger = h.ledger
        assert ledger.balanced(), ledger.snapshot()
        assert ledger.outstanding == _owed(h.core)
        assert min(ledger.missing, ledger.late, ledger.outstanding) >= 0
        assert h.core._stepping_n == sum(1 for a in h.core.agents.values()
                                         if (a if type(a) is AgentEntry else a.host).first_step_at is not None)
        positions = h.core.world.positions()
        assert set(positions) == set(h.core.agents)  # the world holds exactly the registered agents
        assert len(set(positions.values())) == len(positions)
        m = h.core._measure
        if m is not None:
            assert min(m.sent, m.received, m.late, m.missing, m.undeliverable) >= 0


@given(st.lists(st.floats(0, 1e7), min_size=1, max_size=500))
def test_latency_histogram_is_within_two_percent_of_exact_percentiles(samples):
    h = Histogram()
    for x in samples:
        h.record(x)
    ordered = sorted(samples)
    for q, got in h.percentiles().items():
        exact = ordered[max(1, -(-int(q[1:]) * len(samples) // 100)) - 1]
        if exact < 1.0:
            assert got == 0.0
        else:
            assert exact / 1.02 <= got <= exact * 1.02
    assert h.n == len(samples) and len(h.counts) == Histogram.BUCKETS


# --- agent hosts: one frame per host per tick ----------------------------------------


def host_hello(h: Harness, peer: bytes, host_id: str = "h1", first: int = 1, count: int = 3, ready=True) -> list:
    out = h.send(peer, P.HostHello(host_id, "test", 7, "m", first, count))
    return out + (h.send(peer, P.Heartbeat()) if ready else [])


def host_obs(out, peer=None):
    return [m for p, m in out if type(m) is P.HostObservation and (peer is None or p == peer)]


def test_a_host_registers_its_agents_in_one_exchange_and_steps_them_in_one_frame():
    h = Harness()
    out = host_hello(h, b"hp", ready=False)
    ((_, welcome),) = out
    assert type(welcome) is P.HostWelcome and welcome.host_id == "h1" and welcome.arenas.tolist() == [0, 0, 0]
    assert sorted(h.core.agents) == ["m1", "m2", "m3"] and h.core.hosts["h1"].pid == 7
    (obs,) = host_obs(h.send(b"hp", P.Heartbeat()))
    assert obs.tick == 0 and obs.members.tolist() == [0, 1, 2] and obs.obs.shape == (3, 2)
    positions = h.core.world.positions()
    assert obs.obs[:, 0].tolist() == [positions[f"m{i}"][1] for i in (1, 2, 3)]
    (nxt,) = host_obs(h.send(b"hp", P.HostAction(0, np.array([4, 4, 4], np.uint8), 30)))
    assert nxt.tick == 1 and h.ledger.received == 3 and h.ledger.sent == 6 and h.ledger.balanced()
    assert h.core.stats(h.now)["ready"] == 3


def test_lock_step_waits_for_hosts_and_agents_alike():
    h = Harness()
    host_hello(h, b"hp")
    h.hello(b"p1", "a1")                       # joins at the next tick
    h.send(b"hp", P.HostAction(0, np.full(3, 4, np.uint8), 0))
    assert h.core.tick == 1
    assert h.send(b"hp", P.HostAction(1, np.full(3, 4, np.uint8), 0)) == []  # a1 still owes tick 1
    out = h.send(b"p1", P.Action(1, 4, 0))
    assert h.core.tick == 2 and len(host_obs(out)) == 1 and len(observations(out)) == 1
    assert h.ledger.received == 7 and h.ledger.balanced()


def test_async_hosts_step_on_their_own():
    h = Harness(mode="async")
    host_hello(h, b"hp")
    host_hello(h, b"hq", "h2", first=10)
    for tick in range(3):
        (obs,) = host_obs(h.send(b"hp", P.HostAction(tick, np.full(3, 4, np.uint8), 0)))
        assert obs.tick == tick + 1
    assert h.core.hosts["h2"].pending == 0 and h.ledger.received == 9


def test_a_dead_host_takes_its_agents_with_it_and_the_rest_go_on():
    h = Harness(heartbeat=0.5, liveness=3, deadline=10.0)
    host_hello(h, b"hp")
    h.hello(b"p1", "a1")
    h.send(b"hp", P.HostAction(0, np.full(3, 4, np.uint8), 0))
    for _ in range(5):                          # a1 heartbeats; the host is silent
        h.send(b"p1", P.Action(h.core.agents["a1"].pending, 4, 0))
        h.advance(0.4)
    assert "h1" not in h.core.hosts and sorted(h.core.agents) == ["a1"] and len(h.core.world) == 1
    assert h.ledger.missing == 3 and h.ledger.errors["expired"] == 1 and h.ledger.balanced()


def test_a_member_that_leaves_mid_frame_is_missing_and_the_rest_answer():
    h = Harness()
    host_hello(h, b"hp")
    h.send(b"hp", P.HostBye([1], "step raised ValueError"))
    assert "m2" not in h.core.agents and "m2" not in h.core.world and h.ledger.missing == 1
    (obs,) = host_obs(h.send(b"hp", P.HostAction(0, np.array([4, 4], np.uint8), 0)))
    assert obs.members.tolist() == [0, 2] and h.ledger.received == 2 and h.ledger.balanced()


def test_a_mis_sized_host_action_is_refused_and_its_frame_expires():
    h = Harness(deadline=0.5)
    host_hello(h, b"hp")
    ((_, err),) = h.send(b"hp", P.HostAction(0, np.full(5, 4, np.uint8), 0))
    assert err.code == ErrorCode.BAD_FIELD and "has 5 actions" in err.reason
    out = h.advance(0.6)
    assert host_obs(out)[0].tick == 1 and h.ledger.missing == 3 and h.ledger.balanced()


def test_agent_and_host_messages_do_not_mix():
    h = Harness()
    host_hello(h, b"hp")
    h.hello(b"p1", "a1")
    assert h.send(b"hp", P.Action(0, 4, 0))[0][1].code == ErrorCode.NOT_REGISTERED
    assert h.send(b"p1", P.HostAction(0, np.zeros(1, np.uint8), 0))[0][1].code == ErrorCode.NOT_REGISTERED
    assert h.send(b"p1", P.HostBye([0], ""))[0][1].code == ErrorCode.NOT_REGISTERED


def test_a_restarted_host_takes_its_agents_back_where_they_were():
    h = Harness()
    host_hello(h, b"old")
    before = h.core.world.positions()
    out = host_hello(h, b"new")
    assert type(out[0][1]) is P.HostWelcome and h.core.hosts["h1"].peer == b"new"
    assert h.core.world.positions() == before and h.core.stats(h.now)["restarts"] == {"m1": 1, "m2": 1, "m3": 1}
    assert h.ledger.balanced()


def test_an_agent_taking_a_members_id_leaves_the_host_the_others():
    h = Harness()
    host_hello(h, b"hp")
    h.hello(b"p1", "m2")
    assert type(h.core.agents["m2"]) is AgentEntry and h.core.hosts["h1"].live.tolist() == [True, False, True]
    assert h.ledger.missing == 1 and h.ledger.balanced()


def test_arenas_fill_one_after_another():
    h = Harness()
    h.core.world = GridWorld(WorldConfig(seed=1, arena_agents=2))
    ((_, welcome),) = host_hello(h, b"hp", count=5, ready=False)
    assert welcome.arenas.tolist() == [0, 0, 1, 1, 2]
    assert [m for _, m in h.send(b"p1", P.Hello("solo", "test", 1))][0].params["arena"] == 2


def test_stats_page_large_registries():
    h = Harness()
    h.core.world = GridWorld(WorldConfig(seed=1, max_arenas=1000))
    for k in range(3):
        host_hello(h, f"hp{k}".encode(), f"h{k}", first=k * 1000, count=400, ready=False)
    stats = h.core.stats(h.now)
    assert stats["agents"] == 1200 and "agent_ids" not in stats and stats["pages"] == 3
    pages = [h.core.stats(h.now, page) for page in range(3)]
    ids = [a for page in pages for a in page["agent_ids"]]
    assert ids == sorted(h.core.agents) and all(len(p["agent_ids"]) <= STATS_DETAIL_MAX for p in pages)
    assert pages[0]["agent_hosts"]["m0"] == "h0" and len(P.encode(P.Reply(1, True, pages[0]))) < P.MAX_MESSAGE_BYTES


def test_a_host_back_with_fewer_members_frees_the_others_cells():
    h = Harness()
    host_hello(h, b"old", count=4)
    host_hello(h, b"new", count=2)
    assert sorted(h.core.agents) == ["m1", "m2"] and sorted(h.core.world.positions()) == ["m1", "m2"]
    assert h.ledger.balanced()
