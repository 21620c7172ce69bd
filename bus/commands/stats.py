"""``stats``: the bus at a glance (busctl status)."""

from __future__ import annotations

import json

import click

from agentbus_zmq.bus.commands import Call, Command, Server, command, page_arg
from agentbus_zmq.bus.report import Stats

__all__ = ["StatsCommand", "status_view"]


@command
class StatsCommand(Command):
    """Session, mode, uptime, agents, step rate, live efficiency, ledger and errors."""

    name = "stats"
    args_doc = "`page` (optional int)"
    result_doc = ("`session, mode, uptime_s, agents, ready, hosts, arenas, tick, goal_visits, ledger, restarts, "
                  "connections, pending, measurements, stragglers, live, world, pages`; with at most 128 agents, or for the "
                  "`page` asked for (128 agents a page, by id), also `page, agent_ids, agent_pids` (id -> pid, as the "
                  "agent claimed it; a host's agents have the host's pid), `agent_hosts` (id -> host id), "
                  "`ready_ids, host_ids`")
    cli = "status"
    cli_options = (click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
                                show_default=True),)

    def parse(self, args: dict) -> int | None:
        return page_arg(args, self.name, None)

    def execute(self, server: Server, call: Call, page: int | None) -> dict:
        return server.stats(call.now, page).to_wire()

    def console(self, ctl, fmt: str = "table") -> None:
        stats = ctl.request(self.name)
        if fmt == "json":
            ctl.echo(json.dumps(stats, indent=2, sort_keys=True))
        else:
            ctl.print(status_view(Stats.from_wire(stats), ctl.endpoint, ctl.text))


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def status_view(stats: Stats, endpoint: str, text=str):
    """The ``busctl status`` table; ``text`` makes peer-supplied strings safe to show."""
    from rich.table import Table

    live, ledger = stats.live, stats.ledger
    t = Table(title=f"agentbus at {text(endpoint)}", show_header=False, title_justify="left", box=None,
              pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    alert = " [bold red]ALERT[/]" if live.alert else ""
    t.add_row("session", f"{text(stats.session)}  mode {text(stats.mode)}  up {_duration(stats.uptime_s)}")
    t.add_row("agents", f"{stats.agents} registered, {stats.ready} stepping, {stats.pending} pending, "
                        f"{stats.hosts} hosts, {stats.arenas} arenas")
    rate = live.rate
    t.add_row("steps", f"{'-' if rate is None else f'{rate:,.0f}'} /s over {live.window_s:.0f} s, "
                       f"tick {stats.tick:,}")
    t.add_row("efficiency", f"{_pct(live.efficiency)} (threshold {_pct(live.threshold)}, {live.cores} cores){alert}")
    coord = live.coordinator_cpu
    t.add_row("coordinator", f"{'-' if coord is None else f'{coord:.0%}'} of a core")
    t.add_row("ledger", f"sent {ledger.sent:,}  received {ledger.received:,}  late {ledger.late:,}  "
                        f"missing {ledger.missing:,}  outstanding {ledger.outstanding:,}  "
                        f"undeliverable {ledger.undeliverable:,}  slow {ledger.slow:,}  "
                        f"{'balanced' if ledger.balanced else '[bold red]NOT BALANCED[/]'}")
    t.add_row("errors", "  ".join(f"{text(k)} {v:,}" for k, v in sorted(ledger.errors.items())) or "none")
    m = stats.measurements
    if m.get("running") or m.get("queued"):
        t.add_row("measuring", f"{'1 running' if m.get('running') else 'none running'}, {m.get('queued', 0)} queued")
    return t
