"""A world's faults kept in their arena: :class:`GuardedWorld`.

A world is user code running inside the coordinator.  The registry and the schedules
reach it only through :class:`GuardedWorld`, which implements the same
:class:`~agentbus_zmq.coordinator.world.World` interface over the user's world and
never lets an exception (or a value out of the world's spaces) out:

* a per-step call that raises, or returns an observation or reward that cannot travel,
  is a *fault* of the arena it was for: logged (the world's class, its method and, the
  first time for each method, the traceback), counted, and the arena is reset
  (:meth:`World.reset_arena`, a new episode); an observation is tried once more;
* the third fault of an arena within :data:`FAULT_WINDOW_S` *closes* it: the core is
  told (:meth:`take_closed`) and drops its agents with ``WORLD_FAULT``; for
  :data:`FAULT_WINDOW_S` no agent is placed in it, then it opens again, reset;
* every other arena keeps stepping.  A call over several arenas that raises is repeated
  arena by arena (in one call when the world's ``move_many`` is atomic, else arena by
  arena from the start) so that the arena at fault is found and only it is reset.

Observations an agent gets alone are checked against the observation space once per
arena per episode (the first after each new episode or reset); a host's rows, and every
reward, at every step (vectorised, cheap).  Sans-IO: time comes from ``now``, a function.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable

import numpy as np

from agentbus_zmq.bus.logs import PeerLog, printable
from agentbus_zmq.coordinator.door import Door, info_fault, infos_fault, observation_fault, observations_fault
from agentbus_zmq.coordinator.world import World, WorldFull

__all__ = ["GuardedWorld", "WorldFault", "FAULTS_TO_CLOSE", "FAULT_WINDOW_S"]

log = logging.getLogger(__name__)

#: Faults of one arena within FAULT_WINDOW_S that close it (for FAULT_WINDOW_S).
FAULTS_TO_CLOSE = 3
FAULT_WINDOW_S = 60.0


class WorldFault(Exception):
    """What a world handed out cannot travel (the message says what and where)."""


class GuardedWorld(World):
    """``world`` behind the door.  Reads like the world it wraps (attributes it does not
    define are the world's); :attr:`faults` counts the faults, :meth:`take_closed` hands
    the core the agents of arenas closed since it last asked."""

    def __init__(self, world: World, now: Callable[[], float], plog: PeerLog | None = None):
        self.inner = world
        self.kind, self.has_info = world.kind, world.has_info
        self._now = now
        self._plog = plog if plog is not None else PeerLog(log)
        self._obs_space, self._act_space = world.spaces()
        self._atomic = bool(getattr(world, "atomic_moves", False))
        self._name = type(world).__name__
        #: faults in all, and by method
        self.faults = 0
        self.by_method: collections.Counter = collections.Counter()
        #: arena -> times of its recent faults
        self._recent: dict[int, collections.deque] = {}
        #: arena -> until when it is closed
        self.closed: dict[int, float] = {}
        #: arenas closed since take_closed, with the reason
        self._closing: list[tuple[int, str]] = []
        #: arena -> the episode whose observation was checked (singles); a fault forgets it
        self._checked: dict[int, int] = {}
        self._traced: set[str] = set()
        self._door = Door(self._act_space)

    def __getattr__(self, name):  # the world's own extras (positions, goals...), for tests and tools
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # --- faults -----------------------------------------------------------------------

    def _fault(self, arena: int | None, method: str, exc: BaseException | None, detail: str = "") -> None:
        """Count and log a fault of ``arena`` (None: of no arena in particular); reset
        the arena, or close it on its FAULTS_TO_CLOSE-th fault in FAULT_WINDOW_S."""
        now = self._now()
        self.faults += 1
        self.by_method[method] += 1
        what = detail or f"{type(exc).__name__}: {printable(exc, 200)}"
        where = "" if arena is None else f" in arena {arena}"
        if exc is not None and method not in self._traced:  # the traceback once per method
            self._traced.add(method)
            log.error("world %s raised in %s%s: %s (contained%s; later faults of %s logged in one line)", self._name,
                      method, where, what, "" if arena is None else ", the arena reset", method, exc_info=exc)
        else:
            self._plog.warning(now, "world %s: fault in %s%s: %s", self._name, method, where, what)
        if arena is None:
            return
        recent = self._recent.setdefault(arena, collections.deque(maxlen=FAULTS_TO_CLOSE))
        recent.append(now)
        self._checked.pop(arena, None)
        if len(recent) == FAULTS_TO_CLOSE and now - recent[0] <= FAULT_WINDOW_S:
            self._close(arena, f"{FAULTS_TO_CLOSE} faults in {now - recent[0]:.1f} s, the last in {method}: {what}")
            return
        try:
            self.inner.reset_arena(arena)
        except Exception as reset_exc:  # cannot reset: close it
            self._close(arena, f"{method} failed ({what}) and reset_arena failed too "
                               f"({type(reset_exc).__name__}: {printable(reset_exc, 120)})")

    def _close(self, arena: int, why: str) -> None:
        now = self._now()
        self.closed[arena] = now + FAULT_WINDOW_S
        self._recent.pop(arena, None)
        self._closing.append((arena, why))
        log.error("world %s: arena %d closed for %.0f s (%s); its agents are told WORLD_FAULT", self._name, arena,
                  FAULT_WINDOW_S, why)

    def take_closed(self) -> list[tuple[int, str]]:
        """``(arena, why)`` for each arena closed since the last call."""
        out, self._closing = self._closing, []
        return out

    def _arena_of(self, slot: int) -> int | None:
        try:
            return int(self.inner.arena_of(slot))
        except Exception as exc:
            self._fault(None, "arena_of", exc)
            return None

    def _arenas_of(self, slots) -> np.ndarray | None:
        try:
            arenas = np.asarray(self.inner.arenas_of(slots))
            if arenas.shape != (len(slots),) or arenas.dtype.kind not in "iu":
                raise WorldFault(f"arenas_of returned {arenas.dtype} {list(arenas.shape)} for {len(slots)} slots")
            return arenas
        except Exception as exc:
            self._fault(None, "arenas_of", exc)
            return None

    # --- membership (the registry's calls) ------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    @property
    def arenas(self) -> int:
        return self.inner.arenas

    def __len__(self) -> int:
        return len(self.inner)

    def __contains__(self, agent_id: str) -> bool:
        return agent_id in self.inner

    def spaces(self):
        return self._obs_space, self._act_space

    @property
    def discrete_actions(self) -> bool:
        return self.inner.discrete_actions

    def params(self) -> dict:
        return self.inner.params()

    def place(self, agent_id: str) -> int:
        """The world's place; a world that raises, or puts the agent in a closed arena,
        refuses it as full (the agent retries later)."""
        try:
            slot = self.inner.place(agent_id)
        except WorldFull:
            raise
        except Exception as exc:
            self._fault(None, "place", exc)
            raise WorldFull(f"the world ({self._name}) failed to place the agent and counted a fault; retry "
                            f"later") from None
        arena = self._arena_of(slot)
        until = self.closed.get(arena) if arena is not None else None
        if until is not None:
            now = self._now()
            if now < until:
                self.remove(agent_id)
                raise WorldFull(f"arena {arena} is closed after faults of the world for another "
                                f"{until - now:.0f} s")
            del self.closed[arena]
            try:
                self.inner.reset_arena(arena)
            except Exception as exc:
                self._fault(arena, "reset_arena", exc)
        return slot

    def remove(self, agent_id: str) -> None:
        try:
            self.inner.remove(agent_id)
        except Exception as exc:
            self._fault(None, "remove", exc)

    def arenas_of(self, slots) -> np.ndarray:
        arenas = self._arenas_of(slots)
        return arenas if arenas is not None else np.zeros(len(slots), np.int64)

    def arena_of(self, slot: int) -> int:
        arena = self._arena_of(slot)
        return arena if arena is not None else 0

    def reset_arena(self, arena: int) -> None:
        self.inner.reset_arena(arena)

    def default_action(self, slot: int):
        """The world's default action for ``slot``, checked; where the world's own raises
        or is no value of its action space, the interface's (0, or zeros in bounds)."""
        try:
            value, reason = self._door.action(self.inner.default_action(slot))
        except Exception as exc:
            self._fault(None, "default_action", exc)
            return World.default_action(self, slot)
        if reason is not None:
            self._fault(None, "default_action", None, reason)
            return World.default_action(self, slot)
        return value

    # --- what agents get ---------------------------------------------------------------

    def observation(self, slot: int):
        """``(observation, info or None)`` for one agent, checked (see the module
        docstring); None when its arena faulted twice in a row (nothing is sent: the step
        counts missing at its deadline)."""
        for attempt in (0, 1):
            arena = None
            try:
                obs = self.inner.observe(slot)
                info = self.inner.info(slot) if self.has_info else None
                if info is not None and (reason := info_fault(info)) is not None:
                    raise WorldFault(reason)
                arena = self._arena_of(slot)
                episode = info.get("episode", 0) if info is not None else 0
                if self._checked.get(arena) != episode:
                    if (reason := observation_fault(self._obs_space, obs)) is not None:
                        raise WorldFault(reason)
                    self._checked[arena] = episode
                return obs, info
            except Exception as exc:
                if arena is None:
                    arena = self._arena_of(slot)
                self._fault(arena, "observe" if not isinstance(exc, WorldFault) else "observe (value)",
                            None if isinstance(exc, WorldFault) else exc, str(exc) if isinstance(exc, WorldFault)
                            else "")
                if arena is None or arena in self.closed:
                    return None
        return None

    def observations(self, slots: np.ndarray):
        """``(rows, info or None)`` for a host's members at ``slots``, every row checked;
        None when they cannot be had (their arenas are reset, or closed)."""
        for attempt in (0, 1):
            try:
                n = len(slots)
                obs = self.inner.observe_many(slots)
                if (bad := observations_fault(self._obs_space, obs, n)) is not None:
                    raise _Rows("observe_many (value)", bad)
                info = self.inner.info_many(slots) if self.has_info else None
                if info is not None and (bad := infos_fault(info, n)) is not None:
                    raise _Rows("info_many (value)", bad)
                return obs, info
            except _Rows as rows:
                self._rows_fault(slots, rows.method, rows.bad)
            except Exception as exc:
                self._many_fault(slots, "observe_many", exc)
        return None

    def unsendable(self, slots, exc: BaseException) -> None:
        """What the world handed out for ``slots`` (a slot, or a host's) could not be packed."""
        reason = f"its observation cannot be packed: {type(exc).__name__}: {printable(exc, 120)}"
        if isinstance(slots, int):
            self._fault(self._arena_of(slots), "observe (value)", None, reason)
        else:
            self._rows_fault(slots, "observe_many (value)", reason)

    def _rows_fault(self, slots, method: str, bad) -> None:
        arenas = self._arenas_of(slots)
        if arenas is None:
            return
        if isinstance(bad, str):  # the whole answer was wrong: every arena in it
            for arena in np.unique(arenas).tolist():
                self._fault(arena, method, None, bad)
            return
        for arena in np.unique(arenas[bad]).tolist():
            self._fault(arena, method, None, f"rows of arena {arena} cannot travel")

    def _many_fault(self, slots, method: str, exc: BaseException) -> None:
        """A call over ``slots`` raised: find the arenas at fault by calling arena by arena."""
        arenas = self._arenas_of(slots)
        if arenas is None:
            return
        groups = _groups(arenas)
        if len(groups) == 1:
            self._fault(int(arenas[0]), method, exc)
            return
        for arena, idx in groups:
            try:
                self.inner.observe_many(np.asarray(slots)[idx])
            except Exception as one:
                self._fault(arena, method, one)

    # --- what agents do ----------------------------------------------------------------

    def move(self, slot: int, action) -> None:
        try:
            self.inner.move(slot, action)
        except Exception as exc:
            self._fault(self._arena_of(slot), "move", exc)

    def move_many(self, slots, actions) -> None:
        """The world's move_many, arena by arena where it is not atomic (see the module
        docstring)."""
        n = len(slots)
        if n == 0:
            return
        if self._atomic:
            try:
                self.inner.move_many(slots, actions)
                return
            except Exception as exc:
                first = exc
        else:
            first = None
        arenas = self._arenas_of(slots)
        if arenas is None:
            return
        groups = _groups(arenas)
        if len(groups) == 1 and first is None:
            try:
                self.inner.move_many(slots, actions)
            except Exception as exc:
                self._fault(int(arenas[0]), "move_many", exc)
            return
        if len(groups) == 1:
            self._fault(int(arenas[0]), "move_many", first)
            return
        slots_a = np.asarray(slots)
        for arena, idx in groups:
            part = [actions[i] for i in idx.tolist()] if type(actions) is list else np.asarray(actions)[idx]
            try:
                self.inner.move_many(slots_a[idx], part)
            except Exception as exc:
                self._fault(arena, "move_many", exc)

    # --- the interface's plain calls, unchecked: the schedules use observation() and
    # --- observations(); these exist so the guard is a World (tools may read through it)

    def info(self, slot: int):
        return self.inner.info(slot)

    def info_many(self, slots):
        return self.inner.info_many(slots)

    def observe(self, slot: int):
        return self.inner.observe(slot)

    def observe_many(self, slots):
        return self.inner.observe_many(slots)

    # --- what the bus reports ------------------------------------------------------------

    def figures(self) -> dict:
        try:
            figures = dict(self.inner.figures())
        except Exception as exc:
            self._fault(None, "figures", exc)
            figures = {}
        figures = {k: v for k, v in figures.items() if type(k) is str and type(v) in (int, float) and (
            type(v) is int or math.isfinite(v))}
        return {**figures, "faults": self.faults, "closed_arenas": len(self.closed)}

    def state_hash(self) -> str:
        try:
            return str(self.inner.state_hash())
        except Exception as exc:
            self._fault(None, "state_hash", exc)
            return ""


class _Rows(Exception):
    """Rows a world handed out that cannot travel (internal to the guard)."""

    def __init__(self, method: str, bad):
        super().__init__(method)
        self.method, self.bad = method, bad


def _groups(arenas: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(arena, indices into arenas)`` per arena, indices in their given order."""
    if len(arenas) and (arenas == arenas[0]).all():
        return [(int(arenas[0]), np.arange(len(arenas)))]
    order = np.argsort(arenas, kind="stable")
    cuts = np.flatnonzero(np.diff(arenas[order])) + 1
    return [(int(arenas[part[0]]), part) for part in np.split(order, cuts)]
