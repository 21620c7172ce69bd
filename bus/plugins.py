"""Things by name: a built-in name, a name an installed package declares in an
entry-point group, or ``package.module:attribute`` itself.  Agent kinds
(``agentbus.kinds``) and worlds (``agentbus.worlds``) are both found this way; every
failure is the caller's error class, in one line that says what to do."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import sys

__all__ = ["available", "load"]

_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")


def available(builtin: dict[str, str], group: str) -> dict[str, str]:
    """Every name known: the built-ins, then installed packages' entry points (a
    built-in name cannot be taken over)."""
    names = dict(builtin)
    for ep in importlib.metadata.entry_points(group=group):
        names.setdefault(ep.name, ep.value)
    return names


def load(name: str, builtin: dict[str, str], group: str, what: str, error: type[Exception],
         hint: str = "", form: str = "package.module:attribute") -> object:
    """The attribute ``name`` stands for (see the module docstring); ``error(...)`` with
    one line naming ``what`` it is, and the ``form`` a target takes, otherwise."""
    names = available(builtin, group)
    target = name if ":" in name else names.get(name)
    if target is None:
        raise error(f"unknown {what} {name!r}: use one of {', '.join(names)}, or {form}")
    if not _TARGET.match(target):
        raise error(f"{what} {name!r}: {target!r} is not {form}")
    module_name, _, attr = target.partition(":")
    if ":" in name and os.getcwd() not in sys.path:
        # a module:attribute the user names may live in the current directory; it is
        # searched last, so nothing planted there (a pymdp/, a numpy/) stands in for an
        # installed package, and names (built-ins, entry points) never look there at all
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except error:
        raise
    except Exception as exc:  # noqa: BLE001 - an integrator's module: any failure is theirs, in one line
        raise error(f"{what} {name!r}: cannot import {module_name}: {type(exc).__name__}: {exc}{hint}") from None
    value = getattr(module, attr, None)
    if value is None:
        raise error(f"{what} {name!r}: {module_name} has no {attr}")
    return value
