"""SIGINT/SIGTERM as a pollable event, so socket loops wake at once and stop cleanly.

The handler only sets a flag; ``signal.set_wakeup_fd`` writes a byte to a pipe whose
read end the loop registers with its ``zmq.Poller``.  No exception is ever raised from
inside a handler, so a signal can never interrupt a send half-way.
"""

from __future__ import annotations

import os
import signal

__all__ = ["StopSignal"]


class StopSignal:
    """Install with ``with StopSignal() as stop:``; poll ``stop.fd``; test ``stop.requested``."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: int | None = None
        self.fd = -1
        self._w = -1
        self._old: dict = {}
        self._old_fd = -1

    def _handle(self, signum, frame) -> None:
        self.requested = signum

    def __enter__(self) -> StopSignal:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def drain(self) -> None:
        try:
            while os.read(self.fd, 512):
                pass
        except BlockingIOError:
            pass

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(self._old_fd)
        os.close(self.fd)
        os.close(self._w)
