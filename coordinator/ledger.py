"""The coordinator's accounts: the step ledger, error counters and latency samples.

Invariant, at every instant::

    sent == received + late + missing + outstanding

``sent``: observations handed to the socket; ``received``: actions back in time;
``late``: actions back after their deadline (counted, then dropped); ``missing``:
observations never answered (deadline passed, or the agent died or left with one
outstanding); ``outstanding``: observations still awaiting an answer.
"""

from __future__ import annotations

import collections
import dataclasses
import math

__all__ = ["Histogram", "Ledger", "Timings"]


@dataclasses.dataclass
class Ledger:
    sent: int = 0
    received: int = 0
    late: int = 0
    missing: int = 0
    outstanding: int = 0
    undeliverable: int = 0
    #: answers in time, but after ``slow_fraction`` of their deadline (not in the invariant)
    slow: int = 0
    ticks: int = 0
    #: steps outstanding when the bus stopped (counted missing; the stop line says so)
    in_flight_at_stop: int = 0
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def balanced(self) -> bool:
        return self.sent == self.received + self.late + self.missing + self.outstanding

    def snapshot(self) -> dict:
        return {
            "sent": self.sent,
            "received": self.received,
            "late": self.late,
            "missing": self.missing,
            "outstanding": self.outstanding,
            "undeliverable": self.undeliverable,
            "slow": self.slow,
            "ticks": self.ticks,
            "balanced": self.balanced(),
            "errors": {str(k): v for k, v in sorted(self.errors.items())},
        }

    def summary(self) -> str:
        """The accounts as one line for a log; steps in flight when the bus stopped are
        counted missing, as the invariant wants, and said so."""
        missing = f"missing {self.missing:,}"
        if self.in_flight_at_stop:
            missing += f" ({self.in_flight_at_stop:,} in flight at the stop)"
        errors = ", ".join(f"{k} {v:,}" for k, v in sorted(self.errors.items())) or "none"
        return (f"sent {self.sent:,}, received {self.received:,}, late {self.late:,}, {missing}, "
                f"outstanding {self.outstanding:,}, undeliverable {self.undeliverable:,}, slow {self.slow:,}; "
                f"{'balanced' if self.balanced() else 'NOT balanced'}; errors: {errors}")


@dataclasses.dataclass
class Timings:
    """What the schedule measures of each answer, for /metrics and the live efficiency:
    the CPU time agents reported for their steps, and (with ``histograms``) the bus's
    latency per answer and lock-step tick durations, in microseconds."""

    histograms: dataclasses.InitVar[bool] = False
    agent_cpu_us: int = 0
    latency: Histogram | None = None
    latency_sum_us: float = 0.0
    tick_time: Histogram | None = None
    tick_time_sum_us: float = 0.0
    #: the most CPU one agent-step's claim counts for (efficiency.cpu_bound, set at each
    #: liveness sweep): a straggler reporting its wait as work cannot lift live efficiency
    cpu_cap_us: float = math.inf

    def __post_init__(self, histograms: bool) -> None:
        if histograms:
            self.latency, self.tick_time = Histogram(), Histogram()


class Histogram:
    """Fixed-memory latency histogram: log-spaced buckets 2 % wide from 1 us to ~100 s.

    Recording is O(1) and allocates nothing, so a window of a million steps costs the
    coordinator the same 8 KB as one of a hundred; percentiles are exact to the bucket
    (within 2 %).
    """

    STEP = 1.02
    BUCKETS = 940  # 1.02 ** 939 ~ 1.2e8 us

    def __init__(self) -> None:
        self.counts = [0] * self.BUCKETS
        self.n = 0
        self._inv_log = 1.0 / math.log(self.STEP)

    def record(self, us: float, count: int = 1) -> None:
        """``count`` samples of ``us`` (a host's frame: one latency for all its agents)."""
        i = int(math.log(us) * self._inv_log) + 1 if us >= 1.0 else 0
        self.counts[i if i < self.BUCKETS else self.BUCKETS - 1] += count
        self.n += count

    def percentiles(self, qs=(50, 95, 99)) -> dict[str, float]:
        """Nearest-rank percentiles (each bucket's geometric middle), ``{"p50": us}``."""
        out = {}
        for q in qs:
            rank, seen = max(1, -(-q * self.n // 100)), 0
            for i, c in enumerate(self.counts):
                seen += c
                if seen >= rank:
                    out[f"p{q}"] = 0.0 if i == 0 else self.STEP ** (i - 0.5)
                    break
            else:
                out[f"p{q}"] = 0.0
        return out
