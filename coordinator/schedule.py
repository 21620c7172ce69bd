"""When units get observations: the :class:`Schedule` interface and its two schedules.

``lockstep`` (:class:`Lockstep`): tick *t* sends an observation to every ready unit; it
closes when all of them answered or its deadline passed; the world then applies the
tick's actions at once and tick *t+1* starts.  Units that become ready during a tick
take part from the next one.

``async`` (:class:`Async`): each unit gets its next observation as soon as its action(s)
are applied; an observation unanswered after the deadline is counted missing and
replaced by a new one (with the next tick number).

In both, an ACTION that arrives after its deadline is late, whether or not the timer
has run yet: the facade expires what is due before it hands any answer over.  Every
action passes the world's door (:mod:`.door`) before the world sees it: one that is not
a value of the action space is refused (BAD_FIELD, counted per unit) and the world's
default action is applied in its place.  The world is the registry's
:class:`~agentbus_zmq.coordinator.guard.GuardedWorld`: nothing it does can raise here.

A schedule owns the tick, what is outstanding and when it is due, the step fields of
the ledger and the step timings; it reads the registry's units and tells the registry
when agents step for the first time, the liveness part when a unit strikes, and the
measurement windows what happens, never the other way round.
"""

from __future__ import annotations

import abc
import collections
import math

import numpy as np

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.logs import PeerLog
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.coordinator.door import Door
from agentbus_zmq.coordinator.ledger import Ledger, Timings
from agentbus_zmq.coordinator.liveness import Liveness
from agentbus_zmq.coordinator.outbox import Outbox
from agentbus_zmq.coordinator.registry import Registry
from agentbus_zmq.coordinator.settings import Settings
from agentbus_zmq.coordinator.units import (ANSWER, EXPIRE, IDLE, OBSERVE, OBSERVE_ALL, STEPPING, STEP_TIMES, AgentEntry, HostEntry,
                                            Unit, owed)
from agentbus_zmq.coordinator.window import Windows

__all__ = ["Schedule", "Lockstep", "Async", "SCHEDULES", "COMPUTE_SLACK_US", "apply_moves"]

#: How far an agent's compute_us may exceed the time the coordinator waited for its
#: answer (clock granularity) before it is counted as a bad report and clamped.
COMPUTE_SLACK_US = 1000


class Schedule(abc.ABC):
    """What both schedules share: sending observations and accepting answers.  The
    abstract methods are what makes one schedule differ from another."""

    mode = ""

    def __init__(self, settings: Settings, registry: Registry, ledger: Ledger, timings: Timings, outbox: Outbox,
                 liveness: Liveness, windows: Windows, plog: PeerLog):
        self.settings = settings
        self.registry = registry
        self.world = registry.world
        self.ledger = ledger
        self.timings = timings
        self.outbox = outbox
        self.liveness = liveness
        self.windows = windows
        self._plog = plog
        self._slow_fraction = settings.slow_fraction
        #: the door for actions; a discrete world's size, checked inline on the hot path
        self._door = Door(self.world.spaces()[1])
        self._n_actions = self._door.n
        #: lock-step ticks closed (async: 0)
        self.tick = 0
        #: earliest time a deadline may be due (may be early, never late)
        self.due = math.inf
        self.stopping = False

    # --- the interface the facade calls --------------------------------------------------

    @abc.abstractmethod
    def on_ready(self, unit: Unit, now: float) -> None:
        """``unit`` (just marked ready) may be scheduled."""

    @abc.abstractmethod
    def on_action(self, entry: AgentEntry, msg: P.Action, now: float) -> None:
        """An agent's ACTION (whatever is due has been expired): accepted, late or stale."""

    @abc.abstractmethod
    def on_host_action(self, host: HostEntry, msg: P.HostAction, now: float) -> None:
        """A host's HOST_ACTION: accepted, late, stale, or refused for its length."""

    def _host_answer(self, host: HostEntry, msg: P.HostAction, now: float) -> np.ndarray | None:
        """The actions of the members still owed (None: refused, late or stale).  A host may
        answer the frame as listed, or leave out the members it said HOST_BYE for; actions
        of members that left since the frame was sent (moved elsewhere) are not applied."""
        if host.state is not STEPPING or msg.tick != host.pending:
            self._late_or_stale(host, msg.tick, now)
            return None
        n, actions = len(host.pending_idx), msg.actions
        if len(actions) != n:
            if len(actions) != len(host.sent_idx):
                self.outbox.reject(host.peer, ErrorCode.BAD_FIELD, f"HOST_ACTION for tick {msg.tick} has "
                                   f"{len(actions)} actions; the observation listed {len(host.sent_idx)} members"
                                   f"{f', {n} still here' if n != len(host.sent_idx) else ''}", now)
                return None
            actions = actions[np.isin(host.sent_idx, host.pending_idx, assume_unique=True)]
        self._accept(host, n, msg.compute_us, now, msg.cpu_us)
        checked, bad, reason = self._door.actions(actions, n)
        if bad is None:
            return checked
        host.bad_actions += int(bad.sum())
        self.ledger.errors["bad_actions"] += int(bad.sum())
        self.outbox.reject(host.peer, ErrorCode.BAD_FIELD, f"HOST_ACTION for tick {msg.tick}: {reason}; the "
                           f"world's default action was applied for those members", now)
        slots = host.slots[host.pending_idx]
        return self._door.fill(checked, bad, [self.world.default_action(s) for s in
                                              (slots if checked is None else slots[bad]).tolist()])

    def _door_action(self, entry: AgentEntry, msg: P.Action, now: float):
        """An agent's action through the door: itself, or (refused) the world's default."""
        value, reason = self._door.action(msg.action)
        if reason is None:
            return value
        entry.bad_actions += 1
        self.ledger.errors["bad_actions"] += 1
        self.outbox.reject(entry.peer, ErrorCode.BAD_FIELD, f"ACTION for tick {msg.tick}: {reason}; the world's "
                           f"default action was applied", now)
        return self.world.default_action(entry.slot)

    def withdraw(self, unit: Unit, keep_position: bool) -> None:
        """``unit`` leaves: what it owes counts missing; it is awaited no more."""
        if unit.state is STEPPING:
            self._count_missing(owed(unit))

    def withdraw_member(self, host: HostEntry, index: int) -> None:
        """One member of ``host`` leaves: a step it owes in the outstanding frame is missing."""
        if host.state is STEPPING:
            hit = host.pending_idx == index
            if hit.any():
                host.pending_idx = host.pending_idx[~hit]
                self._count_missing(1)

    def settle(self, now: float) -> None:
        """After units left: go on without them."""

    @abc.abstractmethod
    def expire_due(self, now: float) -> None:
        """Expire every observation whose deadline has passed; recompute ``due``."""

    def stop(self) -> None:
        self.stopping = True

    def _tick_closed(self) -> None:
        """A lock-step tick closed (of the world, or of one cohort of arenas)."""
        self.tick += 1

    # --- shared ----------------------------------------------------------------------

    def _send_observation(self, unit: Unit, tick: int, now: float) -> None:
        """The observation for ``tick`` to ``unit`` (moved to STEPPING by the caller)."""
        unit.pending = tick
        unit.sent_at = now
        world = self.world
        try:
            if type(unit) is AgentEntry:
                n = 1
                got = world.observation(unit.slot)
                frame = P.encode_observation(tick, *got) if got is not None else None
            else:
                unit.pending_idx = unit.sent_idx = unit.live_idx
                n = len(unit.live_idx)
                got = world.observations(unit.live_slots)
                frame = P.encode_host_observation(tick, unit.members_ext, *got) if got is not None else None
        except (TypeError, ValueError, OverflowError) as exc:  # what the world handed out cannot be packed
            world.unsendable(unit.slot if type(unit) is AgentEntry else unit.live_slots, exc)
            frame = None
        ledger = self.ledger
        ledger.sent += n
        ledger.outstanding += n
        m = self.windows.current
        if m is not None:
            m.on_sent(n)
        if frame is not None:  # None: the world failed in its arena (the step counts missing at its deadline)
            self.outbox.send(unit, frame, now)

    def _accept(self, unit: Unit, n: int, compute_us: int, now: float, cpu_us: int | None) -> None:
        """``n`` agent-steps answered in time: the ledger, the unit, the measurement."""
        ANSWER(unit)
        unit.steps += n
        unit.answers += 1
        waited = now - unit.sent_at
        if compute_us > waited * 1e6 + COMPUTE_SLACK_US:  # it cannot have computed for longer than we waited
            self.ledger.errors["bad_compute_us"] += 1
            self._plog.warning(now, "%s reported compute_us %d for an answer that took %.0f us: counted as %.0f",
                               unit.name, compute_us, waited * 1e6, waited * 1e6)
            compute_us = int(waited * 1e6)
        cpu = compute_us if cpu_us is None or cpu_us > compute_us else cpu_us  # never more than the wall time
        timings = self.timings
        if cpu > timings.cpu_cap_us * n:  # more than agents' steps cost: counted as what they cost
            cpu = int(timings.cpu_cap_us * n)
            self.ledger.errors["cpu_us_capped"] += 1
        timings.agent_cpu_us += cpu
        ring = unit.times_n & (STEP_TIMES - 1)
        unit.times[ring] = compute_us // n
        unit.waits[ring] = int(waited * 1e6) // n
        unit.times_n += 1
        latency = timings.latency
        if latency is not None:
            us = waited * 1e6 - compute_us
            latency.record(us, n)
            timings.latency_sum_us += us * n
        ledger = self.ledger
        if waited > unit.deadline * self._slow_fraction:
            unit.slow += 1
            ledger.slow += n
            self.liveness.strike(unit)
        elif unit.strikes:
            self.liveness.clear(unit)
        first = unit.first_step_at is None
        if first:
            unit.first_step_at = now
            self.registry.first_step(unit, n)
        ledger.outstanding -= n
        ledger.received += n
        m = self.windows.current
        if m is not None:
            m.on_received(waited * 1e6 - compute_us, compute_us, n, cpu)
            if first or not m.counting:
                m.advance(self.registry.ready, ledger.received, now)
            elif m.done(now):
                self.windows.close(now)

    def _late_or_stale(self, unit: Unit, tick: int, now: float) -> None:
        """An answer that is not for the outstanding observation: late if its
        observation expired recently, else refused."""
        for i, (expired, n, window) in enumerate(unit.overdue):
            if expired == tick:
                del unit.overdue[i]
                unit.late += 1
                self.ledger.missing -= n
                self.ledger.late += n
                if window is not None and window is self.windows.current:
                    window.on_late(n)
                return
        current = f"current {unit.pending}" if unit.state is STEPPING else "none is"
        self.outbox.reject(unit.peer, ErrorCode.STALE_TICK, f"no observation for tick {tick} is outstanding "
                                                            f"({current})", now)

    def _expire(self, unit: Unit) -> None:
        n = owed(unit)
        EXPIRE(unit)
        unit.missed += 1
        self.liveness.strike(unit)
        m = self.windows.current
        unit.overdue.append((unit.pending, n, m if m is not None and m.counting else None))
        self._count_missing(n)

    def _count_missing(self, n: int) -> None:
        self.ledger.outstanding -= n
        self.ledger.missing += n
        m = self.windows.current
        if m is not None:
            m.on_expired(n)



class Lockstep(Schedule):
    """Ticks: every ready unit observes, the tick closes when all answered or at the deadline."""

    mode = "lockstep"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.open = False
        self._opened_at = 0.0
        #: this tick's moves, agent slot -> action, and hosts' (host, member indices,
        #: actions): a member that leaves before the tick closes is skipped then
        self._moves: dict[int, int] = {}
        self._host_moves: list[tuple[HostEntry, np.ndarray, np.ndarray]] = []
        #: units whose answer to the open tick is still awaited
        self._expected: set[Unit] = set()

    def on_ready(self, unit: Unit, now: float) -> None:
        if not self.open:
            self._open_tick(now)

    def on_action(self, entry: AgentEntry, msg: P.Action, now: float) -> None:
        if entry.state is not STEPPING or msg.tick != entry.pending:
            self._late_or_stale(entry, msg.tick, now)
            return
        self._accept(entry, 1, msg.compute_us, now, msg.cpu_us)
        action = msg.action
        if type(action) is not int or action >= self._n_actions:  # the door; for a discrete world, inline
            action = self._door_action(entry, msg, now)
        self._moves[entry.slot] = action
        expected = self._expected
        expected.discard(entry)
        if not expected:
            self._close_tick(now)

    def on_host_action(self, host: HostEntry, msg: P.HostAction, now: float) -> None:
        if (actions := self._host_answer(host, msg, now)) is not None:
            self._host_moves.append((host, host.pending_idx, actions))
            self._expected.discard(host)
            if not self._expected:
                self._close_tick(now)

    def withdraw(self, unit: Unit, keep_position: bool) -> None:
        super().withdraw(unit, keep_position)
        self._expected.discard(unit)
        if not keep_position and type(unit) is AgentEntry:
            self._moves.pop(unit.slot, None)  # a move it sent this tick goes with it

    def settle(self, now: float) -> None:
        if self.open and not self._expected:
            self._close_tick(now)

    def expire_due(self, now: float) -> None:
        if self.open and now >= self.due:
            for unit in self._expected:
                self._expire(unit)
            self._expected = set()
            self._close_tick(now)  # sets `due` for the next tick

    def _open_tick(self, now: float) -> None:
        ready = [u for u in self.registry.by_peer.values() if u.state is IDLE]
        if not ready or self.stopping:
            self.open = False
            self.due = math.inf
            return
        self.open = True
        self._opened_at = now
        deadline = 0.0
        self._expected = set(ready)
        tick = self.tick
        OBSERVE_ALL(ready)
        for unit in ready:
            if unit.deadline > deadline:
                deadline = unit.deadline
            self._send_observation(unit, tick, now)
        self.due = now + deadline

    def _close_tick(self, now: float) -> None:
        tick_time = self.timings.tick_time
        if tick_time is not None:
            us = (now - self._opened_at) * 1e6
            tick_time.record(us)
            self.timings.tick_time_sum_us += us
        self._apply_moves()  # never raises (the world is guarded): the tick is closed once they are applied
        self.open = False
        self.ledger.ticks += 1
        m = self.windows.current
        if m is not None:
            m.on_tick()
        self.tick += 1
        self._open_tick(now)

    def _apply_moves(self) -> None:
        """The tick's actions, all at once, in slot (registration) order."""
        moves, self._moves = self._moves, {}
        host_moves, self._host_moves = self._host_moves, []
        apply_moves(self.world, moves, host_moves)


def apply_moves(world, moves: dict[int, int], host_moves: list) -> None:
    """One lock-step tick's actions, all at once, in slot (registration) order: agents'
    own (slot -> action) and hosts' ((host, member indices, actions); a member that left
    since its host answered is skipped)."""
    if host_moves and not world.discrete_actions:  # array actions: one value per slot, in slot order
        pairs = list(moves.items())
        for host, idx, acts in host_moves:
            still = host.live[idx]
            pairs += zip(host.slots[idx[still]].tolist(), list(acts[still]))
        pairs.sort(key=lambda p: p[0])
        world.move_many([p[0] for p in pairs], [p[1] for p in pairs])
    elif host_moves:
        slots = [np.fromiter(moves, np.int64, len(moves))]
        actions = [np.fromiter(moves.values(), np.int64, len(moves))]
        for host, idx, acts in host_moves:
            still = host.live[idx]
            slots.append(host.slots[idx[still]])
            actions.append(acts[still].astype(np.int64, copy=False))
        slots, actions = np.concatenate(slots), np.concatenate(actions)
        order = np.argsort(slots, kind="stable")
        world.move_many(slots[order], actions[order])
    elif moves:
        ordered = sorted(moves)
        world.move_many(ordered, [moves[s] for s in ordered])


class Async(Schedule):
    """Each unit steps on its own: answered, moved, observed again."""

    mode = "async"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        #: units with an outstanding observation, oldest first, one queue per deadline
        #: (a host's grows with its members): within a queue, send order is deadline order
        self._queues: dict[float, collections.OrderedDict[Unit, None]] = {}

    def on_ready(self, unit: Unit, now: float) -> None:
        self._observe(unit, unit.tick, now)

    def _observe(self, unit: Unit, tick: int, now: float) -> None:
        queue = self._queues.get(unit.deadline)
        if queue is None:
            queue = self._queues[unit.deadline] = collections.OrderedDict()
        if not queue and now + unit.deadline < self.due:
            self.due = now + unit.deadline
        queue[unit] = None
        OBSERVE(unit)
        self._send_observation(unit, tick, now)

    def on_action(self, entry: AgentEntry, msg: P.Action, now: float) -> None:
        if entry.state is not STEPPING or msg.tick != entry.pending:
            self._late_or_stale(entry, msg.tick, now)
            return
        self._accept(entry, 1, msg.compute_us, now, msg.cpu_us)
        del self._queues[entry.deadline][entry]
        action = msg.action
        if type(action) is not int or action >= self._n_actions:  # the door; for a discrete world, inline
            action = self._door_action(entry, msg, now)
        self.world.move(entry.slot, action)
        entry.tick += 1
        self._observe(entry, entry.tick, now)

    def on_host_action(self, host: HostEntry, msg: P.HostAction, now: float) -> None:
        if (actions := self._host_answer(host, msg, now)) is not None:
            del self._queues[host.deadline][host]
            self.world.move_many(host.slots[host.pending_idx], actions)
            host.tick += 1
            self._observe(host, host.tick, now)

    def withdraw(self, unit: Unit, keep_position: bool) -> None:
        super().withdraw(unit, keep_position)
        queue = self._queues.get(unit.deadline)
        if queue is not None:
            queue.pop(unit, None)

    def expire_due(self, now: float) -> None:
        due = math.inf
        for deadline, queue in self._queues.items():
            while queue:
                unit = next(iter(queue))
                if now - unit.sent_at < deadline:
                    break
                del queue[unit]
                self._expire(unit)
                unit.tick += 1
                self._observe(unit, unit.tick, now)  # re-queued at the end
            if queue:
                due = min(due, next(iter(queue)).sent_at + deadline)
        self.due = due


SCHEDULES: dict[str, type[Schedule]] = {s.mode: s for s in (Lockstep, Async)}
