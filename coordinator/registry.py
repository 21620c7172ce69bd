"""Who is registered: admission, takeover, units and their members, and their places.

:class:`Registry` owns the maps from agent id, host id and connection to units, the
count of agents not yet ready (in all and per origin), the count of agents that have
stepped, each id's registrations this session (``restarts``) and every unit's place in
the world.  It decides who may register (:meth:`Registry.admit`: an id held by a live
connection is taken only with its token, the same CURVE key, or once that connection
went silent; pending agents are bounded in all and per origin), adds and removes units,
and never schedules: the facade settles what a departing unit owed with the schedule
before it calls :meth:`Registry.remove`.
"""

from __future__ import annotations

import collections
import hmac
import itertools
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.bus.report import PAGE_SIZE, page_slice
from agentbus_zmq.bus.security import id_allowed
from agentbus_zmq.coordinator.outbox import Outbox
from agentbus_zmq.coordinator.settings import ConfigError, Settings
from agentbus_zmq.coordinator.units import (JOINING, UNITS, AgentEntry, HostEntry, Member, Unit, unit_of)
from agentbus_zmq.coordinator.world import World, WorldFull

__all__ = ["Admission", "Registry", "MAX_TRACKED_IDS", "RESTARTS_KEPT", "WorldFull", "DISPLACE_AFTER_S"]

#: Agent ids whose registrations are counted for ``restarts`` in stats (bounded memory).
MAX_TRACKED_IDS = 65_536
#: When pending registrations are full, one still getting ready this long may make way for
#: a newcomer from another origin (those of the origin holding the most first, then the
#: stalest); an origin may displace once every DISPLACE_EVERY_S.  Squatters from many
#: addresses can then renew their places only by displacing each other, at a bounded
#: rate, so some of theirs are always old enough, and a real agent gets in within seconds.
DISPLACE_AFTER_S = 1.0
DISPLACE_EVERY_S = 2.0
#: pending registrations looked at, oldest first, for one that may make way; origins
#: whose last displacement is remembered
DISPLACE_SCAN = 64
DISPLACERS_KEPT = 4096
#: The agent ids ``restarts`` keeps: the most recently re-registered (stats shows them,
#: sorted, at a cost that does not grow with the session).
RESTARTS_KEPT = PAGE_SIZE


class Admission(NamedTuple):
    """A registration :meth:`Registry.admit` lets in."""

    #: the units it takes over (the caller drops them)
    taking_over: list[Unit]
    #: when its setup grace began: now, or the first HELLO of a registration of its ids
    #: that was still getting ready (a takeover does not start the grace again)
    grace_from: float
    #: who is charged for it while it gets ready: its CURVE key, else its address
    origin: str
    #: registrations still getting ready that make way for it (pending full; told BUSY:
    #: the caller drops them)
    displaced: tuple = ()


class Registry:
    def __init__(self, settings: Settings, world: World, session: str, outbox: Outbox, errors: collections.Counter,
                 key_patterns: Mapping[bytes, tuple[str, ...] | None] | None, token: Callable[[], str]):
        self.settings = settings
        self.world = world
        self.outbox = outbox
        self._errors = errors
        #: with CURVE, each allowed key's agent id patterns (None: any id)
        self.key_patterns = key_patterns
        self._token = token
        #: every registered agent, by id: its own connection's entry, or a host's member
        self.agents: dict[str, AgentEntry | Member] = {}
        #: their ids in order, for pages (None: to be sorted again)
        self._order: list[str] | None = None
        self.hosts: dict[str, HostEntry] = {}
        self.by_peer: dict[bytes, Unit] = {}
        #: agents registered and not yet ready (Settings.max_pending), in all and by origin
        self.joining = 0
        self._joining_by: collections.Counter = collections.Counter()
        #: the units charged while they get ready, oldest first
        self._pending: dict[Unit, None] = {}
        #: origin -> when it last displaced a pending registration (DISPLACE_EVERY_S)
        self._displaced_at: dict[str, float] = {}
        #: registered agents that have answered at least one observation
        self.ready = 0
        #: registrations per agent id this session (restarts = registrations - 1)
        self._registrations: collections.Counter = collections.Counter()
        #: the agent ids registered more than once, and how many times again: the
        #: RESTARTS_KEPT most recent, oldest first
        self.restarts: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.stopping = False
        self._welcomes = P.WelcomeEncoder(session, {
            "mode": settings.mode,
            "heartbeat_ms": int(settings.heartbeat * 1000),
            "liveness": settings.liveness,
            "world": world.params(),
        })
        self._check_welcome_fits()

    def name_of(self, peer: bytes) -> str:
        unit = self.by_peer.get(peer)
        return f"{unit.name} (peer {peer.hex()})" if unit is not None else f"peer {peer.hex()}"

    # --- admission ----------------------------------------------------------------------

    def admit(self, peer: bytes, ids: list[str], who: str, token: str, key: bytes | None, address: str, now: float,
              host_id: str | None = None) -> Admission | None:
        """May ``peer`` register ``ids`` (and ``host_id``)?  The units it takes over
        (to be dropped by the caller) and when its setup grace began, or None when refused
        (the refusal is sent): the coordinator is stopping, the key may not use an id, an
        id is held by another live connection that this one cannot prove to be, or too
        many agents are pending, in all or from its origin (its key, else ``address``)."""
        if self.stopping:
            self.outbox.reject(peer, ErrorCode.SHUTTING_DOWN, "coordinator is shutting down", now)
            return None
        if key is not None and self.key_patterns is not None:
            patterns = self.key_patterns.get(key)
            for name in ([host_id] if host_id is not None else []) + ids:
                if not id_allowed(patterns, name):
                    self._errors["id_not_allowed"] += 1
                    self.outbox.reject(peer, ErrorCode.NOT_ALLOWED, f"{who}: this connection's CURVE key may not use "
                                                                    f"id {name!r} (allowed: {' '.join(patterns or ())})",
                                       now)
                    return None
        holders: dict[Unit, str] = {}
        if host_id is not None and host_id in self.hosts:
            holders[self.hosts[host_id]] = host_id
        for agent_id in ids:
            old = self.agents.get(agent_id)
            if old is not None:
                holders.setdefault(unit_of(old), agent_id)
        for holder, name in holders.items():
            if holder.peer == peer or self._may_replace(holder, token, key, now):
                continue
            # if its connection is in fact gone, the probe finds out and the next HELLO gets in;
            # once per heartbeat interval at most, however many HELLOs are refused
            if now - holder.probed_at >= self.settings.heartbeat:
                holder.probed_at = now
                self.outbox.send(holder, P.encode(P.Heartbeat()), now)
            self.outbox.reject(peer, ErrorCode.ID_TAKEN, f"{who}: id {name!r} is registered by {holder.name}, whose "
                                                         f"connection is alive", now)
            return None
        taking_over = [h for h in holders if h.peer != peer]
        joining = [h for h in taking_over if h.state is JOINING]
        current = self.by_peer.get(peer)  # a registered connection registering again: the driver skips its address
        if current is not None and current.state is JOINING and current not in joining:
            joining.append(current)       # it goes; it keeps its age (cycling ids on one connection renews nothing)
        origin = (f"key:{key.hex()}" if key is not None else current.origin if current is not None and not address
                  else f"address:{address}")
        busy, displaced = self._pending_refusal(len(ids), origin, joining, now)
        if busy:
            self.outbox.reject(peer, ErrorCode.BUSY, f"{who}: {busy}", now)
            return None
        for unit in displaced:
            self._errors["displaced"] += 1
            self.outbox.error(unit.peer, ErrorCode.BUSY, f"{unit.name}: displaced by a newer registration while "
                                                         f"{self.settings.max_pending} were getting ready")
        for holder in taking_over:
            if type(holder) is HostEntry and holder.host_id != host_id and \
                    any(holder.ids[i] not in ids for i in holder.live_idx.tolist()):
                # Some of a host's members move elsewhere (to processes of their own): the
                # host keeps the others, and its next frame no longer lists the ones that
                # moved.  REPLACED would tell it to stop.
                continue
            # it may still be listening (alive, or still building its model): tell it
            if holder.state is JOINING or now - holder.last_seen <= self.settings.expiry:
                self.outbox.error(holder.peer, ErrorCode.REPLACED, f"{holder.name}: taken over by another "
                                                                   f"connection that presented its token or key")
        return Admission(taking_over, min([now, *(h.grace_from for h in joining)]), origin, tuple(displaced))

    def _pending_refusal(self, n: int, origin: str, joining: list[Unit], now: float) -> tuple[str, list[Unit]]:
        """Why ``n`` more agents from ``origin`` may not join the pending ones now ("" if
        they may).  The units in ``joining`` are taken over: their share is freed.  One
        origin (a CURVE key, or an address) holds at most half the limit, so one that
        registers and never gets ready, however many connections and ids it cycles,
        leaves the other half to everyone else; a registration larger than the limit
        gets in when nothing else is pending.  When the limit in all is reached, pending
        registrations of other origins older than DISPLACE_AFTER_S make way (returned, to
        be dropped), if that makes room."""
        limit = self.settings.max_pending
        total = self.joining - sum(h.charged for h in joining)
        mine = self._joining_by[origin] - sum(h.charged for h in joining if h.origin == origin)
        if mine and mine + n > max(1, limit // 2):
            return (f"{mine} agents from this {origin.partition(':')[0]} are waiting to "
                    f"say they are ready (at most {max(1, limit // 2)} from one)"), []
        if not total or total + n <= limit:
            return "", []
        if now - self._displaced_at.get(origin, -math.inf) < DISPLACE_EVERY_S:
            return f"{total} agents are waiting to say they are ready (at most {limit})", []
        stale = [u for u in itertools.islice(self._pending, DISPLACE_SCAN)  # the oldest few: bounded per HELLO
                 if u.origin != origin and now - u.grace_from >= DISPLACE_AFTER_S and u not in joining]
        stale.sort(key=lambda u: (-self._joining_by[u.origin], u.grace_from))
        displaced = []
        for unit in stale:
            if total + n <= limit:
                break
            displaced.append(unit)
            total -= unit.charged
        if total + n > limit:
            return f"{total} agents are waiting to say they are ready (at most {limit})", []
        self._displaced_at.pop(origin, None)
        self._displaced_at[origin] = now   # the oldest remembered goes first
        if len(self._displaced_at) > DISPLACERS_KEPT:
            del self._displaced_at[next(iter(self._displaced_at))]
        return "", displaced

    def _may_replace(self, holder: Unit, token: str, key: bytes | None, now: float) -> bool:
        """A new connection may take ``holder``'s registration when the new one proves it
        is the same agent (it presents the token of the old WELCOME, or authenticated with
        the same CURVE key), or when the old connection is silent past liveness and is
        not still getting ready: an agent building its model (a JAX compile, seconds) is
        silent by design inside its setup grace, and liveness drops it if it overstays."""
        if (bool(token) and hmac.compare_digest(token.encode(), holder.token.encode())) or \
                (key is not None and key == holder.key):
            return True
        return holder.state is not JOINING and now - holder.last_seen > self.settings.expiry

    def room_for(self, ids: list[str]) -> int:
        """Agents the world can still take, counting ``ids`` already placed as room."""
        return self.world.capacity - len(self.world) + sum(1 for i in ids if i in self.world)

    # --- adding and removing ----------------------------------------------------------

    def add_agent(self, peer: bytes, msg: P.Hello, key: bytes | None, admission: Admission, now: float) -> AgentEntry:
        """Register an agent (its id is free: the caller took it over first); WorldFull
        when there is no place for it."""
        slot = self.world.place(msg.agent_id)
        entry = AgentEntry(peer, msg.kind, msg.pid, now, now, now, deadline=self.settings.deadline_for(1),
                           token=self._token(), key=key, agent_id=msg.agent_id, slot=slot)
        self.agents[msg.agent_id] = entry
        self._order = None
        self.by_peer[peer] = entry
        self._charge(entry, 1, admission)
        self._count_registration(msg.agent_id)
        return entry

    def _charge(self, unit: Unit, n: int, admission: Admission) -> None:
        unit.origin, unit.charged, unit.grace_from = admission.origin, n, admission.grace_from
        self.joining += n
        self._joining_by[unit.origin] += n
        self._pending[unit] = None

    def _discharge(self, unit: Unit) -> None:
        self.joining -= unit.charged
        self._joining_by[unit.origin] -= unit.charged
        if not self._joining_by[unit.origin]:
            del self._joining_by[unit.origin]
        self._pending.pop(unit, None)
        unit.charged = 0

    def add_host(self, peer: bytes, msg: P.HostHello, ids: list[str], key: bytes | None, admission: Admission,
                 now: float, previous: HostEntry | None) -> HostEntry:
        """Register a host and its members (their ids are free: the caller took them over);
        members ``previous`` (the host's last registration) carried and this one does not
        leave the world."""
        host = HostEntry(peer, msg.kind, msg.pid, now, now, now, deadline=self.settings.deadline_for(len(ids)),
                         token=self._token(), key=key, host_id=msg.host_id, span=(msg.prefix, msg.first, msg.count),
                         ids=ids,
                         slots=np.array([self.world.place(i) for i in ids], dtype=np.int64),
                         live=np.ones(len(ids), dtype=bool))
        host.refresh()
        for index, agent_id in enumerate(ids):
            self.agents[agent_id] = Member(agent_id, host, index, int(host.slots[index]))
            self._count_registration(agent_id)
        self._order = None
        self.hosts[msg.host_id] = host
        self.by_peer[peer] = host
        self._charge(host, len(ids), admission)
        if previous is not None:
            for agent_id in previous.ids:
                if agent_id not in self.agents:
                    self.world.remove(agent_id)
        return host

    def mark_ready(self, unit: Unit) -> None:
        """The unit's first message after WELCOME: its model is built."""
        UNITS.move(unit, "ready")
        self._discharge(unit)

    def first_step(self, unit: Unit, n: int) -> None:
        """``n`` agents of ``unit`` answered their first observation."""
        self.ready += n

    def remove(self, unit: Unit, keep_position: bool = False) -> None:
        """Forget a unit and its agents (the schedule has settled what it owed).
        ``keep_position``: its agents keep their places (a new registration of theirs follows)."""
        if unit.charged:
            self._discharge(unit)
        if self.by_peer.get(unit.peer) is unit:
            del self.by_peer[unit.peer]
        UNITS.move(unit, "leave")
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

    def remove_member(self, member: Member, keep_position: bool) -> None:
        """One member of a host goes (its schedule settled); the host may be left empty."""
        host = member.host
        host.live[member.index] = False
        host.refresh()
        self._unregister(member, host, keep_position)

    def _unregister(self, agent: AgentEntry | Member, unit: Unit, keep_position: bool) -> None:
        del self.agents[agent.agent_id]
        self._order = None
        if unit.first_step_at is not None:
            self.ready -= 1
        if not keep_position:
            self.world.remove(agent.agent_id)

    def _count_registration(self, agent_id: str) -> None:
        if agent_id in self._registrations or len(self._registrations) < MAX_TRACKED_IDS:
            self._registrations[agent_id] += 1
            if self._registrations[agent_id] > 1:
                self.restarts[agent_id] = self._registrations[agent_id] - 1
                self.restarts.move_to_end(agent_id)
                if len(self.restarts) > RESTARTS_KEPT:
                    self.restarts.popitem(last=False)

    # --- what it tells agents, and reports -------------------------------------------

    def welcome(self, entry: AgentEntry) -> bytes:
        return self._welcomes.welcome(entry.agent_id, {"deadline_ms": int(entry.deadline * 1000),
                                                       "arena": self.world.arena_of(entry.slot),
                                                       "token": entry.token})

    def host_welcome(self, host: HostEntry) -> bytes:
        return self._welcomes.host_welcome(host.host_id, {"deadline_ms": int(host.deadline * 1000),
                                                          "token": host.token},
                                           self.world.arenas_of(host.slots).astype(np.uint32))

    def _check_welcome_fits(self) -> None:
        """Refuse to start with a world whose WELCOME no agent could receive."""
        longest, token = "x" * 128, "x" * P.MAX_TOKEN_LEN
        extra = {"deadline_ms": 2**32 - 1, "token": token}
        worst = max(len(self._welcomes.welcome(longest, {**extra, "arena": 2**32 - 1})),
                    len(self._welcomes.host_welcome(longest, extra, np.zeros(P.MAX_HOST_AGENTS, np.uint32))))
        if worst > self.settings.max_message_bytes:
            raise ConfigError(
                f"this world's WELCOME would be {worst} bytes, over the {self.settings.max_message_bytes}-byte message "
                f"limit, so no agent could join: its description travels in it ({_describe(self.world)}); use "
                f"fewer obstacles (--obstacles) or goals, or a smaller map")

    def page(self, page: int) -> list[str]:
        """The ids of page ``page``, in id order: sorted once per change of membership, not
        once per request (a client paging through 230,000 agents, or asking for the same
        page four at a time, costs a slice)."""
        if self._order is None:
            self._order = sorted(self.agents)
        return self._order[page_slice(page)]


def _describe(world: World) -> str:
    params = world.params()
    if "width" in params:
        return f"the {params['width']}x{params['height']} map's obstacles and goals"
    return "the world's parameters"

