"""Log lines that a peer can cause, rate-limited.

Anything a remote peer can trigger (a bad frame, an ERROR it sends, a registration) would
otherwise let it write to our disk at its own pace.  :class:`PeerLog` lets through at most
``per_s`` lines a second of each format string and, once that second is over, one line
saying how many it held back; the events themselves are counted elsewhere (the ledger,
stats).  It never reads a clock: callers pass ``now``, so sans-IO cores stay testable.

Text a peer chose (a BYE's or an ERROR's reason, an id) is never written raw: every
string argument goes through :func:`printable` first, so a newline cannot forge a log
line and an escape sequence cannot reach a terminal that shows the log.
"""

from __future__ import annotations

import collections
import logging
import re

__all__ = ["PeerLog", "printable", "errno_name"]

#: C0 and C1 control characters, DEL, and the Unicode line and paragraph separators
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(value: object, limit: int = 300) -> str:
    """``value`` as one line of plain text: control characters escaped (``\\x0a``),
    at most ``limit`` characters of it (then an ellipsis)."""
    text = str(value)
    cut = text[:limit]
    return _CONTROL.sub(_escape, cut) + ("…" if len(text) > limit else "")


def errno_name(value: int) -> str:
    """An errno as a log line names it: ``EMFILE (Too many open files)``."""
    import errno
    import os

    return f"{errno.errorcode.get(value, value)} ({os.strerror(value)})" if value else "unknown error"


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


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
            self.logger.log(level, fmt, *[printable(a) if isinstance(a, str) else a for a in args])
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
