"""Log lines that a peer can cause, rate-limited.

Anything a remote peer can trigger (a bad frame, an ERROR it sends, a registration) would
otherwise let it write to our disk at its own pace.  :class:`PeerLog` lets through at most
``per_s`` lines a second of each format string and, once that second is over, one line
saying how many it held back; the events themselves are counted elsewhere (the ledger,
stats).  It never reads a clock: callers pass ``now``, so sans-IO cores stay testable.
"""

from __future__ import annotations

import collections
import logging

__all__ = ["PeerLog"]


class PeerLog:
    """Rate-limited logging, keyed by format string."""

    def __init__(self, logger: logging.Logger, per_s: int = 20):
        self.logger = logger
        self.per_s = per_s
        self._window_end = 0.0
        self._counts: collections.Counter = collections.Counter()
        self._levels: dict[str, int] = {}
        #: lines held back since the start (all formats)
        self.suppressed = 0

    def log(self, level: int, now: float, fmt: str, *args) -> bool:
        """Log ``fmt % args`` unless this format already had ``per_s`` lines this second.
        Returns whether it was logged."""
        if now >= self._window_end:
            self.roll(now)
        n = self._counts[fmt] = self._counts[fmt] + 1
        if n <= self.per_s:
            self.logger.log(level, fmt, *args)
            return True
        self._levels[fmt] = level
        self.suppressed += 1
        return False

    def warning(self, now: float, fmt: str, *args) -> bool:
        return self.log(logging.WARNING, now, fmt, *args)

    def info(self, now: float, fmt: str, *args) -> bool:
        return self.log(logging.INFO, now, fmt, *args)

    def roll(self, now: float) -> None:
        """Close the current second: one summary line per format that was held back."""
        if now < self._window_end:
            return
        for fmt, n in self._counts.items():
            if n > self.per_s:
                self.logger.log(self._levels.get(fmt, logging.WARNING),
                                "... %d more lines like %r in the last second (events are counted in stats)",
                                n - self.per_s, fmt.split(":")[0][:80])
        self._counts.clear()
        self._levels.clear()
        self._window_end = now + 1.0
