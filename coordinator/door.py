"""The world's door: every value that crosses between agents and a world, checked.

An agent's action reaches the world only through :class:`Door`: it must be a value of
the world's action space (type, dtype, shape, range, finite), or it is refused, named
in one line for its sender, and the world's default action takes its place.  What a
world hands out (observations, rewards) is checked against its observation space before
it travels (:func:`observation_fault`, :func:`observations_fault`, :func:`info_fault`):
a world's bug is named as the world's, not sent on as a malformed frame.

Sans-IO and stateless but for the space it was built from; the schedules call it.
"""

from __future__ import annotations

import math

import numpy as np

from agentbus_zmq.bus.logs import printable
from agentbus_zmq.bus.spaces import Array, Discrete, MultiDiscrete, Space

__all__ = ["Door", "observation_fault", "observations_fault", "info_fault"]

#: dtype kinds an action of an array space may arrive as, by the space's own kind: a
#: float space takes integers too (cast), an integer space no floats, a bool space bools.
_ACCEPTS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}


def _what(value) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype} {list(value.shape)}"
    return printable(repr(value), 40)


class Door:
    """Checks actions against ``space``.  :meth:`action` for one agent's, :meth:`actions`
    for a host's rows; both return the value to apply (cast to the space's dtype) and a
    reason when something was refused."""

    def __init__(self, space: Space):
        self.space = space
        #: a discrete space's size (the hot path checks ``type(a) is int and a < n`` inline)
        self.n = space.n if isinstance(space, Discrete) else 0
        if isinstance(space, Array):
            self._shape, self._dtype = space.shape, np.dtype(space.dtype)
        elif isinstance(space, MultiDiscrete):
            self._shape, self._dtype = (len(space.nvec),), np.dtype(np.int64)
            self._nvec = np.asarray(space.nvec, dtype=np.int64)
        else:
            self._shape, self._dtype = (), np.dtype(np.int64)

    # --- one agent ------------------------------------------------------------------

    def action(self, value):
        """``(value as the world takes it, None)``, or ``(None, reason)``."""
        space = self.space
        if isinstance(space, Discrete):
            if type(value) is int and 0 <= value < self.n:
                return value, None
            return None, f"an action of this world is one integer in [0, {self.n}), got {_what(value)}"
        if not isinstance(value, np.ndarray):
            return None, f"an action of this world is an array of shape {list(self._shape)}, got {_what(value)}"
        if value.shape != self._shape:
            return None, f"an action of this world is an array of shape {list(self._shape)}, got {_what(value)}"
        rows, reason = self._rows(value[np.newaxis], single=True)
        if reason is not None:
            return None, reason
        return rows[0], None

    # --- a host's members ----------------------------------------------------------

    def actions(self, values, n: int):
        """A host's answer for ``n`` members: ``(actions, bad, reason)`` where ``bad`` is a
        boolean mask of the rows refused (their values are the caller's to replace; None
        when none is) and ``reason`` names the first refusal."""
        if not isinstance(values, np.ndarray) or values.ndim < 1 or len(values) != n:
            return None, np.ones(n, bool), f"expected {n} actions, got {_what(values)}"
        if isinstance(self.space, Discrete):
            if values.ndim != 1 or values.dtype.kind not in "iu":
                return None, np.ones(n, bool), (f"a host's actions in this world are a 1-D integer array, got "
                                                f"{_what(values)}")
            if not n or (values.max() < self.n and (values.dtype.kind == "u" or values.min() >= 0)):
                return values, None, None  # the frame of every step: two reductions, no mask
            bad = (values < 0) | (values >= self.n)
            i = int(np.flatnonzero(bad)[0])
            return values, bad, (f"{int(bad.sum())} of {n} actions out of [0, {self.n}), the first "
                                 f"{values[i].item()!r} (row {i})")
        return self._rows(values, single=False)

    @staticmethod
    def fill(actions, bad: np.ndarray, defaults: list):
        """``actions`` with its ``bad`` rows replaced by ``defaults`` (one per bad row), or,
        where ``actions`` is None (nothing of it usable), ``defaults`` itself, one per row."""
        filler = np.array(defaults)
        if actions is None:
            return filler
        actions = actions.astype(np.promote_types(actions.dtype, filler.dtype))  # a copy, wide enough for both
        actions[bad] = filler.reshape(actions[bad].shape)
        return actions

    def _rows(self, values: np.ndarray, single: bool):
        """Rows of ``self._shape``: ``(rows cast, None)`` / ``(rows, bad, reason)``."""
        n = len(values)
        where = "" if single else " (every row)"
        if values.shape[1:] != self._shape:
            reason = f"actions of this world have shape {list(self._shape)}{where}, got {_what(values)}"
            return (None, reason) if single else (None, np.ones(n, bool), reason)
        kind = self._dtype.kind
        if values.dtype.kind not in _ACCEPTS.get(kind, kind):
            reason = f"actions of this world are of dtype {self._dtype}{where}, got {_what(values)}"
            return (None, reason) if single else (None, np.ones(n, bool), reason)
        flat = values.reshape(n, -1)
        bad = np.zeros(n, bool)
        if values.dtype.kind == "f":
            bad |= ~np.isfinite(flat).all(axis=1)
        space = self.space
        if isinstance(space, MultiDiscrete):
            bad |= ((flat < 0) | (flat >= self._nvec)).any(axis=1)
            bound = "nvec"
        else:
            with np.errstate(invalid="ignore"):
                if space.low is not None:
                    bad |= (flat < space.low).any(axis=1)
                if space.high is not None:
                    bad |= (flat > space.high).any(axis=1)
            bound = f"[{space.low}, {space.high}]"
            if kind in "iub" and values.dtype != self._dtype:
                info = np.iinfo(self._dtype) if kind != "b" else None
                if info is not None:
                    bad |= ((flat < info.min) | (flat > info.max)).any(axis=1)
        cast = values.astype(self._dtype, copy=False) if not bad.all() else values
        if not bad.any():
            return (cast, None) if single else (cast, None, None)
        i = int(np.flatnonzero(bad)[0])
        reason = (f"an action not finite or out of {bound}" if single else
                  f"{int(bad.sum())} of {n} actions not finite or out of {bound}, the first in row {i}")
        return (None, reason) if single else (cast, bad, reason)


# --- what a world hands out --------------------------------------------------------


def observation_fault(space: Space, value) -> str | None:
    """Why ``value`` is not an observation of ``space`` as it travels, or None."""
    if isinstance(space, Array):
        if not isinstance(value, np.ndarray) or value.shape != space.shape or value.dtype.kind not in "biuf":
            return f"observe returned {_what(value)}, not an array of shape {list(space.shape)}"
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return "observe returned an array with NaN or infinite values"
        return None if space.contains(value) else f"observe returned values out of [{space.low}, {space.high}]"
    if type(value) is not list or len(value) != space.size:
        return f"observe returned {_what(value)}, not a list of {space.size} integers"
    nvec = (space.n,) if isinstance(space, Discrete) else space.nvec
    for v, n in zip(value, nvec):
        if type(v) is not int or not 0 <= v < n:
            return f"observe returned {_what(value)}: each value an integer in [0, n) of {list(nvec)}"
    return None


def observations_fault(space: Space, values, n: int) -> np.ndarray | str | None:
    """Why ``values`` (a host's rows) are not ``n`` observations of ``space``: a reason
    for the whole (wrong type or shape), a boolean mask of the bad rows, or None."""
    if isinstance(space, Array):
        shape, kinds = (n, *space.shape), "biuf"
    else:
        shape, kinds = (n, space.size), "iu"
    if not isinstance(values, np.ndarray) or values.shape != shape or values.dtype.kind not in kinds:
        return f"observe_many returned {_what(values)}, not {shape}"
    if not n:
        return None
    flat = values.reshape(n, -1)
    if not isinstance(space, Array):
        nvec = _nvec(space)
        if values.dtype.kind == "u" or flat.min() >= 0:  # the frame of every step: a reduction a column, no mask
            if all(flat[:, i].max() < n_i for i, n_i in enumerate(nvec.tolist())):
                return None
        bad = ((flat < 0) | (flat >= nvec)).any(axis=1)
        return bad if bad.any() else None
    bad = ~np.isfinite(flat).all(axis=1) if values.dtype.kind == "f" else np.zeros(n, bool)
    with np.errstate(invalid="ignore"):
        if space.low is not None:
            bad |= (flat < space.low).any(axis=1)
        if space.high is not None:
            bad |= (flat > space.high).any(axis=1)
    return bad if bad.any() else None


_NVEC: dict[Space, np.ndarray] = {}


def _nvec(space: Space) -> np.ndarray:
    """A discrete space's sizes as an array, built once per space."""
    nvec = _NVEC.get(space)
    if nvec is None:
        nvec = _NVEC[space] = np.asarray((space.n,) if isinstance(space, Discrete) else space.nvec, dtype=np.int64)
    return nvec


def info_fault(info) -> str | None:
    """Why one agent's ``info`` (reward, episode) cannot travel, or None."""
    if type(info) is not dict:
        return f"info returned {_what(info)}, not a map"
    reward, episode = info.get("reward", 0.0), info.get("episode", 0)
    if type(reward) not in (int, float) or not math.isfinite(reward):
        return f"info returned reward {_what(reward)}, not a finite number"
    if type(episode) is not int or not 0 <= episode < 2**32:
        return f"info returned episode {_what(episode)}, not an integer in [0, 2**32)"
    return None


def infos_fault(info, n: int) -> np.ndarray | str | None:
    """:func:`info_fault` for a host's rows: a reason, a mask of bad rows, or None."""
    if type(info) is not dict:
        return f"info_many returned {_what(info)}, not a map"
    bad = np.zeros(n, bool)
    for key, kinds in (("reward", "iuf"), ("episode", "iu")):
        v = info.get(key)
        if v is None:
            continue
        if not isinstance(v, np.ndarray) or v.shape != (n,) or v.dtype.kind not in kinds:
            return f"info_many returned {key} {_what(v)}, not {n} numbers"
        if v.dtype.kind == "f":
            bad |= ~np.isfinite(v)
    return bad if bad.any() else None
