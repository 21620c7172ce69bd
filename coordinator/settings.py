"""The coordinator's settings, checked once; defaults from ``bus.config``."""

from __future__ import annotations

import dataclasses

from agentbus_zmq.bus import config
from agentbus_zmq.bus import protocol as P

__all__ = ["ConfigError", "LOCKSTEP_SCOPES", "MODES", "Settings"]

MODES = config.MODES
#: lock-step over the whole world (every ready unit each tick), or per arena (units that
#: share no arena tick independently: coordinator.arenas)
LOCKSTEP_SCOPES = ("world", "arena")


class ConfigError(ValueError):
    """The coordinator cannot run with these settings; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Schedule and liveness parameters (all times in seconds); defaults from bus.config."""

    mode: str = config.DEFAULTS.mode
    #: lock-step over the whole world, or per cohort of units sharing arenas (coordinator.arenas)
    lockstep_scope: str = "world"
    #: How long a tick (lockstep) or an observation (async) waits for its answer.
    deadline: float = config.DEFAULTS.deadline
    #: A host's frame waits this much longer per member it carries (its members step one
    #: after another): a host of K agents gets ``deadline + K * member_deadline``.
    member_deadline: float = config.DEFAULTS.member_deadline
    #: Heartbeat interval, both ways; a peer silent for ``heartbeat * liveness`` is dead.
    heartbeat: float = config.DEFAULTS.heartbeat
    liveness: int = config.DEFAULTS.liveness
    max_message_bytes: int = P.MAX_MESSAGE_BYTES
    #: Seconds from HELLO until a registration must say it is ready (its first message
    #: after WELCOME); past it, it is dropped and its cells freed.  Repeating HELLO does
    #: not extend it.  A jitted JAX host compiles for seconds.
    setup_grace: float = 30.0
    #: Agents registered and not yet ready (a host counts its members), at most, and half
    #: that from one origin (a CURVE key, or without CURVE an address); more HELLOs are
    #: refused with BUSY and retried by the agent.  One registration larger than the
    #: limit gets in when nothing else is pending (from its origin, and in all).
    max_pending: int = 16_384
    #: An answer after this fraction of its deadline is counted slow.
    slow_fraction: float = 0.8
    #: Drop a unit from the schedule after this many deadlines in a row that it missed,
    #: answered late or answered slowly (0: never); it may HELLO again (bus-agent does, at
    #: once).  On by default: a mute agent must not hold a lock-step bus at the deadline.
    drop_after: int = 5
    #: Live efficiency: its sliding window (s), the cores the agents can use, the alert's
    #: threshold and how long efficiency must stay below it before the alert is raised.
    efficiency_window: float = 10.0
    agent_cores: int = 1
    alert_threshold: float = 0.5
    alert_for: float = 30.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.lockstep_scope not in LOCKSTEP_SCOPES:
            raise ValueError(f"lockstep_scope must be one of {LOCKSTEP_SCOPES}, got {self.lockstep_scope!r}")
        if not (self.deadline > 0 and self.heartbeat > 0 and self.liveness >= 1 and self.member_deadline >= 0):
            raise ValueError("deadline and heartbeat must be positive, member_deadline at least 0 and liveness "
                             "at least 1")
        if not (self.setup_grace > 0 and self.max_pending >= 1 and 0 < self.slow_fraction <= 1
                and self.drop_after >= 0):
            raise ValueError("setup_grace must be positive, max_pending at least 1, slow_fraction in (0, 1] "
                             "and drop_after at least 0")

    @property
    def expiry(self) -> float:
        return self.heartbeat * self.liveness

    def deadline_for(self, members: int) -> float:
        """The deadline of a unit carrying ``members`` agents (1: an agent of its own)."""
        return self.deadline + (members * self.member_deadline if members > 1 else 0.0)
