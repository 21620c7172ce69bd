"""The coordinator core, driven without sockets: registry, ticks, deadlines, liveness,
the ledger, measurement windows.  Time is a number the test advances."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.coordinator.core import AgentState, CoordinatorCore, IllegalTransition, Settings, TickPhase
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
    assert out[1][1].tick == 0 and out[1][1].obs[0] == h.core.world.position["a1"]


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
    cell = h.core.world.position["a1"]
    out = h.hello(b"new", "a1")
    assert h.core.agents["a1"].peer == b"new" and len(h.core.agents) == 1
    assert h.core.world.position["a1"] == cell  # the same agent, where it was
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
    assert "a2" not in h.core.agents and "a2" not in h.core.world.position
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
    h.core.world = GridWorld(WorldConfig(width=2, height=1, obstacles=0, goals=0))
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


events = st.lists(st.tuples(st.sampled_from(["hello", "act", "late", "stale", "bye", "wait", "drift", "hb", "measure"]),
                            st.integers(0, 3), st.floats(0.0, 1.0)), max_size=60)


@pytest.mark.parametrize("mode", ["lockstep", "async"])
@settings(max_examples=150, deadline=None)
@given(script=events)
def test_ledger_always_balances(mode, script):
    h = Harness(mode=mode, deadline=0.5, heartbeat=0.2)
    for kind, i, dt in script:
        peer, agent = f"p{i}".encode(), f"a{i}"
        entry = h.core.agents.get(agent)
        if kind == "hello":
            h.hello(peer, agent)
        elif kind == "act" and entry is not None and entry.state is AgentState.STEPPING:
            received, sent_at = h.ledger.received, entry.sent_at
            h.send(peer, P.Action(entry.pending, i % 5, 5))
            if h.ledger.received > received:   # counted in time only if it was in time
                assert h.now - sent_at < 0.5
        elif kind == "late" and entry is not None and entry.overdue:
            h.send(peer, P.Action(entry.overdue[0][0], 0, 0))
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
        else:
            h.advance(dt)
        ledger = h.ledger
        assert ledger.balanced(), ledger.snapshot()
        assert ledger.outstanding == sum(1 for e in h.core.agents.values() if e.state is AgentState.STEPPING)
        assert min(ledger.missing, ledger.late, ledger.outstanding) >= 0
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
