"""The coordinator's one output channel: frames for peers, and refusals.

Every part of the coordinator that speaks to a peer does it here; the driver takes
the frames with :meth:`Outbox.take`.  A refusal is counted (``errors`` by code name),
logged at a bounded rate naming the peer, and answered with an ERROR carrying the
code's hint: never raised.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.logs import PeerLog
from agentbus_zmq.bus.protocol import ErrorCode

__all__ = ["Outbox"]


class Outbox:
    def __init__(self, errors: collections.Counter, plog: PeerLog, name_of: Callable[[bytes], str]):
        self._frames: list[tuple[bytes, bytes]] = []
        self._errors = errors
        self._plog = plog
        self._name_of = name_of

    def send(self, unit, frame: bytes, now: float) -> None:
        """To a registered unit (its last_sent is the heartbeat clock)."""
        unit.last_sent = now
        self._frames.append((unit.peer, frame))

    def to(self, peer: bytes, frame: bytes) -> None:
        self._frames.append((peer, frame))

    def error(self, peer: bytes, code: ErrorCode, reason: str) -> None:
        """An ERROR with the code's hint, not counted (a notice: REPLACED, DROPPED)."""
        self._frames.append((peer, P.encode(P.Error(code, f"{reason}; {P.ERROR_HINTS[code]}"))))

    def reject(self, peer: bytes, code: ErrorCode, reason: str, now: float) -> None:
        """Count, log and answer a refused message.  Never raises."""
        self._errors[code.name] += 1
        self._plog.warning(now, "refused message from %s: %s: %s", self._name_of(peer), code.name, reason)
        hint = P.ERROR_HINTS.get(code, "")
        self._frames.append((peer, P.encode(P.Error(code, f"{reason}; {hint}" if hint else reason))))

    def take(self) -> list[tuple[bytes, bytes]]:
        out, self._frames = self._frames, []
        return out

    def __bool__(self) -> bool:
        return bool(self._frames)
