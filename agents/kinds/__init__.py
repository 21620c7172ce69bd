"""Agent kinds shipped with agentbus, by name."""

from __future__ import annotations

import importlib

from agentbus_zmq.agents.sdk import Agent

__all__ = ["KINDS", "create"]

#: kind name -> "module:class"; imported only when used, so ``null`` never loads pymdp.
KINDS = {
    "explorer": "agentbus_zmq.agents.kinds.explorer:Explorer",
    "null": "agentbus_zmq.agents.kinds.null:NullAgent",
}


def create(kind: str, **options) -> Agent:
    try:
        module, _, cls = KINDS[kind].partition(":")
    except KeyError:
        raise ValueError(f"unknown agent kind {kind!r}; choose one of {', '.join(KINDS)}") from None
    return getattr(importlib.import_module(module), cls)(**options)
