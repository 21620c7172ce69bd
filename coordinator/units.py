"""What the schedule sends to and hears from: units, and the one table of their states.

A :class:`Unit` is an agent with a connection of its own (:class:`AgentEntry`) or an
agent host (:class:`HostEntry`) whose members travel in one frame per tick; each member
keeps its own registration (:class:`Member`).  Every unit is in one
:class:`AgentState`, and :data:`UNITS` is the whole table of its moves, keyed by event::

    JOINING  --ready-->    IDLE       (its first message after WELCOME: its model is built)
    IDLE     --observe-->  STEPPING   (an observation is outstanding)
    STEPPING --answer-->   IDLE       (answered in time)
    STEPPING --expire-->   IDLE       (its deadline passed)
    any      --leave-->    GONE       (BYE, death, replacement, drop)

``UNITS.move(unit, event)`` is the only way a unit's state changes; an event the table
does not allow raises :class:`~agentbus_zmq.bus.fsm.IllegalTransition` (a bug, which the
driver counts as UNEXPECTED).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import math

import numpy as np

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.fsm import IllegalTransition, Machine

__all__ = ["AgentState", "UNITS", "OBSERVE", "OBSERVE_ALL", "ANSWER", "EXPIRE", "Unit", "AgentEntry", "HostEntry", "Member", "IllegalTransition", "STEP_TIMES",
           "step_times", "owed", "unit_of"]

#: Step times kept per unit (for ``agents``' p50 / p99), a power of two.
STEP_TIMES = 32


class AgentState(enum.Enum):
    """Where a registered unit stands."""

    #: WELCOME sent; the agent is building its model and is not scheduled yet.
    JOINING = "joining"
    #: Ready (it said so with its first message) and owes no answer.
    IDLE = "idle"
    #: An OBSERVATION is outstanding: ``Unit.pending`` is its tick.
    STEPPING = "stepping"
    #: Left the registry; nothing is sent to it or counted for it any more.
    GONE = "gone"


# Enum members are looked up on every message (120 ns each on 3.11): plain names for them.
JOINING, IDLE, STEPPING, GONE = AgentState.JOINING, AgentState.IDLE, AgentState.STEPPING, AgentState.GONE

UNITS = Machine("unit", {
    (JOINING, "ready"): IDLE,
    (IDLE, "observe"): STEPPING,
    (STEPPING, "answer"): IDLE,
    (STEPPING, "expire"): IDLE,
    (JOINING, "leave"): GONE,
    (IDLE, "leave"): GONE,
    (STEPPING, "leave"): GONE,
})
#: the per-step moves, compiled from the table (UNITS.event)
OBSERVE, ANSWER, EXPIRE = UNITS.event("observe"), UNITS.event("answer"), UNITS.event("expire")
OBSERVE_ALL = UNITS.event_all("observe")


@dataclasses.dataclass(slots=True, eq=False)
class Unit:
    """A unit's registration and schedule.  Its outstanding observation (STEPPING) has
    tick ``pending`` and covers ``n`` agent-steps (1 for an agent; a host's members)."""

    peer: bytes
    kind: str
    pid: int
    joined_at: float
    last_seen: float
    last_sent: float
    state: AgentState = JOINING
    #: seconds an observation to this unit waits for its answer (a host's grows with its members)
    deadline: float = 1.0
    #: tick of the outstanding observation (meaningful in STEPPING only)
    pending: int = 0
    sent_at: float = 0.0
    #: async mode: this unit's own step counter
    tick: int = 0
    #: agent-steps answered in time
    steps: int = 0
    #: answers in time (frames, for a host: each steps every member live when it came)
    answers: int = 0
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
    #: actions refused at the world's door (not values of its action space; the default applied)
    bad_actions: int = 0
    #: missed, late or slow answers in a row (Settings.drop_after)
    strikes: int = 0
    #: the last STEP_TIMES step times (wall, per agent, microseconds), a ring
    times: list = dataclasses.field(default_factory=lambda: [0] * STEP_TIMES)
    #: the same steps' wall time by the coordinator's clock (sent to answered, us per agent)
    waits: list = dataclasses.field(default_factory=lambda: [0] * STEP_TIMES)
    times_n: int = 0
    #: when a refused HELLO for its ids last made the registry probe it (ID_TAKEN)
    probed_at: float = -math.inf
    #: who is charged for it while it gets ready: its CURVE key, else its address ("" unknown)
    origin: str = ""
    #: agents it counts among the pending (Settings.max_pending) while JOINING
    charged: int = 0
    #: when its setup grace began: its ids' first HELLO (a takeover while joining keeps it)
    grace_from: float = 0.0

    @property
    def name(self) -> str:
        """How logs and stats name the unit (each kind of unit says)."""
        return f"unit {self.peer.hex()}"


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
    #: what its HOST_HELLO named: (prefix, first, count)
    span: tuple = ()
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
    #: members the outstanding observation listed, as sent (pending_idx less the leavers)
    sent_idx: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    #: live_idx as it travels, built once per change of membership
    members_ext: object = None

    @property
    def name(self) -> str:
        return f"host {self.host_id}"

    def refresh(self) -> None:
        self.live_idx = np.flatnonzero(self.live)
        self.live_slots = self.slots[self.live_idx]
        self.members_ext = P.array_ext(self.live_idx.astype(np.uint16))


def unit_of(entry: AgentEntry | Member) -> Unit:
    """The unit that carries an agent's schedule: itself, or its host."""
    return entry if type(entry) is AgentEntry else entry.host


def owed(unit: Unit) -> int:
    """Agent-steps the unit's outstanding observation covers."""
    return len(unit.pending_idx) if type(unit) is HostEntry else 1


def step_times(unit: Unit) -> list[int]:
    """The unit's recent step times (us per agent), sorted."""
    return sorted(unit.times[:min(unit.times_n, STEP_TIMES)])
