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

__all__ = ["Ledger", "percentiles"]

#: Latency samples kept per measurement window (a uniform subsample beyond this).
MAX_SAMPLES = 1_000_000


@dataclasses.dataclass
class Ledger:
    sent: int = 0
    received: int = 0
    late: int = 0
    missing: int = 0
    outstanding: int = 0
    undeliverable: int = 0
    ticks: int = 0
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
            "ticks": self.ticks,
            "balanced": self.balanced(),
            "errors": {str(k): v for k, v in sorted(self.errors.items())},
        }


def percentiles(samples: list[float], qs=(50, 95, 99)) -> dict[str, float]:
    """Nearest-rank percentiles, ``{"p50": ...}``; empty input gives zeros."""
    if not samples:
        return {f"p{q}": 0.0 for q in qs}
    ordered = sorted(samples)
    n = len(ordered)
    return {f"p{q}": float(ordered[min(n - 1, max(0, -(-q * n // 100) - 1))]) for q in qs}
