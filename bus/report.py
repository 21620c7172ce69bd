"""What the coordinator reports, typed: one view shared by the coordinator (which builds
it), busctl (which shows it) and busbench (which reads it).

The wire form is the plain map a REPLY carries (``to_wire``); readers parse it back with
``from_wire``, which tolerates keys it does not know (a newer coordinator) and supplies
defaults for keys it lacks (an older one).  docs/protocol.md lists the keys; the field
names here are those keys, and a test checks that the page and these classes agree.

Paging is defined once: :data:`PAGE_SIZE` agents a page, in id order
(:func:`page_count`, :func:`page_slice`).
"""

from __future__ import annotations

import dataclasses
import typing

__all__ = ["PAGE_SIZE", "page_count", "page_slice", "LedgerView", "LiveView", "Roster", "Stats", "AgentRow",
           "AgentsPage", "CONNECTION_EVENTS", "Measured", "wire_keys"]

#: Agents listed in one page of ``stats`` or ``agents``: a reply must fit in a message,
#: and a client that never reads may park up to ROUTER_HWM of them (about 9 KB a page).
PAGE_SIZE = 128
#: Transport events ``stats["connections"]`` always lists (0 until one happens).
CONNECTION_EVENTS = ("accepted", "disconnected", "handshake_failed", "accept_failed")


def page_count(n: int) -> int:
    """Pages needed for ``n`` agents (at least one, even when there are none)."""
    return max(1, -(-n // PAGE_SIZE))


def page_slice(page: int) -> slice:
    """The positions, in id order, of page ``page``."""
    return slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE)


class _View:
    """Shared wire conversion for the frozen dataclasses below."""

    def to_wire(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_wire() if isinstance(v, _View) else v
        return out

    @classmethod
    def from_wire(cls, d: dict):
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            v, hint = d[f.name], hints[f.name]
            sub = next((t for t in typing.get_args(hint) or (hint,) if isinstance(t, type) and issubclass(t, _View)),
                       None)
            values[f.name] = sub.from_wire(v) if sub is not None and isinstance(v, dict) else v
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class LedgerView(_View):
    """The step ledger: ``sent == received + late + missing + outstanding``."""

    sent: int = 0
    received: int = 0
    late: int = 0
    missing: int = 0
    outstanding: int = 0
    undeliverable: int = 0
    slow: int = 0
    ticks: int = 0
    balanced: bool = True
    errors: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LiveView(_View):
    """Live efficiency over the coordinator's sliding window (None before a full one)."""

    efficiency: float | None = None
    rate: float | None = None
    window_s: float = 0.0
    cores: int = 1
    agents: int = 0
    lost: int = 0
    coordinator_cpu: float | None = None
    threshold: float = 0.5
    alert: bool = False
    agent_cpu_s: float | None = None


@dataclasses.dataclass(frozen=True)
class Roster(_View):
    """One page of who is registered (``stats`` with a page, or with few agents)."""

    page: int = 0
    agent_ids: list = dataclasses.field(default_factory=list)
    #: id -> pid as the agent claimed it (a host's agents: the host's)
    agent_pids: dict = dataclasses.field(default_factory=dict)
    #: id -> host id, for agents in hosts
    agent_hosts: dict = dataclasses.field(default_factory=dict)
    ready_ids: list = dataclasses.field(default_factory=list)
    host_ids: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Stats(_View):
    """CONTROL ``stats``: the bus at a glance; with a roster when the registry fits a page
    or a page was asked for (its keys then sit beside these on the wire)."""

    session: str = ""
    mode: str = ""
    uptime_s: float = 0.0
    agents: int = 0
    ready: int = 0
    hosts: int = 0
    arenas: int = 0
    tick: int = 0
    ledger: LedgerView = dataclasses.field(default_factory=LedgerView)
    restarts: dict = dataclasses.field(default_factory=dict)
    goal_visits: int = 0
    connections: dict = dataclasses.field(default_factory=dict)
    pending: int = 0
    measurements: dict = dataclasses.field(default_factory=dict)
    stragglers: dict = dataclasses.field(default_factory=dict)
    live: LiveView = dataclasses.field(default_factory=LiveView)
    #: the world: its kind and figures (the grid's goal_visits; episodes and rewards)
    world: dict = dataclasses.field(default_factory=dict)
    pages: int = 1
    roster: Roster | None = None

    def to_wire(self) -> dict:
        out = super().to_wire()
        roster = out.pop("roster")
        if roster is not None:
            out.update(roster)
        return out

    @classmethod
    def from_wire(cls, d: dict) -> Stats:
        roster = Roster.from_wire(d) if "agent_ids" in d else None
        return dataclasses.replace(super().from_wire({k: v for k, v in d.items() if k != "roster"}), roster=roster)


@dataclasses.dataclass(frozen=True)
class AgentRow(_View):
    """One row of CONTROL ``agents``; a host's agents show their host's figures."""

    id: str = ""
    pid: int = 0
    host: str | None = None
    kind: str = ""
    state: str = ""
    steps: int = 0
    p50_us: int | None = None
    p99_us: int | None = None
    missed: int = 0
    late: int = 0
    slow: int = 0
    last_seen_s: float = 0.0
    #: actions refused at the world's door (its default applied); a host's, for its agents
    bad_actions: int = 0


@dataclasses.dataclass(frozen=True)
class AgentsPage(_View):
    page: int = 0
    pages: int = 1
    agents: list = dataclasses.field(default_factory=list)

    def to_wire(self) -> dict:
        return {"page": self.page, "pages": self.pages, "agents": [r.to_wire() for r in self.agents]}

    @classmethod
    def from_wire(cls, d: dict) -> AgentsPage:
        return cls(d.get("page", 0), d.get("pages", 1), [AgentRow.from_wire(r) for r in d.get("agents", [])])


@dataclasses.dataclass(frozen=True)
class Measured(_View):
    """CONTROL ``measure``'s result: one measured window (docs/busbench.md)."""

    agents: int = 0
    opened_at: float = 0.0
    closed_at: float = 0.0
    ready_s: float = 0.0
    elapsed_s: float = 0.0
    steps: int = 0
    rate: float = 0.0
    ticks: int = 0
    latency_us: dict = dataclasses.field(default_factory=dict)
    latency_samples: int = 0
    compute_s: float = 0.0
    agent_cpu_s: float = 0.0
    efficiency_live: float = 0.0
    coordinator_cpu_s: float = 0.0
    coordinator_thread_cpu_s: float = 0.0
    window: dict = dataclasses.field(default_factory=dict)
    ledger: dict = dataclasses.field(default_factory=dict)
    mode: str = ""


def wire_keys(cls: type) -> list[str]:
    """The keys a view puts on the wire (for the docs test)."""
    keys = [f.name for f in dataclasses.fields(cls) if f.name != "roster"]
    if cls is Stats:
        keys += [f.name for f in dataclasses.fields(Roster)]
    return keys

