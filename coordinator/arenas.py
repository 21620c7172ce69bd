"""Lock-step per arena (``--lockstep-scope arena``): the same guarantee, kept where it means
something.

Agents in different arenas share no world, so an arena's tick need not wait for another
arena's agents.  Units are grouped into *cohorts*: units whose arenas overlap, directly or
through others (a host whose members sit in two arenas joins them), tick together, exactly
as :class:`~agentbus_zmq.coordinator.schedule.Lockstep` ticks the whole world: tick *t*
sends an observation to every ready unit of the cohort, closes when all of them answered or
its deadline passed, applies their actions at once, and the cohort's tick *t+1* starts.
Different cohorts tick independently, each with its own tick numbers.

A unit that becomes ready joins the cohort holding its arenas (from that cohort's next
tick), starts a cohort of its own when none does, and when it spans several cohorts they
are merged: each finishes its open tick, and the merged cohort ticks once the last of
them has.  Cohorts only grow and merge while units stay; a cohort whose units have all left
is gone.  With one arena (the default grid holds 23 agents an arena) this is the world's
lock-step.
"""

from __future__ import annotations

import math

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.coordinator.schedule import Schedule, apply_moves
from agentbus_zmq.coordinator.units import IDLE, OBSERVE_ALL, STEPPING, AgentEntry, HostEntry, Unit

__all__ = ["ArenaLockstep"]


class _Cohort:
    """Units that tick together, and their tick."""

    __slots__ = ("units", "arenas", "open", "opened_at", "due", "serial", "expected", "moves", "host_moves",
                 "merge_into", "waiting_for")

    def __init__(self, serial: int = 0):
        self.units: set[Unit] = set()
        self.arenas: set[int] = set()
        self.open = False
        self.opened_at = 0.0
        self.due = math.inf
        #: the number of its next tick (what its observations carry)
        self.serial = serial
        #: units whose answer to the open tick is still awaited
        self.expected: set[Unit] = set()
        self.moves: dict[int, int] = {}
        self.host_moves: list = []
        #: a merge in progress: the cohort this one joins when its open tick closes, and
        #: (for that cohort) how many open ticks it waits for
        self.merge_into: _Cohort | None = None
        self.waiting_for = 0


class ArenaLockstep(Schedule):
    """Lock-step ticks per cohort of units that share arenas."""

    mode = "lockstep"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._cohort_of: dict[Unit, _Cohort] = {}
        self._by_arena: dict[int, _Cohort] = {}
        self._cohorts: set[_Cohort] = set()

    # --- membership -------------------------------------------------------------------

    def _arenas(self, unit: Unit) -> set[int]:
        if type(unit) is AgentEntry:
            return {int(self.world.arena_of(unit.slot))}
        return set(self.world.arenas_of(unit.live_slots).tolist())

    def on_ready(self, unit: Unit, now: float) -> None:
        arenas = self._arenas(unit)
        touched = {self._by_arena[a] for a in arenas if a in self._by_arena}
        if not touched:
            cohort = _Cohort()
            self._cohorts.add(cohort)
        elif len(touched) == 1:
            (cohort,) = touched
        else:
            cohort = self._merge(touched)
        cohort.units.add(unit)
        self._cohort_of[unit] = cohort
        for a in arenas:
            self._by_arena[a] = cohort
        cohort.arenas |= arenas
        if not cohort.open and not cohort.waiting_for:
            self._open_tick(cohort, now)

    def _merge(self, cohorts: set[_Cohort]) -> _Cohort:
        """One cohort for ``cohorts``: those between ticks join it now, those with a tick
        open join it when their tick closes (it opens once the last has)."""
        target = _Cohort(max(c.serial for c in cohorts))
        self._cohorts.add(target)
        for c in cohorts:
            if c.open:
                c.merge_into = target
                target.waiting_for += 1
            else:
                for feeder in self._cohorts:  # a merge already waiting: its feeders now feed the target
                    if feeder.merge_into is c:
                        feeder.merge_into = target
                target.waiting_for += c.waiting_for
                self._absorb(c, target)
        return target

    def _absorb(self, c: _Cohort, target: _Cohort) -> None:
        target.units |= c.units
        target.arenas |= c.arenas
        target.serial = max(target.serial, c.serial)
        for u in c.units:
            self._cohort_of[u] = target
        for a in c.arenas:
            if self._by_arena.get(a) is c:
                self._by_arena[a] = target
        self._cohorts.discard(c)

    def withdraw(self, unit: Unit, keep_position: bool) -> None:
        super().withdraw(unit, keep_position)
        cohort = self._cohort_of.pop(unit, None)
        if cohort is None:
            return
        cohort.expected.discard(unit)
        cohort.units.discard(unit)
        if not keep_position and type(unit) is AgentEntry:
            cohort.moves.pop(unit.slot, None)  # a move it sent this tick goes with it
        if not cohort.units and not cohort.open and not cohort.waiting_for:
            self._forget(cohort)

    def _forget(self, cohort: _Cohort) -> None:
        for a in cohort.arenas:
            if self._by_arena.get(a) is cohort:
                del self._by_arena[a]
        self._cohorts.discard(cohort)

    # --- answers ----------------------------------------------------------------------

    def on_action(self, entry: AgentEntry, msg: P.Action, now: float) -> None:
        if entry.state is not STEPPING or msg.tick != entry.pending:
            self._late_or_stale(entry, msg.tick, now)
            return
        self._accept(entry, 1, msg.compute_us, now, msg.cpu_us)
        action = msg.action
        if type(action) is not int or action >= self._n_actions:  # the door; for a discrete world, inline
            action = self._door_action(entry, msg, now)
        cohort = self._cohort_of[entry]
        cohort.moves[entry.slot] = action
        cohort.expected.discard(entry)
        if not cohort.expected:
            self._close_tick(cohort, now)

    def on_host_action(self, host: HostEntry, msg: P.HostAction, now: float) -> None:
        if (actions := self._host_answer(host, msg, now)) is not None:
            cohort = self._cohort_of[host]
            cohort.host_moves.append((host, host.pending_idx, actions))
            cohort.expected.discard(host)
            if not cohort.expected:
                self._close_tick(cohort, now)

    def settle(self, now: float) -> None:
        for cohort in list(self._cohorts):
            if cohort.open and not cohort.expected:
                self._close_tick(cohort, now)

    def expire_due(self, now: float) -> None:
        for cohort in list(self._cohorts):
            if cohort.open and now >= cohort.due:
                for unit in cohort.expected:
                    self._expire(unit)
                cohort.expected = set()
                self._close_tick(cohort, now)
        self.due = min((c.due for c in self._cohorts if c.open), default=math.inf)

    # --- ticks ------------------------------------------------------------------------

    def _open_tick(self, cohort: _Cohort, now: float) -> None:
        ready = [u for u in cohort.units if u.state is IDLE]
        if not ready or self.stopping:
            cohort.open, cohort.due = False, math.inf
            return
        cohort.open, cohort.opened_at = True, now
        cohort.expected = set(ready)
        OBSERVE_ALL(ready)
        deadline = 0.0
        for unit in ready:
            deadline = max(deadline, unit.deadline)
            self._send_observation(unit, cohort.serial, now)
        cohort.due = now + deadline
        self.due = min(self.due, cohort.due)  # the earliest may be early (expire_due recomputes), never late

    def _close_tick(self, cohort: _Cohort, now: float) -> None:
        tick_time = self.timings.tick_time
        if tick_time is not None:
            us = (now - cohort.opened_at) * 1e6
            tick_time.record(us)
            self.timings.tick_time_sum_us += us
        moves, cohort.moves = cohort.moves, {}
        host_moves, cohort.host_moves = cohort.host_moves, []
        apply_moves(self.world, moves, host_moves)  # never raises (the world is guarded)
        cohort.open, cohort.due = False, math.inf
        self.ledger.ticks += 1
        m = self.windows.current
        if m is not None:
            m.on_tick()
        cohort.serial += 1
        self._tick_closed()
        target = cohort.merge_into
        if target is not None:
            self._absorb(cohort, target)
            target.waiting_for -= 1
            if not target.waiting_for:
                if target.units:
                    self._open_tick(target, now)
                else:
                    self._forget(target)
            return
        if not cohort.units:
            self._forget(cohort)
            return
        self._open_tick(cohort, now)
