"""The coordinator's logic as a sans-IO state machine.

:class:`CoordinatorCore` owns the registry, liveness, the tick schedule, the world, the
ledger and measurement windows.  It never touches a socket or a clock: the driver feeds
it frames and the current time, and sends what :meth:`~CoordinatorCore.take_outbox`
hands back (a list of ``(peer routing id, frame)``).  Tests drive it the same way with a
fake clock and no sockets.

The schedule's unit is a :class:`Unit`: an agent with a connection of its own
(:class:`AgentEntry`), or an agent host (:class:`HostEntry`) whose members travel in one
frame per tick (HOST_OBSERVATION / HOST_ACTION); each member keeps its own registration
(:class:`Member`), world slot and ledger counts.  Each unit is in one :class:`AgentState`;
:data:`TRANSITIONS` is the whole table of legal moves, and a move outside it raises
:class:`IllegalTransition` (a bug, which the driver counts as UNEXPECTED), as h11's state
tables do.

Schedules
---------
``lockstep``: tick *t* sends an observation to every ready unit; it closes when all of
them answered or its deadline passed; the world then applies the tick's actions at once
and tick *t+1* starts.  Units that become ready during a tick take part from the next one.

``async``: each unit gets its next observation as soon as its action(s) are applied; an
observation unanswered after the deadline is counted missing and replaced by a new one
(with the next tick number).

In both, an ACTION that arrives after its deadline is late, whether or not the timer
has run yet: deadlines are checked before every ACTION is counted.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import hmac
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping

import numpy as np

from agentbus_zmq.bus import config
from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.logs import PeerLog
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.bus.security import id_allowed
from agentbus_zmq.coordinator.live import AlertEvent, LiveEfficiency, Sample
from agentbus_zmq.coordinator.measure import ControlError, MeasureRequest, Measurement
from agentbus_zmq.coordinator.metrics import Histogram, Ledger
from agentbus_zmq.coordinator.world import GridWorld, WorldFull

__all__ = ["Settings", "AgentState", "TickPhase", "Unit", "AgentEntry", "HostEntry", "Member", "CoordinatorCore",
           "IllegalTransition", "TRANSITIONS", "MODES", "STATS_DETAIL_MAX"]

log = logging.getLogger(__name__)

MODES = config.MODES
#: Lines about what peers do (registrations, refusals, errors they report) logged per
#: second at most, per kind of line; the rest are counted.
WARNINGS_PER_S = 20
#: Agent ids whose registrations are counted for ``restarts`` in stats (bounded memory).
MAX_TRACKED_IDS = 65_536
#: ``stats`` lists agents (ids, pids, hosts) when there are at most this many, else a
#: page of them on request: the reply must fit in a message, and a client that never
#: reads may park up to ROUTER_HWM of them in the coordinator (about 9 KB a page).
STATS_DETAIL_MAX = 128
#: Measurements that may wait behind the running one; more are refused (BUSY).
MAX_QUEUED_MEASURES = 8
#: When a connection closes, every unit gets a HEARTBEAT, so that the one whose connection
#: it was is found gone (the send fails) and dropped at once; at most one such probe
#: every PROBE_INTERVAL_S, however fast connections come and go.  The socket may learn of
#: the closed pipe a moment after the monitor does, so each closing is probed twice.
PROBE_INTERVAL_S = 0.25
PROBES_PER_CLOSE = 2
#: Units listed in ``stats["stragglers"]`` (the worst first).
MAX_STRAGGLERS_LISTED = 16
#: Transport events ``stats["connections"]`` always lists (0 until one happens).
CONNECTION_EVENTS = ("accepted", "disconnected", "handshake_failed", "accept_failed")
#: Step times kept per unit (for ``agents``' p50 / p99), a power of two.
STEP_TIMES = 32
#: Units named as the slowest in an efficiency alert.
SLOWEST_NAMED = 3
#: How far an agent's compute_us may exceed the time the coordinator waited for its
#: answer (clock granularity) before it is counted as a bad report and clamped.
COMPUTE_SLACK_US = 1000


class ConfigError(ValueError):
    """The coordinator cannot run with these settings; the message says what to change."""


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
    #: Seconds from HELLO until a registration must say it is ready (its first message
    #: after WELCOME); past it, it is dropped and its cells freed.  Repeating HELLO does
    #: not extend it.  A jitted JAX host compiles for seconds.
    setup_grace: float = 30.0
    #: Connections (agents or hosts) registered and not yet ready, at most; more HELLOs
    #: are refused with BUSY and retried by the agent.
    max_pending: int = 1024
    #: An answer after this fraction of its deadline is counted slow.
    slow_fraction: float = 0.8
    #: Drop a unit from the schedule after this many deadlines in a row that it missed,
    #: answered late or answered slowly (0: never); it may HELLO again.
    drop_after: int = 0
    #: Live efficiency: its sliding window (s), the cores the agents can use, the alert's
    #: threshold and how long efficiency must stay below it before the alert is raised.
    efficiency_window: float = 10.0
    agent_cores: int = 1
    alert_threshold: float = 0.5
    alert_for: float = 30.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (self.deadline > 0 and self.heartbeat > 0 and self.liveness >= 1):
            raise ValueError("deadline and heartbeat must be positive and liveness at least 1")
        if not (self.setup_grace > 0 and self.max_pending >= 1 and 0 < self.slow_fraction <= 1
                and self.drop_after >= 0):
            raise ValueError("setup_grace must be positive, max_pending at least 1, slow_fraction in (0, 1] "
                             "and drop_after at least 0")

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


# Enum members are looked up on every message (120 ns each on 3.11): plain names for them.
JOINING, IDLE, STEPPING = AgentState.JOINING, AgentState.IDLE, AgentState.STEPPING
TICK_IDLE, TICK_OPEN = TickPhase.IDLE, TickPhase.OPEN
J, I, S = JOINING, IDLE, STEPPING
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
class Unit:
    """What the schedule sends to and hears from: one agent's connection, or a host's.

    A unit is in one :class:`AgentState`; its outstanding observation (STEPPING) has
    tick ``pending`` and covers ``n`` agent-steps (1 for an agent; a host's members)."""

    peer: bytes
    kind: str
    pid: int
    joined_at: float
    last_seen: float
    last_sent: float
    state: AgentState = JOINING
    #: tick of the outstanding observation (meaningful in STEPPING only)
    pending: int = 0
    sent_at: float = 0.0
    #: async mode: this unit's own step counter
    tick: int = 0
    #: agent-steps answered in time
    steps: int = 0
    first_step_at: float | None = None
    #: recently expired (tick, agent-steps, the measurement window it expired in, or
    #: None) whose answer would count as late rather than stray
    overdue: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=4))
    #: the secret its WELCOME carried: a new connection presenting it may take over
    token: str = ""
    #: the CURVE key (Z85) its connection authenticated with, or None
    key: bytes | None = None
    #: deadlines it missed, answers it sent late or slowly (see Settings.slow_fraction)
    missed: int = 0
    late: int = 0
    slow: int = 0
    #: missed, late or slow answers in a row (Settings.drop_after)
    strikes: int = 0
    #: the last STEP_TIMES step times (wall, per agent, microseconds), a ring
    times: list = dataclasses.field(default_factory=lambda: [0] * STEP_TIMES)
    times_n: int = 0

    def move(self, event: str) -> None:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalTransition(f"{self.name}: {event!r} in state {self.state.value}") from None


@dataclasses.dataclass(slots=True, eq=False)
class AgentEntry(Unit):
    """An agent with a connection of its own."""

    agent_id: str = ""
    slot: int = 0

    @property
    def name(self) -> str:
        return self.agent_id


@dataclasses.dataclass(slots=True, eq=False)
class Member:
    """An agent registered by a host: its identity; the host carries its schedule."""

    agent_id: str
    host: HostEntry
    index: int
    slot: int


@dataclasses.dataclass(slots=True, eq=False)
class HostEntry(Unit):
    """A host: many agents on one connection, scheduled as one unit, one frame a tick."""

    host_id: str = ""
    #: member ids, in registration order (the order of every host frame)
    ids: list = dataclasses.field(default_factory=list)
    #: world slot of each member
    slots: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    #: whether each member is still registered here
    live: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, bool))
    #: the live members' indices and slots (recomputed when membership changes)
    live_idx: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    live_slots: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    #: members of the outstanding observation, in its row order
    pending_idx: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    #: live_idx as it travels, built once per change of membership
    members_ext: object = None

    @property
    def name(self) -> str:
        return f"host {self.host_id}"

    def refresh(self) -> None:
        self.live_idx = np.flatnonzero(self.live)
        self.live_slots = self.slots[self.live_idx]
        self.members_ext = P.array_ext(self.live_idx.astype(np.uint16))


class CoordinatorCore:
    """Registry, liveness, schedule, world and ledger.  Feed it; take its outbox."""

    def __init__(
        self,
        settings: Settings = Settings(),
        world: GridWorld | None = None,
        session: str = "s0",
        cpu_clock: Callable[[], tuple[float, float]] = lambda: (time.process_time(), time.thread_time()),
        key_patterns: Mapping[bytes, tuple[str, ...] | None] | None = None,
        token: Callable[[], str] = lambda: secrets.token_hex(16),
        histograms: bool = False,
        load: Callable[[], float] = lambda: 0.0,
    ):
        """``key_patterns``: with CURVE, each allowed key's agent id patterns (None: any
        id); ``token``: makes each registration's secret (tests pass a predictable one);
        ``histograms``: keep latency and tick-duration histograms (for /metrics);
        ``load``: the machine's load average (named in an alert's cause)."""
        self.settings = settings
        self.world = world if world is not None else GridWorld()
        self.session = session
        self._cpu_clock = cpu_clock
        self._outbox: list[tuple[bytes, bytes]] = []
        #: every registered agent, by id: its own connection's entry, or a host's member
        self.agents: dict[str, AgentEntry | Member] = {}
        self.hosts: dict[str, HostEntry] = {}
        self._by_peer: dict[bytes, Unit] = {}
        self.ledger = Ledger()
        self.tick = 0
        self.phase = TICK_IDLE
        self._tick_deadline = math.inf
        #: lockstep: this tick's moves, agent slot -> action, and hosts' (host, member
        #: indices, actions): a member that leaves before the tick closes is skipped then
        self._moves: dict[int, int] = {}
        self._host_moves: list[tuple[HostEntry, np.ndarray, np.ndarray]] = []
        #: lockstep: units whose answer to the open tick is still awaited
        self._expected: set[Unit] = set()
        #: async: units with an outstanding observation, oldest first (deadlines are
        #: sent_at + deadline, so send order is deadline order)
        self._outstanding: collections.OrderedDict[Unit, None] = collections.OrderedDict()
        #: earliest time a deadline may be due (may be early, never late)
        self._due = math.inf
        self._next_sweep = 0.0
        self._measure: Measurement | None = None
        #: measurements waiting for the running one: (peer, request id, request, received at)
        self._measure_queue: collections.deque = collections.deque()
        self.started_at: float | None = None
        self._plog = PeerLog(log, WARNINGS_PER_S)
        self._key_patterns = key_patterns
        self._token = token
        #: units registered and not yet ready (Settings.max_pending)
        self._joining = 0
        #: a connection closed: probes still to run (PROBES_PER_CLOSE)
        self._probe_due = 0
        self._next_probe = 0.0
        #: units to drop at the next timer (Settings.drop_after)
        self._stragglers: dict[Unit, None] = {}
        self._slow_after = settings.deadline * settings.slow_fraction
        #: CPU time of every step answered in time, as agents reported it (us)
        self.agent_cpu_us = 0
        self.live = LiveEfficiency(settings.efficiency_window, settings.agent_cores, settings.alert_threshold,
                                   settings.alert_for)
        #: alerts raised or cleared, for the driver's hook (take_alerts)
        self._alerts: list[AlertEvent] = []
        self._load = load
        #: /metrics only: bus latency per answer and lock-step tick durations (us)
        self.latency = Histogram() if histograms else None
        self.tick_time = Histogram() if histograms else None
        self.latency_sum_us = self.tick_time_sum_us = 0.0
        self._tick_opened = 0.0
        self.connections: collections.Counter = collections.Counter()
        #: registrations per agent id this session (restarts = registrations - 1)
        self._registrations: collections.Counter = collections.Counter()
        #: the agent ids registered more than once, and how many times again
        self._restarts: dict[str, int] = {}
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
        self._welcomes = P.WelcomeEncoder(session, self._welcome_params)
        self._check_welcome_fits()
        self._commands: dict[str, Callable[[bytes, P.Control, float], dict | None]] = {
            "ping": self._cmd_ping,
            "stats": self._cmd_stats,
            "measure": self._cmd_measure,
            "agents": self._cmd_agents,
        }

    # --- input ------------------------------------------------------------------

    def on_frames(self, peer: bytes, frames: list[bytes], now: float, key: bytes | None = None) -> None:
        """One multipart message from ``peer`` (routing id already stripped); ``key``: the
        CURVE key its connection authenticated with (None without CURVE)."""
        if len(frames) != 1:
            self._reject(peer, ErrorCode.BAD_FRAMING, f"expected 1 frame, got {len(frames)}", now)
            return
        try:
            msg = P.decode(frames[0], self.settings.max_message_bytes)
        except P.ProtocolError as exc:
            self._reject(peer, exc.code, exc.reason, now)
            return
        self.on_message(peer, msg, now, key)

    def on_message(self, peer: bytes, msg: P.Message, now: float, key: bytes | None = None) -> None:
        unit = self._by_peer.get(peer)
        mtype = type(msg)
        if unit is not None:
            unit.last_seen = now
            if unit.state is JOINING and mtype is P.Heartbeat:
                self._on_ready(unit, now)
        if mtype is P.Action:
            if type(unit) is AgentEntry:
                if now >= self._due:  # a deadline passed and the timer has not run yet
                    self._expire_due(now)
                self._on_action(unit, msg, now)
            else:
                self._not_registered(peer, unit, msg, now)
        elif mtype is P.HostAction:
            if type(unit) is HostEntry:
                if now >= self._due:
                    self._expire_due(now)
                self._on_host_action(unit, msg, now)
            else:
                self._not_registered(peer, unit, msg, now)
        elif mtype is P.Heartbeat:
            if unit is None:
                self._reject(peer, ErrorCode.NOT_REGISTERED, "HEARTBEAT from an unregistered peer", now)
        elif mtype is P.Hello:
            self._on_hello(peer, msg, now, key)
        elif mtype is P.HostHello:
            self._on_host_hello(peer, msg, now, key)
        elif mtype is P.Bye:
            if unit is not None:
                self._plog.info(now, "%s left: %s", unit.name, msg.reason or "bye")
                self._drop(unit, now)
        elif mtype is P.HostBye:
            if type(unit) is HostEntry:
                self._on_host_bye(unit, msg, now)
            else:
                self._reject(peer, ErrorCode.NOT_REGISTERED, "HOST_BYE from a peer that is not a host", now)
        elif mtype is P.Control:
            self._on_control(peer, msg, now)
        elif mtype is P.Error:
            self.ledger.errors["received"] += 1
            self._plog.warning(now, "peer %s reported error %s: %s", _peer_name(peer, unit), msg.code, msg.reason[:200])
        else:  # WELCOME, OBSERVATION, REPLY and the host twins travel the other way only
            self._reject(peer, ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE.name} is not accepted by the coordinator", now)

    def _not_registered(self, peer: bytes, unit: Unit | None, msg: P.Message, now: float) -> None:
        what = "an unregistered peer" if unit is None else f"{unit.name}, which registered otherwise"
        self._reject(peer, ErrorCode.NOT_REGISTERED, f"{msg.TYPE.name} from {what}", now)

    def on_timer(self, now: float) -> None:
        """Deadlines, liveness, heartbeats and measurement timeouts.  Call at
        :meth:`next_timeout` or sooner."""
        if self.started_at is None:
            self.started_at = now
        if now >= self._due:
            self._expire_due(now)
        if self._probe_due and now >= self._next_probe:
            self._probe(now)
        if self._stragglers:
            self._drop_stragglers(now)
        if now >= self._next_sweep:
            self._next_sweep = now + self.settings.heartbeat / 4
            self._sweep(now)
            self._plog.roll(now)
            self._watch(now)
        m = self._measure
        if m is not None:
            if m.done(now):
                self._close_measure(now)
            elif now >= m.deadline:
                self._finish_measure(False, _refusal(ErrorCode.TIMED_OUT, f"measure timed out in phase "
                                                     f"{m.phase.value!r} with {len(self.agents)} agents registered"),
                                     now)
        if self._measure_queue:
            self._expire_queued_measures(now)

    def on_connection_event(self, name: str, now: float = 0.0, value: int = 0) -> None:
        """A transport-level event on the ROUTER (the driver's socket monitor).  A closed
        connection makes the next timer probe the quiet units, so that a registration
        whose connection it was is dropped at once rather than after liveness."""
        self.connections[name] += 1
        if name == "disconnected":
            self._probe_due = PROBES_PER_CLOSE
        elif name == "accept_failed":
            self._plog.warning(now, "cannot accept a connection: %s (out of file descriptors? raise `ulimit -n`)",
                               _errno_name(value))

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
        self._outbox.append((peer, P.encode(P.Error(ErrorCode.UNEXPECTED, P.ERROR_HINTS[ErrorCode.UNEXPECTED]))))

    def on_undeliverable(self, peer: bytes, why: str, now: float, gone: bool = False) -> None:
        """The driver could not hand a frame for ``peer`` to the socket; ``gone``: because
        its connection no longer exists (then whatever it held goes at once)."""
        self.ledger.undeliverable += 1
        if self._measure is not None:
            self._measure.on_undeliverable()
        unit = self._by_peer.get(peer)
        self._plog.warning(now, "message to %s counted undeliverable: %s", _peer_name(peer, unit), why)
        if gone:
            if unit is not None:
                self.ledger.errors["connection_closed"] += 1
                self._plog.info(now, "%s: its connection is gone; dropped", unit.name)
                self._drop(unit, now)
            self._cancel_measures(peer, now)

    def next_timeout(self, now: float) -> float:
        """Seconds until :meth:`on_timer` has something to do: the next deadline, sweep,
        probe or measurement event, whichever is first."""
        t = min(self._next_sweep, self._due)
        if self._stragglers:
            t = now
        elif self._probe_due:
            t = min(t, self._next_probe)
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
        """Say BYE to every agent and host; called once before the driver exits."""
        self.stopping = True
        bye = P.encode(P.Bye("coordinator shutting down"))
        for unit in list(self._by_peer.values()):
            self._outbox.append((unit.peer, bye))
            self._drop(unit, now)
        if self._measure is not None:
            self._finish_measure(False, _refusal(ErrorCode.SHUTTING_DOWN, "coordinator shutting down"), now)
        while self._measure_queue:
            peer, request_id, _, _ = self._measure_queue.popleft()
            self._reply(peer, request_id, False, _refusal(ErrorCode.SHUTTING_DOWN, "coordinator shutting down"))

    # --- registration and liveness ----------------------------------------------

    def _on_hello(self, peer: bytes, msg: P.Hello, now: float, key: bytes | None = None) -> None:
        agent_id = msg.agent_id
        old = self.agents.get(agent_id)
        if type(old) is AgentEntry and old.peer == peer:
            # A repeated HELLO (the agent has not seen our WELCOME yet): answer it again.
            # It does not extend the setup grace.
            self._send(old, self._welcome(old), now)
            return
        if not self._admit(peer, [agent_id], agent_id, msg.token, key, now):
            return
        other = self._by_peer.get(peer)
        if other is not None:
            self._drop(other, now)
        if old is not None:
            # The same agent, from a new connection (it restarted, or reconnected).
            self._plog.info(now, "agent %s re-registered (peer %s)", agent_id, peer.hex())
            self._forget_agent(old, now, keep_position=True)
        try:
            slot = self.world.place(agent_id)
        except WorldFull as exc:
            self._reject(peer, ErrorCode.WORLD_FULL, str(exc), now)
            return
        entry = AgentEntry(peer, msg.kind, msg.pid, now, now, now, agent_id=agent_id, slot=slot,
                           token=self._token(), key=key)
        self.agents[agent_id] = entry
        self._by_peer[peer] = entry
        self._joining += 1
        self._count_registration(agent_id)
        self._plog.info(now, "agent %s registered (kind %s, pid %d); %d agents", agent_id, msg.kind, msg.pid,
                        len(self.agents))
        self._send(entry, self._welcome(entry), now)

    def _on_host_hello(self, peer: bytes, msg: P.HostHello, now: float, key: bytes | None = None) -> None:
        ids = msg.member_ids()
        unit = self._by_peer.get(peer)
        if type(unit) is HostEntry and unit.host_id == msg.host_id and unit.ids == ids:
            self._send(unit, self._host_welcome(unit), now)  # a repeated HOST_HELLO
            return
        free = self.world.config.capacity - len(self.world) + sum(1 for i in ids if i in self.world)
        if len(ids) > free:
            self._reject(peer, ErrorCode.WORLD_FULL, f"{len(ids)} agents do not fit: the world has room for "
                                                     f"{free} more", now)
            return
        if not self._admit(peer, ids, f"host {msg.host_id}", msg.token, key, now, host_id=msg.host_id):
            return
        if unit is not None:
            self._drop(unit, now)
        old_host = self.hosts.get(msg.host_id)
        if old_host is not None:
            self._plog.info(now, "host %s re-registered (peer %s)", msg.host_id, peer.hex())
            self._drop(old_host, now, keep_position=True)
        for agent_id in ids:
            old = self.agents.get(agent_id)
            if old is not None:
                self._forget_agent(old, now, keep_position=True)
        host = HostEntry(peer, msg.kind, msg.pid, now, now, now, host_id=msg.host_id, ids=ids,
                         slots=np.array([self.world.place(i) for i in ids], dtype=np.int64),
                         live=np.ones(len(ids), dtype=bool), token=self._token(), key=key)
        host.refresh()
        for index, agent_id in enumerate(ids):
            self.agents[agent_id] = Member(agent_id, host, index, int(host.slots[index]))
            self._count_registration(agent_id)
        self.hosts[msg.host_id] = host
        self._by_peer[peer] = host
        self._joining += 1
        if old_host is not None:  # members the restarted host no longer carries leave the world
            for agent_id in old_host.ids:
                if agent_id not in self.agents:
                    self.world.remove(agent_id)
        self._plog.info(now, "host %s registered %d %s agents (%s .. %s, pid %d); %d agents", msg.host_id, len(ids),
                        msg.kind, ids[0], ids[-1], msg.pid, len(self.agents))
        self._send(host, self._host_welcome(host), now)

    def _admit(self, peer: bytes, ids: list[str], who: str, token: str, key: bytes | None, now: float,
               host_id: str | None = None) -> bool:
        """May ``peer`` register ``ids`` (and ``host_id``)?  Refuses, and says why, when
        the coordinator is stopping, the key may not use an id, an id is held by another
        live connection that this one cannot prove to be, or too many are pending."""
        if self.stopping:
            self._reject(peer, ErrorCode.SHUTTING_DOWN, "coordinator is shutting down", now)
            return False
        if key is not None and self._key_patterns is not None:
            patterns = self._key_patterns.get(key)
            for name in ([host_id] if host_id is not None else []) + ids:
                if not id_allowed(patterns, name):
                    self.ledger.errors["id_not_allowed"] += 1
                    self._reject(peer, ErrorCode.NOT_ALLOWED, f"{who}: this connection's CURVE key may not use id "
                                                              f"{name!r} (allowed: {' '.join(patterns or ())})", now)
                    return False
        holders = {}
        if host_id is not None and host_id in self.hosts:
            holders[self.hosts[host_id]] = host_id
        for agent_id in ids:
            old = self.agents.get(agent_id)
            if old is not None:
                holder = old if type(old) is AgentEntry else old.host
                holders.setdefault(holder, agent_id)
        for holder, name in holders.items():
            if holder.peer == peer or self._may_replace(holder, token, key, now):
                continue
            self._probe_unit(holder, now)  # if its connection is in fact gone, the next HELLO gets in
            self._reject(peer, ErrorCode.ID_TAKEN, f"{who}: id {name!r} is registered by {holder.name}, whose "
                                                   f"connection is alive", now)
            return False
        taking_over = [h for h in holders if h.peer != peer]
        if self._joining - sum(1 for h in taking_over if h.state is JOINING) >= self.settings.max_pending:
            self._reject(peer, ErrorCode.BUSY, f"{who}: {self._joining} registrations are waiting to say they are "
                                               f"ready (at most {self.settings.max_pending})", now)
            return False
        for holder in taking_over:
            if now - holder.last_seen <= self.settings.expiry:  # it may still be listening: tell it
                self._outbox.append((holder.peer, P.encode(P.Error(ErrorCode.REPLACED, (
                    f"{holder.name}: taken over by another connection that presented its token or key; "
                    f"{P.ERROR_HINTS[ErrorCode.REPLACED]}")))))
        return True

    def _may_replace(self, holder: Unit, token: str, key: bytes | None, now: float) -> bool:
        """A new connection may take ``holder``'s registration when the old connection is
        silent past liveness, or when the new one proves it is the same agent: it presents
        the token of the old WELCOME, or authenticated with the same CURVE key."""
        return (now - holder.last_seen > self.settings.expiry
                or (bool(token) and hmac.compare_digest(token.encode(), holder.token.encode()))
                or (key is not None and key == holder.key))

    def _count_registration(self, agent_id: str) -> None:
        if agent_id in self._registrations or len(self._registrations) < MAX_TRACKED_IDS:
            self._registrations[agent_id] += 1
            if self._registrations[agent_id] > 1:
                self._restarts[agent_id] = self._registrations[agent_id] - 1

    def _on_ready(self, unit: Unit, now: float) -> None:
        """The unit's first message after WELCOME: its models are built; schedule it."""
        unit.move("ready")
        self._joining -= 1
        if self._async:
            self._send_observation(unit, unit.tick, now)
        elif self.phase is TICK_IDLE:
            self._open_tick(now)

    def _welcome(self, entry: AgentEntry) -> bytes:
        return self._welcomes.welcome(entry.agent_id, {"arena": int(self.world.arena[entry.slot]),
                                                       "token": entry.token})

    def _host_welcome(self, host: HostEntry) -> bytes:
        return self._welcomes.host_welcome(host.host_id, {"token": host.token},
                                           self.world.arena[host.slots].astype(np.uint32))

    def _check_welcome_fits(self) -> None:
        """Refuse to start with a world whose WELCOME no agent could receive."""
        longest, token = "x" * 128, "x" * P.MAX_TOKEN_LEN
        worst = max(len(self._welcomes.welcome(longest, {"arena": 2**32 - 1, "token": token})),
                    len(self._welcomes.host_welcome(longest, {"token": token},
                                                    np.zeros(P.MAX_HOST_AGENTS, np.uint32))))
        if worst > self.settings.max_message_bytes:
            w = self.world.config
            raise ConfigError(
                f"this world's WELCOME would be {worst} bytes, over the {self.settings.max_message_bytes}-byte message "
                f"limit, so no agent could join: the {w.width}x{w.height} map's obstacles and goals travel in it; use "
                f"fewer obstacles (--obstacles) or goals, or a smaller map")

    def _drop(self, unit: Unit, now: float, keep_position: bool = False) -> None:
        """Forget a unit and its agents; an observation it still owed counts missing."""
        if self._by_peer.get(unit.peer) is unit and unit.state is JOINING:
            self._joining -= 1
        self._stragglers.pop(unit, None)
        if unit.state is STEPPING:
            self._count_missing(self._owed(unit))
            self._outstanding.pop(unit, None)
            self._expected.discard(unit)
        if self._by_peer.get(unit.peer) is unit:
            del self._by_peer[unit.peer]
        if type(unit) is HostEntry:
            if self.hosts.get(unit.host_id) is unit:
                del self.hosts[unit.host_id]
            for index in unit.live_idx.tolist():
                member = self.agents.get(unit.ids[index])
                if type(member) is Member and member.host is unit:
                    self._unregister(member, unit, keep_position)
            unit.live[:] = False
            unit.refresh()
        elif self.agents.get(unit.agent_id) is unit:
            self._unregister(unit, unit, keep_position)
        if self.phase is TICK_OPEN and not self._expected:
            self._close_tick(now)

    def _forget_agent(self, agent: AgentEntry | Member, now: float, keep_position: bool) -> None:
        """One agent goes (replaced by a new registration, or its host said HOST_BYE)."""
        if type(agent) is AgentEntry:
            self._drop(agent, now, keep_position)
            return
        host = agent.host
        host.live[agent.index] = False
        host.refresh()
        if host.state is STEPPING:
            hit = host.pending_idx == agent.index
            if hit.any():  # it owed a step of the outstanding frame: missing
                host.pending_idx = host.pending_idx[~hit]
                self._count_missing(1)
        self._unregister(agent, host, keep_position)
        if not host.live.any():
            log.info("%s has no agents left", host.name)
            self._drop(host, now)

    def _unregister(self, agent: AgentEntry | Member, unit: Unit, keep_position: bool) -> None:
        del self.agents[agent.agent_id]
        if unit.first_step_at is not None:
            self._stepping_n -= 1
        if not keep_position:
            self.world.remove(agent.agent_id)
            if type(agent) is AgentEntry:
                self._moves.pop(agent.slot, None)  # a move it sent this tick goes with it

    def _on_host_bye(self, host: HostEntry, msg: P.HostBye, now: float) -> None:
        for index in msg.members:
            if index < len(host.ids) and host.live[index]:
                log.warning("%s: agent %s left: %s", host.name, host.ids[index], msg.reason or "bye")
                self._forget_agent(self.agents[host.ids[index]], now, keep_position=False)
        if self.phase is TICK_OPEN and not self._expected:
            self._close_tick(now)

    def _sweep(self, now: float) -> None:
        """Liveness, setup grace and heartbeats (deadlines are :meth:`_expire_due`'s)."""
        s = self.settings
        hb = None
        for unit in list(self._by_peer.values()):
            if unit.state is JOINING:
                if now - unit.joined_at > s.setup_grace:
                    self._plog.warning(now, "%s did not say it was ready within %.1f s of HELLO: dropped", unit.name,
                                       s.setup_grace)
                    self.ledger.errors["setup_expired"] += 1
                    self._drop(unit, now)
                    continue
            elif now - unit.last_seen > s.expiry:
                self._plog.warning(now, "%s silent for %.2f s: declared dead", unit.name, now - unit.last_seen)
                self.ledger.errors["expired"] += 1
                self._drop(unit, now)
                continue
            if now - unit.last_sent >= s.heartbeat:
                hb = hb or P.encode(P.Heartbeat())
                self._send(unit, hb, now)

    def _probe(self, now: float) -> None:
        """A connection closed: a HEARTBEAT to every unit and to clients waiting for
        measurements.  The one whose connection it was cannot be sent to, and the driver
        reports it gone (:meth:`on_undeliverable`)."""
        self._probe_due -= 1
        self._next_probe = now + PROBE_INTERVAL_S
        hb = P.encode(P.Heartbeat())
        for unit in self._by_peer.values():
            self._send(unit, hb, now)
        for peer in {m[0] for m in self._measure_queue} | ({self._measure.peer} if self._measure else set()):
            self._outbox.append((peer, hb))

    def _watch(self, now: float) -> None:
        """Sample the live efficiency; raise or clear its alert."""
        ledger = self.ledger
        self.live.sample(Sample(now, self.agent_cpu_us, ledger.received, ledger.missing + ledger.late,
                                self._cpu_clock()[0]), self._stepping_n)
        event = self.live.update(now, self._explain)
        if event is None:
            return
        if event.raised:
            log.warning("efficiency %.0f%% below the %.0f%% threshold for %.0f s: %s", event.efficiency * 100,
                        event.threshold * 100, self.settings.alert_for, event.cause)
        else:
            log.info("efficiency alert cleared (%s): %s", f"{event.efficiency:.0%}" if event.efficiency else "-",
                     event.cause)
        self._alerts.append(event)

    def _explain(self, f: dict) -> str:
        """What the coordinator can see behind a low efficiency, most telling first."""
        causes = []
        if f["lost"]:
            causes.append(f"{f['lost']} steps lost (missed or late) in the last {f['window_s']:.0f} s")
            missing = [(name, c) for name, c in self.straggler_table().items() if c["in_a_row"] or c["missed"]]
            if missing:
                causes.append("missing their deadlines: " + ", ".join(
                    f"{name} ({c['missed']} missed, {c['late']} late)" for name, c in missing[:SLOWEST_NAMED]))
        slowest = self.slowest_units(SLOWEST_NAMED)
        if slowest:
            causes.append("slowest: " + ", ".join(f"{name} ({p50 / 1000:.1f} ms a step)" for name, p50 in slowest))
        if f["coordinator_cpu"] is not None and f["coordinator_cpu"] >= 0.85:
            causes.append(f"the coordinator uses {f['coordinator_cpu']:.0%} of a core: it is the bottleneck "
                          f"(hosts or async mode send fewer messages a step)")
        load = self._load()
        if load > f["cores"]:
            causes.append(f"the machine is overloaded: load {load:.1f} on {f['cores']} cores")
        if f["agents"] < f["cores"]:
            causes.append(f"only {f['agents']} agents for {f['cores']} cores")
        return "; ".join(causes) or "no cause visible from the coordinator (agents waiting on something else?)"

    def slowest_units(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` units with the longest median step time: (name, p50 in us)."""
        ranked = sorted(((_median(u), u.name) for u in self._by_peer.values() if u.times_n), reverse=True)
        return [(name, p50) for p50, name in ranked[:k]]

    def take_alerts(self) -> list[AlertEvent]:
        out, self._alerts = self._alerts, []
        return out

    def _probe_unit(self, unit: Unit, now: float) -> None:
        self._send(unit, P.encode(P.Heartbeat()), now)

    def _strike(self, unit: Unit) -> None:
        unit.strikes += 1
        if unit.strikes >= self.settings.drop_after > 0:
            self._stragglers[unit] = None

    def _drop_stragglers(self, now: float) -> None:
        """Settings.drop_after: units that kept missing, or nearly missing, their deadlines
        leave the schedule (they may HELLO again)."""
        stragglers, self._stragglers = self._stragglers, {}
        for unit in stragglers:
            if self._by_peer.get(unit.peer) is not unit:
                continue
            self.ledger.errors["dropped_stragglers"] += 1
            self._plog.warning(now, "%s dropped from the schedule: %d deadlines in a row missed, late or slow "
                                    "(missed %d, late %d, slow %d in all)", unit.name, unit.strikes, unit.missed,
                               unit.late, unit.slow)
            self._outbox.append((unit.peer, P.encode(P.Error(ErrorCode.DROPPED, (
                f"{unit.name}: {unit.strikes} deadlines in a row missed, late or slow; "
                f"{P.ERROR_HINTS[ErrorCode.DROPPED]}")))))
            self._drop(unit, now)

    # --- deadlines ----------------------------------------------------------------

    def _expire_due(self, now: float) -> None:
        """Expire every observation whose deadline has passed, then recompute ``_due``."""
        if self._async:
            deadline = self.settings.deadline
            outstanding = self._outstanding
            while outstanding:
                unit = next(iter(outstanding))
                if now - unit.sent_at < deadline:
                    break
                self._expire(unit)
                unit.tick += 1
                self._send_observation(unit, unit.tick, now)  # re-queued at the end
            self._due = next(iter(outstanding)).sent_at + deadline if outstanding else math.inf
        elif self.phase is TICK_OPEN and now >= self._tick_deadline:
            for unit in self._expected:
                self._expire(unit)
            self._expected = set()
            self._close_tick(now)  # sets _due for the next tick

    def _expire(self, unit: Unit) -> None:
        n = self._owed(unit)
        unit.move("expire")
        unit.missed += 1
        self._strike(unit)
        m = self._measure
        unit.overdue.append((unit.pending, n, m if m is not None and m.counting else None))
        self._outstanding.pop(unit, None)
        self._count_missing(n)

    @staticmethod
    def _owed(unit: Unit) -> int:
        """Agent-steps the unit's outstanding observation covers."""
        return len(unit.pending_idx) if type(unit) is HostEntry else 1

    def _count_missing(self, n: int) -> None:
        self.ledger.outstanding -= n
        self.ledger.missing += n
        if self._measure is not None:
            self._measure.on_expired(n)

    # --- the schedule -------------------------------------------------------------

    def _open_tick(self, now: float) -> None:
        ready = [u for u in self._by_peer.values() if u.state is IDLE]
        if not ready or self.stopping:
            self.phase = TICK_IDLE
            self._due = self._tick_deadline = math.inf
            return
        self.phase = TICK_OPEN
        self._tick_opened = now
        self._due = self._tick_deadline = now + self.settings.deadline
        self._expected = set(ready)
        tick = self.tick
        for unit in ready:
            self._send_observation(unit, tick, now)

    def _close_tick(self, now: float) -> None:
        if self.tick_time is not None:
            us = (now - self._tick_opened) * 1e6
            self.tick_time.record(us)
            self.tick_time_sum_us += us
        self.phase = TICK_IDLE
        self._apply_moves()
        self.ledger.ticks += 1
        if self._measure is not None:
            self._measure.on_tick()
        self.tick += 1
        self._open_tick(now)

    def _apply_moves(self) -> None:
        """The tick's actions, all at once, in slot (registration) order."""
        moves, self._moves = self._moves, {}
        host_moves, self._host_moves = self._host_moves, []
        if host_moves:
            slots, actions = [np.fromiter(moves, np.int64, len(moves))], [np.fromiter(moves.values(), np.int64, len(moves))]
            for host, idx, acts in host_moves:
                still = host.live[idx]  # members that left since their host answered are skipped
                slots.append(host.slots[idx[still]])
                actions.append(acts[still].astype(np.int64, copy=False))
            slots, actions = np.concatenate(slots), np.concatenate(actions)
            order = np.argsort(slots, kind="stable")
            self.world.move_many(slots[order], actions[order])
        elif moves:
            ordered = sorted(moves)
            self.world.move_many(ordered, [moves[s] for s in ordered])

    def _send_observation(self, unit: Unit, tick: int, now: float) -> None:
        if unit.state is not IDLE:  # the table's (IDLE, "observe"), inlined: the per-step path
            unit.move("observe")
        unit.state = STEPPING
        unit.pending = tick
        unit.sent_at = now
        if type(unit) is AgentEntry:
            n = 1
            frame = P.encode_observation(tick, self.world.observe(unit.slot))
        else:
            unit.pending_idx = unit.live_idx
            n = len(unit.live_idx)
            frame = P.encode_host_observation(tick, unit.members_ext, self.world.observe_many(unit.live_slots))
        ledger = self.ledger
        ledger.sent += n
        ledger.outstanding += n
        if self._measure is not None:
            self._measure.on_sent(n)
        if self._async:
            if not self._outstanding:
                self._due = now + self.settings.deadline
            self._outstanding[unit] = None
        self._send(unit, frame, now)

    def _on_action(self, entry: AgentEntry, msg: P.Action, now: float) -> None:
        if entry.state is not STEPPING or msg.tick != entry.pending:
            self._late_or_stale(entry, msg.tick, now)
            return
        self._accept(entry, 1, msg.compute_us, now, msg.cpu_us)
        if self._async:
            del self._outstanding[entry]
            self.world.move(entry.slot, msg.action)
            entry.tick += 1
            self._send_observation(entry, entry.tick, now)
        else:
            self._moves[entry.slot] = msg.action
            self._expected.discard(entry)
            if not self._expected:
                self._close_tick(now)

    def _on_host_action(self, host: HostEntry, msg: P.HostAction, now: float) -> None:
        if host.state is not STEPPING or msg.tick != host.pending:
            self._late_or_stale(host, msg.tick, now)
            return
        n = len(host.pending_idx)
        if len(msg.actions) != n:
            self._reject(host.peer, ErrorCode.BAD_FIELD, f"HOST_ACTION for tick {msg.tick} has "
                         f"{len(msg.actions)} actions; the observation listed {n} members", now)
            return
        self._accept(host, n, msg.compute_us, now, msg.cpu_us)
        if self._async:
            del self._outstanding[host]
            self.world.move_many(host.slots[host.pending_idx], msg.actions)
            host.tick += 1
            self._send_observation(host, host.tick, now)
        else:
            self._host_moves.append((host, host.pending_idx, msg.actions))
            self._expected.discard(host)
            if not self._expected:
                self._close_tick(now)

    def _accept(self, unit: Unit, n: int, compute_us: int, now: float, cpu_us: int | None = None) -> None:
        """``n`` agent-steps answered in time: the ledger, the unit, the measurement."""
        unit.state = IDLE  # the table's (STEPPING, "answer"): the caller checked STEPPING
        unit.steps += n
        waited = now - unit.sent_at
        if compute_us > waited * 1e6 + COMPUTE_SLACK_US:  # it cannot have computed for longer than we waited
            self.ledger.errors["bad_compute_us"] += 1
            self._plog.warning(now, "%s reported compute_us %d for an answer that took %.0f us: counted as %.0f",
                               unit.name, compute_us, waited * 1e6, waited * 1e6)
            compute_us = int(waited * 1e6)
        cpu = compute_us if cpu_us is None or cpu_us > compute_us else cpu_us  # never more than the wall time
        self.agent_cpu_us += cpu
        unit.times[unit.times_n & (STEP_TIMES - 1)] = compute_us // n
        unit.times_n += 1
        if self.latency is not None:
            us = waited * 1e6 - compute_us
            self.latency.record(us, n)
            self.latency_sum_us += us * n
        if waited > self._slow_after:
            unit.slow += 1
            self.ledger.slow += n
            self._strike(unit)
        elif unit.strikes:
            unit.strikes = 0
        first = unit.first_step_at is None
        if first:
            unit.first_step_at = now
            self._stepping_n += n
        ledger = self.ledger
        ledger.outstanding -= n
        ledger.received += n
        m = self._measure
        if m is not None:
            m.on_received(waited * 1e6 - compute_us, compute_us, n, cpu)
            if first or not m.counting:
                m.advance(self._stepping_n, ledger.received, now)
            elif m.done(now):
                self._close_measure(now)

    def _late_or_stale(self, unit: Unit, tick: int, now: float) -> None:
        """An answer that is not for the outstanding observation: late if its
        observation expired recently, else refused."""
        for i, (expired, n, window) in enumerate(unit.overdue):
            if expired == tick:
                del unit.overdue[i]
                unit.late += 1
                self.ledger.missing -= n
                self.ledger.late += n
                if window is not None and window is self._measure:
                    window.on_late(n)
                return
        current = f"current {unit.pending}" if unit.state is STEPPING else "none is"
        self._reject(unit.peer, ErrorCode.STALE_TICK, f"no observation for tick {tick} is outstanding ({current})", now)

    # --- output -------------------------------------------------------------------

    def _send(self, unit: Unit, frame: bytes, now: float) -> None:
        unit.last_sent = now
        self._outbox.append((unit.peer, frame))

    def _reject(self, peer: bytes, code: ErrorCode, reason: str, now: float) -> None:
        """Count, log and answer a refused message.  Never raises."""
        self.ledger.errors[code.name] += 1
        self._plog.warning(now, "refused message from %s: %s: %s", _peer_name(peer, self._by_peer.get(peer)), code.name,
                           reason)
        hint = P.ERROR_HINTS.get(code, "")
        self._outbox.append((peer, P.encode(P.Error(code, f"{reason}; {hint}" if hint else reason))))

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
        page = msg.args.get("page")
        if page is not None and (type(page) is not int or page < 0):
            raise ControlError(ErrorCode.BAD_FIELD, "stats' page must be a non-negative integer")
        return self.stats(now, page)

    def _cmd_agents(self, peer: bytes, msg: P.Control, now: float) -> dict:
        """One row per agent, STATS_DETAIL_MAX a page, by id: what ``busctl agents`` shows.
        A host's agents share their host's figures (state, step times, counts)."""
        page = msg.args.get("page", 0)
        if type(page) is not int or page < 0:
            raise ControlError(ErrorCode.BAD_FIELD, "agents' page must be a non-negative integer")
        ids = sorted(self.agents)[page * STATS_DETAIL_MAX:(page + 1) * STATS_DETAIL_MAX]
        rows = []
        for agent_id in ids:
            entry = self.agents[agent_id]
            unit = entry if type(entry) is AgentEntry else entry.host
            times = _step_times(unit)
            rows.append({
                "id": agent_id, "pid": unit.pid, "host": unit.host_id if type(unit) is HostEntry else None,
                "kind": unit.kind, "state": unit.state.value,
                "steps": unit.steps if type(unit) is AgentEntry else unit.steps // max(1, len(unit.ids)),
                "p50_us": times[len(times) // 2] if times else None,
                "p99_us": times[min(len(times) - 1, (len(times) * 99) // 100)] if times else None,
                "missed": unit.missed, "late": unit.late, "slow": unit.slow,
                "last_seen_s": round(now - unit.last_seen, 3),
            })
        return {"page": page, "pages": max(1, -(-len(self.agents) // STATS_DETAIL_MAX)), "agents": rows}

    def _cmd_measure(self, peer: bytes, msg: P.Control, now: float) -> None:
        """Start a measurement, or queue it behind the running one (its ``timeout_s``
        counts from now); answered when it closes."""
        request = MeasureRequest.parse(msg.args)
        if self._measure is None:
            self._start_measure(peer, msg.request_id, request, now, now)
        elif len(self._measure_queue) < MAX_QUEUED_MEASURES:
            self._measure_queue.append((peer, msg.request_id, request, now))
        else:
            raise ControlError(ErrorCode.BUSY, f"a measurement is running and {len(self._measure_queue)} are queued "
                                               f"(at most {MAX_QUEUED_MEASURES})")

    def _start_measure(self, peer: bytes, request_id: int, request: MeasureRequest, received_at: float,
                       now: float) -> None:
        self._measure = Measurement(peer, request_id, request, now, self._cpu_clock)
        self._measure.deadline = received_at + request.timeout_s
        self._measure.advance(self._stepping_n, self.ledger.received, now)

    def _expire_queued_measures(self, now: float) -> None:
        for item in [q for q in self._measure_queue if now >= q[3] + q[2].timeout_s]:
            self._measure_queue.remove(item)
            self._reply(item[0], item[1], False, _refusal(ErrorCode.TIMED_OUT, "measure timed out while queued "
                                                                                "behind other measurements"))

    def _cancel_measures(self, peer: bytes, now: float) -> None:
        """The client ``peer`` is gone: its measurements, running or queued, are dropped."""
        for item in [q for q in self._measure_queue if q[0] == peer]:
            self._measure_queue.remove(item)
            self.ledger.errors["measures_cancelled"] += 1
        if self._measure is not None and self._measure.peer == peer:
            self._measure = None
            self.ledger.errors["measures_cancelled"] += 1
            self._plog.info(now, "measurement cancelled: its client (peer %s) is gone", peer.hex())
            self._next_measure(now)

    def _next_measure(self, now: float) -> None:
        if self._measure_queue and not self.stopping:
            peer, request_id, request, received_at = self._measure_queue.popleft()
            self._start_measure(peer, request_id, request, received_at, now)

    def _reply(self, peer: bytes, request_id: int, ok: bool, result: dict) -> None:
        self._outbox.append((peer, P.encode(P.Reply(request_id, ok, result))))

    def stats(self, now: float, page: int | None = None) -> dict:
        """The bus at a glance.  Agents are listed (ids, pids, which have stepped) when
        there are at most STATS_DETAIL_MAX, else in pages of that size on request."""
        out = {
            "session": self.session,
            "mode": self.settings.mode,
            "uptime_s": now - (self.started_at if self.started_at is not None else now),
            "agents": len(self.agents),
            "ready": self._stepping_n,
            "hosts": len(self.hosts),
            "arenas": self.world.arenas,
            "tick": self.tick,
            "ledger": self.ledger.snapshot(),
            "restarts": dict(sorted(self._restarts.items())[:STATS_DETAIL_MAX]),
            "goal_visits": self.world.goal_visits,
            "connections": {**dict.fromkeys(CONNECTION_EVENTS, 0), **self.connections,
                            "open": self.connections["accepted"] - self.connections["disconnected"]},
            "pending": self._joining,
            "measurements": {"running": self._measure is not None, "queued": len(self._measure_queue)},
            "stragglers": self.straggler_table(),
            "live": self.live.figures(),
        }
        pages = max(1, -(-len(self.agents) // STATS_DETAIL_MAX))
        if page is None and len(self.agents) > STATS_DETAIL_MAX:
            out["pages"] = pages
            return out
        ids = sorted(self.agents)[(page or 0) * STATS_DETAIL_MAX:((page or 0) + 1) * STATS_DETAIL_MAX]
        entries = [self.agents[a] for a in ids]
        units = [e if type(e) is AgentEntry else e.host for e in entries]
        out.update({
            "pages": pages,
            "page": page or 0,
            "agent_ids": ids,
            "agent_pids": {e.agent_id: u.pid for e, u in zip(entries, units)},
            "agent_hosts": {e.agent_id: e.host.host_id for e in entries if type(e) is Member},
            "ready_ids": [e.agent_id for e, u in zip(entries, units) if u.first_step_at is not None],
            "host_ids": sorted(self.hosts)[:STATS_DETAIL_MAX],
        })
        return out

    @property
    def ready(self) -> int:
        """Agents that have answered an observation."""
        return self._stepping_n

    @property
    def pending(self) -> int:
        """Connections registered and not yet ready."""
        return self._joining

    def cpu_seconds(self) -> float:
        """The coordinator process's CPU time so far."""
        return self._cpu_clock()[0]

    def straggler_table(self) -> dict:
        """The units that missed, answered late or slowly most often (at most
        MAX_STRAGGLERS_LISTED, worst first): their name -> counts."""
        units = [u for u in self._by_peer.values() if u.missed or u.late or u.slow]
        units.sort(key=lambda u: (u.missed + u.late + u.slow), reverse=True)
        return {u.name: {"missed": u.missed, "late": u.late, "slow": u.slow, "in_a_row": u.strikes}
                for u in units[:MAX_STRAGGLERS_LISTED]}

    def _close_measure(self, now: float) -> None:
        m = self._measure
        self._finish_measure(True, m.result(now, len(self.agents), self.ledger.snapshot(), self.settings.mode,
                                            self.settings.agent_cores), now)

    def _finish_measure(self, ok: bool, result: dict, now: float) -> None:
        m, self._measure = self._measure, None
        self._reply(m.peer, m.request_id, ok, result)
        self._next_measure(now)


def _step_times(unit: Unit) -> list[int]:
    """The unit's recent step times (us per agent), sorted."""
    return sorted(unit.times[:min(unit.times_n, STEP_TIMES)])


def _median(unit: Unit) -> float:
    times = _step_times(unit)
    return times[len(times) // 2]


def _errno_name(value: int) -> str:
    import errno
    import os

    return f"{errno.errorcode.get(value, value)} ({os.strerror(value)})" if value else "unknown error"


def _refusal(code: ErrorCode, reason: str) -> dict:
    """A refused CONTROL request's ``result``: what went wrong, its code, what to do."""
    return {"error": reason, "code": int(code), "code_name": code.name, "hint": P.ERROR_HINTS.get(code, "")}


def _peer_name(peer: bytes, unit: Unit | None) -> str:
    return f"{unit.name} (peer {peer.hex()})" if unit is not None else f"peer {peer.hex()}"
