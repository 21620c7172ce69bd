"""``busctl``: the operator's view of a running coordinator.

    busctl status                 # the bus at a glance (--format json: the stats reply)
    busctl agents --sort p99      # one row per agent
    busctl top                    # a live view, refreshed every second

It reads ``BUS_ENDPOINT`` and the CURVE settings (``BUS_CURVE_SERVER_KEY``,
``BUS_CURVE_KEY``) from the environment or ``.env``, as the other commands do, and when
the coordinator cannot be reached it says where it tried and what the transport saw.
"""

from __future__ import annotations

import json
import sys
import time

import click

from agentbus_zmq.bus.client import BusUnavailable, ControlClient, ControlFailed
from agentbus_zmq.bus.config import DEFAULT_ENDPOINT, dotenv_defaults
from agentbus_zmq.bus.security import ClientKeys

__all__ = ["main", "status_view", "agents_table"]

_ENV = {"endpoint": "BUS_ENDPOINT", "curve_server_key": "BUS_CURVE_SERVER_KEY", "curve_key": "BUS_CURVE_KEY"}
SORTS = {"id": ("id", False), "steps": ("steps", True), "p50": ("p50_us", True), "p99": ("p99_us", True),
         "missed": ("missed", True), "late": ("late", True), "slow": ("slow", True),
         "last-seen": ("last_seen_s", True)}


class Ctl:
    def __init__(self, endpoint: str, curve: ClientKeys | None, timeout: float):
        self.endpoint, self.curve, self.timeout = endpoint, curve, timeout
        self._client: ControlClient | None = None

    @property
    def client(self) -> ControlClient:
        if self._client is None:
            self._client = ControlClient(self.endpoint, curve=self.curve)
        return self._client

    def request(self, command: str, args: dict | None = None) -> dict:
        try:
            return self.client.request(command, args, timeout=self.timeout)
        except BusUnavailable as exc:
            raise click.ClickException(str(exc)) from None
        except ControlFailed as exc:
            raise click.ClickException(str(exc)) from None

    def agents(self) -> list[dict]:
        first = self.request("agents", {"page": 0})
        rows = list(first["agents"])
        for page in range(1, first["pages"]):
            rows += self.request("agents", {"page": page})["agents"]
        return rows

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--endpoint", envvar=_ENV["endpoint"], default=DEFAULT_ENDPOINT, show_default=True,
              help="The coordinator's endpoint.")
@click.option("--curve-server-key", envvar=_ENV["curve_server_key"], type=click.Path(exists=True, dir_okay=False),
              default=None, help="With CURVE: the coordinator's public .key file.")
@click.option("--curve-key", envvar=_ENV["curve_key"], type=click.Path(exists=True, dir_okay=False), default=None,
              help="With CURVE: this client's .key_secret file (its .key on the coordinator's allow-list).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Seconds to wait for each answer.")
@click.pass_context
def cli(ctx, endpoint, curve_server_key, curve_key, timeout):
    """Look at a running agentbus coordinator."""
    try:
        curve = ClientKeys.from_options(curve_server_key, curve_key)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    ctx.obj = Ctl(endpoint, curve, timeout)
    ctx.call_on_close(ctx.obj.close)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
def status(ctl: Ctl, fmt: str):
    """Session, mode, uptime, agents, step rate, live efficiency, ledger and errors."""
    stats = ctl.request("stats")
    if fmt == "json":
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
        return
    _console().print(status_view(stats, ctl.endpoint))


@cli.command()
@click.option("--sort", type=click.Choice(list(SORTS)), default="id", show_default=True,
              help="Order of the rows (numbers: largest first).")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="Show this many rows at most (0: all).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
def agents(ctl: Ctl, sort: str, limit: int, fmt: str):
    """One row per agent: id, pid or host, state, steps, step time p50/p99, late/missing, last seen."""
    rows = _sorted(ctl.agents(), sort)
    if limit:
        rows = rows[:limit]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    _console().print(agents_table(rows, f"{len(rows)} agents, by {sort}"))


@cli.command()
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--rows", type=click.IntRange(min=1), default=15, show_default=True,
              help="Agents shown (the slowest first).")
@click.option("--iterations", type=click.IntRange(min=0), default=0, help="Stop after this many refreshes (0: "
                                                                          "until Ctrl-C).")
@click.pass_obj
def top(ctl: Ctl, interval: float, rows: int, iterations: int):
    """A live view: the bus's figures and its slowest agents, refreshed every second."""
    from rich.console import Group
    from rich.live import Live

    def frame():
        try:
            stats = ctl.client.request("stats", timeout=ctl.timeout)
            table = agents_table(_sorted(ctl.agents(), "p50")[:rows], f"slowest {rows} agents (p50)")
            return Group(status_view(stats, ctl.endpoint), table)
        except (BusUnavailable, ControlFailed, click.ClickException) as exc:
            from rich.text import Text

            return Text(f"{time.strftime('%H:%M:%S')}  {exc}", style="bold red")

    n = 0
    try:
        with Live(frame(), console=_console(), refresh_per_second=4, screen=False) as live:
            while not iterations or n < iterations:
                time.sleep(interval)
                live.update(frame())
                n += 1
    except KeyboardInterrupt:
        pass


def _sorted(rows: list[dict], sort: str) -> list[dict]:
    key, descending = SORTS[sort]
    present = [r for r in rows if r.get(key) is not None]
    return sorted(present, key=lambda r: r[key], reverse=descending) + [r for r in rows if r.get(key) is None]


def _console():
    from rich.console import Console

    return Console()


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def status_view(stats: dict, endpoint: str):
    """The ``busctl status`` table for a ``stats`` reply."""
    from rich.table import Table

    live = stats.get("live", {})
    ledger = stats["ledger"]
    t = Table(title=f"agentbus at {endpoint}", show_header=False, title_justify="left", box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    alert = " [bold red]ALERT[/]" if live.get("alert") else ""
    t.add_row("session", f"{stats['session']}  mode {stats['mode']}  up {_duration(stats['uptime_s'])}")
    t.add_row("agents", f"{stats['agents']} registered, {stats['ready']} stepping, {stats.get('pending', 0)} "
                        f"pending, {stats['hosts']} hosts, {stats['arenas']} arenas")
    rate = live.get("rate")
    t.add_row("steps", f"{'-' if rate is None else f'{rate:,.0f}'} /s over {live.get('window_s', 0):.0f} s, "
                       f"tick {stats['tick']:,}")
    t.add_row("efficiency", f"{_pct(live.get('efficiency'))} (threshold {_pct(live.get('threshold'))}, "
                            f"{live.get('cores', '-')} cores){alert}")
    coord = live.get("coordinator_cpu")
    t.add_row("coordinator", f"{'-' if coord is None else f'{coord:.0%}'} of a core")
    t.add_row("ledger", f"sent {ledger['sent']:,}  received {ledger['received']:,}  late {ledger['late']:,}  "
                        f"missing {ledger['missing']:,}  outstanding {ledger['outstanding']:,}  "
                        f"undeliverable {ledger['undeliverable']:,}  slow {ledger.get('slow', 0):,}  "
                        f"{'balanced' if ledger['balanced'] else '[bold red]NOT BALANCED[/]'}")
    errors = ledger.get("errors", {})
    t.add_row("errors", "  ".join(f"{k} {v:,}" for k, v in sorted(errors.items())) or "none")
    m = stats.get("measurements", {})
    if m.get("running") or m.get("queued"):
        t.add_row("measuring", f"{'1 running' if m.get('running') else 'none running'}, {m.get('queued', 0)} queued")
    return t


def agents_table(rows: list[dict], title: str):
    """The ``busctl agents`` table."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for name, justify in (("id", "left"), ("pid / host", "left"), ("state", "left"), ("steps", "right"),
                          ("p50 ms", "right"), ("p99 ms", "right"), ("late", "right"), ("missed", "right"),
                          ("slow", "right"), ("seen", "right")):
        t.add_column(name, justify=justify, no_wrap=True)
    for r in rows:
        t.add_row(r["id"], r["host"] or str(r["pid"]), r["state"], f"{r['steps']:,}", _ms(r["p50_us"]),
                  _ms(r["p99_us"]), str(r["late"]), str(r["missed"]), str(r["slow"]), f"{r['last_seen_s']:.1f}s")
    return t


def _ms(us) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="busctl", default_map=dotenv_defaults(_ENV))


if __name__ == "__main__":
    sys.exit(main())
