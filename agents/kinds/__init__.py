"""Agent kinds by name, and the options each one takes.

This is the one place that knows the kinds: ``bus-agent --kind``, busbench's
``--agent-kind`` and its r1 measurement all resolve a kind here and build its options
with :func:`kind_options`, so they cannot drift apart.  A kind is

* a built-in name (:data:`KINDS`: ``explorer``, ``null``);
* a name an installed package declares in the entry-point group :data:`ENTRY_POINT_GROUP`
  (``agentbus.kinds``), as ``name = "package.module:ClassName"``;
* or ``package.module:ClassName`` itself, importable from the current directory or the
  environment.

Either way the class must subclass :class:`~agentbus_zmq.agents.sdk.Agent`; anything
else, or a module that does not import, is :class:`KindUnavailable` with one line that
says what to do.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import sys

from agentbus_zmq.agents.sdk import Agent

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
_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")


class KindUnavailable(RuntimeError):
    """A kind that cannot be used here; the message says why and what to do."""


def available_kinds() -> dict[str, str]:
    """Every kind known by name: the built-ins, then installed packages' entry points
    (a built-in name cannot be taken over)."""
    kinds = dict(KINDS)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        kinds.setdefault(ep.name, ep.value)
    return kinds


def kind_class(kind: str) -> type[Agent]:
    """The Agent class for ``kind`` (a name, or ``module:ClassName``)."""
    target = kind if ":" in kind else available_kinds().get(kind)
    if target is None:
        raise KindUnavailable(f"unknown agent kind {kind!r}: use one of {', '.join(available_kinds())}, or "
                              f"package.module:ClassName")
    if not _TARGET.match(target):
        raise KindUnavailable(f"agent kind {kind!r}: {target!r} is not package.module:ClassName")
    module_name, _, class_name = target.partition(":")
    if os.getcwd() not in sys.path:  # as `python -m` would: a kind in the current directory imports
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except KindUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - an integrator's module: any failure is theirs, in one line
        raise KindUnavailable(f"agent kind {kind!r}: cannot import {module_name}: {type(exc).__name__}: {exc} "
                              f"(is it installed, or in the current directory?)") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise KindUnavailable(f"agent kind {kind!r}: {module_name} has no {class_name}")
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise KindUnavailable(f"agent kind {kind!r}: {target} is not an agent (subclass "
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
