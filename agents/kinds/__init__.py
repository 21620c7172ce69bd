"""Agent kinds by name, and the options each one takes.

This is the one place that knows the kinds: ``bus-agent --kind``, busbench's
``--agent-kind`` and its r1 measurement all resolve a kind here and build its options
with :func:`kind_options`, so they cannot drift apart.  A kind is

* a built-in name (:data:`KINDS`: ``explorer``, ``null``);
* a name an installed package declares in the entry-point group :data:`ENTRY_POINT_GROUP`
  (``agentbus.kinds``), as ``name = "package.module:ClassName"``;
* or ``package.module:ClassName`` itself, importable from the environment or, searched
  last, the current directory (bus.plugins); built-in and entry-point names never look there.

Either way the class must subclass :class:`~agentbus_zmq.agents.sdk.Agent`; anything
else, or a module that does not import, is :class:`KindUnavailable` with one line that
says what to do.
"""

from __future__ import annotations


from agentbus_zmq.agents.sdk import Agent
from agentbus_zmq.bus import plugins

__all__ = ["ENTRY_POINT_GROUP", "KINDS", "KindUnavailable", "available_kinds", "create", "kind_class",
           "kind_options"]

#: kind name -> "module:class"; imported only when used, so ``null`` never loads pymdp.
KINDS = {
    "explorer": "agentbus_zmq.agents.kinds.explorer:Explorer",
    "learner": "agentbus_zmq.agents.kinds.learner:Learner",
    "null": "agentbus_zmq.agents.kinds.null:NullAgent",
    "random": "agentbus_zmq.agents.kinds.random:RandomAgent",
}
#: Installed packages add kinds here (pyproject.toml: [project.entry-points."agentbus.kinds"]).
ENTRY_POINT_GROUP = "agentbus.kinds"


class KindUnavailable(RuntimeError):
    """A kind that cannot be used here; the message says why and what to do."""


def available_kinds() -> dict[str, str]:
    """Every kind known by name: the built-ins, then installed packages' entry points
    (a built-in name cannot be taken over)."""
    return plugins.available(KINDS, ENTRY_POINT_GROUP)


def kind_class(kind: str) -> type[Agent]:
    """The Agent class for ``kind`` (a name, or ``module:ClassName``)."""
    cls = plugins.load(kind, KINDS, ENTRY_POINT_GROUP, "agent kind", KindUnavailable,
                       " (is it installed, or in the current directory?)", "package.module:ClassName")
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise KindUnavailable(f"agent kind {kind!r}: {cls!r:.60} is not an agent (subclass "
                              f"agentbus_zmq.agents.sdk.Agent and implement step)")
    return cls


def kind_options(kind: str, **candidates) -> dict:
    """The subset of ``candidates`` that ``kind`` takes (its class's ``OPTIONS``)."""
    wanted = kind_class(kind).OPTIONS
    return {k: v for k, v in candidates.items() if k in wanted}


def create(kind: str, **options) -> Agent:
    return kind_class(kind)(**options)


def kind_help() -> str:
    """What ``--kind`` accepts, with the kinds found in this environment."""
    return (f"Agent kind: {', '.join(available_kinds())} (found here), or package.module:ClassName "
            f"(a subclass of agentbus_zmq.agents.sdk.Agent).")


def kind_param():
    """A click parameter type for ``--kind``: a known name, or ``module:Class`` checked by
    importing it (one line, no traceback, when it cannot be used)."""
    import click

    class KindParam(click.ParamType):
        name = "KIND"

        def convert(self, value, param, ctx):
            if value in KINDS:
                return value
            try:
                kind_class(value)
            except KindUnavailable as exc:
                self.fail(str(exc), param, ctx)
            return value

    return KindParam()
