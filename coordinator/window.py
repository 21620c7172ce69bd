"""Measurement windows: what a CONTROL ``measure`` asks for, counted inside the window.

:class:`Windows` owns the running window and those queued behind it (answering each
with one REPLY when it closes, times out, or its client goes); :class:`Measurement` is
one window.

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

import collections
import enum
from typing import Callable

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.commands import Call, CommandError, refusal
from agentbus_zmq.bus.commands.measure import MeasureRequest
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.coordinator.ledger import Histogram

__all__ = ["MeasurePhase", "Measurement", "Windows", "MAX_QUEUED_MEASURES"]

#: Measurements that may wait behind the running one; more are refused (BUSY).
MAX_QUEUED_MEASURES = 8


class MeasurePhase(enum.Enum):
    WAITING = "waiting"
    WARMUP = "warmup"
    WINDOW = "window"


# Enum members cost 120 ns a lookup on 3.11, and these are read on every step.
WAITING, WARMUP, WINDOW = MeasurePhase.WAITING, MeasurePhase.WARMUP, MeasurePhase.WINDOW

class Measurement:
    """One window, from request to REPLY."""

    def __init__(self, call: Call, request: MeasureRequest, now: float, cpu_clock: Callable[[], tuple[float, float]]):
        self.peer = call.peer
        self.request_id = call.request_id
        self.request = request
        self.phase = WAITING
        self.requested_at = now
        self.deadline = call.now + request.timeout_s
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


class Windows:
    """The running measurement, and up to MAX_QUEUED_MEASURES waiting behind it.

    ``progress()`` gives (agents ready, steps received so far), which move a window on
    from waiting and warming up; ``context()`` what a closing window reports beside its
    own counts: (agents registered, the ledger's snapshot, the mode, the agents' cores)."""

    def __init__(self, outbox, cpu_clock: Callable[[], tuple[float, float]], progress: Callable[[], tuple[int, int]],
                 context: Callable[[], tuple]):
        self.outbox = outbox
        self._cpu_clock = cpu_clock
        self._progress = progress
        self._context = context
        self.current: Measurement | None = None
        self._queue: collections.deque[tuple[Call, MeasureRequest]] = collections.deque()
        self.stopping = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    def clients(self) -> set[bytes]:
        """Peers waiting for a measurement's REPLY."""
        return {call.peer for call, _ in self._queue} | ({self.current.peer} if self.current else set())

    def request(self, call: Call, request: MeasureRequest) -> None:
        """Start a measurement, or queue it behind the running one (its ``timeout_s``
        counts from the request); answered when it closes."""
        if self.current is None:
            self._start(call, request, call.now)
        elif len(self._queue) < MAX_QUEUED_MEASURES:
            self._queue.append((call, request))
        else:
            raise CommandError(ErrorCode.BUSY, f"a measurement is running and {len(self._queue)} are queued "
                                               f"(at most {MAX_QUEUED_MEASURES})")

    def _start(self, call: Call, request: MeasureRequest, now: float) -> None:
        self.current = Measurement(call, request, now, self._cpu_clock)
        self.current.advance(*self._progress(), now)

    def next_timeout(self, now: float) -> float:
        return self.current.next_timeout(now) if self.current is not None else float("inf")

    def on_timer(self, now: float) -> None:
        m = self.current
        if m is not None:
            if m.done(now):
                self.close(now)
            elif now >= m.deadline:
                agents = self._context()[0]
                self._finish(False, refusal(ErrorCode.TIMED_OUT, f"measure timed out in phase {m.phase.value!r} "
                                                                 f"with {agents} agents registered"), now)
        for item in [q for q in self._queue if now >= q[0].now + q[1].timeout_s]:
            self._queue.remove(item)
            self._reply(item[0], False, refusal(ErrorCode.TIMED_OUT, "measure timed out while queued behind other "
                                                                     "measurements"))

    def close(self, now: float) -> None:
        """The running window has what it asked for: reply with its figures."""
        agents, ledger, mode, cores = self._context()
        self._finish(True, self.current.result(now, agents, ledger, mode, cores), now)

    def cancel(self, peer: bytes, now: float) -> int:
        """The client ``peer`` is gone: its measurements, running or queued, are dropped.
        Returns how many."""
        gone = [q for q in self._queue if q[0].peer == peer]
        for item in gone:
            self._queue.remove(item)
        cancelled = len(gone)
        if self.current is not None and self.current.peer == peer:
            self.current = None
            cancelled += 1
            self._next(now)
        return cancelled

    def shutdown(self) -> None:
        self.stopping = True
        if self.current is not None:
            m, self.current = self.current, None
            self.outbox.to(m.peer, P.encode(P.Reply(m.request_id, False, refusal(ErrorCode.SHUTTING_DOWN,
                                                                                  "coordinator shutting down"))))
        while self._queue:
            call, _ = self._queue.popleft()
            self._reply(call, False, refusal(ErrorCode.SHUTTING_DOWN, "coordinator shutting down"))

    def _finish(self, ok: bool, result: dict, now: float) -> None:
        m, self.current = self.current, None
        self.outbox.to(m.peer, P.encode(P.Reply(m.request_id, ok, result)))
        self._next(now)

    def _next(self, now: float) -> None:
        if self._queue and not self.stopping:
            call, request = self._queue.popleft()
            self._start(call, request, now)

    def _reply(self, call: Call, ok: bool, result: dict) -> None:
        self.outbox.to(call.peer, P.encode(P.Reply(call.request_id, ok, result)))
