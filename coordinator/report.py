"""The coordinator's reports, built from its parts as the typed views of ``bus.report``
(the same classes busctl and busbench read them with)."""

from __future__ import annotations

import heapq

from agentbus_zmq.bus.report import (CONNECTION_EVENTS, PAGE_SIZE, AgentRow, AgentsPage, LedgerView, LiveView, Roster,
                                     Stats, page_count)
from agentbus_zmq.coordinator.registry import Registry
from agentbus_zmq.coordinator.units import AgentEntry, HostEntry, Member, step_times, unit_of

__all__ = ["stats", "agents_page"]


def stats(core, now: float, page: int | None = None) -> Stats:
    """CONTROL ``stats`` for the facade ``core``.  Agents are listed (ids, pids, which have
    stepped) when there are at most PAGE_SIZE, else in pages of that size on request."""
    reg = core.registry
    n = len(reg.agents)
    roster = None
    if page is not None or n <= PAGE_SIZE:
        ids = reg.page(page or 0)
        entries = [reg.agents[a] for a in ids]
        units = [unit_of(e) for e in entries]
        roster = Roster(page=page or 0, agent_ids=ids,
                        agent_pids={e.agent_id: u.pid for e, u in zip(entries, units)},
                        agent_hosts={e.agent_id: e.host.host_id for e in entries if type(e) is Member},
                        ready_ids=[e.agent_id for e, u in zip(entries, units) if u.first_step_at is not None],
                        host_ids=heapq.nsmallest(PAGE_SIZE, reg.hosts))
    connections = {**dict.fromkeys(CONNECTION_EVENTS, 0), **core.connections}
    figures = core.world.figures()
    return Stats(
        session=core.session, mode=core.settings.mode,
        uptime_s=now - (core.started_at if core.started_at is not None else now),
        agents=n, ready=reg.ready, hosts=len(reg.hosts), arenas=core.world.arenas, tick=core.schedule.tick,
        ledger=LedgerView(**core.ledger.snapshot()), restarts=dict(sorted(reg.restarts.items())[:PAGE_SIZE]),
        goal_visits=figures.get("goal_visits", 0), world={"kind": core.world.kind, **figures},
        connections={**connections, "open": connections["accepted"] - connections["disconnected"]},
        pending=reg.joining, measurements={"running": core.windows.current is not None, "queued": core.windows.queued},
        stragglers=core.liveness.straggler_table(), live=LiveView(**core.live.figures()), pages=page_count(n),
        roster=roster)


def agents_page(registry: Registry, page: int, now: float) -> AgentsPage:
    """CONTROL ``agents``: one row per agent, PAGE_SIZE a page, by id.  A host's agents
    share their host's figures (state, step times, counts); a member's ``steps`` are its
    host's frames answered in time (every frame steps each member live when it came)."""
    rows = []
    for agent_id in registry.page(page):
        unit = unit_of(registry.agents[agent_id])
        times = step_times(unit)
        rows.append(AgentRow(
            id=agent_id, pid=unit.pid, host=unit.host_id if type(unit) is HostEntry else None, kind=unit.kind,
            state=unit.state.value, steps=unit.steps if type(unit) is AgentEntry else unit.answers,
            p50_us=times[len(times) // 2] if times else None,
            p99_us=times[min(len(times) - 1, (len(times) * 99) // 100)] if times else None,
            missed=unit.missed, late=unit.late, slow=unit.slow, last_seen_s=round(now - unit.last_seen, 3),
            bad_actions=unit.bad_actions))
    return AgentsPage(page, page_count(len(registry.agents)), rows)
