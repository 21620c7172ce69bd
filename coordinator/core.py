"""The coordinator's logic as a sans-IO state machine.

:class:`CoordinatorCore` owns the registry, liveness, the tick schedule, the world, the
ledger and measurement windows.  It never touches a socket or a clock: the driver feeds
it frames and the current time, and sends what :meth:`~CoordinatorCore.take_outbox`
hands back (a list of ``(peer routing id, frame)``).  Tests drive it the same way with a
fake clock and no sockets.

Each registered agent is in one :class:`AgentState`; :data:`TRANSITIONS` is the whole
table of legal moves, and a move outside it raises :class:`IllegalTransition` (a bug,
which the driver counts as UNEXPECTED), as h11's state tables do.

Schedules
---------
``lockstep``: tick *t* sends an OBSERVATION to every ready agent; it closes when all of
them answered or its deadline passed; the world then applies the tick's actions and
tick *t+1* starts.  Agents that join during a tick take part from the next one.

``async``: each agent gets its next OBSERVATION as soon as its ACTION is applied; an
observation unanswered after the deadline is counted missing and replaced by a new one
(with the next tick number).

In both, an ACTION that arrives after its deadline is late, whether or not the timer
has run yet: deadlines are checked before every ACTION is counted.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import math
import time
from typing import Callable

from agentbus_zmq.bus import config
from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.coordinator.measure import ControlError, MeasureRequest, Measurement
from agentbus_zmq.coordinator.metrics import Ledger
from agentbus_zmq.coordinator.world import GridWorld, WorldFull

__all__ = ["Settings", "AgentState", "TickPhase", "AgentEntry", "CoordinatorCore", "IllegalTransition",
           "TRANSITIONS", "MODES"]

log = logging.getLogger(__name__)

MODES = config.MODES
#: Warnings about misbehaving peers logged per second at most (the rest are counted).
WARNINGS_PER_S = 20
#: Seconds a registered agent may take to build its model before its first message
#: (the HEARTBEAT that says it is ready); a jitted JAX model compiles for seconds.
SETUP_GRACE_S = 30.0
#: Agent ids whose registrations are counted for ``restarts`` in stats (bounded memory).
MAX_TRACKED_IDS = 65_536


@dataclasses.dataclass(frozen=True)
class Settings:
    """Schedule and liveness parameters (all times in seconds); defaults from bus.config."""

    mode: str = config.DEFAULTS.mode
    #: How long a tick (lockstep) or an observation (async) waits for its answer.
    deadline: float = config.DEFAULTS.deadline
    #: Heartbeat interval, both ways; a peer silent for ``heartbeat * liveness`` is dead.
    heartbeat: float = config.DEFAULTS.heartbeat
    liveness: int = config.DEFAULTS.liveness
    max_message_bytes: int = P.MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (self.deadline > 0 and self.heartbeat > 0 and self.liveness >= 1):
            raise ValueError("deadline and heartbeat must be positive and liveness at least 1")

    @property
    def expiry(self) -> float:
        return self.heartbeat * self.liveness


class AgentState(enum.Enum):
    """Where a registered agent stands."""

    #: WELCOME sent; the agent is building its model and is not scheduled yet.
    JOINING = "joining"
    #: Ready (it said so with its first message) and owes no answer.
    IDLE = "idle"
    #: An OBSERVATION is outstanding: ``AgentEntry.pending`` is its tick.
    STEPPING = "stepping"


class TickPhase(enum.Enum):
    """Lock-step only: whether a tick is waiting for answers."""

    IDLE = "idle"
    OPEN = "open"


class IllegalTransition(RuntimeError):
    """The core tried a move that :data:`TRANSITIONS` does not allow: a bug."""


J, I, S = AgentState.JOINING, AgentState.IDLE, AgentState.STEPPING
#: (state, event) -> next state.  Leaving the registry (BYE, death, replacement) is legal
#: from every state and is not an event here.
TRANSITIONS: dict[tuple[AgentState, str], AgentState] = {
    (J, "ready"): I,
    (I, "observe"): S,
    (S, "answer"): I,
    (S, "expire"): I,
}
del J, I, S


@dataclasses.dataclass(slots=True, eq=False)
class AgentEntry:
    agent_id: str
    peer: bytes
    kind: str
    pid: int
    joined_at: float
    last_seen: float
    last_sent: float
    state: AgentState = AgentState.JOINING
    #: tick of the outstanding observation (meaningful in STEPPING only)
    pending: int = 0
    sent_at: float = 0.0
    #: async mode: this agent's own step counter
    tick: int = 0
    steps: int = 0
    first_step_at: float | None = None
    #: recently expired (tick, the measurement window it expired in, or None) whose
    #: answer would count as late, not stray
    overdue: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=4))

    def move(self, event: str) -> None:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalTransition(f"agent {self.agent_id}: {event!r} in state {self.state.value}") from None


class CoordinatorCore:
    """Registry, liveness, schedule, world and ledger.  Feed it; take its outbox."""

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
        self._outbox: list[tuple[bytes, bytes]] = []
        self.agents: dict[str, AgentEntry] = {}
        self._by_peer: dict[bytes, AgentEntry] = {}
        self.ledger = Ledger()
        self.tick = 0
        self.phase = TickPhase.IDLE
        self._tick_deadline = math.inf
        self._actions: dict[str, int] = {}
        #: lockstep: agents whose answer to the open tick is still awaited
        self._expected: set[str] = set()
        #: async: agents with an outstanding observation, oldest first (deadlines are
        #: sent_at + deadline, so send order is deadline order)
        self._outstanding: collections.OrderedDict[AgentEntry, None] = collections.OrderedDict()
        #: earliest time a deadline may be due (may be early, never late)
        self._due = math.inf
        self._next_sweep = 0.0
        self._measure: Measurement | None = None
        self.started_at: float | None = None
        self._warn_window = 0.0
        self._warned: collections.Counter = collections.Counter()  # warnings this second, by kind
        self.connections: collections.Counter = collections.Counter()
        #: registrations per agent id this session (restarts = registrations - 1)
        self._registrations: collections.Counter = collections.Counter()
        #: registered agents that have answered at least one observation
        self._stepping_n = 0
        self.stopping = False
        self._async = settings.mode == "async"
        self._welcome_params = {
            "mode": settings.mode,
            "deadline_ms": int(settings.deadline * 1000),
            "heartbeat_ms": int(settings.heartbeat * 1000),
            "liveness": settings.liveness,
            "world": self.world.params(),
        }
        self._commands: dict[str, Callable[[bytes, P.Control, float], dict | None]] = {
            "ping": self._cmd_ping,
            "stats": self._cmd_stats,
            "measure": self._cmd_measure,
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
            if entry.state is AgentState.JOINING and type(msg) is P.Heartbeat:
                self._on_ready(entry, now)
        mtype = type(msg)
        if mtype is P.Action:
            if entry is None:
                self._reject(peer, ErrorCode.NOT_REGISTERED, "ACTION from an unregistered peer", now)
            else:
                if now >= self._due:  # a deadline passed and the timer has not run yet
                    self._expire_due(now)
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
            self._warn(now, "peer %s reported error %s: %s", _peer_name(peer, entry), msg.code, msg.reason)
        else:  # WELCOME, OBSERVATION, REPLY travel the other way only
            self._reject(peer, ErrorCode.UNKNOWN_TYPE, f"{mtype.__name__.upper()} is not accepted by the coordinator", now)

    def on_timer(self, now: float) -> None:
        """Deadlines, liveness, heartbeats and measurement timeouts.  Call at
        :meth:`next_timeout` or sooner."""
        if self.started_at is None:
            self.started_at = now
        if now >= self._due:
            self._expire_due(now)
        if now >= self._next_sweep:
            self._next_sweep = now + self.settings.heartbeat / 4
            self._sweep(now)
            self._roll_warnings(now)
        m = self._measure
        if m is not None:
            if m.done(now):
                self._close_measure(now)
            elif now >= m.deadline:
                self._finish_measure(False, _refusal(ErrorCode.TIMED_OUT, f"measure timed out in phase "
                                                     f"{m.phase.value!r} with {len(self.agents)} agents registered"))

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
        self._outbox.append((peer, P.encode(P.Error(ErrorCode.UNEXPECTED, P.ERROR_HINTS[ErrorCode.UNEXPECTED]))))

    def on_undeliverable(self, peer: bytes, why: str, now: float) -> None:
        """The driver could not hand a frame for ``peer`` to the socket."""
        self.ledger.undeliverable += 1
        if self._measure is not None:
            self._measure.on_undeliverable()
        self._warn(now, "message to %s counted undeliverable: %s", _peer_name(peer, self._by_peer.get(peer)), why)

    def next_timeout(self, now: float) -> float:
        """Seconds until :meth:`on_timer` has something to do: the next deadline, sweep
        or measurement event, whichever is first."""
        t = min(self._next_sweep, self._due)
        if self._measure is not None:
            t = min(t, self._measure.next_timeout(now))
        return max(0.0, t - now)

    def take_outbox(self) -> list[tuple[bytes, bytes]]:
        """The frames to send, in order, as ``(peer, frame)``; the outbox is empty after."""
        out, self._outbox = self._outbox, []
        return out

    @property
    def has_output(self) -> bool:
        return bool(self._outbox)

    def shutdown(self, now: float) -> None:
        """Say BYE to every agent; called once before the driver exits."""
        self.stopping = True
        bye = P.encode(P.Bye("coordinator shutting down"))
        for entry in list(self.agents.values()):
            self._outbox.append((entry.peer, bye))
            self._drop(entry, now)
        if self._measure is not None:
            self._finish_measure(False, _refusal(ErrorCode.SHUTTING_DOWN, "coordinator shutting down"))

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
        if msg.agent_id in self._registrations or len(self._registrations) < MAX_TRACKED_IDS:
            self._registrations[msg.agent_id] += 1
        log.info("agent %s registered (kind %s, pid %d); %d agents", msg.agent_id, msg.kind, msg.pid, len(self.agents))
        self._send(entry, self._welcome(msg.agent_id), now)

    def _on_ready(self, entry: AgentEntry, now: float) -> None:
        """The agent's first message after WELCOME: its model is built; schedule it."""
        entry.move("ready")
        if self._async:
            self._send_observation(entry, entry.tick, now)
        elif self.phase is TickPhase.IDLE:
            self._open_tick(now)

    def _welcome(self, agent_id: str) -> bytes:
        return P.encode(P.Welcome(self.session, agent_id, self._welcome_params))

    def _drop(self, entry: AgentEntry, now: float, keep_position: bool = False) -> None:
        """Forget an agent; an observation it still owed is counted missing."""
        if entry.state is AgentState.STEPPING:
            self._count_missing()
            self._outstanding.pop(entry, None)
            self._expected.discard(entry.agent_id)
        if self.agents.get(entry.agent_id) is entry:
            del self.agents[entry.agent_id]
            if entry.first_step_at is not None:
                self._stepping_n -= 1
        if self._by_peer.get(entry.peer) is entry:
            del self._by_peer[entry.peer]
        if not keep_position:
            self.world.remove(entry.agent_id)
            self._actions.pop(entry.agent_id, None)
        if self.phase is TickPhase.OPEN and not self._expected:
            self._close_tick(now)

    def _sweep(self, now: float) -> None:
        """Liveness and heartbeats (deadlines are :meth:`_expire_due`'s)."""
        s = self.settings
        hb = None
        for entry in list(self.agents.values()):
            limit = max(s.expiry, SETUP_GRACE_S) if entry.state is AgentState.JOINING else s.expiry
            if now - entry.last_seen > limit:
                log.warning("agent %s silent for %.2f s: declared dead", entry.agent_id, now - entry.last_seen)
                self.ledger.errors["expired"] += 1
                self._drop(entry, now)
            elif now - entry.last_sent >= s.heartbeat:
                hb = hb or P.encode(P.Heartbeat())
                self._send(entry, hb, now)

    # --- deadlines ----------------------------------------------------------------

    def _expire_due(self, now: float) -> None:
        """Expire every observation whose deadline has passed, then recompute ``_due``."""
        if self._async:
            deadline = self.settings.deadline
            outstanding = self._outstanding
            while outstanding:
                entry = next(iter(outstanding))
                if now - entry.sent_at < deadline:
                    break
                self._expire(entry, now)
                entry.tick += 1
                self._send_observation(entry, entry.tick, now)  # re-queued at the end
            self._due = next(iter(outstanding)).sent_at + deadline if outstanding else math.inf
        elif self.phase is TickPhase.OPEN and now >= self._tick_deadline:
            for agent_id in self._expected:
                self._expire(self.agents[agent_id], now)
            self._expected = set()
            self._close_tick(now)  # sets _due for the next tick

    def _expire(self, entry: AgentEntry, now: float) -> None:
        entry.move("expire")
        m = self._measure
        entry.overdue.append((entry.pending, m if m is not None and m.counting else None))
        self._outstanding.pop(entry, None)
        self._count_missing()

    def _count_missing(self) -> None:
        self.ledger.outstanding -= 1
        self.ledger.missing += 1
        if self._measure is not None:
            self._measure.on_expired()

    # --- the schedule -------------------------------------------------------------

    def _open_tick(self, now: float) -> None:
        ready = [e for e in self.agents.values() if e.state is AgentState.IDLE]
        if not ready or self.stopping:
            self.phase = TickPhase.IDLE
            self._due = self._tick_deadline = math.inf
            return
        self.phase = TickPhase.OPEN
        self._due = self._tick_deadline = now + self.settings.deadline
        self._actions = {}
        self._expected = {e.agent_id for e in ready}
        tick = self.tick
        for entry in ready:
            self._send_observation(entry, tick, now)

    def _close_tick(self, now: float) -> None:
        self.phase = TickPhase.IDLE
        self.world.step(self._actions)
        self.ledger.ticks += 1
        if self._measure is not None:
            self._measure.on_tick()
        self.tick += 1
        self._open_tick(now)

    def _send_observation(self, entry: AgentEntry, tick: int, now: float) -> None:
        entry.move("observe")
        entry.pending = tick
        entry.sent_at = now
        ledger = self.ledger
        ledger.sent += 1
        ledger.outstanding += 1
        if self._measure is not None:
            self._measure.on_sent()
        if self._async:
            if not self._outstanding:
                self._due = now + self.settings.deadline
            self._outstanding[entry] = None
        self._send(entry, P.encode_observation(tick, self.world.observe(entry.agent_id)), now)

    def _on_action(self, entry: AgentEntry, msg: P.Action, now: float) -> None:
        if entry.state is not AgentState.STEPPING or msg.tick != entry.pending:
            for i, (tick, window) in enumerate(entry.overdue):
                if tick == msg.tick:
                    del entry.overdue[i]
                    self.ledger.missing -= 1
                    self.ledger.late += 1
                    if window is not None and window is self._measure:
                        window.on_late()
                    return
            current = f"current {entry.pending}" if entry.state is AgentState.STEPPING else "none is"
            self._reject(entry.peer, ErrorCode.STALE_TICK,
                         f"no observation for tick {msg.tick} is outstanding ({current})", now)
            return
        entry.move("answer")
        entry.steps += 1
        first = entry.first_step_at is None
        if first:
            entry.first_step_at = now
            self._stepping_n += 1
        ledger = self.ledger
        ledger.outstanding -= 1
        ledger.received += 1
        m = self._measure
        if m is not None:
            m.on_received((now - entry.sent_at) * 1e6 - msg.compute_us, msg.compute_us)
            if first or not m.counting:
                m.advance(self._stepping_n, ledger.received, now)
            elif m.done(now):
                self._close_measure(now)
        if self._async:
            del self._outstanding[entry]
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
        self._outbox.append((entry.peer, frame))

    def _reject(self, peer: bytes, code: ErrorCode, reason: str, now: float) -> None:
        """Count, log and answer a refused message.  Never raises."""
        self.ledger.errors[code.name] += 1
        self._warn(now, "refused message from %s: %s: %s", _peer_name(peer, self._by_peer.get(peer)), code.name, reason)
        hint = P.ERROR_HINTS.get(code, "")
        self._outbox.append((peer, P.encode(P.Error(code, f"{reason}; {hint}" if hint else reason))))

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

    # --- control: a table of commands, each answered ok() or with a coded refusal ----

    def _on_control(self, peer: bytes, msg: P.Control, now: float) -> None:
        handler = self._commands.get(msg.command)
        try:
            if handler is None:
                raise ControlError(ErrorCode.UNKNOWN_COMMAND, f"unknown command {msg.command!r}; "
                                                              f"known: {', '.join(self._commands)}")
            result = handler(peer, msg, now)
        except ControlError as exc:
            self.ledger.errors[exc.code.name] += 1
            self._reply(peer, msg.request_id, False, _refusal(exc.code, exc.reason))
            return
        if result is not None:  # None: answered later (measure)
            self._reply(peer, msg.request_id, True, result)

    def _cmd_ping(self, peer: bytes, msg: P.Control, now: float) -> dict:
        return {"session": self.session}

    def _cmd_stats(self, peer: bytes, msg: P.Control, now: float) -> dict:
        return self.stats(now)

    def _cmd_measure(self, peer: bytes, msg: P.Control, now: float) -> None:
        request = MeasureRequest.parse(msg.args)
        if self._measure is not None:
            raise ControlError(ErrorCode.BUSY, "a measurement is already running")
        self._measure = Measurement(peer, msg.request_id, request, now, self._cpu_clock)
        self._measure.advance(self._stepping_n, self.ledger.received, now)

    def _reply(self, peer: bytes, request_id: int, ok: bool, result: dict) -> None:
        self._outbox.append((peer, P.encode(P.Reply(request_id, ok, result))))

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
            "restarts": {a: n - 1 for a, n in sorted(self._registrations.items()) if n > 1},
            "goal_visits": self.world.goal_visits,
            "connections": {**self.connections,
                            "open": self.connections["accepted"] - self.connections["disconnected"]},
        }

    def _stepping(self) -> list[str]:
        """Ids of the agents that have answered at least one observation ("ready" in stats)."""
        return [e.agent_id for e in self.agents.values() if e.first_step_at is not None]

    def _close_measure(self, now: float) -> None:
        m = self._measure
        self._finish_measure(True, m.result(now, len(self.agents), self.ledger.snapshot(), self.settings.mode))

    def _finish_measure(self, ok: bool, result: dict) -> None:
        m, self._measure = self._measure, None
        self._reply(m.peer, m.request_id, ok, result)


def _refusal(code: ErrorCode, reason: str) -> dict:
    """A refused CONTROL request's ``result``: what went wrong, its code, what to do."""
    return {"error": reason, "code": int(code), "code_name": code.name, "hint": P.ERROR_HINTS.get(code, "")}


def _peer_name(peer: bytes, entry: AgentEntry | None) -> str:
    return f"{entry.agent_id} (peer {peer.hex()})" if entry is not None else f"peer {peer.hex()}"
