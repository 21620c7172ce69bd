"""Clocks as objects: the system's, and a fake twin for tests (trio's ``MockClock``).

Sans-IO cores take the time as an argument on every call (``now``); what they read by
themselves, the process's CPU time and the machine's load, comes from a :class:`Clock`
they are given.  :class:`FakeClock` has the same interface and moves only when told.
"""

from __future__ import annotations

import abc
import os
import time

__all__ = ["Clock", "SystemClock", "FakeClock"]


class Clock(abc.ABC):
    """What a core may ask of time: wall time, CPU time, the machine's load."""

    @abc.abstractmethod
    def now(self) -> float:
        """Monotonic seconds."""

    @abc.abstractmethod
    def cpu(self) -> tuple[float, float]:
        """CPU seconds of (this process, this thread)."""

    @abc.abstractmethod
    def load(self) -> float:
        """The machine's one-minute load average."""


class SystemClock(Clock):
    def now(self) -> float:
        return time.monotonic()

    def cpu(self) -> tuple[float, float]:
        return time.process_time(), time.thread_time()

    def load(self) -> float:
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0


class FakeClock(Clock):
    """Time, CPU time and load that change only when a test says so."""

    def __init__(self, start: float = 0.0, cpu: float = 0.0, load: float = 0.0):
        self.t = start
        self.cpu_s = cpu
        self.load_avg = load

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.t += seconds
        return self.t

    def cpu(self) -> tuple[float, float]:
        return self.cpu_s, self.cpu_s

    def load(self) -> float:
        return self.load_avg
