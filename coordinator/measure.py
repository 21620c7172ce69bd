"""Measurement windows: what a CONTROL ``measure`` asks for, counted inside the window.

A window goes through three phases::

    WAITING --(N agents have answered a first observation)--> WARMUP
    WARMUP  --(warmup_steps more steps)-----------------------> WINDOW
    WINDOW  --(steps counted, or duration elapsed)-------------> closed: REPLY ok
    any     --(timeout_s elapsed, or shutdown)-----------------> closed: REPLY refused

Inside the window it keeps its own counts of what happened *inside it*: an observation
sent before the window opened and answered late inside it is neither a window step nor
a window loss, so no count can go negative.  The core tells it about each event; it
never looks at the core.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Callable

from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.coordinator.metrics import Histogram

__all__ = ["MeasurePhase", "MeasureRequest", "Measurement", "ControlError", "LIMITS"]


class ControlError(Exception):
    """A CONTROL request refused; ``code`` travels in the REPLY's ``result``."""

    def __init__(self, code: ErrorCode, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class MeasurePhase(enum.Enum):
    WAITING = "waiting"
    WARMUP = "warmup"
    WINDOW = "window"


# Enum members cost 120 ns a lookup on 3.11, and these are read on every step.
WAITING, WARMUP, WINDOW = MeasurePhase.WAITING, MeasurePhase.WARMUP, MeasurePhase.WINDOW

#: Largest values ``measure`` accepts (docs/protocol.md).
LIMITS = {"agents": 1_000_000, "warmup_steps": 10**9, "steps": 10**12, "duration_s": 86_400.0,
          "timeout_s": 7 * 86_400.0}


@dataclasses.dataclass(frozen=True)
class MeasureRequest:
    """The arguments of CONTROL ``measure``, validated."""

    agents: int = 1
    warmup_steps: int = 0
    steps: int = 0
    duration_s: float = 0.0
    timeout_s: float = 60.0

    @classmethod
    def parse(cls, args: dict) -> MeasureRequest:
        unknown = set(args) - set(LIMITS)
        if unknown:
            raise ControlError(ErrorCode.BAD_FIELD, f"measure takes no argument {sorted(unknown)[0]!r}; "
                                                    f"it takes {', '.join(LIMITS)}")
        values = {}
        for field in dataclasses.fields(cls):
            if field.name not in args:
                continue
            v = args[field.name]
            integral = field.type == "int"
            if type(v) not in ((int,) if integral else (int, float)) or not math.isfinite(v) \
                    or not 0 <= v <= LIMITS[field.name]:
                kind = "an integer" if integral else "a finite number"
                raise ControlError(ErrorCode.BAD_FIELD, f"measure's {field.name} must be {kind} in "
                                                        f"[0, {LIMITS[field.name]:g}], got {v!r:.40}")
            values[field.name] = v
        req = cls(**values)
        if req.agents < 1 or (req.steps <= 0 and req.duration_s <= 0) or req.timeout_s <= 0:
            raise ControlError(ErrorCode.BAD_FIELD, "measure needs agents >= 1, steps or duration_s > 0, "
                                                    "and timeout_s > 0")
        return req


class Measurement:
    """One window, from request to REPLY."""

    def __init__(self, peer: bytes, request_id: int, request: MeasureRequest, now: float,
                 cpu_clock: Callable[[], tuple[float, float]]):
        self.peer = peer
        self.request_id = request_id
        self.request = request
        self.phase = WAITING
        self.requested_at = now
        self.deadline = now + request.timeout_s
        self._cpu_clock = cpu_clock
        self.ready_s = 0.0
        self._warmup_until = 0
        self.opened_at = 0.0
        self._cpu_start = (0.0, 0.0)
        # inside the window only
        self.sent = self.received = self.late = self.missing = self.undeliverable = self.ticks = 0
        self.compute_us = 0
        self.cpu_us = 0
        self.latency = Histogram()

    @property
    def counting(self) -> bool:
        return self.phase is WINDOW

    # --- phases -------------------------------------------------------------------

    def advance(self, stepping: int, received_total: int, now: float) -> None:
        """Move on from WAITING / WARMUP when their condition holds (idempotent)."""
        if self.phase is WAITING and stepping >= self.request.agents:
            self.ready_s = now - self.requested_at
            self.phase = WARMUP
            self._warmup_until = received_total + self.request.warmup_steps
        if self.phase is WARMUP and received_total >= self._warmup_until:
            self.phase = WINDOW
            self.opened_at = now
            self._cpu_start = self._cpu_clock()

    def done(self, now: float) -> bool:
        """The window has what it asked for (steps counted, or its duration elapsed)."""
        r = self.request
        return self.phase is WINDOW and (
            (r.steps > 0 and self.received >= r.steps)
            or (r.duration_s > 0 and now - self.opened_at >= r.duration_s))

    def next_timeout(self, now: float) -> float:
        t = self.deadline
        if self.phase is WINDOW and self.request.duration_s > 0:
            t = min(t, self.opened_at + self.request.duration_s)
        return t

    # --- events, counted only while the window is open ------------------------------

    def on_sent(self, n: int = 1) -> None:
        if self.phase is WINDOW:
            self.sent += n

    def on_received(self, latency_us: float, compute_us: int, n: int = 1, cpu_us: int = 0) -> None:
        """``n`` steps answered in time, in one frame (a host's) or one ACTION; ``cpu_us``
        the CPU time the agents reported for them."""
        if self.phase is WINDOW:
            self.received += n
            self.latency.record(latency_us, n)
            self.compute_us += compute_us
            self.cpu_us += cpu_us

    def on_expired(self, n: int = 1) -> None:
        if self.phase is WINDOW:
            self.missing += n

    def on_late(self, n: int = 1) -> None:
        """A late answer to observations that expired inside this window (the core
        checks that): the window's loss moves from missing to late."""
        self.missing -= n
        self.late += n

    def on_undeliverable(self) -> None:
        if self.phase is WINDOW:
            self.undeliverable += 1

    def on_tick(self) -> None:
        if self.phase is WINDOW:
            self.ticks += 1

    # --- the result ---------------------------------------------------------------

    def result(self, now: float, agents: int, ledger: dict, mode: str, cores: int = 1) -> dict:
        """The window's figures; ``cores``: the cores the agents can use (the live
        efficiency's C), for ``efficiency_live``, the live formula over this window."""
        process, thread = self._cpu_clock()
        elapsed = max(now - self.opened_at, 1e-9)
        return {
            "agents": agents,
            # CLOCK_MONOTONIC, comparable with other processes' time.monotonic() on this host
            "opened_at": self.opened_at,
            "closed_at": now,
            "ready_s": self.ready_s,
            "elapsed_s": elapsed,
            "steps": self.received,
            "rate": self.received / elapsed,
            "ticks": self.ticks,
            "latency_us": self.latency.percentiles(),
            "latency_samples": self.latency.n,
            "compute_s": self.compute_us / 1e6,
            "agent_cpu_s": self.cpu_us / 1e6,
            "efficiency_live": self.cpu_us / 1e6 / (elapsed * min(self.request.agents, cores)),
            "coordinator_cpu_s": process - self._cpu_start[0],
            "coordinator_thread_cpu_s": thread - self._cpu_start[1],
            "window": {"sent": self.sent, "received": self.received, "late": self.late, "missing": self.missing,
                       "undeliverable": self.undeliverable},
            "ledger": ledger,
            "mode": mode,
        }
