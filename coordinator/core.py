"""The coordinator's logic as a sans-IO state machine.

:class:`CoordinatorCore` owns the registry, liveness, the tick schedule, the world, the
ledger and measurement windows.  It never touches a socket or a clock: the driver
feeds it frames and the current time, and sends whatever it leaves in :attr:`outbox`
(a list of ``(peer routing id, frame)``).  Tests drive it the same way with a fake
clock and no sockets.

Schedules
---------
``lockstep``: tick *t* sends an OBSERVATION to every ready agent; it closes when all of
them answered or its deadline passed; the world then applies the tick's actions and
tick *t+1* starts.  Agents that join during a tick take part from the next one.

``async``: each agent gets its next OBSERVATION as soon as its ACTION is applied; an
observation unanswered after the deadline is counted missing and replaced.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Callable

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.coordinator.metrics import Histogram, Ledger
from agentbus_zmq.coordinator.world import GridWorld, WorldFull

__all__ = ["Settings", "AgentEntry", "CoordinatorCore"]

log = logging.getLogger(__name__)

MODES = ("lockstep", "async")
#: Warnings about misbehaving peers logged per second at most (the rest are counted).
WARNINGS_PER_S = 20
#: Seconds a registered agent may take to build its model before its first message
#: (the HEARTBEAT that says it is ready); a jitted JAX model compiles for seconds.
SETUP_GRACE_S = 30.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """Schedule and liveness parameters (all times in seconds)."""

    mode: str = "lockstep"
    #: How long a tick (lockstep) or an observation (async) waits for its answer.
    deadline: float = 1.0
    #: Heartbeat interval, both ways; a peer silent for ``heartbeat * liveness`` is dead.
    heartbeat: float = 0.5
    liveness: int = 3
    max_message_bytes: int = P.MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.deadline <= 0 or self.heartbeat <= 0 or self.liveness < 1:
            raise ValueError("deadline and heartbeat must be positive and liveness at least 1")

    @property
    def expiry(self) -> float:
        return self.heartbeat * self.liveness


@dataclasses.dataclass(slots=True, eq=False)
class AgentEntry:
    agent_id: str
    peer: bytes
    kind: str
    pid: int
    joined_at: float
    last_seen: float
    last_sent: float
    #: False from WELCOME until the agent's first message (its model is built)
    ready: bool = False
    #: tick of the observation awaiting an answer, or -1
    pending: int = -1
    sent_at: float = 0.0
    #: async mode: this agent's own step counter
    tick: int = 0
    steps: int = 0
    first_step_at: float | None = None
    #: recently expired ticks whose answer would count as late rather than stray
    overdue: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=4))


@dataclasses.dataclass(slots=True)
class _Measure:
    """A benchmark window requested by a CONTROL ``measure``."""

    peer: bytes
    request_id: int
    agents: int
    warmup_steps: int
    steps: int
    duration: float
    deadline: float
    requested_at: float
    phase: str = "waiting"  # waiting -> warmup -> window
    ready_s: float = 0.0
    warmup_until: int = 0
    start: dict | None = None
    latency: Histogram = dataclasses.field(default_factory=Histogram)
    compute_us: int = 0


class CoordinatorCore:
    """Registry, liveness, schedule, world and ledger.  Feed it; read :attr:`outbox`."""

    def __init__(
        self,
        settings: Settings = Settings(),
        world: GridWorld | None = None,
        session: str = "s0",
        cpu_clock: Callable[[], tuple[float, float]] = lambda: (time.process_time(), time.thread_time()),
    ):
        self.settings = settings
        self.world = world if world is not None else GridWorld()
        self.session = session
        self._cpu_clock = cpu_clock
        self.outbox: list[tuple[bytes, bytes]] = []
        self.agents: dict[str, AgentEntry] = {}
        self._by_peer: dict[bytes, AgentEntry] = {}
        self.ledger = Ledger()
        self.tick = 0
        self._tick_open = False
        self._tick_deadline = 0.0
        self._actions: dict[str, int] = {}
        #: lockstep: agents whose answer to the open tick is still awaited
        self._expected: set[str] = set()
        self._next_sweep = 0.0
        self._measure: _Measure | None = None
        self.started_at: float | None = None
        self._warn_window = 0.0
        self._warned: collections.Counter = collections.Counter()  # warnings this second, by kind
        self.connections: collections.Counter = collections.Counter()
        self.stopping = False
        self._welcome_params = {
            "mode": settings.mode,
            "deadline_ms": int(settings.deadline * 1000),
            "heartbeat_ms": int(settings.heartbeat * 1000),
            "liveness": settings.liveness,
            "world": self.world.params(),
        }

    # --- input ------------------------------------------------------------------

    def on_frames(self, peer: bytes, frames: list[bytes], now: float) -> None:
        """One multipart message from ``peer`` (routing id already stripped)."""
        if len(frames) != 1:
            self._reject(peer, ErrorCode.BAD_FRAMING, f"expected 1 frame, got {len(frames)}", now)
            return
        try:
            msg = P.decode(frames[0], self.settings.max_message_bytes)
        except P.ProtocolError as exc:
            self._reject(peer, exc.code, exc.reason, now)
            return
        self.on_message(peer, msg, now)

    def on_message(self, peer: bytes, msg: P.Message, now: float) -> None:
        entry = self._by_peer.get(peer)
        if entry is not None:
            entry.last_seen = now
            if not entry.ready and type(msg) is P.Heartbeat:
                self._on_ready(entry, now)
        mtype = type(msg)
        if mtype is P.Action:
            if entry is None:
                self._reject(peer, ErrorCode.NOT_REGISTERED, "ACTION from an unregistered peer", now)
            else:
                self._on_action(entry, msg, now)
        elif mtype is P.Heartbeat:
            if entry is None:
                self._reject(peer, ErrorCode.NOT_REGISTERED, "HEARTBEAT from an unregistered peer", now)
        elif mtype is P.Hello:
            self._on_hello(peer, msg, now)
        elif mtype is P.Bye:
            if entry is not None:
                log.info("agent %s left: %s", entry.agent_id, msg.reason or "bye")
                self._drop(entry, now)
        elif mtype is P.Control:
            self._on_control(peer, msg, now)
        elif mtype is P.Error:
            self.ledger.errors["received"] += 1
            log.warning("peer %s reported error %s: %s", _peer_name(peer, entry), msg.code, msg.reason)
        else:  # WELCOME, OBSERVATION, REPLY travel the other way only
            self._reject(peer, ErrorCode.UNKNOWN_TYPE, f"{mtype.__name__.upper()} is not accepted by the coordinator", now)

    def on_timer(self, now: float) -> None:
        """Deadlines, liveness, heartbeats and measurement timeouts.  Call often."""
        if self.started_at is None:
            self.started_at = now
        if self._tick_open and now >= self._tick_deadline:
            self._expire_tick(now)
        if now >= self._next_sweep:
            self._next_sweep = now + self.settings.heartbeat / 4
            self._sweep(now)
            self._roll_warnings(now)
        m = self._measure
        if m is not None:
            if m.phase == "window" and m.duration and now - m.start["at"] >= m.duration:
                self._close_window(now)
            elif now >= m.deadline:
                self._finish_measure(False, {"error": f"timed out in phase {m.phase!r}", "phase": m.phase,
                                             "registered": len(self.agents)})

    def on_connection_event(self, name: str) -> None:
        """A transport-level event on the ROUTER (the driver's socket monitor)."""
        self.connections[name] += 1

    def on_handshake(self, who: str, allowed: bool, now: float) -> None:
        """A CURVE handshake was decided (the driver answers ZAP with bus.security)."""
        if allowed:
            log.debug("CURVE: accepted %s", who)
        else:
            self.ledger.errors["unauthorized"] += 1
            self._warn(now, "CURVE: refused %s: not on the allow-list", who)

    def on_unexpected(self, peer: bytes) -> None:
        """Handling a message from ``peer`` raised: a bug.  Tell the peer; keep serving."""
        self.ledger.errors[ErrorCode.UNEXPECTED.name] += 1
        self.outbox.append((peer, P.encode(P.Error(ErrorCode.UNEXPECTED, P.ERROR_HINTS[ErrorCode.UNEXPECTED]))))

    def on_undeliverable(self, peer: bytes, why: str, now: float) -> None:
        """The driver could not hand a frame for ``peer`` to the socket."""
        self.ledger.undeliverable += 1
        self._warn(now, "message to %s counted undeliverable: %s", _peer_name(peer, self._by_peer.get(peer)), why)

    def next_timeout(self, now: float) -> float:
        """Seconds until :meth:`on_timer` has something to do (at most one sweep)."""
        t = self._next_sweep
        if self._tick_open:
            t = min(t, self._tick_deadline)
        return max(0.0, t - now)

    def shutdown(self, now: float) -> None:
        """Say BYE to every agent; called once before the driver exits."""
        self.stopping = True
        bye = P.encode(P.Bye("coordinator shutting down"))
        for entry in list(self.agents.values()):
            self.outbox.append((entry.peer, bye))
            self._drop(entry, now)
        if self._measure is not None:
            self._finish_measure(False, {"error": "coordinator shutting down"})

    # --- registration and liveness ----------------------------------------------

    def _on_hello(self, peer: bytes, msg: P.Hello, now: float) -> None:
        if self.stopping:
            self._reject(peer, ErrorCode.SHUTTING_DOWN, "coordinator is shutting down", now)
            return
        old = self.agents.get(msg.agent_id)
        if old is not None and old.peer == peer:
            # A repeated HELLO (the agent has not seen our WELCOME yet): answer it again.
            self._send(old, self._welcome(msg.agent_id), now)
            return
        if old is not None:
            # Same agent id again: it restarted, or re-announced itself.  Replace.
            log.info("agent %s re-registered (peer %s -> %s)", msg.agent_id, old.peer.hex(), peer.hex())
            self._drop(old, now, keep_position=True)
        other = self._by_peer.get(peer)
        if other is not None:
            self._drop(other, now)
        try:
            self.world.place(msg.agent_id)
        except WorldFull as exc:
            self._reject(peer, ErrorCode.WORLD_FULL, str(exc), now)
            return
        entry = AgentEntry(msg.agent_id, peer, msg.kind, msg.pid, now, now, now)
        self.agents[msg.agent_id] = entry
        self._by_peer[peer] = entry
        log.info("agent %s registered (kind %s, pid %d); %d agents", msg.agent_id, msg.kind, msg.pid, len(self.agents))
        self._send(entry, self._welcome(msg.agent_id), now)

    def _on_ready(self, entry: AgentEntry, now: float) -> None:
        """The agent's first message after WELCOME: its model is built; schedule it."""
        entry.ready = True
        if self.settings.mode == "async":
            self._send_observation(entry, entry.tick, now)
        elif not self._tick_open:
            self._open_tick(now)

    def _welcome(self, agent_id: str) -> bytes:
        return P.encode(P.Welcome(self.session, agent_id, self._welcome_params))

    def _drop(self, entry: AgentEntry, now: float, keep_position: bool = False) -> None:
        """Forget an agent; an observation it still owed is counted missing."""
        if entry.pending >= 0:
            self.ledger.outstanding -= 1
            self.ledger.missing += 1
            entry.pending = -1
            self._expected.discard(entry.agent_id)
        if self.agents.get(entry.agent_id) is entry:
            del self.agents[entry.agent_id]
        if self._by_peer.get(entry.peer) is entry:
            del self._by_peer[entry.peer]
        if not keep_position:
            self.world.remove(entry.agent_id)
            self._actions.pop(entry.agent_id, None)
        if self._tick_open and not self._expected:
            self._close_tick(now)

    def _sweep(self, now: float) -> None:
        s = self.settings
        hb = None
        for entry in list(self.agents.values()):
            if now - entry.last_seen > (s.expiry if entry.ready else max(s.expiry, SETUP_GRACE_S)):
                log.warning("agent %s silent for %.2f s: declared dead", entry.agent_id, now - entry.last_seen)
                self.ledger.errors["expired"] += 1
                self._drop(entry, now)
                continue
            if s.mode == "async" and entry.pending >= 0 and now - entry.sent_at > s.deadline:
                self._expire(entry)
                self._send_observation(entry, entry.tick, now)
            elif now - entry.last_sent >= s.heartbeat:
                hb = hb or P.encode(P.Heartbeat())
                self._send(entry, hb, now)

    # --- the schedule -------------------------------------------------------------

    def _open_tick(self, now: float) -> None:
        ready = [e for e in self.agents.values() if e.ready]
        if not ready or self.stopping:
            self._tick_open = False
            return
        self._tick_open = True
        self._tick_deadline = now + self.settings.deadline
        self._actions = {}
        self._expected = {e.agent_id for e in ready}
        tick = self.tick
        for entry in ready:
            self._send_observation(entry, tick, now)

    def _close_tick(self, now: float) -> None:
        self._tick_open = False
        self.world.step(self._actions)
        self.ledger.ticks += 1
        self.tick += 1
        self._open_tick(now)

    def _expire_tick(self, now: float) -> None:
        for agent_id in self._expected:
            self._expire(self.agents[agent_id])
        self._expected = set()
        self._close_tick(now)

    def _expire(self, entry: AgentEntry) -> None:
        entry.overdue.append(entry.pending)
        entry.pending = -1
        self.ledger.outstanding -= 1
        self.ledger.missing += 1

    def _send_observation(self, entry: AgentEntry, tick: int, now: float) -> None:
        entry.pending = tick
        entry.sent_at = now
        self.ledger.sent += 1
        self.ledger.outstanding += 1
        self._send(entry, P.encode_observation(tick, self.world.observe(entry.agent_id)), now)

    def _on_action(self, entry: AgentEntry, msg: P.Action, now: float) -> None:
        if msg.tick != entry.pending:
            if msg.tick in entry.overdue:
                entry.overdue.remove(msg.tick)
                self.ledger.missing -= 1
                self.ledger.late += 1
            else:
                self._reject(entry.peer, ErrorCode.STALE_TICK,
                             f"no observation for tick {msg.tick} is outstanding (current {entry.pending})", now)
            return
        entry.pending = -1
        entry.steps += 1
        first = entry.first_step_at is None
        if first:
            entry.first_step_at = now
        ledger = self.ledger
        ledger.outstanding -= 1
        ledger.received += 1
        m = self._measure
        if m is not None:
            self._account(m, entry, msg, now, first)
        if self.settings.mode == "async":
            self.world.move(entry.agent_id, msg.action)
            entry.tick += 1
            self._send_observation(entry, entry.tick, now)
        else:
            self._actions[entry.agent_id] = msg.action
            self._expected.discard(entry.agent_id)
            if not self._expected:
                self._close_tick(now)

    # --- output -------------------------------------------------------------------

    def _send(self, entry: AgentEntry, frame: bytes, now: float) -> None:
        entry.last_sent = now
        self.outbox.append((entry.peer, frame))

    def _reject(self, peer: bytes, code: ErrorCode, reason: str, now: float) -> None:
        """Count, log and answer a refused message.  Never raises."""
        self.ledger.errors[code.name] += 1
        self._warn(now, "refused message from %s: %s: %s", _peer_name(peer, self._by_peer.get(peer)), code.name, reason)
        hint = P.ERROR_HINTS.get(code, "")
        self.outbox.append((peer, P.encode(P.Error(code, f"{reason}; {hint}" if hint else reason))))

    def _warn(self, now: float, fmt: str, *args) -> None:
        """Log a warning about a peer, at most WARNINGS_PER_S a second of each kind
        (``fmt``): a flood of bad input must not become a flood of log lines, nor hide
        a different problem.  Every event is still counted in the ledger."""
        self._roll_warnings(now)
        self._warned[fmt] += 1
        if self._warned[fmt] <= WARNINGS_PER_S:
            log.warning(fmt, *args)

    def _roll_warnings(self, now: float) -> None:
        if now >= self._warn_window:
            for fmt, n in self._warned.items():
                if n > WARNINGS_PER_S:
                    log.warning("... %d more warnings like %r in the last second (counted in stats)",
                                n - WARNINGS_PER_S, fmt.split(":")[0])
            self._warn_window = now + 1.0
            self._warned.clear()

    # --- control: stats and measurement windows -----------------------------------

    def _on_control(self, peer: bytes, msg: P.Control, now: float) -> None:
        if msg.command == "ping":
            self._reply(peer, msg.request_id, True, {"session": self.session})
        elif msg.command == "stats":
            self._reply(peer, msg.request_id, True, self.stats(now))
        elif msg.command == "measure":
            self._start_measure(peer, msg, now)
        else:
            self.ledger.errors[ErrorCode.UNKNOWN_COMMAND.name] += 1
            self._reply(peer, msg.request_id, False, {"error": f"unknown command {msg.command!r}; "
                                                              + P.ERROR_HINTS[ErrorCode.UNKNOWN_COMMAND]})

    def _reply(self, peer: bytes, request_id: int, ok: bool, result: dict) -> None:
        self.outbox.append((peer, P.encode(P.Reply(request_id, ok, result))))

    def stats(self, now: float) -> dict:
        stepping = self._stepping()
        return {
            "session": self.session,
            "mode": self.settings.mode,
            "uptime_s": now - (self.started_at if self.started_at is not None else now),
            "agents": len(self.agents),
            "agent_ids": sorted(self.agents),
            "agent_pids": {e.agent_id: e.pid for e in self.agents.values()},
            "ready_ids": sorted(stepping),
            "ready": len(stepping),
            "tick": self.tick,
            "ledger": self.ledger.snapshot(),
            "goal_visits": self.world.goal_visits,
            "connections": {**self.connections,
                            "open": self.connections["accepted"] - self.connections["disconnected"]},
        }

    def _stepping(self) -> list[str]:
        """Ids of the agents that have answered at least one observation ("ready" in stats)."""
        return [e.agent_id for e in self.agents.values() if e.first_step_at is not None]

    def _start_measure(self, peer: bytes, msg: P.Control, now: float) -> None:
        a = msg.args
        try:
            agents = int(a.get("agents", 1))
            warmup = int(a.get("warmup_steps", 0))
            steps = int(a.get("steps", 0))
            duration = float(a.get("duration_s", 0.0))
            timeout = float(a.get("timeout_s", 60.0))
        except (TypeError, ValueError):
            self._reply(peer, msg.request_id, False, {"error": "measure takes integer agents, warmup_steps, steps and "
                                                               "numbers duration_s, timeout_s"})
            return
        if agents < 1 or (steps <= 0 and duration <= 0) or timeout <= 0:
            self._reply(peer, msg.request_id, False, {"error": "measure needs agents >= 1, steps or duration_s > 0"})
            return
        if self._measure is not None:
            self._reply(peer, msg.request_id, False, {"error": "a measurement is already running"})
            return
        self._measure = _Measure(peer, msg.request_id, agents, warmup, steps, duration, now + timeout, now)
        self._advance_measure(now)

    def _account(self, m: _Measure, entry: AgentEntry, msg: P.Action, now: float, first: bool) -> None:
        if m.phase == "window":
            m.latency.record((now - entry.sent_at) * 1e6 - msg.compute_us)
            m.compute_us += msg.compute_us
            if m.steps and self.ledger.received - m.start["received"] >= m.steps:
                self._close_window(now)
        elif m.phase == "warmup" or first:  # the stepping-agent count only rises on a first step
            self._advance_measure(now)

    def _advance_measure(self, now: float) -> None:
        m = self._measure
        if m.phase == "waiting":
            if len(self._stepping()) >= m.agents:
                m.ready_s = now - m.requested_at
                m.phase = "warmup"
                m.warmup_until = self.ledger.received + m.warmup_steps
        if m.phase == "warmup" and self.ledger.received >= m.warmup_until:
            process, thread = self._cpu_clock()
            m.start = {"at": now, "process_cpu": process, "thread_cpu": thread, **self.ledger.snapshot()}
            m.phase = "window"

    def _close_window(self, now: float) -> None:
        m = self._measure
        process, thread = self._cpu_clock()
        end = self.ledger.snapshot()
        start = m.start
        elapsed = max(now - start["at"], 1e-9)
        steps = end["received"] - start["received"]
        result = {
            "agents": len(self.agents),
            # CLOCK_MONOTONIC, comparable with other processes' time.monotonic() on this host
            "opened_at": start["at"],
            "closed_at": now,
            "ready_s": m.ready_s,
            "elapsed_s": elapsed,
            "steps": steps,
            "rate": steps / elapsed,
            "ticks": end["ticks"] - start["ticks"],
            "latency_us": m.latency.percentiles(),
            "latency_samples": m.latency.n,
            "compute_s": m.compute_us / 1e6,
            "coordinator_cpu_s": process - start["process_cpu"],
            "coordinator_thread_cpu_s": thread - start["thread_cpu"],
            "window": {k: end[k] - start[k] for k in ("sent", "received", "late", "missing", "undeliverable")},
            "ledger": end,
            "mode": self.settings.mode,
        }
        self._finish_measure(True, result)

    def _finish_measure(self, ok: bool, result: dict) -> None:
        m, self._measure = self._measure, None
        self._reply(m.peer, m.request_id, ok, result)


def _peer_name(peer: bytes, entry: AgentEntry | None) -> str:
    return f"{entry.agent_id} (peer {peer.hex()})" if entry is not None else f"peer {peer.hex()}"
