"""A fuzzer that finds the next bad action (issue #26): hypothesis drives the coordinator's
core in-process, for each world, with frames whose every field may be any msgpack value
(ints at the 64-bit edges, floats with NaN and inf, strings, bytes, nested lists and
maps, numpy arrays of every dtype and shape the wire carries), from hostile peers that
register as agents and hosts beside two honest agents; and it drives the agent session
and every built-in kind with what a hostile coordinator may send.

Invariants: the core never raises; the ledger balances; the honest agents keep stepping
(every tick closes by its deadline); what the core keeps grows with the peers, not with
what they send.  An agent refuses a WELCOME or an observation with its typed error
(BadWelcome, BadObservation) or steps, never anything else, and never allocates past
the documented bound.

In the suite the example budget is fixed and the runs are derandomized (seeded); a longer
run for a release: ``AGENTBUS_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py`` (docs/security.md).
"""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from agentbus_zmq.agents.sdk import BadObservation, BadWelcome, spaces_of
from agentbus_zmq.agents.session import AgentSession
from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.clock import FakeClock
from agentbus_zmq.bus.commands import COMMANDS
from agentbus_zmq.bus.spaces import Discrete
from agentbus_zmq.coordinator.core import CoordinatorCore, Settings
from agentbus_zmq.coordinator.worlds import WorldSpec

pytestmark = pytest.mark.unit

#: examples per test; AGENTBUS_FUZZ_EXAMPLES raises it for a release run
EXAMPLES = int(os.environ.get("AGENTBUS_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, stateful_step_count=25, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

# --- values as a hostile peer may send them -----------------------------------------------

DTYPES = ["?", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"]
ints = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, 1, 4, 5, 2**31, 2**32 - 1, 2**32, 2**63 - 1,
                                                                   -1, -(2**63), 2**64 - 1]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([np.inf, -np.inf, np.nan, -1e308]))
arrays = hnp.arrays(dtype=st.sampled_from(DTYPES), shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
                    elements=None)
scalars = st.one_of(ints, floats, st.booleans(), st.none(), st.text(max_size=12), st.binary(max_size=12), arrays)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)
#: what may stand where an action goes: anything, weighted towards the door's edge cases
actions = st.one_of(ints, arrays, floats, values)


def frame(fields: list) -> bytes:
    return P.pack(fields)


WORLDS = {
    "grid": ("grid", {"seed": 1, "arena_agents": 4}),
    "pettingzoo-discrete": ("pettingzoo:mpe2.simple_spread_v3", {"N": 3, "max_cycles": 15}),
    "pettingzoo-box": ("pettingzoo:mpe2.simple_spread_v3", {"N": 3, "max_cycles": 15, "continuous_actions": True}),
    "pymdp-tmaze": ("pymdp:tmaze", {}),
}


class CoreFuzz(RuleBasedStateMachine):
    """Two honest agents and hostile peers against one core (WORLD set per subclass)."""

    WORLD = "grid"
    SCOPE = "world"

    @initialize()
    def start(self):
        name, args = WORLDS[self.WORLD]
        self.clock = FakeClock()
        self.core = CoordinatorCore(Settings(deadline=1.0, heartbeat=0.5, lockstep_scope=self.SCOPE, drop_after=0),
                                    WorldSpec(name, args).build(), "fuzz", clock=self.clock)
        self.honest: dict[bytes, P.Observation | None] = {}
        _, self.act_space = self.core.world.spaces()
        for i in range(2):
            peer = f"honest{i}".encode()
            self.honest[peer] = None
            self.feed(peer, P.encode(P.Hello(f"h{i}", "honest", 1)))
            self.feed(peer, P.encode(P.Heartbeat()))
        self.answered: dict[bytes, set] = {}
        self.registered: dict[bytes, int] = {}

    def feed(self, peer: bytes, data: bytes) -> None:
        self.core.on_frames(peer, [data], self.clock.now())        # must never raise
        self.collect()

    def collect(self) -> None:
        for peer, data in self.core.take_outbox():
            msg = P.decode(data)                                     # the core only ever sends valid frames
            if peer in self.honest and type(msg) is P.Observation:
                self.honest[peer] = msg
            elif type(msg) is P.Observation:
                self.registered[peer] = msg.tick
            elif type(msg) is P.HostObservation:
                self.registered[peer] = msg.tick

    # --- hostile peers --------------------------------------------------------------

    @rule(peer=st.sampled_from([b"x1", b"x2", b"x3"]), fields=st.lists(values, max_size=7),
          mtype=st.one_of(st.sampled_from([int(t) for t in P.MsgType]), ints), version=st.sampled_from([1, 1, 1, 0, 2]))
    def any_frame(self, peer, fields, mtype, version):
        self.feed(peer, frame([version, mtype, *fields]))

    @rule(command=st.sampled_from(sorted(COMMANDS) + ["nope"]), args=st.dictionaries(
        st.sampled_from(["page", "agents", "steps", "warmup_steps", "timeout_s", "duration_s", "x"]), values, max_size=4),
          request_id=ints)
    def control(self, command, args, request_id):
        self.feed(b"ctl", frame([1, int(P.MsgType.CONTROL), request_id, command, args]))

    @rule(peer=st.sampled_from([b"x1", b"x2"]), data=st.binary(max_size=64))
    def garbage(self, peer, data):
        self.feed(peer, data)

    @rule(peer=st.sampled_from([b"a1", b"a2"]))
    def hostile_agent_joins(self, peer):
        self.feed(peer, P.encode(P.Hello(peer.decode(), "hostile", 2)))
        self.feed(peer, P.encode(P.Heartbeat()))

    @rule(peer=st.sampled_from([b"a1", b"a2"]), action=actions, extra=st.lists(values, max_size=2))
    def hostile_action(self, peer, action, extra):
        tick = self.registered.get(peer, 0)
        self.feed(peer, frame([1, int(P.MsgType.ACTION), tick, action, 0, *extra][:6]))

    @rule(count=st.integers(1, 3))
    def hostile_host_joins(self, count):
        self.feed(b"hh", P.encode(P.HostHello("hh", "hostile", 3, "m", 0, count)))
        self.feed(b"hh", P.encode(P.Heartbeat()))

    @rule(rows=arrays, tick_off=st.sampled_from([0, 0, 0, 1, -1]))
    def hostile_host_action(self, rows, tick_off):
        tick = max(0, self.registered.get(b"hh", 0) + tick_off)
        self.feed(b"hh", frame([1, int(P.MsgType.HOST_ACTION), tick, rows, 0]))

    @rule(peer=st.sampled_from([b"a1", b"x1", b"hh"]))
    def leaves(self, peer):
        self.feed(peer, P.encode(P.Bye("fuzz")))
        self.registered.pop(peer, None)

    # --- the honest ones, and time ------------------------------------------------------

    def honest_turn(self, seconds: float) -> None:
        """``seconds`` pass as the honest agents live them: each quarter second they answer
        what is outstanding (with a value of the action space) or say they are alive."""
        left = seconds
        while left > 0:
            chunk = min(left, 0.25)
            left -= chunk
            for peer, obs in list(self.honest.items()):
                if obs is not None and obs.tick not in self.answered.get(peer, ()):
                    value = self.act_space.sample(np.random.default_rng(obs.tick))
                    action = value if isinstance(self.act_space, Discrete) else np.asarray(value)
                    self.answered.setdefault(peer, set()).add(obs.tick)
                    self.feed(peer, P.encode(P.Action(obs.tick, action, 10)))
                else:
                    self.feed(peer, P.encode(P.Heartbeat()))
            self.core.on_timer(self.clock.advance(chunk))            # must never raise
            self.collect()

    @rule(seconds=st.sampled_from([0.01, 0.3, 1.1, 2.5]))
    def time_passes(self, seconds):
        before = {p: (o.tick if o is not None else -1) for p, o in self.honest.items()}
        self.honest_turn(seconds + 1.25)                             # past any deadline: a tick closed
        for peer, obs in self.honest.items():                        # the honest agents were never held up
            assert obs is not None and obs.tick > before[peer], (peer, before[peer], obs)
        assert {"h0", "h1"} <= set(self.core.agents)

    @invariant()
    def ledger_balances(self):
        if hasattr(self, "core"):
            assert self.core.ledger.balanced(), self.core.ledger.snapshot()

    @invariant()
    def state_bounded_by_peers(self):
        if hasattr(self, "core"):
            assert len(self.core.agents) <= 2 + 2 + 3 and len(self.core.hosts) <= 1
            assert len(self.core.outbox._frames) == 0


def _machine(world: str, scope: str = "world"):
    machine = type(f"CoreFuzz_{world}_{scope}", (CoreFuzz,), {"WORLD": world, "SCOPE": scope})
    machine.TestCase.settings = FUZZ
    return machine.TestCase


TestCoreGrid = _machine("grid")
TestCoreGridArenas = _machine("grid", "arena")
TestCorePettingZooDiscrete = _machine("pettingzoo-discrete")
TestCorePettingZooBox = _machine("pettingzoo-box")
TestCoreTmaze = _machine("pymdp-tmaze")


# --- a hostile coordinator, to an agent -----------------------------------------------------

space_maps = st.one_of(
    st.fixed_dictionaries({"type": st.just("discrete"), "n": ints}),
    st.fixed_dictionaries({"type": st.just("multi_discrete"), "nvec": st.lists(ints, min_size=0, max_size=34)}),
    st.fixed_dictionaries({"type": st.just("array"), "shape": st.lists(ints, max_size=9),
                           "dtype": st.sampled_from(DTYPES + ["<c16", "O", "|S3", "x"]),
                           "low": st.one_of(st.none(), floats, ints), "high": st.one_of(st.none(), floats, ints)}),
    values)
model_arrays = st.lists(hnp.arrays(dtype=st.sampled_from(["<f8", "<f4", "<i8", "|u1"]),
                                   shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=6)), max_size=8)
models = st.fixed_dictionaries({"A": model_arrays, "B": model_arrays, "C": model_arrays, "D": model_arrays},
                               optional={"control_factors": st.lists(ints, max_size=8)})
worlds = st.one_of(
    st.fixed_dictionaries({"kind": st.text(max_size=8), "spaces": st.fixed_dictionaries(
        {"observation": space_maps, "action": space_maps})}, optional={"model": st.one_of(models, values)}),
    st.fixed_dictionaries({"width": ints, "height": ints, "obstacles": st.lists(ints, max_size=6),
                           "goals": st.lists(ints, max_size=6), "outcomes": st.lists(st.text(max_size=4), max_size=6),
                           "actions": st.lists(st.text(max_size=4), max_size=6)}),
    values)
observations = st.one_of(st.lists(ints, max_size=4), arrays, values)

#: what an agent may take while it refuses or steps (docs/security.md: estimated before
#: allocating, 1 GiB by default; the fuzzer holds the kinds to 200 MB)
MAX_MB = 200


def _kind(name: str):
    from agentbus_zmq.agents.kinds import create

    return create(name, max_model_mb=MAX_MB) if name in ("explorer", "learner") else create(name)


@pytest.mark.parametrize("kind", ["null", "random", "learner", "explorer"])
def test_every_kind_refuses_a_hostile_welcome_or_observation_with_its_typed_error(kind):
    if kind in ("learner", "explorer"):
        _kind(kind).prepare()                        # pymdp imported once, outside the measured runs

    @FUZZ
    @given(world=worlds, obs=st.lists(observations, min_size=1, max_size=3), info=values)
    def run(world, obs, info):
        agent = _kind(kind)
        tracemalloc.start()
        try:
            try:
                agent.on_start(P.Welcome("evil", "a1", {"world": world}))
            except BadWelcome:
                return
            try:
                space = spaces_of(P.Welcome("evil", "a1", {"world": world}))[1]
            except BadWelcome:
                space = None
            for value in obs:
                try:
                    action = agent.step(value)
                except BadObservation:
                    continue
                if space is not None and kind != "null":
                    assert space.contains(action), (action, space)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak < MAX_MB << 20, f"{kind} reached {peak / 2**20:.0f} MB"

    run()


@FUZZ
@given(frames=st.lists(st.one_of(st.binary(max_size=80),
                                 st.builds(lambda t, f: frame([1, t, *f]), st.sampled_from([int(t) for t in P.MsgType]),
                                           st.lists(values, max_size=6))), max_size=12))
def test_the_agent_session_takes_any_frame_from_a_hostile_coordinator(frames):
    s = AgentSession("a1", "test", 7)
    s.connect(0.0)
    now = 0.0
    for data in frames:
        now += 0.1
        s.receive(data, now)                          # an event, a BadFrame, or None: never an exception
        s.on_timer(now)
        for out in s.take_outbox():
            P.decode(out)                             # and it only ever sends valid frames
