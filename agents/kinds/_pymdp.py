"""Importing pymdp for inference only.

``pymdp.legacy`` (the numpy API) and ``pymdp`` (the JAX API) import matplotlib and
seaborn at module level, for plotting helpers inference never calls
(``pymdp.legacy.utils``, ``pymdp.utils``), and through scipy's array-API shim (which
clones numpy's whole namespace) ``numpy.f2py`` and ``numpy.testing``.  Measured on a
2-core machine, median of 5 fresh interpreters (docs/performance.md):

* ``import pymdp.legacy.agent``: 1.41 s and 158 MB max RSS as installed; 0.19 s, 45 MB here;
* ``import pymdp.agent``: 0.94 s and 204 MB as installed; 0.62 s, 175 MB here.

:func:`legacy_agent_class` and :func:`jax_agent_class` defer them: while pymdp is
imported, ``matplotlib``, ``matplotlib.pyplot``, ``seaborn``, ``numpy.f2py`` and
``numpy.testing`` resolve to placeholder modules that import the real one on first
attribute access.  The placeholders are removed from ``sys.modules`` right after, so any
later ``import matplotlib`` (by the user, or by busbench's plotting) gets the real
thing; only the modules imported meanwhile (pymdp's plotting helpers, scipy's shim)
hold a placeholder, and those still work, paying the import when first used.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__all__ = ["legacy_agent_class", "jax_agent_class", "DEFERRED"]

DEFERRED = ("matplotlib", "matplotlib.pyplot", "seaborn", "numpy.f2py", "numpy.testing")


class _Deferred(types.ModuleType):
    """A module that imports its real namesake on first attribute access."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(importlib.import_module(self.__name__), attr)


def legacy_agent_class():
    """``pymdp.legacy.agent.Agent`` (numpy), imported without the modules above."""
    return _slim_import("pymdp.legacy.agent").Agent


def jax_agent_class():
    """``pymdp.agent.Agent`` (JAX), imported without the modules above."""
    return _slim_import("pymdp.agent").Agent


def _slim_import(module: str) -> types.ModuleType:
    if module in sys.modules:
        return sys.modules[module]
    if importlib.util.find_spec("pymdp") is None:
        from agentbus_zmq.agents.kinds import KindUnavailable

        raise KindUnavailable("the explorer kind needs pymdp: pip install 'agentbus-zmq[pymdp]' "
                              "(or install from requirements/all.txt)")
    import numpy  # noqa: F401 - the parent of two deferred modules must exist to hold them

    placeholders = {name: _Deferred(name) for name in DEFERRED if name not in sys.modules}
    # `import a.b as c` reads `b` from the parent: hang each placeholder there too, or
    # numpy's lazy `__getattr__` would import the real module anyway.  A placeholder
    # parent keeps it; a real parent has it taken off again afterwards.
    borrowed = []
    for name, placeholder in placeholders.items():
        parent, _, child = name.rpartition(".")
        holder = placeholders.get(parent) or sys.modules.get(parent)
        if holder is not None and child not in holder.__dict__:
            holder.__dict__[child] = placeholder
            if parent not in placeholders:
                borrowed.append((holder, child, placeholder))
    sys.modules.update(placeholders)
    try:
        return importlib.import_module(module)
    finally:
        for name, placeholder in placeholders.items():
            if sys.modules.get(name) is placeholder:
                del sys.modules[name]
        for holder, child, placeholder in borrowed:
            if holder.__dict__.get(child) is placeholder:
                del holder.__dict__[child]
