"""State machines as data: one mechanism for the coordinator's units and the agent session.

As h11's ``_state.py`` does, a machine is a table ``(state, event) -> next state`` and
nothing else; :meth:`Machine.move` is the only way an object's ``state`` changes, and an
event the table does not list for the current state raises :class:`IllegalTransition`
at once (a bug in the caller, never a peer's doing)::

    UNITS = Machine("unit", {(JOINING, "ready"): IDLE, (IDLE, "observe"): STEPPING, ...})
    UNITS.move(unit, "ready")

:meth:`Machine.start` puts an object in the initial state (the first row's state unless
named).  States are :class:`enum.Enum` members with string values.  A move is on the per-step path
of the coordinator (two a step), so the table is compiled to ``value -> event -> state``
dictionaries: an Enum member hashes in Python (~120 ns), its value string in C.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

__all__ = ["IllegalTransition", "Machine"]


class IllegalTransition(RuntimeError):
    """A move its machine's table does not allow: a bug in the caller."""


class Machine:
    """A transition table and the one way to apply it."""

    def __init__(self, name: str, table: Mapping[tuple[enum.Enum, str], enum.Enum], initial: enum.Enum | None = None):
        self.name = name
        self.table = dict(table)
        #: the state :meth:`start` puts an object in
        self.initial = initial if initial is not None else next(iter(self.table))[0]
        self._next: dict[str, dict[str, enum.Enum]] = {}
        for (state, event), to in self.table.items():
            self._next.setdefault(state.value, {})[event] = to

    @property
    def events(self) -> set[str]:
        return {event for _, event in self.table}

    def states(self) -> set[enum.Enum]:
        """Every state the table names, as a source or a target."""
        return {s for s, _ in self.table} | set(self.table.values())

    def allows(self, state: enum.Enum, event: str) -> bool:
        return event in self._next.get(state.value, ())

    def event(self, event: str):
        """``move(obj)`` for one event, compiled from the table: half the cost of
        :meth:`move` (one call, one lookup), for the per-step paths."""
        nxt = {state.value: to for (state, e), to in self.table.items() if e == event}
        if not nxt:
            raise ValueError(f"{self.name}: no transition on {event!r}")
        name = self.name

        def move(obj) -> None:
            try:
                obj.state = nxt[obj.state._value_]
            except KeyError:
                raise IllegalTransition(f"{name} {getattr(obj, 'name', '')}: event {event!r} is not allowed in "
                                        f"state {obj.state.value!r}") from None

        move.__name__ = move.__qualname__ = f"{name}.{event}"
        return move

    def event_all(self, event: str):
        """``move_all(objs)``: :meth:`event` for many objects in one call (a lock-step
        tick moves every ready unit at once).  All move, or none does and it raises."""
        nxt = {state.value: to for (state, e), to in self.table.items() if e == event}
        name = self.name

        def move_all(objs) -> None:
            targets = [nxt.get(obj.state._value_) for obj in objs]
            if None in targets:
                bad = objs[targets.index(None)]
                raise IllegalTransition(f"{name} {getattr(bad, 'name', '')}: event {event!r} is not allowed in "
                                        f"state {bad.state.value!r}")
            for obj, to in zip(objs, targets):
                obj.state = to

        move_all.__name__ = move_all.__qualname__ = f"{name}.{event}(all)"
        return move_all

    def start(self, obj) -> None:
        """``obj`` begins in the machine's initial state."""
        obj.state = self.initial

    def move(self, obj, event: str) -> None:
        """``obj.state`` becomes the table's next state for ``event``, or this raises."""
        try:
            obj.state = self._next[obj.state._value_][event]
        except KeyError:
            raise IllegalTransition(f"{self.name} {getattr(obj, 'name', '')}: event {event!r} is not allowed "
                                    f"in state {obj.state.value!r}".replace("  ", " ")) from None

    def reachable(self, start: enum.Enum) -> set[enum.Enum]:
        """States reachable from ``start`` (for tests that walk the table)."""
        seen, todo = {start}, [start]
        while todo:
            for to in self._next.get(todo.pop().value, {}).values():
                if to not in seen:
                    seen.add(to)
                    todo.append(to)
        return seen

    def walk(self) -> Iterable[tuple[enum.Enum, str, enum.Enum]]:
        """Every row of the table, in its order."""
        for (state, event), to in self.table.items():
            yield state, event, to
