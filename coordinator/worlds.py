"""Choosing a world: ``--world NAME`` and ``--world-arg KEY=VALUE`` (a contract).

NAME is

* ``grid`` (the default), the built-in grid world (its arguments are WorldConfig's:
  ``width``, ``height``, ``obstacles``, ``goals``, ``seed``, ``arena_agents``, ``max_arenas``);
* ``pettingzoo:MODULE``, any PettingZoo environment module with ``parallel_env(**args)``
  (or an AEC-only ``env(**args)``): one environment per arena
  (:mod:`agentbus_zmq.coordinator.pettingzoo`);
* ``pymdp:ENV``, one of pymdp's own environments (``tmaze``), each agent in its own copy,
  its generative model in WELCOME (:mod:`agentbus_zmq.coordinator.pymdp_world`);
* a name that an installed package declares in the entry-point group ``agentbus.worlds``;
* ``package.module:factory``, a callable returning a :class:`~agentbus_zmq.coordinator.world.World`.

VALUE is read as a JSON literal where it is one (``3``, ``false``, ``null``, ``[1, 2]``),
else as a string.  Every factory that takes ``seed`` and ``max_arenas`` gets the
coordinator's (``--seed``, ``--max-arenas``) unless a ``--world-arg`` names them.

A :class:`WorldSpec` (name and arguments) is what travels between processes: busbench
hands the same one to the coordinator, to r1 and to the no-bus pool.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re

from agentbus_zmq.bus import plugins
from agentbus_zmq.coordinator.grid import GridWorld, WorldConfig
from agentbus_zmq.coordinator.world import World

__all__ = ["ENTRY_POINT_GROUP", "WorldSpec", "WorldUnavailable", "available_worlds", "parse_world_args"]

ENTRY_POINT_GROUP = "agentbus.worlds"
_MODULE = re.compile(r"[A-Za-z_][\w.]*\Z")


class WorldUnavailable(ValueError):
    """A world that cannot be built here; the message says why and what to do."""


def grid(**args) -> GridWorld:
    """The built-in grid world (WorldConfig's fields as arguments)."""
    fields = {f.name for f in dataclasses.fields(WorldConfig)}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise WorldUnavailable(f"the grid takes no argument {unknown[0]!r}; it takes {', '.join(sorted(fields))}")
    return GridWorld(WorldConfig(**args))


BUILTIN = {"grid": "agentbus_zmq.coordinator.worlds:grid"}


def available_worlds() -> dict[str, str]:
    """Worlds known by name: the built-in ones, then installed packages' entry points."""
    return plugins.available(BUILTIN, ENTRY_POINT_GROUP)


def parse_world_args(pairs: list[str] | tuple[str, ...]) -> dict:
    """``KEY=VALUE`` pairs as keyword arguments (VALUE as JSON where it parses)."""
    args = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise WorldUnavailable(f"--world-arg takes KEY=VALUE with KEY a Python identifier, got {pair!r:.60}")
        try:
            args[key] = json.loads(value)
        except ValueError:
            args[key] = value
    return args


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """A world by name, and the arguments it is built with."""

    name: str = "grid"
    args: dict = dataclasses.field(default_factory=dict)

    def build(self) -> World:
        """The world; :class:`WorldUnavailable` with one line that says what to do."""
        try:
            world = self._factory()(**self.args)
        except WorldUnavailable:
            raise
        except (TypeError, ValueError, ImportError) as exc:
            raise WorldUnavailable(f"world {self.name!r} with {self.args or 'no arguments'}: "
                                   f"{type(exc).__name__}: {exc}") from None
        if not isinstance(world, World):
            raise WorldUnavailable(f"world {self.name!r}: its factory returned a {type(world).__name__}, not a "
                                   f"World (agentbus_zmq.coordinator.world.World)")
        return world

    def with_defaults(self, **defaults) -> WorldSpec:
        """The spec with ``defaults`` for the arguments it does not name, where the factory
        takes them (``seed``, ``max_arenas``)."""
        factory = self._factory()
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            return self
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        extra = {k: v for k, v in defaults.items() if k not in self.args and (k in params or takes_any)}
        return dataclasses.replace(self, args={**extra, **self.args})

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "args": self.args})

    @classmethod
    def from_json(cls, text: str) -> WorldSpec:
        d = json.loads(text)
        return cls(d.get("name", "grid"), d.get("args", {}))

    def _factory(self):
        name = self.name
        if name.startswith("pymdp:"):
            from agentbus_zmq.coordinator.pymdp_world import PymdpWorld

            env = name.partition(":")[2]
            return lambda **args: PymdpWorld(env, **args)
        if name.startswith("pettingzoo:"):
            module = name.partition(":")[2]
            if not _MODULE.match(module):
                raise WorldUnavailable(f"world {name!r}: pettingzoo:MODULE takes a module path, e.g. "
                                       f"pettingzoo:mpe2.simple_spread_v3")
            from agentbus_zmq.coordinator.pettingzoo import PettingZooWorld

            return lambda **args: PettingZooWorld(module, **args)
        factory = plugins.load(name, BUILTIN, ENTRY_POINT_GROUP, "world", WorldUnavailable,
                               form="pettingzoo:MODULE, pymdp:ENV, or package.module:factory")
        if not callable(factory):
            raise WorldUnavailable(f"world {name!r}: {factory!r:.60} is not callable")
        return factory

    def describe(self) -> str:
        args = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(self.args.items()))
        return f"{self.name}{' ' + args if args else ''}"
