"""The agentbus wire protocol, in one place.

Every message is ONE ZeroMQ frame holding ONE msgpack array::

    [version, type, field1, field2, ...]

``version`` is :data:`PROTOCOL_VERSION`, ``type`` a :class:`MsgType` code and the
fields follow positionally, as each record below lists them.  A ROUTER prepends the
peer's routing id; nothing else is ever framed around a message.  ``docs/protocol.md``
is the specification for people writing agents in other languages; this module is the
reference implementation and the two must agree.

numpy arrays travel as msgpack extension type :data:`EXT_NDARRAY` whose payload is the
msgpack array ``[dtype, shape, raw bytes]`` (dtype a numpy type string such as
``"<f8"``); nothing is ever pickled.

Decoding never trusts its input: :func:`decode` raises :class:`ProtocolError` (with an
:class:`ErrorCode`) for anything that is not a well-formed message of this version, and
nothing else.  Records are plain slotted dataclasses (a frozen one costs three times as
much to build, on every message); treat them as values.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import sys
import typing
from typing import Any, ClassVar

import msgpack

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_MESSAGE_BYTES",
    "MAX_TEXT",
    "MAX_TOKEN_LEN",
    "MAX_HOST_AGENTS",
    "EXT_NDARRAY",
    "ERROR_HINTS",
    "MsgType",
    "ErrorCode",
    "ProtocolError",
    "Message",
    "WelcomeEncoder",
    "encode",
    "encode_observation",
    "encode_host_observation",
    "array_ext",
    "decode",
    "pack",
    "unpack",
    # and every message record, added by @record below
]

PROTOCOL_VERSION = 1
#: Largest message a peer accepts by default (the sockets enforce it too, with
#: ``ZMQ_MAXMSGSIZE``).  Observations and actions are a few dozen bytes.
MAX_MESSAGE_BYTES = 64 * 1024
#: msgpack extension type code used for numpy arrays.
EXT_NDARRAY = 1
#: Agents one host may register (its frames then stay well under MAX_MESSAGE_BYTES).
MAX_HOST_AGENTS = 4096
#: Longest registration token (WELCOME params ``token``; HELLO's optional last field).
MAX_TOKEN_LEN = 64

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_U32_MAX = 2**32 - 1
_ID_RE = re.compile(r"[A-Za-z0-9._:@/+-]{1,128}\Z")
#: Longest free text (reasons, kinds' names are ids) a message may carry.
MAX_TEXT = _MAX_TEXT = 1024
_MAX_MODALITIES = 32
# numpy dtype kinds allowed on the wire: bool, signed, unsigned, float, complex.
_ARRAY_KINDS = frozenset("biufc")
_MAX_ARRAY_DIMS = 8


class ErrorCode(enum.IntEnum):
    """Error codes carried by ERROR messages and by :class:`ProtocolError`."""

    MALFORMED = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_TYPE = 3
    BAD_FIELD = 4
    TOO_LARGE = 5
    BAD_FRAMING = 6
    NOT_REGISTERED = 7
    STALE_TICK = 8
    WORLD_FULL = 9
    SHUTTING_DOWN = 10
    UNKNOWN_COMMAND = 11
    UNEXPECTED = 12
    BUSY = 13
    TIMED_OUT = 14
    ID_TAKEN = 15
    REPLACED = 16
    NOT_ALLOWED = 17
    DROPPED = 18
    WORLD_FAULT = 19


#: What the receiver of each error should do about it.  Part of the protocol.
ERROR_HINTS: dict[ErrorCode, str] = {
    ErrorCode.MALFORMED: "send one frame holding a msgpack array [version, type, ...]",
    ErrorCode.UNSUPPORTED_VERSION: f"speak protocol version {PROTOCOL_VERSION}",
    ErrorCode.UNKNOWN_TYPE: "use a message type listed in docs/protocol.md",
    ErrorCode.BAD_FIELD: "check the fields' number, order and types against docs/protocol.md",
    ErrorCode.TOO_LARGE: f"keep messages under {MAX_MESSAGE_BYTES} bytes",
    ErrorCode.BAD_FRAMING: "send exactly one frame per message (a DEALER adds no envelope)",
    ErrorCode.NOT_REGISTERED: "send HELLO and wait for WELCOME before anything else",
    ErrorCode.STALE_TICK: "answer the latest OBSERVATION before its deadline",
    ErrorCode.WORLD_FULL: "retry later or start the coordinator with a larger world",
    ErrorCode.SHUTTING_DOWN: "reconnect with HELLO once the coordinator is back",
    ErrorCode.UNKNOWN_COMMAND: "use a CONTROL command listed in docs/protocol.md",
    ErrorCode.UNEXPECTED: "report this as a bug, with the coordinator's log",
    ErrorCode.BUSY: "the coordinator is at a limit (pending registrations, queued measurements): retry later",
    ErrorCode.TIMED_OUT: "the request's timeout_s passed first: check that the agents it waits for are running",
    ErrorCode.ID_TAKEN: ("the id is registered by a live connection: give this agent another id, stop the other "
                         "process, or present the token its WELCOME carried"),
    ErrorCode.REPLACED: "another connection took this registration over with its token: stop, or start with a new id",
    ErrorCode.NOT_ALLOWED: "this CURVE key may not use that id: see the key's `agents` patterns in the allow-list",
    ErrorCode.DROPPED: "this agent kept missing its deadline and was dropped from the schedule: HELLO to rejoin",
    ErrorCode.WORLD_FAULT: ("the world kept failing in this agent's arena, which is closed for a while (the "
                            "coordinator's log names the world's method): HELLO to rejoin; tell the world's author"),
}


class ProtocolError(Exception):
    """A message that is not valid agentbus protocol.  Carries an :class:`ErrorCode`."""

    def __init__(self, code: ErrorCode, reason: str):
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason

    @property
    def hint(self) -> str:
        return ERROR_HINTS.get(self.code, "")


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_FIELD, reason)


def _int(value: Any, name: str, lo: int = _INT64_MIN, hi: int = _INT64_MAX) -> int:
    # `type(...) is int` rejects bool, which msgpack would happily carry.
    if type(value) is not int or not lo <= value <= hi:
        raise _bad(f"{name} must be an integer in [{lo}, {hi}], got {value!r:.40}")
    return value


def _text(value: Any, name: str, max_len: int = _MAX_TEXT) -> str:
    if type(value) is not str or len(value) > max_len:
        raise _bad(f"{name} must be a string of at most {max_len} characters")
    return value


def _ident(value: Any, name: str) -> str:
    if type(value) is not str or not _ID_RE.match(value):
        raise _bad(f"{name} must match [A-Za-z0-9._:@/+-]{{1,128}}, got {value!r:.40}")
    return value


#: Types a free-form map (WELCOME params, CONTROL args, REPLY result) may hold.
_PLAIN = (type(None), bool, int, float, str, bytes)
_MAX_DEPTH = 16


def _map(value: Any, name: str) -> dict:
    if type(value) is not dict:
        raise _bad(f"{name} must be a map")
    _plain(value, name, 0)
    return value


def _plain(value: Any, name: str, depth: int) -> None:
    """Refuse what msgpack decodes by itself but the protocol does not carry: its
    timestamp extension (type -1) and nesting past :data:`_MAX_DEPTH`."""
    if depth > _MAX_DEPTH:
        raise _bad(f"{name} nests deeper than {_MAX_DEPTH} levels")
    items = value.items() if type(value) is dict else value
    for item in items:
        for v in (item if type(value) is dict else (item,)):
            t = type(v)
            if t is dict or t is list:
                _plain(v, name, depth + 1)
            elif t not in _PLAIN and not _is_array(v):
                raise _bad(f"{name} holds a {t.__name__}, which the protocol does not carry")


def _is_array(value: Any) -> bool:
    np = sys.modules.get("numpy")  # an array can only have been decoded if numpy is loaded
    return np is not None and type(value) is np.ndarray


def _arity(fields: list, n: int | tuple[int, int], name: str) -> None:
    if isinstance(n, tuple):
        if not n[0] <= len(fields) <= n[1]:
            raise _bad(f"{name} takes {n[0]} to {n[1]} fields after [version, type], got {len(fields)}")
    elif len(fields) != n:
        raise _bad(f"{name} takes {n} fields after [version, type], got {len(fields)}")


def _token(value: Any) -> str:
    return _text(value, "token", MAX_TOKEN_LEN)


# --- message records ---------------------------------------------------------------
#
# Each record is declared once, with its type code: ``@record(code)``.  MsgType,
# ``Message``, the decoder's table and ``__all__`` follow from these declarations.

_RECORDS: dict[int, type] = {}


def record(code: int):
    """Register a message record under type ``code``; its MsgType name is the class
    name in capitals (``HostHello`` -> ``HOST_HELLO``)."""

    def register(cls):
        if code in _RECORDS:
            raise ValueError(f"message type {code} declared twice")
        cls.TYPE_NAME = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).upper()
        _RECORDS[code] = cls
        __all__.append(cls.__name__)
        return cls

    return register


def _registration_head(f: list, name: str, n: tuple[int, int], id_name: str) -> tuple[str, str, int, str]:
    """HELLO and HOST_HELLO: ``id, kind, pid, ..., [token]``: the shared fields, checked."""
    _arity(f, n, name)
    token = _token(f[n[1] - 1]) if len(f) == n[1] else ""
    return _ident(f[0], id_name), _ident(f[1], "kind"), _int(f[2], "pid", 0, _U32_MAX), token


@record(1)
@dataclasses.dataclass(slots=True)
class Hello:
    """Agent -> coordinator: join (or rejoin) the bus.

    agent_id: stable name of the agent; a HELLO with an id already registered replaces
        that registration (the agent restarted).
    kind: free-form agent kind, e.g. ``"explorer"``; reported in metrics.
    pid: the agent's OS process id, or 0 if it has none to report (informative only:
        nobody acts on a pid a peer claims).
    token: optional; the ``token`` of this agent's last WELCOME.  It lets a new connection
        of the same agent take over its registration while the old one may still look
        alive; without it, a HELLO for an id held by a live connection is refused
        (ID_TAKEN).
    """

    agent_id: str
    kind: str
    pid: int = 0
    token: str = ""

    def wire(self) -> tuple:
        fields = (self.agent_id, self.kind, self.pid)
        return (*fields, self.token) if self.token else fields

    @classmethod
    def from_wire(cls, f: list) -> Hello:
        return cls(*_registration_head(f, "HELLO", (3, 4), "agent_id"))


@record(2)
@dataclasses.dataclass(slots=True)
class Welcome:
    """Coordinator -> agent: registration accepted.

    session: id of this coordinator run; changes when the coordinator restarts.
    agent_id: the id registered, echoed.
    params: world and schedule parameters (keys listed in docs/protocol.md).
    """

    session: str
    agent_id: str
    params: dict

    def wire(self) -> tuple:
        return (self.session, self.agent_id, self.params)

    @classmethod
    def from_wire(cls, f: list) -> Welcome:
        _arity(f, 3, "WELCOME")
        return cls(_ident(f[0], "session"), _ident(f[1], "agent_id"), _map(f[2], "params"))


@record(3)
@dataclasses.dataclass(slots=True)
class Observation:
    """Coordinator -> agent: what the agent observes at ``tick``; answer with ACTION.

    tick: the step number this observation belongs to.
    obs: one outcome index per observation modality (a list of ints), or an array
        (extension type 1) for a world whose observation space is an array.
    info: optional; for worlds that have them, ``reward`` (float: the reward since the
        last observation) and ``episode`` (int: it changes when an episode ended and the
        next began).  Never sent by the grid.
    """

    tick: int
    obs: Any
    info: dict | None = None

    def wire(self) -> tuple:
        return (self.tick, self.obs) if self.info is None else (self.tick, self.obs, self.info)

    @staticmethod
    def _accept(m: list) -> Observation | None:
        """``[version, type, *fields]`` as a valid OBSERVATION in one expression, or None."""
        if len(m) == 4:
            tick, obs = m[2], m[3]
            if (type(tick) is int and 0 <= tick <= _INT64_MAX and type(obs) is list
                    and 0 < len(obs) <= _MAX_MODALITIES and all(type(o) is int and 0 <= o <= _U32_MAX for o in obs)):
                return Observation(tick, obs)
        return None

    @classmethod
    def from_wire(cls, f: list) -> Observation:
        _arity(f, (2, 3), "OBSERVATION")
        obs = f[1]
        if _is_array(obs):
            _array(obs, "obs", _VALUE_KINDS, None, MAX_HOST_AGENTS)
        elif type(obs) is not list or not 0 < len(obs) <= _MAX_MODALITIES:
            raise _bad(f"obs must be a list of 1..{_MAX_MODALITIES} outcome indices, or an array")
        else:
            for o in obs:
                _int(o, "obs[i]", 0, _U32_MAX)
        return cls(_int(f[0], "tick", 0), obs, _info(f[2]) if len(f) == 3 else None)


class _Answer:
    """ACTION and HOST_ACTION: ``tick, payload, compute_us, [cpu_us]``, checked field by
    field in :meth:`_precise`, which both share."""

    __slots__ = ()

    def wire(self) -> tuple:
        fields = (self.tick, getattr(self, self._PAYLOAD), self.compute_us)
        return fields if self.cpu_us is None else (*fields, self.cpu_us)

    @classmethod
    def _precise(cls, f: list):
        _arity(f, (3, 4), cls._NAME)
        return cls(_int(f[0], "tick", 0), cls._payload(f[1]), _int(f[2], "compute_us", 0),
                   _int(f[3], "cpu_us", 0) if len(f) == 4 else None)


@record(4)
@dataclasses.dataclass(slots=True)
class Action(_Answer):
    """Agent -> coordinator: the action chosen for ``tick``.

    tick: the tick of the OBSERVATION being answered.
    action: index of the chosen action, or an array for a world whose action space is
        not discrete.
    compute_us: microseconds (wall clock) the agent spent computing it: the bus's
        latency is the round trip less this.
    cpu_us: optional; the CPU time (the thread's) of that computation, in microseconds:
        the coordinator's live efficiency counts it as work (a step preempted half-way
        does not count twice).  Left out when the agent cannot measure it.
    """

    _NAME: ClassVar[str] = "ACTION"
    _PAYLOAD: ClassVar[str] = "action"
    tick: int
    action: int
    compute_us: int = 0
    cpu_us: int | None = None

    @classmethod
    def from_wire(cls, f: list) -> Action:
        return cls._precise(f)

    @staticmethod
    def _accept(m: list) -> Action | None:
        """``[version, type, *fields]`` as a valid ACTION in one expression, or None."""
        n = len(m)
        if n == 5 or n == 6:
            tick, action, compute_us = m[2], m[3], m[4]
            cpu_us = m[5] if n == 6 else 0
            if (type(tick) is int and type(action) is int and type(compute_us) is int and type(cpu_us) is int
                    and 0 <= tick <= _INT64_MAX and 0 <= action <= _U32_MAX and 0 <= compute_us <= _INT64_MAX
                    and 0 <= cpu_us <= _INT64_MAX):
                return Action(tick, action, compute_us, cpu_us if n == 6 else None)
        return None

    @staticmethod
    def _payload(v: Any):
        if _is_array(v):
            return _array(v, "action", _VALUE_KINDS, None, MAX_HOST_AGENTS)
        return _int(v, "action", 0, _U32_MAX)


@record(5)
@dataclasses.dataclass(slots=True)
class Heartbeat:
    """Either direction: I am alive.  Sent when a peer has sent nothing else for a while."""

    def wire(self) -> tuple:
        return ()

    @classmethod
    def from_wire(cls, f: list) -> Heartbeat:
        _arity(f, 0, "HEARTBEAT")
        return _HEARTBEAT


@record(6)
@dataclasses.dataclass(slots=True)
class Bye:
    """Either direction: I am leaving; forget me.

    reason: human-readable reason, for logs.
    """

    reason: str = ""

    def wire(self) -> tuple:
        return (self.reason,)

    @classmethod
    def from_wire(cls, f: list) -> Bye:
        _arity(f, 1, "BYE")
        return cls(_text(f[0], "reason"))


@record(7)
@dataclasses.dataclass(slots=True)
class Error:
    """Either direction: the last message was refused.

    code: an :class:`ErrorCode` value (unknown codes are kept as plain ints).
    reason: what was wrong and what to do, for humans.
    """

    code: int
    reason: str

    def wire(self) -> tuple:
        return (int(self.code), self.reason)

    @classmethod
    def from_wire(cls, f: list) -> Error:
        _arity(f, 2, "ERROR")
        return cls(_int(f[0], "code", 0, _U32_MAX), _text(f[1], "reason"))


@record(8)
@dataclasses.dataclass(slots=True)
class Control:
    """Client -> coordinator: an operator or benchmark request (no registration needed).

    request_id: echoed in the REPLY, so a client can drop stale replies.
    command: a command of ``bus.commands`` (docs/protocol.md lists them and their args).
    args: command arguments.
    """

    request_id: int
    command: str
    args: dict = dataclasses.field(default_factory=dict)

    def wire(self) -> tuple:
        return (self.request_id, self.command, self.args)

    @classmethod
    def from_wire(cls, f: list) -> Control:
        _arity(f, 3, "CONTROL")
        return cls(_int(f[0], "request_id", 0), _ident(f[1], "command"), _map(f[2], "args"))


@record(9)
@dataclasses.dataclass(slots=True)
class Reply:
    """Coordinator -> client: the answer to CONTROL ``request_id``.

    request_id: the request answered.
    ok: whether the command succeeded.
    result: the command's result (a map), or ``{"error": reason}`` when not ok.
    """

    request_id: int
    ok: bool
    result: dict

    def wire(self) -> tuple:
        return (self.request_id, self.ok, self.result)

    @classmethod
    def from_wire(cls, f: list) -> Reply:
        _arity(f, 3, "REPLY")
        if type(f[1]) is not bool:
            raise _bad("ok must be a boolean")
        return cls(_int(f[0], "request_id", 0), f[1], _map(f[2], "result"))


# --- agent hosts: one frame per host per tick (added in 0.2; version 1 unchanged) -------


def _array(value: Any, name: str, kinds: str, ndim: int | None, max_len: int = MAX_HOST_AGENTS, min_ndim: int = 0):
    """``value`` as an array of one of ``kinds``, ``ndim`` dimensions (None: at least
    ``min_ndim``) and at most ``max_len`` rows (elements, for a 0-D array)."""
    np = sys.modules.get("numpy")
    if np is None or type(value) is not np.ndarray:
        raise _bad(f"{name} must be an array (extension type {EXT_NDARRAY})")
    dims_ok = value.ndim == ndim if ndim is not None else value.ndim >= min_ndim
    if value.dtype.kind not in kinds or not dims_ok or (len(value) if value.ndim else 1) > max_len:
        what = f"{ndim}-D" if ndim is not None else f"at least {min_ndim}-D"
        raise _bad(f"{name} must be a {what} array of kind {kinds!r} with at most {max_len} rows, "
                   f"got {value.dtype} {value.shape}")
    return value


#: kinds of numpy arrays a value (an observation, an action) may be
_VALUE_KINDS = "biuf"


def _info(value: Any) -> dict:
    """OBSERVATION's and HOST_OBSERVATION's optional info map: ``reward``, ``episode``."""
    info = _map(value, "info")
    if not set(info) <= {"reward", "episode"}:
        raise _bad(f"info holds only reward and episode, got {sorted(info)!r:.60}")
    return info


class _ArrayRecord:
    """Records holding arrays compare by value (dataclass equality would ask numpy for
    a truth value)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        import numpy as np

        return all((np.array_equal(a, b) and a.dtype == b.dtype) if isinstance(a, np.ndarray) else a == b
                   for a, b in zip(self.wire(), other.wire()))

    __hash__ = None


@record(10)
@dataclasses.dataclass(slots=True, eq=False)
class HostHello(_ArrayRecord):
    """Host -> coordinator: register ``count`` agents, ids ``prefix + str(first + i)``.

    host_id: the host's own name (its connection's identity in logs and stats).
    kind: the agents' kind.
    pid: the host's OS process id, or 0.
    prefix, first, count: the members, in the order every later host frame uses.
    token: optional; the ``token`` of this host's last HOST_WELCOME (see HELLO).
    """

    host_id: str
    kind: str
    pid: int
    prefix: str
    first: int
    count: int
    token: str = ""

    def wire(self) -> tuple:
        fields = (self.host_id, self.kind, self.pid, self.prefix, self.first, self.count)
        return (*fields, self.token) if self.token else fields

    def member_ids(self) -> list[str]:
        return [f"{self.prefix}{self.first + i}" for i in range(self.count)]

    @classmethod
    def from_wire(cls, f: list) -> HostHello:
        host_id, kind, pid, token = _registration_head(f, "HOST_HELLO", (6, 7), "host_id")
        prefix = _text(f[3], "prefix", 100)
        first, count = _int(f[4], "first", 0, _U32_MAX), _int(f[5], "count", 1, MAX_HOST_AGENTS)
        _ident(f"{prefix}{first}", "the first member id")
        _ident(f"{prefix}{first + count - 1}", "the last member id")
        return cls(host_id, kind, pid, prefix, first, count, token)


@record(11)
@dataclasses.dataclass(slots=True, eq=False)
class HostWelcome(_ArrayRecord):
    """Coordinator -> host: registration accepted.

    session, params: as in WELCOME (params without ``arena``).
    arenas: each member's arena (1-D unsigned array, in member order).
    """

    session: str
    host_id: str
    params: dict
    arenas: Any

    def wire(self) -> tuple:
        return (self.session, self.host_id, self.params, self.arenas)

    @classmethod
    def from_wire(cls, f: list) -> HostWelcome:
        _arity(f, 4, "HOST_WELCOME")
        return cls(_ident(f[0], "session"), _ident(f[1], "host_id"), _map(f[2], "params"),
                   _array(f[3], "arenas", "u", 1))


@record(12)
@dataclasses.dataclass(slots=True, eq=False)
class HostObservation(_ArrayRecord):
    """Coordinator -> host: observations of some members at ``tick``; answer with
    HOST_ACTION.

    members: member indices (1-D unsigned array), the rows' order.
    obs: one row per member: one column per modality (2-D unsigned array), or, for a
        world whose observations are arrays, each row that member's array.
    info: optional; ``reward`` and ``episode`` arrays, one entry per row (see OBSERVATION).
    """

    tick: int
    members: Any
    obs: Any
    info: dict | None = None

    def wire(self) -> tuple:
        fields = (self.tick, self.members, self.obs)
        return fields if self.info is None else (*fields, self.info)

    @classmethod
    def from_wire(cls, f: list) -> HostObservation:
        _arity(f, (3, 4), "HOST_OBSERVATION")
        members = _array(f[1], "members", "u", 1)
        obs = _array(f[2], "obs", _VALUE_KINDS, None, min_ndim=2)
        if obs.shape[0] != len(members) or (obs.ndim == 2 and obs.dtype.kind == "u"
                                              and not 0 < obs.shape[1] <= _MAX_MODALITIES):
            raise _bad(f"obs must have one row per member (and 1..{_MAX_MODALITIES} columns of outcome indices), "
                       f"got {obs.shape} for {len(members)} members")
        info = _info(f[3]) if len(f) == 4 else None
        for k, v in (info or {}).items():
            if len(_array(v, f"info {k}", "iuf", 1)) != len(members):
                raise _bad(f"info {k} must have one entry per member")
        return cls(_int(f[0], "tick", 0), members, obs, info)


@record(13)
@dataclasses.dataclass(slots=True, eq=False)
class HostAction(_Answer, _ArrayRecord):
    """Host -> coordinator: the actions for HOST_OBSERVATION ``tick``, one per member
    listed there, in its order.

    actions: 1-D integer array, or one row per member for a world whose actions are arrays.
    compute_us: microseconds the host spent computing them (all members together).
    cpu_us: optional; the CPU time of that computation (see ACTION).
    """

    _NAME: ClassVar[str] = "HOST_ACTION"
    _PAYLOAD: ClassVar[str] = "actions"
    tick: int
    actions: Any
    compute_us: int = 0
    cpu_us: int | None = None

    @classmethod
    def from_wire(cls, f: list) -> HostAction:
        return cls._precise(f)

    @staticmethod
    def _payload(v: Any):
        return _array(v, "actions", _VALUE_KINDS, None, min_ndim=1)


@record(14)
@dataclasses.dataclass(slots=True)
class HostBye:
    """Host -> coordinator: these members leave (their step failed, say); the host stays.

    members: member indices.
    reason: human-readable reason, for logs.
    """

    members: list
    reason: str = ""

    def wire(self) -> tuple:
        return (self.members, self.reason)

    @classmethod
    def from_wire(cls, f: list) -> HostBye:
        _arity(f, 2, "HOST_BYE")
        members = f[0]
        if type(members) is not list or not 0 < len(members) <= MAX_HOST_AGENTS:
            raise _bad(f"members must be a list of 1..{MAX_HOST_AGENTS} member indices")
        for m in members:
            _int(m, "members[i]", 0, MAX_HOST_AGENTS - 1)
        return cls(members, _text(f[1], "reason"))


# What follows from the declarations above.
MsgType = enum.IntEnum("MsgType", {cls.TYPE_NAME: code for code, cls in _RECORDS.items()})
MsgType.__doc__ = "Message type codes: the second element of every message (one per @record)."
for _code, _cls in _RECORDS.items():
    _cls.TYPE = MsgType(_code)
Message = typing.Union[tuple(_RECORDS.values())]  # noqa: UP007 - built from the table
_TYPE_CODE = {cls: code for code, cls in _RECORDS.items()}
#: records with a one-expression accept for their valid form (the messages of every step):
#: decode tries it first; whatever it does not accept goes to from_wire's precise checks
_ACCEPT = {code: cls._accept for code, cls in _RECORDS.items() if hasattr(cls, "_accept")}
_HEARTBEAT = Heartbeat()
_OBSERVATION = int(MsgType.OBSERVATION)


# --- codec -------------------------------------------------------------------------


def _default(obj: Any) -> Any:
    """msgpack fallback for non-native values: numpy arrays and scalars only."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _ARRAY_KINDS:
            raise TypeError(f"arrays of dtype {obj.dtype} cannot travel on the bus")
        # tobytes() is always C order, whatever the array's layout.
        return msgpack.ExtType(
            EXT_NDARRAY, msgpack.packb([obj.dtype.str, list(obj.shape), obj.tobytes()], use_bin_type=True)
        )
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} cannot travel on the bus (no pickle, by design)")


_DTYPES: dict[str, Any] = {}


def _ext_hook(code: int, data: bytes) -> Any:
    if code != EXT_NDARRAY:
        raise _bad(f"unknown msgpack extension type {code}")
    import numpy as np

    try:
        dtype_str, shape, raw = msgpack.unpackb(data, raw=False, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise _bad(f"bad array payload: {exc}") from None
    if type(dtype_str) is not str or len(dtype_str) > 8 or type(shape) is not list \
            or len(shape) > _MAX_ARRAY_DIMS or type(raw) is not bytes:
        raise _bad("array payload must be [dtype string, shape, bytes]")
    dtype = _DTYPES.get(dtype_str)
    if dtype is None:
        try:
            dtype = np.dtype(dtype_str)
        except Exception as exc:  # noqa: BLE001 - numpy parses hostile text; only ProtocolError leaves decode
            raise _bad(f"bad array dtype {dtype_str!r}: {type(exc).__name__}") from None
        if dtype.kind not in _ARRAY_KINDS or dtype.hasobject or dtype.fields is not None:
            raise _bad(f"arrays of dtype {dtype_str!r} are not allowed")
        if len(_DTYPES) < 256:  # the dtypes seen, parsed once (bounded: a peer may send many)
            _DTYPES[dtype_str] = dtype
    count = 1
    for dim in shape:
        count *= _int(dim, "array dimension", 0, MAX_MESSAGE_BYTES * 16)
    if count * dtype.itemsize != len(raw):
        raise _bad(f"array of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


# One Packer per process, reused: half the cost of msgpack.packb per message.  The
# codec has no threads to share it with (agentbus runs none).
_packer = msgpack.Packer(default=_default, use_bin_type=True, autoreset=True)


def pack(obj: Any) -> bytes:
    """msgpack-encode any bus value (numpy arrays included)."""
    return _packer.pack(obj)


def unpack(data: bytes) -> Any:
    """msgpack-decode a bus value; raises :class:`ProtocolError` on anything malformed."""
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, ext_hook=_ext_hook, strict_map_key=True)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"not valid msgpack ({type(exc).__name__}: {exc})") from None


def encode(msg: Message) -> bytes:
    """One frame for ``msg``."""
    return _packer.pack((PROTOCOL_VERSION, _TYPE_CODE[type(msg)], *msg.wire()))


def encode_observation(tick: int, obs: Any, info: dict | None = None) -> bytes:
    """``encode(Observation(tick, obs, info))`` without building the record: the
    coordinator's most frequent message."""
    if info is None:
        return _packer.pack((PROTOCOL_VERSION, _OBSERVATION, tick, obs))
    return _packer.pack((PROTOCOL_VERSION, _OBSERVATION, tick, obs, info))


def array_ext(array) -> msgpack.ExtType:
    """A numpy array as it travels (extension type EXT_NDARRAY), for a sender that sends
    the same array many times: build it once, pass it in place of the array."""
    return _default(array)


_HOST_OBSERVATION = int(MsgType.HOST_OBSERVATION)


def encode_host_observation(tick: int, members: Any, obs: Any, info: dict | None = None) -> bytes:
    """``encode(HostObservation(tick, members, obs, info))`` without building the record;
    ``members`` may be an :func:`array_ext` made once for many frames."""
    if info is None:
        return _packer.pack((PROTOCOL_VERSION, _HOST_OBSERVATION, tick, members, obs))
    return _packer.pack((PROTOCOL_VERSION, _HOST_OBSERVATION, tick, members, obs, info))


class WelcomeEncoder:
    """WELCOME and HOST_WELCOME frames for one coordinator session.  The parameters every
    agent gets (the world: thousands of obstacle cells, perhaps) are packed once; a frame
    adds only its own entries (``arena``, ``token``), so a registration costs the same
    whatever the world's size.  The bytes are those :func:`encode` would produce."""

    def __init__(self, session: str, params: dict):
        pack = _packer.pack
        self._welcome = b"\x95" + pack(PROTOCOL_VERSION) + pack(int(MsgType.WELCOME)) + pack(session)
        self._host = b"\x96" + pack(PROTOCOL_VERSION) + pack(int(MsgType.HOST_WELCOME)) + pack(session)
        self._n = len(params)
        self._fixed = b"".join(pack(k) + pack(v) for k, v in params.items())

    def welcome(self, agent_id: str, extra: dict) -> bytes:
        return self._welcome + _packer.pack(agent_id) + self._params(extra)

    def host_welcome(self, host_id: str, extra: dict, arenas: Any) -> bytes:
        return self._host + _packer.pack(host_id) + self._params(extra) + _packer.pack(arenas)

    def _params(self, extra: dict) -> bytes:
        n = self._n + len(extra)
        header = bytes((0x80 | n,)) if n < 16 else b"\xde" + n.to_bytes(2, "big")
        return header + self._fixed + b"".join(_packer.pack(k) + _packer.pack(v) for k, v in extra.items())


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate one frame; raises :class:`ProtocolError` and nothing else.
    A record's ``_accept`` takes the valid messages of every step (ACTION, OBSERVATION)
    in one expression; anything it does not take is checked field by field by the
    record's ``from_wire``, which names what is wrong."""
    if len(data) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{len(data)} bytes, limit {max_bytes}")
    obj = unpack(data)
    if type(obj) is list and len(obj) > 2 and type(obj[0]) is int and obj[0] == PROTOCOL_VERSION \
            and type(obj[1]) is int and (accept := _ACCEPT.get(obj[1])) is not None \
            and (msg := accept(obj)) is not None:
        return msg
    if type(obj) is not list or len(obj) < 2:
        raise ProtocolError(ErrorCode.MALFORMED, "a message is a msgpack array [version, type, ...]")
    version, mtype = obj[0], obj[1]
    if type(version) is not int:
        raise ProtocolError(ErrorCode.MALFORMED, "version must be an integer")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION, f"protocol version {version} is not supported (this peer speaks {PROTOCOL_VERSION})"
        )
    record = _RECORDS.get(mtype) if type(mtype) is int else None
    if record is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {mtype!r:.40}")
    return record.from_wire(obj[2:])
