"""The coordinator's logic, sans-IO: a facade over parts that each own their state.

:class:`CoordinatorCore` never touches a socket or a clock of its own: the driver feeds
it frames and the current time, and sends what :meth:`~CoordinatorCore.take_outbox`
hands back (a list of ``(peer routing id, frame)``).  Tests drive it the same way with a
fake clock and no sockets.

Its parts, and what each owns (calls go one way, down this list, never back up):

* :mod:`.registry`: who is registered, admission, takeover, places in the world;
* :mod:`.schedule`: the tick (``Lockstep`` or ``Async``), what is outstanding and when
  it is due, the ledger's step counts and timings;
* :mod:`.liveness`: heartbeats, silence, setup grace, probes and stragglers (it names
  who must go; the facade drops them);
* :mod:`.window`: measurement windows (CONTROL ``measure``);
* :mod:`.efficiency`: the live efficiency and its alert;
* :mod:`.units`: the entries, and the one table of their states;
* :mod:`.report`: the typed views (``bus.report``) built from the parts;
* ``bus.commands``: CONTROL commands, served through this facade's ``Server`` methods
  (:meth:`stats`, :meth:`agents_page`, :meth:`measure`).

The facade keeps the dispatch table of message types, the timers and the order in
which a departing unit is settled: the schedule counts what it owed, liveness forgets
it, the registry removes it, and the schedule goes on without it.
"""

from __future__ import annotations

import collections
import logging
import secrets
from collections.abc import Callable, Mapping

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.clock import Clock, SystemClock
from agentbus_zmq.bus.commands import COMMANDS, Call, CommandError, refusal
from agentbus_zmq.bus.commands.measure import MeasureRequest
from agentbus_zmq.bus.logs import PeerLog, errno_name
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.bus.report import PAGE_SIZE, AgentsPage, Stats
from agentbus_zmq.coordinator import report
from agentbus_zmq.coordinator.guard import GuardedWorld
from agentbus_zmq.coordinator.efficiency import SLOWEST_NAMED, AlertEvent, LiveEfficiency, Sample, cpu_bound, explain
from agentbus_zmq.coordinator.ledger import Ledger, Timings
from agentbus_zmq.coordinator.liveness import Liveness
from agentbus_zmq.coordinator.outbox import Outbox
from agentbus_zmq.coordinator.registry import Registry
from agentbus_zmq.coordinator.arenas import ArenaLockstep
from agentbus_zmq.coordinator.schedule import SCHEDULES
from agentbus_zmq.coordinator.settings import MODES, ConfigError, Settings
from agentbus_zmq.coordinator.units import (GONE, JOINING, AgentEntry, AgentState, HostEntry, IllegalTransition, Member,
                                            Unit)
from agentbus_zmq.coordinator.window import Windows
from agentbus_zmq.coordinator.grid import GridWorld
from agentbus_zmq.coordinator.world import World, WorldFull

__all__ = ["CoordinatorCore", "Settings", "ConfigError", "AgentState", "AgentEntry", "HostEntry", "Member",
           "IllegalTransition", "MODES", "STATS_DETAIL_MAX", "WARNINGS_PER_S"]

log = logging.getLogger(__name__)
_ACTION, _decode = P.Action, P.decode

#: Lines about what peers do (registrations, refusals, errors they report) logged per
#: second at most, per kind of line; the rest are counted.
WARNINGS_PER_S = 20
#: ``stats`` lists agents when there are at most this many, else a page of them on request.
STATS_DETAIL_MAX = PAGE_SIZE


class CoordinatorCore:
    """Registry, schedule, liveness, measurements and the live efficiency, behind one
    face.  Feed it; take its outbox."""

    def __init__(
        self,
        settings: Settings = Settings(),
        world: World | None = None,
        session: str = "s0",
        clock: Clock | None = None,
        key_patterns: Mapping[bytes, tuple[str, ...] | None] | None = None,
        token: Callable[[], str] = lambda: secrets.token_hex(16),
        histograms: bool = False,
    ):
        """``key_patterns``: with CURVE, each allowed key's agent id patterns (None: any
        id); ``token``: makes each registration's secret (tests pass a predictable one);
        ``histograms``: keep latency and tick-duration histograms (for /metrics);
        ``clock``: CPU time and load (:class:`~agentbus_zmq.bus.clock.FakeClock` in tests)."""
        self.settings = settings
        self.session = session
        self.clock = clock if clock is not None else SystemClock()
        self.ledger = Ledger()
        self.timings = Timings(histograms)
        self._plog = PeerLog(log, WARNINGS_PER_S)
        #: the world behind its door: every part reaches it only through this guard
        self.world = GuardedWorld(world if world is not None else GridWorld(), self.clock.now, self._plog)
        self.outbox = Outbox(self.ledger.errors, self._plog, lambda peer: self.registry.name_of(peer))
        self.registry = Registry(settings, self.world, session, self.outbox, self.ledger.errors, key_patterns, token)
        self._by_peer = self.registry.by_peer  # read on every message (the registry owns it)
        self._max_bytes = settings.max_message_bytes
        self.liveness = Liveness(settings, self.registry, self.outbox, self.ledger.errors, self._plog)
        self.windows = Windows(self.outbox, self.clock.cpu, lambda: (self.registry.ready, self.ledger.received),
                               lambda: (len(self.registry.agents), self.ledger.snapshot(), settings.mode,
                                        settings.agent_cores))
        schedule = ArenaLockstep if settings.mode == "lockstep" and settings.lockstep_scope == "arena" else \
            SCHEDULES[settings.mode]
        self.schedule = schedule(settings, self.registry, self.ledger, self.timings, self.outbox,
                                                 self.liveness, self.windows, self._plog)
        self.live = LiveEfficiency(settings.efficiency_window, settings.agent_cores, settings.alert_threshold,
                                   settings.alert_for)
        #: alerts raised or cleared, for the driver's hook (take_alerts)
        self._alerts: list[AlertEvent] = []
        self.connections: collections.Counter = collections.Counter()
        self.started_at: float | None = None
        self.stopping = False
        self._dispatch = {
            P.Action: self._on_action, P.HostAction: self._on_host_action, P.Heartbeat: self._on_heartbeat,
            P.Hello: self._on_hello, P.HostHello: self._on_host_hello, P.Bye: self._on_bye,
            P.HostBye: self._on_host_bye, P.Control: self._on_control, P.Error: self._on_error,
        }

    # --- what others read ------------------------------------------------------------

    @property
    def agents(self) -> dict[str, AgentEntry | Member]:
        return self.registry.agents

    @property
    def hosts(self) -> dict[str, HostEntry]:
        return self.registry.hosts

    @property
    def tick(self) -> int:
        return self.schedule.tick

    @property
    def ready(self) -> int:
        """Agents that have answered an observation."""
        return self.registry.ready

    @property
    def pending(self) -> int:
        """Agents registered and not yet ready (a host's members count each)."""
        return self.registry.joining

    @property
    def has_output(self) -> bool:
        return bool(self.outbox)

    def cpu_seconds(self) -> float:
        """The coordinator process's CPU time so far."""
        return self.clock.cpu()[0]

    def straggler_table(self) -> dict:
        return self.liveness.straggler_table()

    # --- input ------------------------------------------------------------------

    def on_frames(self, peer: bytes, frames: list[bytes], now: float, key: bytes | None = None, address="") -> None:
        """One multipart message from ``peer`` (routing id stripped); ``key``: its connection's
        CURVE key (None without CURVE); ``address``: its remote address, if the driver knows it."""
        if len(frames) != 1:
            self.outbox.reject(peer, ErrorCode.BAD_FRAMING, f"expected 1 frame, got {len(frames)}", now)
            return
        try:
            msg = _decode(frames[0], self._max_bytes)
        except P.ProtocolError as exc:
            self.outbox.reject(peer, exc.code, exc.reason, now)
            return
        self.on_message(peer, msg, now, key, address)

    def on_message(self, peer: bytes, msg: P.Message, now: float, key: bytes | None = None, address: str = "") -> None:
        unit = self._by_peer.get(peer)
        mtype = type(msg)
        if unit is not None:
            unit.last_seen = now
            if mtype is _ACTION and type(unit) is AgentEntry:  # the message of every step: straight on
                schedule = self.schedule
                if now >= schedule.due:  # a deadline passed and the timer has not run yet
                    schedule.expire_due(now)
                schedule.on_action(unit, msg, now)
                return
            if unit.state is JOINING and mtype is P.Heartbeat:
                self.registry.mark_ready(unit)
                self.schedule.on_ready(unit, now)
        handler = self._dispatch.get(mtype)
        if handler is None:  # WELCOME, OBSERVATION, REPLY and the host twins travel the other way only
            self.outbox.reject(peer, ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE.name} is not accepted by the coordinator", now)
        else:
            handler(peer, unit, msg, now, key, address)

    def _on_action(self, peer: bytes, unit: Unit | None, msg: P.Action, now: float, *_) -> None:
        self._not_registered(peer, unit, msg, now)  # an agent's own ACTIONs never get here (on_message)

    def _on_host_action(self, peer: bytes, unit: Unit | None, msg: P.HostAction, now: float, *_) -> None:
        if type(unit) is HostEntry:
            if now >= self.schedule.due:
                self.schedule.expire_due(now)
            self.schedule.on_host_action(unit, msg, now)
        else:
            self._not_registered(peer, unit, msg, now)

    def _not_registered(self, peer: bytes, unit: Unit | None, msg: P.Message, now: float) -> None:
        """NOT_REGISTERED (HELLO first); registered as the other kind, UNKNOWN_TYPE (not back to HELLO)."""
        if unit is None:
            self.outbox.reject(peer, ErrorCode.NOT_REGISTERED, f"{msg.TYPE.name} from an unregistered peer", now)
        else:
            fits = "a host sends HOST_ACTION and HOST_BYE" if type(unit) is HostEntry else "an agent sends ACTION"
            self.outbox.reject(peer, ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE.name} from {unit.name}: {fits}", now)

    def _on_heartbeat(self, peer: bytes, unit: Unit | None, msg: P.Heartbeat, now: float, *_) -> None:
        if unit is None:
            self.outbox.reject(peer, ErrorCode.NOT_REGISTERED, "HEARTBEAT from an unregistered peer", now)

    def _on_bye(self, peer: bytes, unit: Unit | None, msg: P.Bye, now: float, *_) -> None:
        if unit is not None:
            self._plog.info(now, "%s left: %s", unit.name, msg.reason or "bye")
            self._drop(unit, now)

    def _on_error(self, peer: bytes, unit: Unit | None, msg: P.Error, now: float, *_) -> None:
        self.ledger.errors["received"] += 1
        self._plog.warning(now, "peer %s reported error %s: %s", self.registry.name_of(peer), msg.code,
                           msg.reason[:200])

    def _on_control(self, peer: bytes, unit: Unit | None, msg: P.Control, now: float, *_) -> None:
        """One REPLY per CONTROL: a command of ``bus.commands``, or a coded refusal."""
        command = COMMANDS.get(msg.command)
        try:
            if command is None:
                raise CommandError(ErrorCode.UNKNOWN_COMMAND, f"unknown command {msg.command!r}; "
                                                              f"known: {', '.join(COMMANDS)}")
            result = command.execute(self, Call(peer, msg.request_id, now), command.parse(msg.args))
        except CommandError as exc:
            self.ledger.errors[exc.code.name] += 1
            self.outbox.to(peer, P.encode(P.Reply(msg.request_id, False, refusal(exc.code, exc.reason))))
            return
        if result is not None:  # None: answered later (measure)
            self.outbox.to(peer, P.encode(P.Reply(msg.request_id, True, result)))

    # --- registration ----------------------------------------------------------------

    def _on_hello(self, peer: bytes, unit: Unit | None, msg: P.Hello, now: float, key, address: str) -> None:
        reg = self.registry
        old = reg.agents.get(msg.agent_id)
        if type(old) is AgentEntry and old.peer == peer:
            # A repeated HELLO (the agent has not seen our WELCOME yet): answer it again.
            # It does not extend the setup grace.
            self.outbox.send(old, reg.welcome(old), now)
            return
        if (admission := reg.admit(peer, [msg.agent_id], msg.agent_id, msg.token, key, address, now)) is None:
            return
        for gone in [u for u in (unit, *admission.displaced) if u is not None]:
            self._drop(gone, now)
        if old is not None:
            # The same agent, from a new connection (it restarted, or reconnected).
            self._plog.info(now, "agent %s re-registered (peer %s)", msg.agent_id, peer.hex())
            self._forget(old, now, keep_position=True)
        try:
            entry = reg.add_agent(peer, msg, key, admission, now)
        except WorldFull as exc:
            self.outbox.reject(peer, ErrorCode.WORLD_FULL, str(exc), now)
            return
        self._plog.info(now, "agent %s registered (kind %s, pid %d); %d agents", msg.agent_id, msg.kind, msg.pid,
                        len(reg.agents))
        self.outbox.send(entry, reg.welcome(entry), now)

    def _on_host_hello(self, peer: bytes, unit: Unit | None, msg: P.HostHello, now: float, key, address: str) -> None:
        reg = self.registry
        if type(unit) is HostEntry:  # this connection's host, again: as cheap as a heartbeat, whatever it says
            if unit.host_id == msg.host_id and unit.span == (msg.prefix, msg.first, msg.count):
                if unit.state is JOINING and now - unit.last_sent >= self.settings.heartbeat / 2:
                    self.outbox.send(unit, reg.host_welcome(unit), now)  # a repeated HOST_HELLO: WELCOME was lost
                return
            if now - unit.joined_at < self.settings.expiry:
                self.outbox.reject(peer, ErrorCode.BUSY, f"host {msg.host_id}: this connection registered a host "
                                                         f"{now - unit.joined_at:.2f} s ago; it may register another "
                                                         f"after {self.settings.expiry:.1f} s", now)
                return
        ids = msg.member_ids()
        free = reg.room_for(ids)
        if len(ids) > free:
            self.outbox.reject(peer, ErrorCode.WORLD_FULL, f"{len(ids)} agents do not fit: the world has room for "
                                                           f"{free} more", now)
            return
        admission = reg.admit(peer, ids, f"host {msg.host_id}", msg.token, key, address, now, host_id=msg.host_id)
        if admission is None:
            return
        for gone in [u for u in (unit, *admission.displaced) if u is not None]:
            self._drop(gone, now)
        if (old_host := reg.hosts.get(msg.host_id)) is not None:
            self._plog.info(now, "host %s re-registered (peer %s)", msg.host_id, peer.hex())
            self._drop(old_host, now, keep_position=True)
        for agent_id in ids:
            old = reg.agents.get(agent_id)
            if old is not None:
                self._forget(old, now, keep_position=True)
        host = reg.add_host(peer, msg, ids, key, admission, now, old_host)
        self._plog.info(now, "host %s registered %d %s agents (%s .. %s, pid %d); %d agents", msg.host_id, len(ids),
                        msg.kind, ids[0], ids[-1], msg.pid, len(reg.agents))
        self.outbox.send(host, reg.host_welcome(host), now)

    def _on_host_bye(self, peer: bytes, unit: Unit | None, msg: P.HostBye, now: float, *_) -> None:
        if type(unit) is not HostEntry:
            return self._not_registered(peer, unit, msg, now)
        left = []
        for index in msg.members:
            if index < len(unit.ids) and unit.live[index]:
                left.append(unit.ids[index])
                self._forget(self.registry.agents[unit.ids[index]], now, keep_position=False)
        if left:  # one line a frame, whatever it names
            self._plog.warning(now, "%s: %d %s left (%s%s): %s", unit.name, len(left),
                               "agent" if len(left) == 1 else "agents", left[0],
                               f" .. {left[-1]}" if len(left) > 1 else "", msg.reason or "bye")
        self.schedule.settle(now)

    # --- departures: settled in one order -------------------------------------------

    def _drop(self, unit: Unit, now: float, keep_position: bool = False) -> None:
        """Forget a unit and its agents; an observation it still owed counts missing."""
        if unit.state is GONE:
            return
        self.schedule.withdraw(unit, keep_position)
        self.liveness.forget(unit)
        self.registry.remove(unit, keep_position)
        self.schedule.settle(now)

    def _forget(self, agent: AgentEntry | Member, now: float, keep_position: bool) -> None:
        """One agent goes (replaced by a new registration, or its host said HOST_BYE)."""
        if type(agent) is AgentEntry:
            self._drop(agent, now, keep_position)
            return
        host = agent.host
        self.schedule.withdraw_member(host, agent.index)
        self.registry.remove_member(agent, keep_position)
        if not host.live.any():
            log.info("%s has no agents left", host.name)
            self._drop(host, now)

    # --- time and transport ------------------------------------------------------------

    def on_timer(self, now: float) -> None:
        """Deadlines, liveness, heartbeats and measurement timeouts.  Call at
        :meth:`next_timeout` or sooner."""
        if self.started_at is None:
            self.started_at = now
        if now >= self.schedule.due:
            self.schedule.expire_due(now)
        swept = now >= self.liveness.next_sweep
        for departure in self.liveness.on_timer(now, self.windows.clients()):
            self.ledger.errors[departure.reason] += 1
            self._drop(departure.unit, now)
        if swept:
            self._plog.roll(now)
            self._watch(now)
            self.timings.cpu_cap_us = cpu_bound(self.registry.by_peer.values())
        self.windows.on_timer(now)
        if self.world.closed:  # arenas closed by what happened since the last turn (messages, deadlines)
            self._settle_closed(now)

    def _settle_closed(self, now: float) -> None:
        """Agents of arenas the guard closed are told WORLD_FAULT and dropped (a host keeps its others)."""
        for arena, why in self.world.take_closed():
            entries = [e for e in self.registry.agents.values() if self.world.arena_of(e.slot) == arena]
            for peer in {(e if type(e) is AgentEntry else e.host).peer for e in entries}:
                self.outbox.error(peer, ErrorCode.WORLD_FAULT, f"arena {arena} closed: {why}")
            for entry in entries:
                self.ledger.errors["world_fault"] += 1
                self._forget(entry, now, keep_position=False)

    def next_timeout(self, now: float) -> float:
        """Seconds until :meth:`on_timer` has something to do: the next deadline, sweep,
        probe or measurement event, whichever is first."""
        t = min(self.liveness.next_timeout(now), self.schedule.due, self.windows.next_timeout(now))
        return max(0.0, t - now)

    def on_connection_event(self, name: str, now: float = 0.0, value: int = 0) -> None:
        """A transport-level event on the ROUTER (the driver's socket monitor).  A closed
        connection makes the next timer probe the quiet units, so that a registration
        whose connection it was is dropped at once rather than after liveness."""
        self.connections[name] += 1
        if name == "disconnected":
            self.liveness.on_connection_closed()
        elif name == "accept_failed":
            self._plog.warning(now, "cannot accept a connection: %s (out of file descriptors? raise `ulimit -n`)",
                               errno_name(value))

    def on_handshake(self, who: str, allowed: bool, now: float) -> None:
        """A CURVE handshake was decided (the driver answers ZAP with bus.security)."""
        if allowed:
            log.debug("CURVE: accepted %s", who)
        else:
            self.ledger.errors["unauthorized"] += 1
            self._plog.warning(now, "CURVE: refused %s: not on the allow-list", who)

    def on_unexpected(self, peer: bytes) -> None:
        """Handling a message from ``peer`` raised: a bug.  Tell the peer; keep serving."""
        self.ledger.errors[ErrorCode.UNEXPECTED.name] += 1
        self.outbox.to(peer, P.encode(P.Error(ErrorCode.UNEXPECTED, P.ERROR_HINTS[ErrorCode.UNEXPECTED])))

    def on_undeliverable(self, peer: bytes, why: str, now: float, gone: bool = False) -> None:
        """The driver could not hand a frame for ``peer`` to the socket; ``gone``: because
        its connection no longer exists (then whatever it held goes at once)."""
        self.ledger.undeliverable += 1
        if self.windows.current is not None:
            self.windows.current.on_undeliverable()
        unit = self.registry.by_peer.get(peer)
        self._plog.warning(now, "message to %s counted undeliverable: %s", self.registry.name_of(peer), why)
        if gone:
            if unit is not None:
                self.ledger.errors["connection_closed"] += 1
                self._plog.info(now, "%s: its connection is gone; dropped", unit.name)
                self._drop(unit, now)
            running = self.windows.current is not None and self.windows.current.peer == peer
            cancelled = self.windows.cancel(peer, now)
            if cancelled:
                self.ledger.errors["measures_cancelled"] += cancelled
                if running:
                    self._plog.info(now, "measurement cancelled: its client (peer %s) is gone", peer.hex())

    def take_outbox(self) -> list[tuple[bytes, bytes]]:
        """The frames to send, in order, as ``(peer, frame)``; the outbox is empty after."""
        return self.outbox.take()

    def take_alerts(self) -> list[AlertEvent]:
        out, self._alerts = self._alerts, []
        return out

    def shutdown(self, now: float) -> None:
        """Say BYE to every agent and host; called once before the driver exits."""
        self.stopping = self.registry.stopping = True
        self.ledger.in_flight_at_stop = self.ledger.outstanding
        self.schedule.stop()
        bye = P.encode(P.Bye("coordinator shutting down"))
        for unit in list(self.registry.by_peer.values()):
            self.outbox.to(unit.peer, bye)
            self._drop(unit, now)
        self.windows.shutdown()

    def _watch(self, now: float) -> None:
        """Sample the live efficiency; raise or clear its alert."""
        ledger, liveness = self.ledger, self.liveness
        event = self.live.watch(Sample(now, self.timings.agent_cpu_us, ledger.received, ledger.missing + ledger.late,
                                       self.clock.cpu()[0]), self.registry.ready, now,
                                lambda f: explain(f, liveness.straggler_table(), liveness.slowest_units(SLOWEST_NAMED),
                                                  self.clock.load()))
        if event is not None:
            self._alerts.append(event)

    # --- the Server interface of bus.commands -------------------------------------------

    def measure(self, call: Call, request: MeasureRequest) -> None:
        self.windows.request(call, request)

    def stats(self, now: float, page: int | None = None) -> Stats:
        """The bus at a glance (``bus.report.Stats``); a roster of agents with it when
        there are at most STATS_DETAIL_MAX, else a page of them on request."""
        return report.stats(self, now, page)

    def agents_page(self, page: int, now: float) -> AgentsPage:
        """One row per agent, STATS_DETAIL_MAX a page, by id: what ``busctl agents`` shows."""
        return report.agents_page(self.registry, page, now)
