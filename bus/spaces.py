"""Observation and action spaces, described language-neutrally (WELCOME's ``spaces``).

Three kinds, as plain maps on the wire (docs/worlds.md)::

    {"type": "discrete", "n": 5, "names": ["up", "down", "left", "right", "stay"]}
    {"type": "multi_discrete", "nvec": [25, 5], "names": ["location", "found"]}
    {"type": "array", "shape": [18], "dtype": "<f4", "low": null, "high": null}

How values travel: a discrete observation as a one-element list of ints (one
modality), a multi-discrete one as a list of ints (one per modality): exactly the
version-1 OBSERVATION, so grid agents in any language keep working; an array as the
protocol's numpy extension type.  A discrete action is an int; the others are arrays.

:func:`from_gymnasium` converts Gymnasium's spaces (PettingZoo's); anything else is a
:class:`SpaceError` naming what is not supported.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any

__all__ = ["Space", "Discrete", "MultiDiscrete", "Array", "SpaceError", "space_from_wire", "from_gymnasium",
           "MAX_DIMS", "MAX_ELEMENTS"]

#: Largest array a space may describe (its values must fit in a message).
MAX_DIMS = 8
MAX_ELEMENTS = 4096
_DTYPES = frozenset("biuf")


class SpaceError(ValueError):
    """A space that cannot be described or carried; the message says which part."""


class Space(abc.ABC):
    """Base of the three kinds."""

    @abc.abstractmethod
    def to_wire(self) -> dict:
        """The space as a plain map (the module docstring)."""

    @abc.abstractmethod
    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a value of the space."""

    @abc.abstractmethod
    def sample(self, rng) -> Any:
        """A value of the space from ``rng`` (a numpy Generator)."""

    def is_observation(self, value: Any) -> bool:
        """Whether ``value`` is an observation of this space as it is delivered: a list
        of ints, one per modality, for the discrete kinds; an array for arrays."""
        if isinstance(self, Array):
            import numpy as np

            return isinstance(value, np.ndarray) and self.contains(value)
        return type(value) is list and len(value) == self.size and (
            self.contains(value[0]) if isinstance(self, Discrete) else self.contains(value))

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Values in one observation or action (the modalities, or array elements)."""


def _names(names, n: int, what: str) -> tuple[str, ...]:
    names = tuple(names or ())
    if names and (len(names) != n or not all(isinstance(x, str) and len(x) <= 64 for x in names)):
        raise SpaceError(f"{what}: names must be {n} strings of at most 64 characters")
    return names


@dataclasses.dataclass(frozen=True)
class Discrete(Space):
    """One integer in ``[0, n)``."""

    n: int
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if type(self.n) is not int or not 1 <= self.n <= 2**32:
            raise SpaceError(f"a discrete space needs n in [1, 2**32], got {self.n!r:.40}")
        object.__setattr__(self, "names", _names(self.names, self.n, "discrete"))

    def to_wire(self) -> dict:
        return {"type": "discrete", "n": self.n, "names": list(self.names)}

    def contains(self, value: Any) -> bool:
        try:
            return int(value) == value and 0 <= int(value) < self.n
        except (TypeError, ValueError):
            return False

    def sample(self, rng) -> int:
        return int(rng.integers(self.n))

    @property
    def size(self) -> int:
        return 1


@dataclasses.dataclass(frozen=True)
class MultiDiscrete(Space):
    """One integer per modality, modality ``i`` in ``[0, nvec[i])``."""

    nvec: tuple[int, ...]
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        nvec = tuple(self.nvec)
        if not 1 <= len(nvec) <= 32 or not all(type(n) is int and 1 <= n <= 2**32 for n in nvec):
            raise SpaceError(f"a multi-discrete space needs 1..32 sizes in [1, 2**32], got {list(nvec)!r:.60}")
        object.__setattr__(self, "nvec", nvec)
        object.__setattr__(self, "names", _names(self.names, len(nvec), "multi_discrete"))

    def to_wire(self) -> dict:
        return {"type": "multi_discrete", "nvec": list(self.nvec), "names": list(self.names)}

    def contains(self, value: Any) -> bool:
        try:
            values = [int(v) for v in value]
        except (TypeError, ValueError):
            return False
        return len(values) == len(self.nvec) and all(0 <= v < n for v, n in zip(values, self.nvec))

    def sample(self, rng) -> list[int]:
        return [int(rng.integers(n)) for n in self.nvec]

    @property
    def size(self) -> int:
        return len(self.nvec)


@dataclasses.dataclass(frozen=True)
class Array(Space):
    """An array of ``shape`` and ``dtype`` (a numpy type string), within ``low`` and
    ``high`` where they are given (one bound for every element, or None)."""

    shape: tuple[int, ...]
    dtype: str = "<f4"
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        import numpy as np

        shape = tuple(self.shape)
        if not 0 <= len(shape) <= MAX_DIMS or not all(type(d) is int and d >= 1 for d in shape) \
                or math.prod(shape) > MAX_ELEMENTS:
            raise SpaceError(f"an array space needs up to {MAX_DIMS} positive dimensions and at most "
                             f"{MAX_ELEMENTS} elements, got {list(shape)!r:.60}")
        try:
            dtype = np.dtype(self.dtype)
        except TypeError:
            raise SpaceError(f"unknown dtype {self.dtype!r:.20}") from None
        if dtype.kind not in _DTYPES or dtype.fields is not None:
            raise SpaceError(f"arrays of dtype {self.dtype!r} cannot travel (bool, int, uint, float only)")
        for bound in (self.low, self.high):
            if bound is not None and (type(bound) not in (int, float) or math.isnan(bound)):
                raise SpaceError("an array space's low and high are numbers or null")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", dtype.str)
        lo, hi = self._interval()
        if not lo <= hi:
            raise SpaceError(f"an array space of {dtype} within [{self.low}, {self.high}] holds no value")

    def _interval(self) -> tuple[float, float]:
        """The values the bounds leave of the dtype's range: ``[lo, hi]`` (integers rounded
        inwards); empty when ``lo > hi``."""
        import numpy as np

        dtype = np.dtype(self.dtype)
        if dtype.kind == "b":
            lo, hi = 0, 1
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            lo, hi = int(info.min), int(info.max)
        else:
            info = np.finfo(dtype)
            lo, hi = float(info.min), float(info.max)
        whole = dtype.kind in "biu"
        if self.low is not None:
            lo = max(lo, math.ceil(self.low) if whole and math.isfinite(self.low) else self.low)
        if self.high is not None:
            hi = min(hi, math.floor(self.high) if whole and math.isfinite(self.high) else self.high)
        return lo, hi

    def to_wire(self) -> dict:
        return {"type": "array", "shape": list(self.shape), "dtype": self.dtype, "low": self.low, "high": self.high}

    def contains(self, value: Any) -> bool:
        import numpy as np

        a = np.asarray(value)
        if a.shape != self.shape or a.dtype.kind not in _DTYPES:
            return False
        return ((self.low is None or bool(np.all(a >= self.low)))
                and (self.high is None or bool(np.all(a <= self.high))))

    def sample(self, rng):
        """Values within the bounds (where a bound is missing, within 2 of the other one,
        or of 0), always of the space."""
        import numpy as np

        dtype = np.dtype(self.dtype)
        lo, hi = self._interval()
        bounded_lo = self.low is not None and self.low > -math.inf
        bounded_hi = self.high is not None and self.high < math.inf
        if not bounded_lo:
            lo = max(lo, min(-1, hi - 2))
        if not bounded_hi:
            hi = min(hi, max(1, lo + 2))
        if dtype.kind in "biu":
            return rng.integers(int(lo), int(hi), size=self.shape, endpoint=True).astype(dtype)
        if not math.isfinite(hi - lo):  # a span past float64: halve both ends (inf x 0 would be NaN)
            lo, hi = lo / 2, hi / 2
        return np.clip(rng.uniform(lo, hi, size=self.shape), lo, hi).astype(dtype)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def space_from_wire(d: Any) -> Space:
    """A space from its wire map; :class:`SpaceError` for anything else."""
    if not isinstance(d, dict):
        raise SpaceError(f"a space is a map, got {type(d).__name__}")
    kind = d.get("type")
    try:
        if kind == "discrete":
            return Discrete(d["n"], tuple(d.get("names") or ()))
        if kind == "multi_discrete":
            return MultiDiscrete(tuple(d["nvec"]), tuple(d.get("names") or ()))
        if kind == "array":
            return Array(tuple(d["shape"]), d.get("dtype", "<f4"), d.get("low"), d.get("high"))
    except (KeyError, TypeError) as exc:
        raise SpaceError(f"a {kind} space lacks or mistypes {exc}") from None
    raise SpaceError(f"unknown space type {kind!r:.30}: discrete, multi_discrete or array")


def from_gymnasium(space) -> Space:
    """A Gymnasium space (PettingZoo's) as one of ours."""
    import numpy as np

    name = type(space).__name__
    if name == "Discrete":
        if int(space.start) != 0:
            raise SpaceError("a Discrete space must start at 0 to travel")
        return Discrete(int(space.n))
    if name == "MultiDiscrete":
        nvec = np.asarray(space.nvec)
        if nvec.ndim != 1:
            raise SpaceError("a MultiDiscrete space must be one-dimensional to travel")
        return MultiDiscrete(tuple(int(n) for n in nvec))
    if name == "MultiBinary":
        return MultiDiscrete((2,) * int(np.prod(space.n)))
    if name == "Box":
        low, high = np.asarray(space.low), np.asarray(space.high)
        uniform_low = float(low.flat[0]) if low.size and np.all(low == low.flat[0]) else None
        uniform_high = float(high.flat[0]) if high.size and np.all(high == high.flat[0]) else None
        return Array(tuple(int(d) for d in space.shape), np.dtype(space.dtype).str,
                     None if uniform_low is None or not math.isfinite(uniform_low) else uniform_low,
                     None if uniform_high is None or not math.isfinite(uniform_high) else uniform_high)
    raise SpaceError(f"a Gymnasium {name} space cannot travel on the bus (Discrete, MultiDiscrete, MultiBinary "
                     f"and Box can)")
