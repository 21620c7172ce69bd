"""The agent session, driven without sockets: handshake, readiness, heartbeats,
liveness, back-off, stale and replaced sessions.  Time is a number the test advances."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentbus_zmq.agents.session import (AgentSession, BadFrame, IllegalTransition, Left, Refused, SessionState,
                                         Welcomed)
from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.protocol import ErrorCode

pytestmark = pytest.mark.unit

PARAMS = {"world": {"width": 5}}


class Harness:
    def __init__(self, **kw):
        self.now = 0.0
        self.s = AgentSession("a1", "test", 7, **{"heartbeat": 0.5, "liveness": 3, "backoff_min": 0.1,
                                                  "backoff_max": 0.8, **kw})

    def out(self) -> list:
        return [P.decode(f) for f in self.s.take_outbox()]

    def recv(self, msg):
        return self.s.receive(P.encode(msg), self.now)

    def advance(self, dt: float) -> list:
        self.now += dt
        self.s.on_timer(self.now)
        return self.out()

    def register(self, session="s1", params=PARAMS) -> Welcomed:
        if self.s.state is SessionState.CONNECTING:
            self.s.connect(self.now)
        event = self.recv(P.Welcome(session, "a1", params))
        if event.new_session:
            self.s.ready(self.now)
        return event


def test_connect_says_hello_and_repeats_it_until_welcome():
    h = Harness()
    h.s.connect(0.0)
    assert h.out() == [P.Hello("a1", "test", 7)]
    assert h.advance(0.5) == [P.Hello("a1", "test", 7)]       # idempotent, every heartbeat
    event = h.recv(P.Welcome("s1", "a1", PARAMS))
    assert type(event) is Welcomed and event.new_session and h.s.state is SessionState.REGISTERED
    assert h.out() == []                                      # ready only once the model is built
    h.s.ready(h.now)
    assert h.out() == [P.Heartbeat()]


def test_observations_are_stepped_only_when_registered():
    h = Harness()
    h.s.connect(0.0)
    assert h.recv(P.Observation(3, [1, 0])) is None           # stale: an old session's
    h.register()
    obs = h.recv(P.Observation(4, [1, 0]))
    assert obs == P.Observation(4, [1, 0])
    h.s.take_outbox()
    h.s.act(4, 2, 150, h.now)
    assert h.out() == [P.Action(4, 2, 150)] and h.s.steps == 1


def test_heartbeats_when_idle_and_silence_backs_off_with_doubling_delays():
    h = Harness()
    h.register()
    h.out()
    assert h.advance(0.5) == [P.Heartbeat()]
    assert h.s.next_timeout(h.now) == pytest.approx(0.5)
    waits = []
    for _ in range(6):
        while h.s.state is not SessionState.BACKING_OFF:
            h.advance(0.25)
        waits.append(round(h.s.reconnect_at - h.now, 6))
        h.advance(h.s.next_timeout(h.now))
        assert h.s.state is SessionState.CONNECTING           # the runtime opens a fresh socket
        h.s.connect(h.now)
        h.out()
    assert waits == [0.1, 0.2, 0.4, 0.8, 0.8, 0.8]
    h.register()
    assert h.s.backoff == 0.1                                 # a WELCOME resets the back-off


def test_a_restarted_coordinator_is_a_new_session_and_the_same_one_is_not():
    h = Harness()
    assert h.register("s1").new_session
    h.out()
    assert not h.register("s1").new_session                   # the answer to a repeated HELLO
    assert h.out() == [P.Heartbeat()]                         # ready again, nothing rebuilt
    assert h.register("s2").new_session                       # a new coordinator: rebuild the model
    assert h.register("s2", {"world": {"width": 6}}).new_session


def test_forgotten_agents_say_hello_again_at_once():
    h = Harness()
    h.register()
    h.out()
    event = h.recv(P.Error(ErrorCode.NOT_REGISTERED, "who?"))
    assert type(event) is Refused and event.rehello and h.s.state is SessionState.HELLO_SENT
    assert h.out() == [P.Hello("a1", "test", 7)]
    assert h.recv(P.Observation(1, [0, 0])) is None           # not ours until WELCOME
    event = h.recv(P.Error(ErrorCode.STALE_TICK, "late"))
    assert not event.rehello and h.out() == []


def test_bye_from_the_coordinator_backs_off_and_drops_what_was_queued():
    h = Harness()
    h.register()
    h.s.act(1, 0, 0, h.now)
    event = h.recv(P.Bye("coordinator shutting down"))
    assert type(event) is Left and h.s.state is SessionState.BACKING_OFF and h.out() == []


def test_stop_says_bye_only_when_registered():
    h = Harness()
    h.s.connect(0.0)
    h.out()
    h.s.stop(0.1)
    assert h.out() == [] and h.s.state is SessionState.STOPPED
    h = Harness()
    h.register()
    h.out()
    h.s.stop(1.0)
    assert h.out() == [P.Bye("agent stopping")]


def test_garbage_is_reported_not_raised():
    h = Harness()
    h.register()
    assert type(h.s.receive(b"\xc1", h.now)) is BadFrame
    assert h.s.state is SessionState.REGISTERED


def test_illegal_moves_raise():
    h = Harness()
    with pytest.raises(IllegalTransition):
        h.s.ready(0.0) or h.s._move("welcome")


def test_bad_ids_and_settings_are_refused_up_front():
    with pytest.raises(P.ProtocolError):
        AgentSession("has space", "test")
    with pytest.raises(ValueError):
        AgentSession("a1", "test", heartbeat=0)


frames = st.one_of(
    st.builds(P.Observation, st.integers(0, 9), st.just([0, 0])),
    st.builds(P.Welcome, st.sampled_from(["s1", "s2"]), st.sampled_from(["a1", "b2"]), st.just(PARAMS)),
    st.builds(P.Error, st.sampled_from(list(ErrorCode)), st.just("x")),
    st.just(P.Heartbeat()), st.just(P.Bye("x")), st.just(P.Hello("z", "k", 0)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(frames, st.floats(0, 3)), max_size=40))
def test_any_script_keeps_the_session_consistent(script):
    """Whatever arrives, in any order: the session never raises, never sends after a
    back-off until it has reconnected, and always has a bounded next timeout."""
    h = Harness()
    for item in script:
        if h.s.state is SessionState.CONNECTING:
            h.s.connect(h.now)
        if isinstance(item, float):
            out = h.advance(item)
        else:
            event = h.recv(item)
            if type(event) is Welcomed and event.new_session:
                h.s.ready(h.now)
            out = h.out()
        if h.s.state is SessionState.STOPPED:         # only REPLACED and NOT_ALLOWED stop a session on their own
            assert type(item) is P.Error and item.code in (ErrorCode.REPLACED, ErrorCode.NOT_ALLOWED) and out == []
            break
        if h.s.state in (SessionState.BACKING_OFF, SessionState.CONNECTING):
            assert out == [] or all(type(m) is not P.Action for m in out)
        assert 0 <= h.s.next_timeout(h.now) <= 3.0
        assert h.s.backoff <= 0.8


def test_a_long_step_is_not_the_coordinators_silence_and_keepalive_heartbeats_during_it():
    h = Harness()
    h.register()
    h.out()
    h.recv(P.Observation(1, [0, 0]))
    h.now += 1.0
    h.s.keepalive(h.now)                                      # mid-computation: a heartbeat is due
    assert h.out() == [P.Heartbeat()]
    h.s.keepalive(h.now + 0.1)
    assert h.out() == []                                      # not due again yet
    h.now += 2.0                                              # the step took 3 s in all (expiry is 1.5 s)
    h.s.act(1, 4, 3_000_000, h.now)
    assert h.advance(0.0) == [P.Action(1, 4, 3_000_000)] and h.s.state is SessionState.REGISTERED


def test_a_host_session_speaks_the_host_messages():
    import numpy as np

    s = AgentSession("h1", "test", 7, members=("m-", 1, 3))
    s.connect(0.0)
    assert [P.decode(f) for f in s.take_outbox()] == [P.HostHello("h1", "test", 7, "m-", 1, 3)]
    assert s.receive(P.encode(P.Welcome("s1", "h1", PARAMS)), 0.0) is None     # not a host's
    event = s.receive(P.encode(P.HostWelcome("s1", "h1", PARAMS, np.zeros(3, np.uint32))), 0.0)
    assert event.new_session and s.arenas.tolist() == [0, 0, 0]
    again = s.receive(P.encode(P.HostWelcome("s1", "h1", PARAMS, np.array([0, 1, 0], np.uint32))), 0.0)
    assert again.new_session                                   # moved arenas: rebuild
    obs = P.HostObservation(0, np.arange(3, dtype=np.uint16), np.zeros((3, 2), np.uint16))
    assert s.receive(P.encode(obs), 0.0) == obs
    s.leave([1], "failed", 0.0)
    s.act_many(0, np.array([4, 4], np.uint8), 10, 0.1)
    assert [type(P.decode(f)) for f in s.take_outbox()] == [P.HostBye, P.HostAction] and s.steps == 2


def test_every_hello_after_welcome_presents_its_token_and_the_token_is_not_a_new_world():
    h = Harness()
    h.register(params={**PARAMS, "token": "t1"})
    h.out()
    h.advance(1.6)                                           # silence: back off, reconnect
    h.advance(1.0)
    h.s.connect(h.now)
    assert h.out() == [P.Hello("a1", "test", 7, "t1")]      # takes its own registration back at once
    event = h.recv(P.Welcome("s1", "a1", {**PARAMS, "token": "t2"}))
    assert event.new_session is False and h.s.token == "t2"  # a new token, the same world: no rebuild
    assert h.out() == [P.Heartbeat()]


def test_replaced_stops_the_session_and_dropped_says_hello_again():
    h = Harness()
    h.register()
    h.out()
    event = h.recv(P.Error(ErrorCode.DROPPED, "too slow"))
    assert event.rehello and h.out() == [P.Hello("a1", "test", 7)]
    h.register()
    h.out()
    event = h.recv(P.Error(ErrorCode.REPLACED, "taken over"))
    assert event.fatal and h.s.state is SessionState.STOPPED and h.out() == []
    h.s.stop(h.now)
    assert h.out() == []                                     # no BYE: the registration is not ours


def test_id_taken_before_welcome_keeps_saying_hello():
    h = Harness()
    h.s.connect(0.0)
    h.out()
    event = h.recv(P.Error(ErrorCode.ID_TAKEN, "held"))
    assert not event.rehello and not event.fatal and h.s.state is SessionState.HELLO_SENT
    assert h.advance(0.5) == [P.Hello("a1", "test", 7)]


def test_id_taken_never_ends_the_session_it_backs_off_and_keeps_trying():
    """A squatter may hold our id (without CURVE, ids are first come): the session keeps
    asking every heartbeat while the holder may yet be found gone, then backs off,
    doubling, and tries again from a fresh socket for as long as it runs."""
    h = Harness(id_taken_limit=10.0)
    h.s.connect(0.0)
    h.out()
    while h.now < 9.5:
        event = h.recv(P.Error(ErrorCode.ID_TAKEN, "held"))
        assert not event.fatal and h.s.state is SessionState.HELLO_SENT
        h.advance(0.5)
    h.advance(0.5)
    waits = []
    for _ in range(5):                                      # refused again and again: never stopped
        event = h.recv(P.Error(ErrorCode.ID_TAKEN, "held"))
        assert not event.fatal and h.s.state is SessionState.BACKING_OFF
        waits.append(h.s.reconnect_at - h.now)
        h.advance(waits[-1])
        assert h.s.state is SessionState.CONNECTING
        h.s.connect(h.now)                                  # the runtime's fresh socket: HELLO again
        assert h.s.state is SessionState.HELLO_SENT and P.Hello("a1", "test", 7) in h.out()
    assert waits == sorted(waits) and waits[-1] > waits[0]  # backing off
    h.register()                                            # the id is free again: in, and the count reset
    assert h.s.state is SessionState.REGISTERED and h.s.reconnects == 0
    h.recv(P.Error(ErrorCode.NOT_REGISTERED, "coordinator restarted"))
    event = h.recv(P.Error(ErrorCode.ID_TAKEN, "held"))
    assert h.s.state is SessionState.HELLO_SENT              # the minute starts again


def test_the_coordinators_heartbeat_and_liveness_win():
    h = Harness(heartbeat=0.5, liveness=3)
    h.register(params={**PARAMS, "heartbeat_ms": 2000, "liveness": 4})
    h.out()
    assert h.advance(1.9) == []                              # its own 0.5 s would have sent three by now
    assert h.advance(0.2) == [P.Heartbeat()]
    h.advance(5.8)                                           # 8 s of silence is the coordinator's limit ...
    assert h.s.state is SessionState.REGISTERED
    h.advance(0.3)
    assert h.s.state is SessionState.BACKING_OFF             # ... not 1.5 s
    h2 = Harness(heartbeat=0.5, liveness=3)
    h2.register(params={**PARAMS, "heartbeat_ms": 0, "liveness": 10**9})   # nonsense: ignored
    assert h2.s.heartbeat == 0.5 and h2.s.expiry == 1.5
