"""An agent's side of the protocol as a sans-IO state machine: bytes and time in, frames
and timers out.

:class:`AgentSession` is the twin of :class:`~agentbus_zmq.coordinator.core.CoordinatorCore`.
It never touches a socket or a clock.  The runtime (``agents.runtime``) feeds it every
frame with :meth:`~AgentSession.receive` and the time with :meth:`~AgentSession.on_timer`,
sends what :meth:`~AgentSession.take_outbox` returns, and opens a fresh socket whenever
the session asks for one (:attr:`~AgentSession.state` is ``CONNECTING``).  Tests drive it
with a fake clock.

States (:data:`SESSION` is the whole table)::

    CONNECTING --connect--> HELLO_SENT --welcome--> REGISTERED
    HELLO_SENT / REGISTERED --silence (heartbeat x liveness)--> BACKING_OFF
    REGISTERED --NOT_REGISTERED / SHUTTING_DOWN error--> HELLO_SENT   (coordinator restarted)
    REGISTERED --BYE from the coordinator--> BACKING_OFF
    BACKING_OFF --backoff elapsed--> CONNECTING                        (a fresh socket)
    HELLO_SENT / REGISTERED --REPLACED or NOT_ALLOWED--> STOPPED          (our id is taken, or not ours)
    HELLO_SENT --ID_TAKEN for ID_TAKEN_BACK_OFF_S in a row--> BACKING_OFF (a live connection holds our id)
    any --stop--> STOPPED

``SESSION.move(session, event)`` (``bus.fsm``, the coordinator's mechanism too) is the
only way the state changes; an event the table does not allow raises.

* Until WELCOME, HELLO is repeated every ``heartbeat`` (it is idempotent).
* A WELCOME whose session or parameters differ from the last one is a new session
  (the coordinator restarted, or was reconfigured): :class:`Welcomed` says so and the
  runtime rebuilds the model (``on_start``) before saying it is ready.  The same WELCOME
  again (a repeated HELLO's answer) needs no rebuild.
* OBSERVATIONs outside REGISTERED are stale (an old session's): they are dropped.
* Back-off doubles from ``backoff_min`` to ``backoff_max`` with each reconnection in a
  row, and resets when a WELCOME arrives.
* WELCOME's ``heartbeat_ms`` and ``liveness`` replace the session's own (they are the
  coordinator's to set); until the first WELCOME the session uses its constructor's.
* Every HELLO after the first WELCOME presents that WELCOME's ``token``: a reconnection
  (a fresh socket) then takes its own registration over at once, even while the
  coordinator still sees the old connection.  Another process without the token gets
  ID_TAKEN; one that has it takes over, and this session, told REPLACED, stops.
* ID_TAKEN never ends the session: a peer without our token or key may squat our id
  (without CURVE, ids are first come), and a squatter must cost us no more than retries.
  HELLO is repeated every ``heartbeat`` while the holder may still be found gone (its
  connection closed, silent past liveness, or past its setup grace: 30 s by default);
  refused for ``id_taken_limit`` seconds in a row (60), the session backs off, doubling
  up to ``backoff_max``, and tries again from a fresh socket, for as long as it runs (the
  runtime says so at each refusal).  Only REPLACED (the holder proved to be us, with our
  token or key) and NOT_ALLOWED end it.
"""

from __future__ import annotations

import dataclasses
import enum
import math

from agentbus_zmq.bus import config
from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.fsm import IllegalTransition, Machine
from agentbus_zmq.bus.protocol import ErrorCode

__all__ = ["AgentSession", "SessionState", "Welcomed", "Refused", "Left", "BadFrame", "SESSION",
           "IllegalTransition"]

#: Errors after which the coordinator has forgotten us: say HELLO again at once.
REHELLO = frozenset({ErrorCode.NOT_REGISTERED, ErrorCode.SHUTTING_DOWN, ErrorCode.DROPPED, ErrorCode.WORLD_FAULT})
#: Errors after which this session must stop: another connection holds our registration.
#: refusals that end the session: another connection took the id over, or the
#: coordinator will never let this agent have it (its CURVE key is bound to other ids)
FATAL = frozenset({ErrorCode.REPLACED, ErrorCode.NOT_ALLOWED})
#: Seconds of ID_TAKEN in a row after which HELLO backs off instead of repeating every
#: heartbeat: twice the coordinator's default setup grace, the longest a holder may stay
#: silent before it is found gone.
ID_TAKEN_BACK_OFF_S = 60.0


class SessionState(enum.Enum):
    CONNECTING = "connecting"    # wants a fresh socket, then HELLO
    HELLO_SENT = "hello_sent"    # waiting for WELCOME
    REGISTERED = "registered"    # stepping
    BACKING_OFF = "backing_off"  # the coordinator went silent or left; waiting to reconnect
    STOPPED = "stopped"


_C, _H, _R, _B = SessionState.CONNECTING, SessionState.HELLO_SENT, SessionState.REGISTERED, SessionState.BACKING_OFF
_S = SessionState.STOPPED
#: read on every message (an Enum member lookup costs 120 ns on 3.11)
_REGISTERED = SessionState.REGISTERED
SESSION = Machine("session", {
    (_C, "connect"): _H,
    (_H, "welcome"): _R,
    (_R, "welcome"): _R,
    (_H, "silence"): _B,
    (_R, "silence"): _B,
    (_R, "forgotten"): _H,
    (_H, "forgotten"): _H,
    (_R, "bye"): _B,
    (_H, "bye"): _B,
    (_B, "retry"): _C,
    (_H, "held"): _B,
    (_H, "replaced"): _S,
    (_R, "replaced"): _S,
    **{(state, "stop"): _S for state in SessionState},
})


@dataclasses.dataclass(slots=True)
class Welcomed:
    """WELCOME arrived.  ``new_session``: build the model (``on_start``), then :meth:`AgentSession.ready`."""

    welcome: P.Welcome
    new_session: bool


@dataclasses.dataclass(slots=True)
class Refused:
    """The coordinator refused something we sent (``rehello``: it had forgotten us;
    ``fatal``: another connection took our registration over, and the session stopped)."""

    error: P.Error
    rehello: bool
    fatal: bool = False


@dataclasses.dataclass(slots=True)
class Left:
    """The coordinator said BYE; the session backs off and reconnects."""

    reason: str


@dataclasses.dataclass(slots=True)
class BadFrame:
    """A frame that is not valid protocol; dropped."""

    error: P.ProtocolError


Event = P.Observation | Welcomed | Refused | Left | BadFrame


class AgentSession:
    """One agent's registration with a coordinator, across reconnections."""

    def __init__(self, agent_id: str, kind: str, pid: int = 0, heartbeat: float = config.DEFAULTS.heartbeat,
                 liveness: int = config.DEFAULTS.liveness, backoff_min: float = config.DEFAULTS.backoff_min,
                 backoff_max: float = config.DEFAULTS.backoff_max, members: tuple[str, int, int] | None = None,
                 id_taken_limit: float = ID_TAKEN_BACK_OFF_S):
        """``agent_id`` is the host's id when ``members`` (prefix, first, count) is given:
        the session then registers a host's agents with HOST_HELLO and expects
        HOST_WELCOME and HOST_OBSERVATION instead of their single-agent twins."""
        if not (heartbeat > 0 and liveness >= 1 and 0 < backoff_min <= backoff_max):
            raise ValueError("heartbeat and backoff_min must be positive, liveness >= 1, backoff_min <= backoff_max")
        self.agent_id = agent_id
        self.heartbeat = heartbeat
        self.expiry = heartbeat * liveness
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.id_taken_limit = id_taken_limit
        #: when the ID_TAKEN refusals in a row began (None: the last answer was another)
        self._id_taken_since: float | None = None
        SESSION.start(self)
        #: the coordinator session and WELCOME params of the current registration
        self.session: str | None = None
        self.params: dict | None = None
        self.steps = 0
        #: reconnections since the last WELCOME (the next back-off is min * 2**n)
        self.reconnects = 0
        self.reconnect_at = 0.0
        self._last_recv = self._last_send = 0.0
        self._outbox: list[bytes] = []
        # a bad id raises ProtocolError here, not on the wire
        self._hello_fields = [agent_id, kind, pid] if members is None else [agent_id, kind, pid, *members]
        if members is None:
            self._hello = P.encode(P.Hello.from_wire(self._hello_fields))
            self._welcome_type, self._observation_type = P.Welcome, P.Observation
        else:
            self._hello = P.encode(P.HostHello.from_wire(self._hello_fields))
            self._welcome_type, self._observation_type = P.HostWelcome, P.HostObservation
        #: the secret of our registration (WELCOME params ``token``), presented by every
        #: later HELLO
        self.token = ""
        self.members = members
        #: a host's members' arenas, from HOST_WELCOME
        self.arenas = None
        self._heartbeat = P.encode(P.Heartbeat())

    def _move(self, event: str) -> None:
        SESSION.move(self, event)

    # --- the runtime's calls ----------------------------------------------------------

    def connect(self, now: float) -> None:
        """A fresh socket is open: say HELLO."""
        self._move("connect")
        self._last_recv = now
        self._send(self._hello, now)

    def receive(self, frame: bytes, now: float) -> Event | None:
        """One frame from the coordinator.  Returns what the runtime must act on: an
        OBSERVATION to step (answer with :meth:`act`), a :class:`Welcomed`, or a note to
        log; None when the session handled it alone."""
        self._last_recv = now
        try:
            msg = P.decode(frame)
        except P.ProtocolError as exc:
            return BadFrame(exc)
        mtype = type(msg)
        if mtype is self._observation_type:
            return msg if self.state is _REGISTERED else None  # stale: an old session's
        if mtype is P.Heartbeat:
            return None
        if mtype is self._welcome_type:
            if self.members is None:
                ours, arenas = msg.agent_id == self.agent_id, None
            else:
                ours, arenas = msg.host_id == self.agent_id and len(msg.arenas) == self.members[2], msg.arenas
            if self.state not in (SessionState.HELLO_SENT, _REGISTERED) or not ours:
                return None
            params = {k: v for k, v in msg.params.items() if k != "token"}  # the token is not the world
            new = (msg.session != self.session or params != self.params
                   or (arenas is not None and (self.arenas is None or arenas.tolist() != self.arenas.tolist())))
            self._move("welcome")
            self.session, self.params, self.arenas = msg.session, params, arenas
            self._take_token(msg.params.get("token"))
            self._take_timing(msg.params)
            self.reconnects = 0
            self._id_taken_since = None
            if not new:
                self.ready(now)  # the answer to a repeated HELLO: ready again, nothing to rebuild
            return Welcomed(msg, new)
        if mtype is P.Error:
            live = self.state in (SessionState.HELLO_SENT, _REGISTERED)
            if live and msg.code == ErrorCode.ID_TAKEN:
                if self._id_taken_since is None:  # kept across reconnections: reset by a WELCOME
                    self._id_taken_since = now
                elif now - self._id_taken_since >= self.id_taken_limit and self.state is SessionState.HELLO_SENT:
                    self._back_off(now, "held")
                return Refused(msg, False)
            if live and msg.code in FATAL:
                self._move("replaced")
                self._outbox.clear()
                return Refused(msg, False, True)
            rehello = live and msg.code in REHELLO
            if rehello:
                self._move("forgotten")
                self._send(self._hello, now)
            return Refused(msg, rehello)
        if mtype is P.Bye:
            if self.state in (SessionState.HELLO_SENT, _REGISTERED):
                self._back_off(now, "bye")
            return Left(msg.reason)
        return None  # HELLO, ACTION, CONTROL, REPLY: not for agents

    def ready(self, now: float) -> None:
        """The model is built: tell the coordinator (our first message after WELCOME)."""
        self._last_recv = now  # building a model may take seconds of silence
        self._send(self._heartbeat, now)

    def act(self, tick: int, action: int, compute_us: int, now: float, cpu_us: int | None = None) -> None:
        """The answer to OBSERVATION ``tick``, at ``now`` (after computing it: time spent
        computing is not the coordinator's silence)."""
        self._outbox.append(P.encode(P.Action(tick, action, compute_us, cpu_us)))
        self._last_send = now
        self._last_recv = max(self._last_recv, now)
        self.steps += 1

    def act_many(self, tick: int, actions, compute_us: int, now: float, cpu_us: int | None = None) -> None:
        """A host's answer to HOST_OBSERVATION ``tick``: one action per member it listed
        (less those that :meth:`leave` took away), in its order."""
        self._outbox.append(P.encode(P.HostAction(tick, actions, compute_us, cpu_us)))
        self._last_send = now
        self._last_recv = max(self._last_recv, now)
        self.steps += len(actions)

    def keepalive(self, now: float) -> None:
        """In the middle of a long computation (a host's frame of many agents): a
        HEARTBEAT if one is due, so that the coordinator does not take the host for dead."""
        if self.state is _REGISTERED and now - self._last_send >= self.heartbeat:
            self._send(self._heartbeat, now)

    def leave(self, members: list[int], reason: str, now: float) -> None:
        """A host's members that stop for good (their step raised): HOST_BYE."""
        if members and self.state is _REGISTERED:
            self._outbox.append(P.encode(P.HostBye(members, reason[:1024])))
            self._last_send = now

    def on_timer(self, now: float) -> None:
        """Liveness, heartbeats, HELLO repeats and the back-off.  Call at
        :meth:`next_timeout` or sooner."""
        state = self.state
        if state is SessionState.BACKING_OFF:
            if now >= self.reconnect_at:
                self._move("retry")
        elif state in (SessionState.HELLO_SENT, _REGISTERED):
            if now - self._last_recv >= self.expiry:
                self._back_off(now, "silence")
            elif now - self._last_send >= self.heartbeat:
                # Until WELCOME arrives, repeat HELLO (idempotent) rather than heartbeat.
                self._send(self._heartbeat if state is _REGISTERED else self._hello, now)

    def next_timeout(self, now: float) -> float:
        """Seconds until :meth:`on_timer` has something to do."""
        state = self.state
        if state is SessionState.BACKING_OFF:
            t = self.reconnect_at
        elif state in (SessionState.HELLO_SENT, _REGISTERED):
            t = min(self._last_recv + self.expiry, self._last_send + self.heartbeat)
        elif state is SessionState.CONNECTING:
            t = now
        else:
            t = math.inf
        return max(0.0, t - now)

    def report(self, code: ErrorCode, reason: str, now: float) -> None:
        """Tell the coordinator that something it sent was refused (an observation the
        agent cannot use, say)."""
        if self.state is _REGISTERED:
            self._send(P.encode(P.Error(code, reason[:P.MAX_TEXT])), now)

    def stop(self, now: float, reason: str = "agent stopping") -> None:
        """Leaving for good: BYE if registered.  Nothing is sent after this."""
        if self.state is _REGISTERED:
            self._send(P.encode(P.Bye(reason[:P.MAX_TEXT])), now)
        self._move("stop")

    def take_outbox(self) -> list[bytes]:
        out, self._outbox = self._outbox, []
        return out

    @property
    def has_output(self) -> bool:
        return bool(self._outbox)

    @property
    def backoff(self) -> float:
        """The wait before the next reconnection, were the coordinator to go silent now."""
        return min(self.backoff_min * 2 ** self.reconnects, self.backoff_max)

    # --- internals --------------------------------------------------------------------

    def _send(self, frame: bytes, now: float) -> None:
        self._outbox.append(frame)
        self._last_send = now

    def _take_timing(self, params: dict) -> None:
        """Heartbeat and liveness are the coordinator's to set (WELCOME's ``heartbeat_ms``
        and ``liveness``): an agent started with other settings must not take a quiet
        coordinator for dead.  Values outside sane bounds are ignored."""
        ms, liveness = params.get("heartbeat_ms"), params.get("liveness")
        if type(ms) is int and 10 <= ms <= 60_000 and type(liveness) is int and 1 <= liveness <= 100:
            self.heartbeat = ms / 1000
            self.expiry = self.heartbeat * liveness

    def _take_token(self, token: object) -> None:
        if isinstance(token, str) and token != self.token and 0 < len(token) <= P.MAX_TOKEN_LEN:
            self.token = token
            cls = P.Hello if self.members is None else P.HostHello
            self._hello = P.encode(cls.from_wire([*self._hello_fields, token]))

    def _back_off(self, now: float, event: str) -> None:
        self.reconnect_at = now + self.backoff
        self.reconnects += 1
        self._outbox.clear()  # nothing queued for the old socket survives it
        self._move(event)
