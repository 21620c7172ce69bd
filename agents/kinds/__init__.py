"""Agent kinds shipped with agentbus, by name, and the options each one takes.

This is the one place that knows the kinds: ``bus-agent --kind``, busbench's
``--agent-kind`` and its r1 measurement all read :data:`KINDS` and build a kind's
options with :func:`kind_options`, so they cannot drift apart.
"""

from __future__ import annotations

import importlib

from agentbus_zmq.agents.sdk import Agent

__all__ = ["KINDS", "kind_class", "kind_options", "create", "KindUnavailable"]

#: kind name -> "module:class"; imported only when used, so ``null`` never loads pymdp.
KINDS = {
    "explorer": "agentbus_zmq.agents.kinds.explorer:Explorer",
    "null": "agentbus_zmq.agents.kinds.null:NullAgent",
}


class KindUnavailable(RuntimeError):
    """A kind whose libraries are not installed; the message says what to install."""


def kind_class(kind: str) -> type[Agent]:
    try:
        module, _, cls = KINDS[kind].partition(":")
    except KeyError:
        raise ValueError(f"unknown agent kind {kind!r}; choose one of {', '.join(KINDS)}") from None
    return getattr(importlib.import_module(module), cls)


def kind_options(kind: str, **candidates) -> dict:
    """The subset of ``candidates`` that ``kind`` takes (its class's ``OPTIONS``)."""
    wanted = kind_class(kind).OPTIONS
    return {k: v for k, v in candidates.items() if k in wanted}


def create(kind: str, **options) -> Agent:
    return kind_class(kind)(**options)
