"""The world's door and its faults kept in their arena (issue #26), driven without
sockets: actions checked against the action space, what a world hands out checked
against its own, an exception out of any world method contained to its arena, a tick
closed only once its moves are applied.  Time is a number the test advances."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.clock import FakeClock
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.bus.spaces import Array, Discrete, MultiDiscrete
from agentbus_zmq.coordinator.core import CoordinatorCore, Settings
from agentbus_zmq.coordinator.door import Door
from agentbus_zmq.coordinator.grid import GridWorld, WorldConfig
from agentbus_zmq.coordinator.guard import FAULT_WINDOW_S
from agentbus_zmq.coordinator.worlds import WorldSpec

pytestmark = pytest.mark.unit

SPREAD = "pettingzoo:mpe2.simple_spread_v3"


class Harness:
    def __init__(self, world=None, **kw):
        self.clock = FakeClock()
        world = world if world is not None else GridWorld(WorldConfig(seed=1))
        self.core = CoordinatorCore(Settings(**kw), world, "test", clock=self.clock)

    def send(self, peer: bytes, msg) -> list:
        self.core.on_frames(peer, [P.encode(msg)], self.clock.now())  # through the codec, as a peer's bytes come
        return self.take()

    def take(self) -> list:
        return [(peer, P.decode(frame)) for peer, frame in self.core.take_outbox()]

    def advance(self, seconds: float) -> list:
        self.core.on_timer(self.clock.advance(seconds))
        return self.take()

    def join(self, peer: bytes, agent_id: str) -> list:
        self.send(peer, P.Hello(agent_id, "test", 1))
        return self.send(peer, P.Heartbeat())

    def host(self, peer: bytes, host_id: str, count: int) -> list:
        self.send(peer, P.HostHello(host_id, "test", 1, f"{host_id}-", 0, count))
        return self.send(peer, P.Heartbeat())


def errors(out, peer=None) -> list:
    return [m for p, m in out if type(m) is P.Error and (peer is None or p == peer)]


def last_obs(out, peer):
    obs = [m for p, m in out if p == peer and type(m) in (P.Observation, P.HostObservation)]
    return obs[-1] if obs else None


# --- the door itself ----------------------------------------------------------------------


@pytest.mark.parametrize("space, value, words", [
    (Discrete(5), np.array([1, 2]), "one integer in [0, 5)"),
    (Discrete(5), np.array(np.inf), "one integer"),
    (Discrete(6), 99, "[0, 6)"),
    (Discrete(5), np.array(3), "one integer"),               # an array even of one value: ints travel as ints
    (Array((5,), "<f4", -1.0, 1.0), 4, "shape [5]"),
    (Array((5,), "<f4", -1.0, 1.0), np.zeros((5, 1), np.float32), "shape [5]"),
    (Array((5,), "<f4", -1.0, 1.0), np.full(5, np.nan, np.float32), "not finite"),
    (Array((5,), "<f4", -1.0, 1.0), np.full(5, 2.0), "out of"),
    (Array((5,), "<f4"), np.array([0, 0, np.inf, 0, 0]), "not finite"),
    (Array((2,), "<i4", 0, 10), np.array([0.5, 1.0]), "dtype"),
    (Array((2,), "<i4"), np.array([2**40, 0]), "out of"),     # would not fit the space's dtype
    (MultiDiscrete((3, 4)), np.array([2, 4]), "out of nvec"),
    (MultiDiscrete((3, 4)), np.array([True, False]), "dtype"),
])
def test_the_door_refuses_what_is_not_a_value_of_the_action_space(space, value, words):
    checked, reason = Door(space).action(value)
    assert checked is None and words in reason


@pytest.mark.parametrize("space, value", [
    (Discrete(5), 4), (Array((5,), "<f4", -1.0, 1.0), np.array([0, 1, 0, -1, 0])),
    (Array((2,), "<f8"), np.array([1e300, -1e300])), (MultiDiscrete((3, 4)), np.array([2, 3], np.uint8)),
])
def test_the_door_lets_values_of_the_space_through_cast_to_its_dtype(space, value):
    checked, reason = Door(space).action(value)
    assert reason is None and space.contains(checked)
    if isinstance(space, Array):
        assert checked.dtype == np.dtype(space.dtype)


def test_a_hosts_rows_are_checked_one_by_one_and_its_dtype_as_a_whole():
    door = Door(Discrete(5))
    actions, bad, reason = door.actions(np.array([1, 7, 4, 9], np.int64), 4)
    assert bad.tolist() == [False, True, False, True] and "2 of 4" in reason and "7" in reason
    for wrong in (np.array([1.0, 2.0]), np.array([True, False]), np.zeros((2, 2), np.int64), np.array([1, 2, 3])):
        _, bad, reason = door.actions(wrong, 2)
        assert bad.all() and reason
    box = Door(Array((2,), "<f4", -1.0, 1.0))
    rows, bad, reason = box.actions(np.array([[0, 0], [np.nan, 0], [0.5, 3.0]]), 3)
    assert bad.tolist() == [False, True, True] and rows.dtype == np.float32


# --- findings: one bad action stopped the bus ------------------------------------------------


@pytest.mark.parametrize("scope", ["world", "arena"])
def test_an_array_action_in_the_grid_is_refused_and_the_ticks_go_on(scope):
    h = Harness(lockstep_scope=scope)
    h.join(b"p1", "a1")
    h.join(b"p2", "a2")
    out = h.send(b"p1", P.Action(0, np.array([1, 2]), 0))
    (err,) = errors(out, b"p1")
    assert err.code == ErrorCode.BAD_FIELD and "one integer in [0, 5)" in err.reason and "default" in err.reason
    assert h.core.tick == 1 and last_obs(out, b"p1").tick == 1        # closed, applied (stay), the next one sent
    for tick in range(1, 4):
        h.send(b"p1", P.Action(tick, 0, 0))
        h.send(b"p2", P.Action(tick, 0, 0))
    assert h.core.tick == 4 and h.core.ledger.balanced()
    row = {r.id: r for r in h.core.agents_page(0, h.clock.now()).agents}["a1"]
    assert row.bad_actions == 1 and h.core.ledger.errors["bad_actions"] == 1


@pytest.mark.parametrize("scope", ["world", "arena"])
def test_a_bad_action_in_a_tick_closed_at_its_deadline_does_not_stop_the_coordinator(scope):
    h = Harness(lockstep_scope=scope, deadline=1.0)
    h.join(b"p1", "a1")
    h.join(b"mute", "m1")                    # registered, never answers: the tick closes at its deadline
    h.send(b"p1", P.Action(0, 0, 0))         # tick 0 held a1 alone
    h.send(b"p1", P.Action(1, np.array([1, 2]), 0))
    out = h.advance(1.5)                     # on_timer closes tick 1 with the refused action's default
    assert h.core.tick == 2 and last_obs(out, b"p1").tick == 2
    h.send(b"p1", P.Action(2, 1, 0))
    h.advance(1.5)
    assert h.core.tick == 3 and h.core.ledger.balanced()


def test_a_hosts_float_bool_or_2d_actions_are_refused_with_the_default_applied():
    h = Harness()
    out = h.host(b"h", "h1", 3)
    tick = last_obs(out, b"h").tick
    for wrong in (np.array([1.0, 2.0, 3.0]), np.array([True, False, True]), np.zeros((3, 2), np.int64),
                  np.array([1, 2, 5])):
        out = h.send(b"h", P.HostAction(tick, wrong, 0))
        (err,) = errors(out, b"h")
        assert err.code == ErrorCode.BAD_FIELD and "HOST_ACTION" in err.reason
        tick = last_obs(out, b"h").tick
    assert h.core.tick == 4 and h.core.ledger.balanced()
    assert {r.bad_actions for r in h.core.agents_page(0, h.clock.now()).agents} == {3 + 3 + 3 + 1}


def test_inf_and_out_of_range_actions_in_a_pettingzoo_world_are_refused():
    h = Harness(WorldSpec(SPREAD, {"N": 3, "seed": 0}).build())
    h.join(b"p1", "a1")
    for tick, wrong in enumerate((np.array(np.inf), 99, np.array([1.0]))):
        out = h.send(b"p1", P.Action(tick, wrong, 0))
        (err,) = errors(out, b"p1")
        assert err.code == ErrorCode.BAD_FIELD
    assert h.core.tick == 3 and h.core.world.figures()["faults"] == 0


def test_an_integer_into_a_box_action_space_is_refused():
    h = Harness(WorldSpec(SPREAD, {"N": 3, "seed": 0, "continuous_actions": True}).build())
    h.join(b"p1", "a1")
    out = h.send(b"p1", P.Action(0, 4, 0))
    assert errors(out, b"p1")[0].code == ErrorCode.BAD_FIELD and "shape [5]" in errors(out)[0].reason
    out = h.send(b"p1", P.Action(1, np.full(5, 0.5, np.float32), 0))
    assert errors(out) == [] and h.core.tick == 2


# --- findings: a world with an ordinary bug froze the bus -------------------------------------


class FaultyGrid(GridWorld):
    """A grid whose arena ``bad`` raises in ``method`` once armed."""

    def __init__(self, method: str = "move_many", bad: int = 0, **config):
        super().__init__(WorldConfig(seed=1, **config))
        self.method, self.bad, self.armed, self.resets = method, bad, False, []

    def _check(self, method: str, slots) -> None:
        if self.armed and method == self.method and self.bad in self.arena[np.asarray(slots, np.int64)].tolist():
            raise RuntimeError(f"bug in {method}")

    def move_many(self, slots, actions):
        self._check("move_many", slots)
        super().move_many(slots, actions)

    def move(self, slot, action):
        self._check("move", [slot])
        super().move(slot, action)

    def observe(self, slot):
        self._check("observe", [slot])
        return super().observe(slot) if self.method != "garbage" or not self.armed else [10**6, -1]

    def reset_arena(self, arena):
        self.resets.append(arena)
        super().reset_arena(arena)


def _two_arenas(method: str, mode: str = "lockstep", scope: str = "world"):
    h = Harness(FaultyGrid(method, arena_agents=1), mode=mode, lockstep_scope=scope, deadline=1.0)
    h.join(b"p0", "a0")
    h.join(b"p1", "a1")
    assert h.core.world.arena_of(h.core.agents["a0"].slot) == 0 and h.core.world.arena_of(h.core.agents["a1"].slot) == 1
    return h


def _step_both(h, ticks: int, pending: dict) -> dict:
    """Answer every outstanding observation ``ticks`` times; returns the last observations."""
    for _ in range(ticks):
        out = []
        for peer in list(pending):
            if peer in {u.peer for u in h.core.registry.by_peer.values()}:
                out += h.send(peer, P.Action(pending[peer].tick, 0, 0))
        out += h.advance(1.1)
        for peer in list(pending):
            obs = last_obs(out, peer)
            if obs is not None:
                pending[peer] = obs
    return pending


@pytest.mark.parametrize("method, mode, scope", [("move_many", "lockstep", "world"), ("move_many", "lockstep", "arena"),
                                                 ("move", "async", "world"), ("observe", "lockstep", "world")])
def test_a_world_that_raises_in_one_arena_leaves_the_other_stepping_and_names_itself(caplog, method, mode, scope):
    h = _two_arenas(method, mode, scope)
    pending = {b"p0": P.Observation(0, []), b"p1": P.Observation(0, [])}
    pending = _step_both(h, 2, pending)
    before = h.core.agents["a1"].steps
    h.core.world.inner.armed = True
    with caplog.at_level(logging.ERROR, logger="agentbus_zmq.coordinator.guard"):
        pending = _step_both(h, 4, pending)
    assert h.core.agents["a1"].steps >= before + 3                      # the other arena never stopped
    world = h.core.world
    assert world.faults >= 3 and 0 in world.closed and 1 not in world.closed
    assert "a0" not in h.core.agents                                    # closed: its agent dropped ...
    text = caplog.text
    assert "FaultyGrid" in text and ("bug in" in text or "observe" in text) and "closed" in text
    assert text.count("Traceback") <= 1                                 # ... the traceback logged once
    out = h.send(b"p0", P.Hello("a0", "test", 1))                       # placed in the closed arena: refused
    assert errors(out)[0].code == ErrorCode.WORLD_FULL and "closed" in errors(out)[0].reason
    h.core.world.inner.armed = False
    h.clock.advance(FAULT_WINDOW_S)
    out = h.send(b"p0", P.Hello("a0", "test", 1))                       # reopened, reset
    assert [type(m) for _, m in out] == [P.Welcome] and 0 not in world.closed
    assert h.core.ledger.balanced()


def test_agents_of_a_closed_arena_are_told_world_fault():
    h = _two_arenas("move_many")
    h.core.world.inner.armed = True
    told = []
    pending = {b"p0": P.Observation(0, []), b"p1": P.Observation(0, [])}
    for _ in range(4):
        for peer in (b"p0", b"p1"):
            if peer in {u.peer for u in h.core.registry.by_peer.values()}:
                told += h.send(peer, P.Action(pending[peer].tick, 0, 0))
        out = h.advance(1.1)
        told += out
        for peer in pending:
            if (obs := last_obs(out, peer)) is not None:
                pending[peer] = obs
    faults = [m for p, m in told if p == b"p0" and type(m) is P.Error and m.code == ErrorCode.WORLD_FAULT]
    assert len(faults) == 1 and "arena 0 closed" in faults[0].reason and "move_many" in faults[0].reason
    assert h.core.world.inner.resets == [0, 0]                          # reset twice, then closed
    assert h.core.ledger.errors["world_fault"] == 1


def test_a_host_spanning_arenas_loses_only_the_members_of_the_closed_one():
    world = FaultyGrid("move_many", arena_agents=2)
    h = Harness(world, deadline=1.0)
    out = h.host(b"h", "h1", 4)                                          # two members in arena 0, two in arena 1
    obs = last_obs(out, b"h")
    world.armed = True
    for _ in range(4):
        out = h.send(b"h", P.HostAction(obs.tick, np.zeros(len(obs.members), np.int64), 0))
        if (o := last_obs(out, b"h")) is not None:
            obs = o
        out = h.advance(0.01)
        if (o := last_obs(out, b"h")) is not None:
            obs = o
    assert 0 in h.core.world.closed and sorted(h.core.agents) == ["h1-2", "h1-3"]
    assert h.core.hosts["h1"].state.value in ("idle", "stepping")
    out = h.send(b"h", P.HostAction(obs.tick, np.zeros(len(obs.members), np.int64), 0))
    assert len(last_obs(out, b"h").members) == 2


@pytest.mark.parametrize("garbage", [[10**6, 0], [-1, 0], [1.5, 0], "cell", [1 << 70, 0]])
def test_an_observation_out_of_the_space_is_the_worlds_fault_and_never_sent(garbage):
    class Garbage(GridWorld):
        def observe(self, slot):
            return garbage

    h = Harness(Garbage(WorldConfig(seed=1)), deadline=1.0)
    out = h.join(b"p0", "a0")                                  # its first observation, at once
    assert out == []                                           # nothing sent in its place
    assert h.core.world.faults >= 2 and h.core.world.by_method["observe (value)"] >= 2
    h.advance(1.1)                                             # the step counts missing; the third fault closes it
    assert 0 in h.core.world.closed and "a0" not in h.core.agents and h.core.ledger.balanced()


def test_a_reward_that_is_not_finite_is_the_worlds_fault():
    class NaNReward(GridWorld):
        has_info = True

        def info(self, slot):
            return {"reward": float("nan"), "episode": 0}

    h = Harness(NaNReward(WorldConfig(seed=1)))
    out = h.join(b"p0", "a0")
    assert not [m for _, m in out if type(m) is P.Observation] and h.core.world.faults == 2


def test_a_world_whose_reset_fails_is_closed_at_once():
    class NoReset(FaultyGrid):
        def reset_arena(self, arena):
            raise NotImplementedError

    h = Harness(NoReset("move_many", arena_agents=1), deadline=1.0)
    h.join(b"p0", "a0")
    h.join(b"p1", "a1")
    h.core.world.inner.armed = True
    h.send(b"p0", P.Action(0, 0, 0))       # tick 0 held a0 alone: its move raises, and so does the reset
    h.advance(0.01)
    assert 0 in h.core.world.closed and "a0" not in h.core.agents and "a1" in h.core.agents


def test_world_figures_and_state_hash_that_raise_cost_nothing_but_a_count():
    class Broken(GridWorld):
        def figures(self):
            raise KeyError("figures")

    h = Harness(Broken(WorldConfig(seed=1)))
    stats = h.core.stats(0.0)
    assert stats.world["faults"] == 1 and stats.world["kind"] == "grid" and h.core.world.state_hash()


# --- the driver survives what the core raises ------------------------------------------------


def test_the_driver_survives_timers_that_raise_and_exits_only_when_they_keep_raising(tmp_path, caplog):
    from agentbus_zmq.coordinator import driver as D

    core = CoordinatorCore(Settings(), GridWorld(WorldConfig(seed=1)), "t")
    d = D.Driver(core, f"ipc://{tmp_path}/d.ipc")
    calls = {"n": 0}
    real = core.on_timer

    def flaky(now):
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("a bug in the timers")
        real(now)

    try:
        core.on_timer = flaky
        with caplog.at_level(logging.ERROR, logger="agentbus_zmq.coordinator.driver"):
            for _ in range(2 * D.CORE_FAILURES_TO_EXIT):      # every other turn raises: it goes on
                d.run_once(0.0)
        assert core.ledger.errors["UNEXPECTED"] == D.CORE_FAILURES_TO_EXIT
        core.on_timer = lambda now: (_ for _ in ()).throw(RuntimeError("broken for good"))
        with pytest.raises(D.CoreFailed, match="broken for good"):
            for _ in range(D.CORE_FAILURES_TO_EXIT + 1):
                d.run_once(0.0)
    finally:
        d.close()


def test_a_hosts_narrow_integer_actions_take_a_wider_default():
    """int8 actions in a world of 300 actions whose default is 299: promoted, not overflowed."""
    door = Door(Discrete(300))
    checked, bad, reason = door.actions(np.array([1, -5, 3], np.int8), 3)
    assert bad.tolist() == [False, True, False] and "the first -5 (row 1)" in reason
    assert Door.fill(checked, bad, [299]).tolist() == [1, 299, 3]


def test_control_agents_with_a_null_page_is_refused_not_raised():
    """Found by the fuzzer: CONTROL agents with {"page": null} raised TypeError in the core."""
    h = Harness()
    h.join(b"p1", "a1")
    out = h.send(b"ctl", P.Control(7, "agents", {"page": None}))
    (reply,) = [m for _, m in out if type(m) is P.Reply]
    assert reply.request_id == 7 and not reply.ok and "page must be a non-negative integer" in reply.result["error"]
    (ok,) = [m for _, m in h.send(b"ctl", P.Control(8, "stats", {"page": None})) if type(m) is P.Reply]
    assert ok.ok                                     # stats' page may be left out, or null
