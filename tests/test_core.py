"""The coordinator core, driven without sockets: registry, ticks, deadlines, liveness,
the ledger, measurement windows.  Time is a number the test advances."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.clock import FakeClock
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.coordinator.core import (STATS_DETAIL_MAX, AgentEntry, AgentState, CoordinatorCore, HostEntry,
                                           IllegalTransition, Settings)
from agentbus_zmq.coordinator.ledger import Histogram
from agentbus_zmq.coordinator.units import UNITS
from agentbus_zmq.coordinator.grid import GridWorld, WorldConfig

pytestmark = pytest.mark.unit


class Harness:
    """A core plus helpers that speak to it as agents would."""

    def __init__(self, world: WorldConfig | None = None, **kw):
        self.clock = FakeClock()
        self.core = CoordinatorCore(Settings(**kw), GridWorld(world or WorldConfig(seed=1)), "test", clock=self.clock)

    @property
    def now(self) -> float:
        return self.clock.now()

    @now.setter
    def now(self, t: float) -> None:
        self.clock.advance(t - self.clock.now())

    def send(self, peer: bytes, msg, key: bytes | None = None, address: str = "") -> list:
        self.core.on_message(peer, msg, self.now, key, address)
        return self.take()

    def raw(self, peer: bytes, frames: list[bytes]) -> list:
        self.core.on_frames(peer, frames, self.now)
        return self.take()

    def take(self) -> list:
        out = self.core.take_outbox()
        return [(peer, P.decode(frame)) for peer, frame in out]

    def advance(self, seconds: float) -> list:
        self.core.on_timer(self.clock.advance(seconds))
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


def test_a_new_connection_with_the_welcome_token_takes_the_registration_over():
    h = Harness()
    token = h.hello(b"old", "a1")[0][1].params["token"]
    cell = h.core.world.positions()["a1"]
    out = h.send(b"new", P.Hello("a1", "test", 2, token)) + h.send(b"new", P.Heartbeat())
    assert h.core.agents["a1"].peer == b"new" and len(h.core.agents) == 1
    assert h.core.world.positions()["a1"] == cell  # the same agent, where it was
    told = [m for p, m in out if p == b"old"]
    assert [m.code for m in told] == [ErrorCode.REPLACED]  # the old connection is told, once
    assert type([m for p, m in out if p == b"new"][0]) is P.Welcome
    assert h.ledger.missing == 1                # the old registration's observation
    out = h.send(b"old", P.Action(0, 4, 0))
    assert out[0][1].code == ErrorCode.NOT_REGISTERED
    assert h.ledger.balanced()


def test_a_live_id_cannot_be_taken_without_its_token():
    h = Harness()
    h.hello(b"victim", "a1")
    probes = []
    for token in ("", "0" * 32, "not-the-token"):
        out = h.send(b"thief", P.Hello("a1", "test", 1, token))
        assert [(p, m.code) for p, m in out if type(m) is P.Error] == [(b"thief", ErrorCode.ID_TAKEN)]
        probes.append([p for p, m in out if type(m) is P.Heartbeat])
    assert probes == [[b"victim"], [], []]  # probed (is it really alive?), once a heartbeat interval
    assert h.core.agents["a1"].peer == b"victim"
    out = h.send(b"victim", P.Action(0, 3, 0))               # the victim is never interrupted
    assert observations(out, b"victim") and h.ledger.received == 1
    assert h.ledger.errors["ID_TAKEN"] == 3


def test_refused_hellos_probe_the_holder_once_a_heartbeat_interval_however_many_come():
    """A thief's HELLO flood is not reflected onto its victim: 1,000 refusals over three
    heartbeat intervals cost the victim three probes, not 1,000."""
    h = Harness(heartbeat=1.0, liveness=3, deadline=100.0)
    h.hello(b"victim", "a1")
    probes = refused = 0
    for i in range(1000):
        h.now = i * 0.003
        if i % 100 == 0:
            h.send(b"victim", P.Heartbeat())              # the victim is alive throughout
        out = h.send(b"thief", P.Hello("a1", "test", 1))
        refused += sum(1 for _, m in out if type(m) is P.Error and m.code == ErrorCode.ID_TAKEN)
        probes += sum(1 for p, m in out if p == b"victim" and type(m) is P.Heartbeat)
    assert refused == 1000 and probes == 3
    assert h.core.agents["a1"].peer == b"victim"


def test_restarts_keep_the_most_recent_ids_so_stats_costs_the_same_all_session():
    """Every re-registration used to stay in ``restarts`` for the session (and every
    stats sorted them all); it keeps the RESTARTS_KEPT most recent."""
    from agentbus_zmq.coordinator.registry import RESTARTS_KEPT

    h = Harness()
    for i in range(RESTARTS_KEPT + 50):
        for peer in (b"first-%d" % i, b"again-%d" % i):      # registered twice: one restart
            h.hello(peer, f"a{i}")
            h.send(peer, P.Bye("leaving"))
    restarts = h.core.registry.restarts
    assert len(restarts) == RESTARTS_KEPT and list(restarts)[-1] == f"a{RESTARTS_KEPT + 49}"
    assert "a0" not in restarts and all(n == 1 for n in restarts.values())
    assert len(h.core.stats(h.now).restarts) == RESTARTS_KEPT


def test_an_agent_getting_ready_cannot_have_its_id_stolen_however_long_it_builds():
    """Silent for 20 s while it builds its model (inside the 30 s setup grace), a joining
    registration is not taken by a HELLO without its token; with the token it is, and the
    old connection is told REPLACED."""
    h = Harness(heartbeat=0.5, liveness=3, deadline=100.0)
    welcome = [m for _, m in h.send(b"builder", P.Hello("a1", "test", 1)) if type(m) is P.Welcome][0]
    for t in (2.0, 5.0, 20.0):                                 # past liveness (1.5 s), inside the grace
        h.now = t
        h.advance(0.0)
        out = h.send(b"thief", P.Hello("a1", "test", 1))
        assert [(p, m.code) for p, m in out if type(m) is P.Error] == [(b"thief", ErrorCode.ID_TAKEN)], t
        assert h.core.agents["a1"].peer == b"builder"
    out = h.send(b"restarted", P.Hello("a1", "test", 1, welcome.params["token"]))
    assert [m.code for p, m in out if p == b"builder" and type(m) is P.Error] == [ErrorCode.REPLACED]
    assert h.core.agents["a1"].peer == b"restarted"
    h.now = 31.0 + 20.0                                        # past the new registration's grace: dropped
    h.advance(0.0)
    assert "a1" not in h.core.agents and h.ledger.errors["setup_expired"] == 1


def test_a_host_connection_that_keeps_re_registering_is_refused_at_the_cost_of_a_heartbeat():
    """HOST_HELLO alternating its members (first 0, then 4,096) re-placed 4,096 agents a
    frame; now one connection registers one host per liveness interval, and a repeated
    HOST_HELLO builds nothing."""
    h = Harness(heartbeat=0.5, liveness=3, deadline=100.0, world=WorldConfig(seed=1, max_arenas=1000))
    h.send(b"churn", P.HostHello("churner", "test", 1, "c", 0, 4096))
    h.send(b"churn", P.Heartbeat())
    host = h.core.registry.hosts["churner"]
    for i in range(30):
        h.now = 0.01 * (i + 1)
        out = h.send(b"churn", P.HostHello("churner", "test", 1, "c", 4096 * ((i + 1) % 2), 4096))
        if (i + 1) % 2:
            assert [m.code for _, m in out if type(m) is P.Error] == [ErrorCode.BUSY], i
        else:
            assert out == [], i                                # the same registration: nothing to do
    assert h.core.registry.hosts["churner"] is host and len(h.core.agents) == 4096 and "c0" in h.core.agents
    h.now = 2.0                                                # past liveness: it may change what it registers
    h.send(b"churn", P.Heartbeat())
    out = h.send(b"churn", P.HostHello("churner", "test", 1, "c", 4096, 4096))
    assert [type(m) for _, m in out] == [P.HostWelcome] and "c4096" in h.core.agents and "c0" not in h.core.agents


def test_agents_pages_are_sorted_once_per_change_of_membership_not_once_per_request():
    """Every `agents` request used to sort the whole registry (21 ms at 819,000 agents; four
    in flight cut lock-step to 2-9 %): the order is kept until membership changes."""
    h = Harness(world=WorldConfig(seed=1, max_arenas=1000))
    for j in range(3):
        h.send(b"h%d" % j, P.HostHello(f"h{j}", "test", 1, f"z{j}-", 0, 4096))
        h.send(b"h%d" % j, P.Heartbeat())                  # ready: 4,096 pending from one origin at most
    reg = h.core.registry
    assert len(reg.agents) == 3 * 4096
    first = reg.page(0)
    order = reg._order
    for page in (0, 1, 95, 0):
        assert reg.page(page) == order[page * 128:(page + 1) * 128]
    assert reg._order is order and first == sorted(reg.agents)[:128]          # not sorted again
    h.hello(b"late", "a-new")
    assert reg._order is None and "a-new" in reg.page(0) + reg.page(1)         # a change: sorted again, once
    reply = [m for _, m in h.send(b"c", P.Control(1, "agents", {"page": 2}))][0]
    assert reply.ok and [r["id"] for r in reply.result["agents"]] == sorted(reg.agents)[256:384]


def test_an_id_whose_connection_went_silent_may_be_taken():
    h = Harness(heartbeat=0.5, liveness=3, deadline=100.0)
    h.hello(b"old", "a1")
    h.now += 1.6                                          # silent past 1.5 s, before the sweep ran
    out = h.send(b"new", P.Hello("a1", "test", 1))
    assert h.core.agents["a1"].peer == b"new"
    assert not [m for p, m in out if p == b"old"]         # nobody to tell


def test_a_connection_found_gone_frees_its_registration_at_once():
    h = Harness(deadline=100.0)
    h.hello(b"p1", "a1")
    h.hello(b"p2", "a2")
    h.now += 0.1
    h.core.on_connection_event("disconnected", h.now)
    out = h.advance(0.0)                                  # every unit is probed ...
    assert {p for p, m in out if type(m) is P.Heartbeat} == {b"p1", b"p2"}
    h.core.on_undeliverable(b"p1", "its connection is gone", h.now, gone=True)  # ... p1's send fails
    assert "a1" not in h.core.agents and "a1" not in h.core.world.positions()
    assert h.ledger.missing == 1 and h.ledger.balanced()  # its outstanding observation
    out = h.hello(b"p3", "a1")                            # and its id is free for the next process
    assert h.core.agents["a1"].peer == b"p3"


def test_same_curve_key_takes_over_and_patterns_bind_keys_to_ids():
    h = Harness()
    h.core.registry.key_patterns = {b"K1": ("host1-*",), b"K2": None}
    h.core.on_message(b"a", P.Hello("host1-0", "test", 1), h.now, key=b"K1")
    h.core.on_message(b"a", P.Heartbeat(), h.now, key=b"K1")
    h.take()
    h.core.on_message(b"b", P.Hello("host1-0", "test", 1), h.now, key=b"K2")   # another allowed key
    assert [m.code for _, m in h.take() if type(m) is P.Error] == [ErrorCode.ID_TAKEN]
    h.core.on_message(b"c", P.Hello("host1-0", "test", 1), h.now, key=b"K1")   # the same key: its restart
    out = h.take()
    assert h.core.agents["host1-0"].peer == b"c" and (b"a", ErrorCode.REPLACED) in [
        (p, m.code) for p, m in out if type(m) is P.Error]
    h.core.on_message(b"d", P.Hello("host2-0", "test", 1), h.now, key=b"K1")   # outside its patterns
    assert [m.code for _, m in h.take() if type(m) is P.Error] == [ErrorCode.NOT_ALLOWED]
    h.core.on_message(b"e", P.HostHello("host2", "test", 1, "host1-", 5, 2), h.now, key=b"K1")
    assert [m.code for _, m in h.take() if type(m) is P.Error] == [ErrorCode.NOT_ALLOWED]  # the host id too
    assert "host2-0" not in h.core.agents and "host2" not in h.core.hosts


def test_a_host_cannot_take_members_held_by_a_live_connection():
    h = Harness()
    h.hello(b"single", "h1")
    out = h.send(b"host", P.HostHello("hx", "test", 1, "h", 0, 3))
    assert [m.code for _, m in out if type(m) is P.Error] == [ErrorCode.ID_TAKEN]
    assert not h.core.hosts and h.core.agents["h1"].peer == b"single"


def test_registrations_that_never_get_ready_expire_and_free_their_cells():
    h = Harness(WorldConfig(seed=1, max_arenas=1), setup_grace=5.0, heartbeat=0.5)
    capacity = h.core.world.config.capacity
    assert capacity < 30
    for i in range(capacity):
        h.send(f"p{i}".encode(), P.Hello(f"squatter{i}", "test", 1))
    out = h.send(b"legit", P.Hello("legit", "test", 1))
    assert [m.code for _, m in out] == [ErrorCode.WORLD_FULL]
    for _ in range(9):                                    # repeating HELLO does not extend the grace
        h.now += 0.5
        for i in range(capacity):
            h.send(f"p{i}".encode(), P.Hello(f"squatter{i}", "test", 1))
        h.core.on_timer(h.now)
    h.advance(0.6)
    assert not h.core.agents and len(h.core.world) == 0
    assert h.ledger.errors["setup_expired"] == capacity
    assert type(h.hello(b"legit", "legit")[0][1]) is P.Welcome


def test_pending_registrations_are_bounded_in_agents_and_per_origin():
    """At most max_pending agents not yet ready (a host counts its members), half of them
    from one origin: the address without CURVE, the key with it."""
    h = Harness(max_pending=8)
    for i in range(4):                                    # one address: half the limit
        assert type(h.send(b"a%d" % i, P.Hello(f"a{i}", "test", 1), address="10.0.0.1")[0][1]) is P.Welcome
    out = h.send(b"a4", P.Hello("a4", "test", 1), address="10.0.0.1")
    assert [m.code for _, m in out] == [ErrorCode.BUSY] and "from this address" in out[0][1].reason
    out = h.send(b"k1", P.HostHello("k", "test", 1, "k-", 0, 3), key=b"K" * 40, address="10.0.0.1")
    assert type(out[0][1]) is P.HostWelcome               # another origin: its key, not its address
    out = h.send(b"b1", P.HostHello("b", "test", 1, "b-", 0, 2), address="10.0.0.2")
    assert [m.code for _, m in out] == [ErrorCode.BUSY] and "7 agents are waiting" in out[0][1].reason
    assert h.core.stats(h.now).to_wire()["pending"] == 7
    h.send(b"a0", P.Heartbeat())                          # one becomes ready: room for one more there
    assert type(h.send(b"a4", P.Hello("a4", "test", 1), address="10.0.0.1")[0][1]) is P.Welcome
    h.send(b"k1", P.Heartbeat())                          # the host's three: room for a host of two
    assert type(h.send(b"b1", P.HostHello("b", "test", 1, "b-", 0, 2), address="10.0.0.2")[0][1]) is P.HostWelcome
    assert h.core.stats(h.now).to_wire()["pending"] == 6


def test_a_connection_registering_again_is_charged_to_its_own_origin():
    h = Harness()
    h.send(b"p1", P.Hello("a1", "test", 1), address="10.0.0.1")
    h.send(b"p1", P.Heartbeat())
    h.send(b"p1", P.Hello("a2", "test", 1))               # the driver reads no address for a registered peer
    assert h.core.agents["a2"].origin == "address:10.0.0.1" and h.core.pending == 1


def test_a_registration_larger_than_the_limit_gets_in_when_nothing_is_pending():
    h = Harness(max_pending=4)
    assert type(h.send(b"h", P.HostHello("h", "test", 1, "m-", 0, 10))[0][1]) is P.HostWelcome
    out = h.send(b"a", P.Hello("a", "test", 1), address="10.0.0.9")
    assert [m.code for _, m in out] == [ErrorCode.BUSY]   # until the host is ready
    h.send(b"h", P.Heartbeat())
    assert type(h.send(b"a", P.Hello("a", "test", 1), address="10.0.0.9")[0][1]) is P.Welcome


def test_squatters_from_many_addresses_make_way_for_a_real_agent():
    """Eight addresses hold every pending place and never get ready: a newcomer from a
    ninth displaces the stalest of them once it is DISPLACE_AFTER_S old; squatters can
    renew only by displacing each other, once every DISPLACE_EVERY_S an address, and
    cycling ids on one connection keeps their age."""
    h = Harness(max_pending=8, setup_grace=120.0)
    for i in range(8):
        assert type(h.send(b"s%d" % i, P.Hello(f"squat-{i}", "test", 1), address=f"10.0.1.{i}")[0][1]) is P.Welcome
    out = h.send(b"real", P.Hello("real", "test", 1), address="10.0.0.9")
    assert [m.code for _, m in out] == [ErrorCode.BUSY]             # none old enough yet
    h.now = 1.5
    out = h.send(b"s0", P.Hello("squat-0b", "test", 1), address="")  # cycling an id on its connection: no younger
    assert type(out[0][1]) is P.Welcome and h.core.agents["squat-0b"].grace_from == 0.0
    out = h.send(b"real", P.Hello("real", "test", 1), address="10.0.0.9")
    assert [type(m) for _, m in out] == [P.Error, P.Welcome]
    (notice,) = [(p, m) for p, m in out if type(m) is P.Error]
    assert notice[0] in {b"s%d" % i for i in range(8)} and notice[1].code == ErrorCode.BUSY
    assert "displaced" in notice[1].reason and h.core.pending == 8
    assert len([a for a in h.core.agents if a.startswith("squat")]) == 7
    assert h.core.ledger.errors["displaced"] == 1
    out = h.send(b"s9", P.Hello("squat-9", "test", 1), address="10.0.1.1")
    assert type(out[-1][1]) is P.Welcome                             # squatters displace each other ...
    out = h.send(b"s10", P.Hello("squat-10", "test", 1), address="10.0.1.1")
    assert [m.code for _, m in out] == [ErrorCode.BUSY]              # ... once every 2 s an address
    out = h.send(b"s11", P.Hello("squat-11", "test", 1), address="10.0.1.2")
    assert "real" in h.core.agents                                   # never the one under a second old
    h.send(b"real", P.Heartbeat())
    assert h.core.agents["real"].state is not AgentState.JOINING and h.core.pending == 7


def test_a_takeover_while_getting_ready_does_not_start_the_setup_grace_again():
    """A squatter renewing its registrations with their tokens from new connections used
    to keep them (and the pending slots) for ever: the grace runs from the first HELLO."""
    h = Harness(setup_grace=5.0, heartbeat=0.5)
    token = h.send(b"p0", P.Hello("squat", "test", 1))[0][1].params["token"]
    for n in (1, 2):                                      # every 2 s a new connection with the token
        h.now += 2.0
        out = h.send(b"p%d" % n, P.Hello("squat", "test", 1, token))
        (welcome,) = [m for p, m in out if p == b"p%d" % n]
        token = welcome.params["token"]                   # taken over: a new token, the old one told
        assert [m.code for p, m in out if p != b"p%d" % n] == [ErrorCode.REPLACED]
        h.core.on_timer(h.now)
    assert h.core.agents["squat"].peer == b"p2" and h.ledger.errors["setup_expired"] == 0
    h.now = 5.1                                           # 5 s after the first HELLO, not after the last
    h.core.on_timer(h.now)
    assert "squat" not in h.core.agents and h.ledger.errors["setup_expired"] == 1



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
    h = Harness(WorldConfig(width=2, height=1, obstacles=0, goals=0, max_arenas=1))
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
    assert h.core.windows.current is None


def test_measurements_queue_behind_the_running_one_and_the_queue_is_bounded():
    from agentbus_zmq.coordinator.window import MAX_QUEUED_MEASURES

    h = Harness()
    h.hello(b"p1", "a1")
    assert h.send(b"c", P.Control(1, "measure", {"agents": 1, "steps": 2})) == []
    for i in range(MAX_QUEUED_MEASURES):                   # queued, not refused
        assert h.send(b"d", P.Control(10 + i, "measure", {"agents": 1, "steps": 2, "timeout_s": 100})) == []
    (reply,) = [m for _, m in h.send(b"e", P.Control(2, "measure", {"agents": 1, "steps": 5}))]
    assert reply.result["code"] == ErrorCode.BUSY and h.core.stats(h.now).to_wire()["measurements"]["queued"] == MAX_QUEUED_MEASURES
    replies = []
    for tick in range(2 * (MAX_QUEUED_MEASURES + 1) + 2):  # each window closes after 2 steps; the next starts
        replies += [(p, m) for p, m in h.send(b"p1", P.Action(tick, 4, 0)) if type(m) is P.Reply]
    assert [(p, m.request_id) for p, m in replies] == [(b"c", 1)] + [(b"d", 10 + i) for i in range(MAX_QUEUED_MEASURES)]
    assert all(m.ok and m.result["steps"] == 2 for _, m in replies)


def test_a_measurement_is_cancelled_when_its_client_is_gone():
    h = Harness()
    h.send(b"gone", P.Control(1, "measure", {"agents": 5, "steps": 5, "timeout_s": 3600}))
    h.send(b"next", P.Control(2, "measure", {"agents": 5, "steps": 5, "timeout_s": 3600}))
    h.core.on_connection_event("disconnected", h.now)
    out = h.advance(0.0)
    assert {p for p, m in out if type(m) is P.Heartbeat} >= {b"gone", b"next"}   # clients are probed too
    h.core.on_undeliverable(b"gone", "its connection is gone", h.now, gone=True)
    assert h.core.windows.current is not None and h.core.windows.current.peer == b"next"  # the slot is not held for ever
    assert h.ledger.errors["measures_cancelled"] == 1


def test_a_queued_measurement_times_out_from_when_it_was_asked():
    h = Harness()
    h.send(b"c", P.Control(1, "measure", {"agents": 5, "steps": 5, "timeout_s": 100}))
    h.send(b"d", P.Control(2, "measure", {"agents": 5, "steps": 5, "timeout_s": 2}))
    out = [m for p, m in h.advance(2.5) if type(m) is P.Reply]
    assert [(m.request_id, m.result["code"]) for m in out] == [(2, ErrorCode.TIMED_OUT)]


def test_states_move_only_as_the_table_allows():
    h = Harness()
    h.send(b"p1", P.Hello("a1", "test", 1))
    entry = h.core.agents["a1"]
    assert entry.state is AgentState.JOINING
    with pytest.raises(IllegalTransition):
        UNITS.move(entry, "answer")
    h.send(b"p1", P.Heartbeat())
    assert entry.state is AgentState.STEPPING and h.core.schedule.open
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
    h.send(b"p1", P.Bye("restarting"))
    h.hello(b"p2", "a1")
    h.core.on_undeliverable(b"p2", "its connection is gone", h.now, gone=True)  # killed
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


def test_the_stop_line_says_which_missing_steps_were_in_flight_at_the_stop():
    h = Harness()
    h.hello(b"p1", "a1")
    h.hello(b"p2", "a2")
    outstanding = h.ledger.outstanding
    assert outstanding > 0                                  # a tick was out when it stopped
    h.core.shutdown(h.now)
    line = h.ledger.summary()
    assert h.ledger.missing == outstanding and f"missing {outstanding} ({outstanding} in flight at the stop)" in line
    assert "\n" not in line and "{" not in line and line.endswith("balanced; errors: none")


events = st.lists(st.tuples(st.sampled_from(["hello", "act", "late", "stale", "bye", "wait", "drift", "hb", "measure",
                                             "host", "host_act", "host_bad", "host_bye", "host_late"]),
                            st.integers(0, 3), st.floats(0.0, 1.0)), max_size=60)


def _owed(core) -> int:
    """Agent-steps outstanding, counted from the units (the ledger must agree)."""
    singles = sum(1 for u in core.registry.by_peer.values() if type(u) is AgentEntry and u.state is AgentState.STEPPING)
    hosts = sum(len(u.pending_idx) for u in core.registry.by_peer.values()
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
        host = h.core.registry.by_peer.get(hpeer)
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
            # as many as still owed (a host may also answer the frame as it listed them); a
            # bad answer matches neither
            n = len(host.pending_idx) if kind == "host_act" else len(host.sent_idx) + 1
            received, sent_at = h.ledger.received, host.sent_at
            h.send(hpeer, P.HostAction(host.pending, np.full(n, i, np.uint8), 5))
            if h.ledger.received > received:
                assert h.now - sent_at < host.deadline and kind == "host_act"
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
        assert h.core.registry.ready == sum(1 for a in h.core.agents.values()
                                         if (a if type(a) is AgentEntry else a.host).first_step_at is not None)
        positions = h.core.world.positions()
        assert set(positions) == set(h.core.agents)  # the world holds exactly the registered agents
        assert len(set(positions.values())) == len(positions)
        m = h.core.windows.current
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


def host_hello(h: Harness, peer: bytes, host_id: str = "h1", first: int = 1, count: int = 3, ready=True,
               token: str = "") -> list:
    out = h.send(peer, P.HostHello(host_id, "test", 7, "m", first, count, token))
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
    assert h.core.stats(h.now).to_wire()["ready"] == 3


def test_a_hosts_frame_deadline_grows_with_its_members_and_its_welcome_says_so():
    h = Harness(deadline=0.5, member_deadline=0.01)
    ((_, welcome),) = host_hello(h, b"hp", count=20, ready=False)
    assert welcome.params["deadline_ms"] == 700 and h.core.hosts["h1"].deadline == pytest.approx(0.7)
    assert h.send(b"p1", P.Hello("a1", "test", 1))[0][1].params["deadline_ms"] == 500  # an agent alone: the deadline
    h.send(b"hp", P.Heartbeat())
    h.advance(0.6)                                  # past the agent's deadline, not the host's
    assert h.ledger.missing == 0
    h.advance(0.15)
    assert h.ledger.missing == 20 and h.ledger.balanced()


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
    for tick in (1, 2):
        host_obs(h.send(b"hp", P.HostAction(tick, np.array([4, 4], np.uint8), 0)))
    # each survivor stepped in every frame: 3 steps each (not the host's 6 over its first 3 members)
    from agentbus_zmq.coordinator.report import agents_page

    rows = agents_page(h.core.registry, 0, h.now).agents
    assert {r.id: r.steps for r in rows} == {"m1": 3, "m3": 3}


def test_a_mis_sized_host_action_is_refused_and_its_frame_expires():
    h = Harness(deadline=0.5)
    host_hello(h, b"hp")
    ((_, err),) = h.send(b"hp", P.HostAction(0, np.full(5, 4, np.uint8), 0))
    assert err.code == ErrorCode.BAD_FIELD and "has 5 actions" in err.reason
    out = h.advance(0.6)
    assert host_obs(out)[0].tick == 1 and h.ledger.missing == 3 and h.ledger.balanced()


def test_agent_and_host_messages_do_not_mix():
    # UNKNOWN_TYPE, not NOT_REGISTERED: that would tell a registered peer to HELLO again
    h = Harness()
    host_hello(h, b"hp")
    h.hello(b"p1", "a1")
    ((_, err),) = h.send(b"hp", P.Action(0, 4, 0))
    assert err.code == ErrorCode.UNKNOWN_TYPE and "a host sends HOST_ACTION" in err.reason
    assert h.send(b"p1", P.HostAction(0, np.zeros(1, np.uint8), 0))[0][1].code == ErrorCode.UNKNOWN_TYPE
    assert h.send(b"p1", P.HostBye([0], ""))[0][1].code == ErrorCode.UNKNOWN_TYPE
    assert h.send(b"nobody", P.HostBye([0], ""))[0][1].code == ErrorCode.NOT_REGISTERED
    assert h.send(b"nobody", P.Action(0, 4, 0))[0][1].code == ErrorCode.NOT_REGISTERED


def test_a_restarted_host_takes_its_agents_back_where_they_were():
    h = Harness()
    token = host_hello(h, b"old")[0][1].params["token"]
    before = h.core.world.positions()
    out = [(p, m) for p, m in host_hello(h, b"new", token=token) if p == b"new"]
    assert type(out[0][1]) is P.HostWelcome and h.core.hosts["h1"].peer == b"new"
    assert h.core.world.positions() == before and h.core.stats(h.now).to_wire()["restarts"] == {"m1": 1, "m2": 1, "m3": 1}
    assert h.ledger.balanced()


def test_an_agent_taking_a_members_id_leaves_the_host_the_others():
    h = Harness()
    token = host_hello(h, b"hp")[0][1].params["token"]
    out = h.send(b"p1", P.Hello("m2", "test", 1, token))   # a member moved to a process of its own
    assert type(h.core.agents["m2"]) is AgentEntry and h.core.hosts["h1"].live.tolist() == [True, False, True]
    assert h.ledger.missing == 1 and h.ledger.balanced()
    # the host is not told REPLACED (stop): it keeps its other members, its next frame lists them
    assert not [m for p, m in out if p == b"hp" and type(m) is P.Error]
    # it answers the frame as it listed the members (it had not heard of the move): accepted,
    # the moved member's action dropped, and its next frame lists the two it still has
    received = h.ledger.received
    out = h.send(b"hp", P.HostAction(0, np.full(3, 4, np.uint8), 0))
    assert not [m for p, m in out if p == b"hp" and type(m) is P.Error]
    assert h.ledger.received == received + 2 and h.ledger.balanced()
    assert host_obs(out, b"hp")[0].members.tolist() == [0, 2]
    # an answer of neither length (not as listed, not as owed) is refused
    out = h.send(b"hp", P.HostAction(h.core.hosts["h1"].pending, np.full(3, 4, np.uint8), 0))
    assert [m.code for p, m in out if p == b"hp" and type(m) is P.Error] == [ErrorCode.BAD_FIELD]


def test_arenas_fill_one_after_another():
    h = Harness(WorldConfig(seed=1, arena_agents=2))
    ((_, welcome),) = host_hello(h, b"hp", count=5, ready=False)
    assert welcome.arenas.tolist() == [0, 0, 1, 1, 2]
    assert [m for _, m in h.send(b"p1", P.Hello("solo", "test", 1))][0].params["arena"] == 2


def test_stats_page_large_registries():
    h = Harness(WorldConfig(seed=1, max_arenas=1000))
    for k in range(3):
        host_hello(h, f"hp{k}".encode(), f"h{k}", first=k * 1000, count=400, ready=False)
    stats = h.core.stats(h.now).to_wire()
    assert stats["agents"] == 1200 and "agent_ids" not in stats and stats["pages"] == -(-1200 // STATS_DETAIL_MAX)
    pages = [h.core.stats(h.now, page).to_wire() for page in range(stats["pages"])]
    ids = [a for page in pages for a in page["agent_ids"]]
    assert ids == sorted(h.core.agents) and all(len(p["agent_ids"]) <= STATS_DETAIL_MAX for p in pages)
    assert pages[0]["agent_hosts"]["m0"] == "h0" and len(P.encode(P.Reply(1, True, pages[0]))) < 16 * 1024


def test_a_host_back_with_fewer_members_frees_the_others_cells():
    h = Harness()
    token = host_hello(h, b"old", count=4)[0][1].params["token"]
    host_hello(h, b"new", count=2, token=token)
    assert sorted(h.core.agents) == ["m1", "m2"] and sorted(h.core.world.positions()) == ["m1", "m2"]
    assert h.ledger.balanced()


def test_compute_us_longer_than_the_wait_is_counted_and_clamped():
    h = Harness()
    h.hello(b"p1", "a1")
    h.send(b"c", P.Control(1, "measure", {"agents": 1, "steps": 1}))
    h.now += 0.002
    h.send(b"p1", P.Action(0, 4, 10**9))                  # "I computed for 1000 s" after 2 ms
    assert h.ledger.errors["bad_compute_us"] == 1
    h.now += 0.002
    (reply,) = [m for _, m in h.send(b"p1", P.Action(1, 4, 10**9)) if type(m) is P.Reply]
    assert reply.result["compute_s"] <= 0.0025


def test_slow_answers_are_counted_and_a_straggler_can_be_dropped():
    h = Harness(deadline=1.0, drop_after=3)
    h.hello(b"fast", "a1")
    h.hello(b"slow", "a2")                                # ready during tick 0: in from tick 1
    h.send(b"fast", P.Action(0, 4, 0))
    tick = 1
    for _ in range(3):                                    # a2 answers at 95 % of the deadline
        h.send(b"fast", P.Action(tick, 4, 0))
        h.now += 0.95
        h.send(b"slow", P.Action(tick, 4, 0))
        tick += 1
    assert h.ledger.slow == 3 and h.core.stats(h.now).to_wire()["stragglers"]["a2"] == {
        "missed": 0, "late": 0, "slow": 3, "in_a_row": 3}
    out = h.advance(0.0)
    assert (b"slow", ErrorCode.DROPPED) in [(p, m.code) for p, m in out if type(m) is P.Error]
    assert "a2" not in h.core.agents and "a1" in h.core.agents
    assert h.ledger.errors["dropped_stragglers"] == 1 and h.ledger.balanced()


def test_an_agent_that_heartbeats_but_never_answers_is_dropped_by_the_policy():
    h = Harness(deadline=0.2, heartbeat=0.1, drop_after=5)
    h.hello(b"mute", "a1")
    for _ in range(30):
        h.send(b"mute", P.Heartbeat())                    # alive, never answering
        h.advance(0.1)
    assert "a1" not in h.core.agents and h.ledger.errors["dropped_stragglers"] == 1
    assert h.ledger.missing >= 5 and h.ledger.balanced()


def test_without_the_policy_stragglers_stay_and_a_prompt_answer_resets_the_count():
    h = Harness(deadline=1.0)
    h.hello(b"p1", "a1")
    h.now += 0.9
    h.send(b"p1", P.Action(0, 4, 0))
    assert h.core.agents["a1"].strikes == 1
    h.send(b"p1", P.Action(1, 4, 0))
    assert h.core.agents["a1"].strikes == 0 and h.core.agents["a1"].slow == 1


def test_a_world_whose_welcome_cannot_fit_is_refused_at_start():
    from agentbus_zmq.coordinator.core import ConfigError

    with pytest.raises(ConfigError, match=r"WELCOME would be \d+ bytes, over the 65536-byte message limit.*obstacles"):
        CoordinatorCore(Settings(), GridWorld(WorldConfig(width=300, height=100, obstacles=23_000, seed=1)))


def test_log_lines_a_peer_can_cause_are_bounded(caplog):
    import logging

    h = Harness()
    with caplog.at_level(logging.INFO, logger="agentbus_zmq.coordinator.core"):
        for i in range(2000):                             # garbage, ERRORs and registrations, all in one second
            h.raw(b"x", [b"\xc1"])
            h.send(b"y", P.Error(ErrorCode.UNEXPECTED, "x" * 1000))
            h.send(f"r{i}".encode(), P.Hello(f"r{i}", "test", 1))
        h.advance(1.0)
    assert len(caplog.records) <= 3 * 21 + 3
    assert h.ledger.errors["MALFORMED"] == 2000 and h.ledger.errors["received"] == 2000
    assert all(len(r.getMessage()) < 600 for r in caplog.records)


def test_each_closed_connection_is_probed_twice_and_probes_are_rate_limited():
    from agentbus_zmq.coordinator.liveness import PROBE_INTERVAL_S

    h = Harness(deadline=100.0, heartbeat=100.0)
    h.hello(b"p1", "a1")

    def probes(out):
        return [p for p, m in out if type(m) is P.Heartbeat]

    for _ in range(50):                                   # a storm of connections closing
        h.core.on_connection_event("disconnected", h.now)
    assert probes(h.advance(0.0)) == [b"p1"]
    assert probes(h.advance(PROBE_INTERVAL_S / 2)) == []  # not before the interval
    assert h.core.next_timeout(h.now) == pytest.approx(PROBE_INTERVAL_S / 2)
    assert probes(h.advance(PROBE_INTERVAL_S / 2)) == [b"p1"]  # the second look
    assert probes(h.advance(PROBE_INTERVAL_S)) == []      # and then no more


# --- lock-step per arena (coordinator.arenas) -------------------------------------------


def _obs_ticks(out, peer):
    return [m.tick for p, m in out if p == peer and type(m) is P.Observation]


@pytest.mark.parametrize("scope", ["world", "arena"])
def test_per_arena_lockstep_lets_an_arena_tick_without_waiting_for_another(scope):
    """Two agents in arenas of their own: per arena, one's answer moves its arena and brings
    its next observation at once; over the whole world it waits for the other."""
    h = Harness(world=WorldConfig(seed=1, arena_agents=1, max_arenas=10), lockstep_scope=scope, deadline=10.0)
    h.hello(b"A", "a")
    h.hello(b"B", "b")
    h.take()
    assert {h.core.world.arena_of(h.core.agents[x].slot) for x in "ab"} == {0, 1}
    h.send(b"A", P.Action(0, 4, 10))                        # 'a' was alone in tick 0; now 'b' has one too
    b_tick = h.core.agents["b"].pending
    out = []
    for _ in range(3):                                       # 'a' answers three times; 'b' is thinking
        out = h.send(b"A", P.Action(h.core.agents["a"].pending, 4, 10))
        if scope == "world":
            break
    if scope == "arena":
        assert _obs_ticks(out, b"A") == [4] and h.ledger.received == 4 and h.core.agents["b"].pending == b_tick
    else:
        assert _obs_ticks(out, b"A") == [] and h.ledger.received == 2   # the world waits for 'b'
    out = h.send(b"B", P.Action(b_tick, 4, 10))
    assert _obs_ticks(out, b"B") == [b_tick + 1] and h.ledger.balanced()


def test_per_arena_lockstep_keeps_an_arena_simultaneous_and_merges_cohorts_a_host_joins():
    """Agents sharing an arena still move together; a host whose members land in two
    arenas ticked apart joins them: each finishes its open tick, then they tick as one."""
    h = Harness(world=WorldConfig(seed=1, arena_agents=2, max_arenas=10), lockstep_scope="arena", deadline=10.0)
    for peer, agent in ((b"A", "a"), (b"B", "b"), (b"C", "c"), (b"D", "d")):
        h.hello(peer, agent)
    h.take()
    arena = {x: h.core.world.arena_of(h.core.agents[x].slot) for x in "abcd"}
    assert arena == {"a": 0, "b": 0, "c": 1, "d": 1}
    h.send(b"A", P.Action(0, 4, 10))                         # alone in their arenas' first ticks; now in pairs
    h.send(b"C", P.Action(0, 4, 10))
    assert _obs_ticks(h.send(b"A", P.Action(1, 4, 10)), b"A") == []    # arena 0's tick 1 waits for 'b'
    h.send(b"B", P.Bye("leaving"))                           # arena 0 goes on (tick 2, 'a' alone); a cell free
    h.send(b"C", P.Bye("leaving"))                           # arena 1's tick 1 still waits for 'd'
    out = h.send(b"H", P.HostHello("h", "test", 1, "m", 0, 2)) + h.send(b"H", P.Heartbeat())
    host = h.core.registry.hosts["h"]
    assert sorted(h.core.world.arenas_of(host.slots).tolist()) == [0, 1]
    assert not [m for p, m in out if p == b"H" and type(m) is P.HostObservation]  # waiting for the merge
    out = h.send(b"D", P.Action(1, 4, 10))                   # arena 1's open tick closes: it joins, and waits
    assert not [m for p, m in out if type(m) in (P.Observation, P.HostObservation)]
    out = h.send(b"A", P.Action(h.core.agents["a"].pending, 4, 10))   # arena 0's closes: one joint tick
    frames = [m for p, m in out if p == b"H" and type(m) is P.HostObservation]
    joint = h.core.agents["a"].pending
    assert len(frames) == 1 and frames[0].tick == joint == h.core.agents["d"].pending == 3
    assert _obs_ticks(h.send(b"A", P.Action(joint, 4, 10)), b"A") == []              # waits for 'd' and the host
    h.send(b"D", P.Action(joint, 4, 10))
    out = h.send(b"H", P.HostAction(joint, np.full(2, 4, np.uint8), 10))
    assert _obs_ticks(out, b"A") == _obs_ticks(out, b"D") == [joint + 1] and h.ledger.balanced()


def test_what_counts_as_a_sign_of_life_is_what_the_page_says():
    """A message that passes the field checks counts, even one refused for its state; one
    refused at the field checks does not (docs/protocol.md, HEARTBEAT)."""
    h = Harness(heartbeat=0.5, liveness=3, deadline=100.0)
    host_hello(h, b"bad", "h-bad", first=1, count=2)
    host_hello(h, b"stale", "h-stale", first=10, count=2)
    garbage = msgpack.packb([P.PROTOCOL_VERSION, int(P.MsgType.HOST_ACTION), "not a tick", b"", 0])
    for _ in range(10):                                             # 3 s: twice the liveness limit
        assert h.raw(b"bad", [garbage])[0][1].code == ErrorCode.BAD_FIELD
        refused = h.send(b"stale", P.HostAction(10**6, np.zeros(2, np.uint8), 0))
        assert [m.code for _, m in refused if type(m) is P.Error] == [ErrorCode.STALE_TICK]
        h.advance(0.3)
    assert sorted(h.core.hosts) == ["h-stale"] and h.ledger.balanced()
