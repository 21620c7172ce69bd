"""Who is still there: heartbeats, silence, setup grace, probes and stragglers.

:class:`Liveness` owns when the next sweep and probe are due and which units strike
out; it sends heartbeats and probes, and returns the units that must go, with the
reason, for the facade to drop (it never drops one itself):

* a unit silent for ``heartbeat x liveness`` is dead; one registered but not ready
  after ``setup_grace`` is dropped;
* when a connection closes, every unit gets a HEARTBEAT, so that the one whose
  connection it was is found gone (the send fails) and dropped at once; at most one such
  probe every PROBE_INTERVAL_S, twice per closing (the socket may learn of the closed
  pipe a moment after the monitor does);
* ``drop_after`` deadlines in a row missed, answered late or slowly (strikes), and the
  unit is dropped from the schedule (told DROPPED; it may HELLO again).
"""

from __future__ import annotations

import collections
import dataclasses

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.logs import PeerLog
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.coordinator.outbox import Outbox
from agentbus_zmq.coordinator.registry import Registry
from agentbus_zmq.coordinator.settings import Settings
from agentbus_zmq.coordinator.units import JOINING, STEP_TIMES, Unit

__all__ = ["Liveness", "Departure", "PROBE_INTERVAL_S", "PROBES_PER_CLOSE", "MAX_STRAGGLERS_LISTED"]

PROBE_INTERVAL_S = 0.25
PROBES_PER_CLOSE = 2
#: Units listed in ``stats["stragglers"]`` (the worst first).
MAX_STRAGGLERS_LISTED = 16


@dataclasses.dataclass(frozen=True, slots=True)
class Departure:
    """A unit that must go, and the ledger error it is counted under."""

    unit: Unit
    reason: str


class Liveness:
    def __init__(self, settings: Settings, registry: Registry, outbox: Outbox, errors: collections.Counter,
                 plog: PeerLog):
        self.settings = settings
        self.registry = registry
        self.outbox = outbox
        self._errors = errors
        self._plog = plog
        self.next_sweep = 0.0
        #: a connection closed: probes still to run, and when the next may
        self._probe_due = 0
        self._next_probe = 0.0
        #: units to drop at the next timer (Settings.drop_after)
        self._stragglers: dict[Unit, None] = {}
        self._heartbeat = P.encode(P.Heartbeat())

    def next_timeout(self, now: float) -> float:
        """When :meth:`on_timer` has something to do (absolute time)."""
        if self._stragglers:
            return now
        return min(self.next_sweep, self._next_probe) if self._probe_due else self.next_sweep

    def on_connection_closed(self) -> None:
        self._probe_due = PROBES_PER_CLOSE

    def on_timer(self, now: float, clients: set[bytes]) -> list[Departure]:
        """Stragglers, probes and the sweep, as due; ``clients``: CONTROL peers awaiting an
        answer, probed with the units.  Returns who must go."""
        out = []
        if self._stragglers:
            out += self._drop_stragglers(now)
        if self._probe_due and now >= self._next_probe:
            self._probe(now, clients)
        if now >= self.next_sweep:
            self.next_sweep = now + self.settings.heartbeat / 4
            out += self._sweep(now)
        return out

    def strike(self, unit: Unit) -> None:
        """A deadline missed, or answered late or slowly."""
        unit.strikes += 1
        if unit.strikes >= self.settings.drop_after > 0:
            self._stragglers[unit] = None

    def clear(self, unit: Unit) -> None:
        """A prompt answer: the strikes in a row start again."""
        unit.strikes = 0

    def forget(self, unit: Unit) -> None:
        self._stragglers.pop(unit, None)

    def _sweep(self, now: float) -> list[Departure]:
        """Liveness, setup grace and heartbeats (deadlines are the schedule's)."""
        s = self.settings
        out = []
        for unit in self.registry.by_peer.values():
            if unit.state is JOINING:
                if now - unit.grace_from > s.setup_grace:
                    self._plog.warning(now, "%s did not say it was ready within %.1f s of HELLO: dropped", unit.name,
                                       s.setup_grace)
                    out.append(Departure(unit, "setup_expired"))
                    continue
            elif now - unit.last_seen > s.expiry:
                self._plog.warning(now, "%s silent for %.2f s: declared dead", unit.name, now - unit.last_seen)
                out.append(Departure(unit, "expired"))
                continue
            if now - unit.last_sent >= s.heartbeat:
                self.outbox.send(unit, self._heartbeat, now)
        return out

    def _probe(self, now: float, clients: set[bytes]) -> None:
        """A connection closed: a HEARTBEAT to every unit and to waiting clients.  The one
        whose connection it was cannot be sent to, and the driver reports it gone."""
        self._probe_due -= 1
        self._next_probe = now + PROBE_INTERVAL_S
        for unit in self.registry.by_peer.values():
            self.outbox.send(unit, self._heartbeat, now)
        for peer in clients:
            self.outbox.to(peer, self._heartbeat)

    def _drop_stragglers(self, now: float) -> list[Departure]:
        stragglers, self._stragglers = self._stragglers, {}
        out = []
        for unit in stragglers:
            if self.registry.by_peer.get(unit.peer) is not unit:
                continue
            self._plog.warning(now, "%s dropped from the schedule: %d deadlines in a row missed, late or slow "
                                    "(missed %d, late %d, slow %d in all)", unit.name, unit.strikes, unit.missed,
                               unit.late, unit.slow)
            self.outbox.error(unit.peer, ErrorCode.DROPPED, f"{unit.name}: {unit.strikes} deadlines in a row missed, "
                                                            f"late or slow")
            out.append(Departure(unit, "dropped_stragglers"))
        return out

    # --- reports ---------------------------------------------------------------------

    def straggler_table(self) -> dict:
        """The units that missed, answered late or slowly most often (at most
        MAX_STRAGGLERS_LISTED, worst first): their name -> counts."""
        units = [u for u in self.registry.by_peer.values() if u.missed or u.late or u.slow]
        units.sort(key=lambda u: (u.missed + u.late + u.slow), reverse=True)
        return {u.name: {"missed": u.missed, "late": u.late, "slow": u.slow, "in_a_row": u.strikes}
                for u in units[:MAX_STRAGGLERS_LISTED]}

    def slowest_units(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` units whose steps cost the bus most: the longest median wall time from
        observation sent to answer read, by the coordinator's clock (not what they report):
        (name, p50 in us)."""
        ranked = []
        for u in self.registry.by_peer.values():
            if u.times_n:
                waits = sorted(u.waits[:min(u.times_n, STEP_TIMES)])
                ranked.append((waits[len(waits) // 2], u.name))
        ranked.sort(reverse=True)
        return [(name, p50) for p50, name in ranked[:k]]
