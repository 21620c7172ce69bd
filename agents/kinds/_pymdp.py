"""Importing pymdp for inference only.

``pymdp.legacy`` (the numpy API) imports matplotlib and seaborn at module level, for
plotting helpers inference never calls (``pymdp.legacy.utils``, ``legacy.envs``).
Measured on a 2-core machine: 1.6 s and 171 MB max RSS for ``import pymdp.legacy.agent``
as installed, 0.31 s and 58 MB with the plotting libraries deferred (docs/performance.md).

:func:`legacy_agent_class` defers them: while pymdp is imported, ``matplotlib``,
``matplotlib.pyplot`` and ``seaborn`` resolve to placeholder modules that import the
real library on first attribute access.  The placeholders are removed from
``sys.modules`` right after, so any later ``import matplotlib`` (by the user, or by
busbench's plotting) gets the real thing; only pymdp's own plotting helpers hold a
placeholder, and those still work, paying the import when first called.
"""

from __future__ import annotations

import importlib
import sys
import types

__all__ = ["legacy_agent_class", "DEFERRED"]

DEFERRED = ("matplotlib", "matplotlib.pyplot", "seaborn")


class _Deferred(types.ModuleType):
    """A module that imports its real namesake on first attribute access."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(importlib.import_module(self.__name__), attr)


def legacy_agent_class():
    """``pymdp.legacy.agent.Agent``, imported without its plotting dependencies."""
    if "pymdp.legacy.agent" in sys.modules:
        return sys.modules["pymdp.legacy.agent"].Agent
    placeholders = {name: _Deferred(name) for name in DEFERRED if name not in sys.modules}
    if "matplotlib" in placeholders and "matplotlib.pyplot" in placeholders:
        # `import matplotlib.pyplot as plt` reads the attribute from the parent.
        placeholders["matplotlib"].__dict__["pyplot"] = placeholders["matplotlib.pyplot"]
    sys.modules.update(placeholders)
    try:
        from pymdp.legacy.agent import Agent
    finally:
        for name, module in placeholders.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
    return Agent
