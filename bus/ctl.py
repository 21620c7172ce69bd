"""``busctl``: the operator's view of a running coordinator.

    busctl status                 # the bus at a glance (--format json: the stats reply)
    busctl agents --sort p99      # one row per agent
    busctl ping                   # is it there, and how fast does it answer
    busctl top                    # a live view, refreshed every second

Every CONTROL command that names a busctl subcommand (``bus.commands``: its ``cli``)
becomes one here, with its options and its rendering; ``top`` combines two of them.
It reads ``BUS_ENDPOINT`` and the CURVE settings (``BUS_CURVE_SERVER_KEY``,
``BUS_CURVE_KEY``) from the environment or ``.env``, as the other commands do; the
options (``--endpoint``, ``--curve-server-key``, ``--curve-key``, ``--timeout``) go before
or after the subcommand (``busctl status --endpoint tcp://10.0.0.5:5555``).  When the
coordinator cannot be reached it says where it tried and what the transport saw.
"""

from __future__ import annotations

import sys
import time

import click

from agentbus_zmq.bus.client import BusUnavailable, ControlClient, ControlFailed
from agentbus_zmq.bus.commands import COMMANDS, Command
from agentbus_zmq.bus.commands.agents import agents_table, fetch, sort_rows
from agentbus_zmq.bus.commands.stats import status_view
from agentbus_zmq.bus.config import DEFAULT_ENDPOINT, dotenv_defaults, show_environment, version_option
from agentbus_zmq.bus.logs import printable
from agentbus_zmq.bus.report import Stats
from agentbus_zmq.bus.security import ClientKeys

__all__ = ["main", "safe_text"]

#: pages of agents ``busctl top`` reads each refresh (1,024 agents): a refresh a second
#: must not cost the coordinator a walk of its whole registry
TOP_PAGES = 8
_ENV = {"endpoint": "BUS_ENDPOINT", "curve_server_key": "BUS_CURVE_SERVER_KEY", "curve_key": "BUS_CURVE_KEY"}


def safe_text(value: object, limit: int = 200) -> str:
    """A string a coordinator sent, made safe for the terminal: control characters
    escaped (bus.logs.printable), rich markup neutralised, at most ``limit`` characters."""
    from rich.markup import escape

    return escape(printable(value, limit))


class Ctl:
    """What a command's ``console`` gets: requests to the coordinator, and output."""

    def __init__(self, endpoint: str, curve: ClientKeys | None, timeout: float):
        self.endpoint, self.curve, self.timeout = endpoint, curve, timeout
        self._client: ControlClient | None = None
        self._console = None

    def connect_with(self, endpoint: str | None = None, curve_server_key: str | None = None,
                     curve_key: str | None = None, timeout: float | None = None) -> None:
        """Connection options given (before the first request): where they are not None,
        they replace what was set."""
        if self._client is not None:
            raise RuntimeError("connect_with after the first request")
        self.endpoint = endpoint or self.endpoint
        self.timeout = timeout or self.timeout
        if curve_server_key or curve_key:
            try:
                self.curve = ClientKeys.from_options(curve_server_key, curve_key)
            except ValueError as exc:
                raise click.UsageError(str(exc)) from None

    @property
    def client(self) -> ControlClient:
        if self._client is None:
            self._client = ControlClient(self.endpoint, curve=self.curve, refused_is_final=True)
        return self._client

    def request(self, command: str, args: dict | None = None) -> dict:
        try:
            return self.client.request(command, args, timeout=self.timeout)
        except (BusUnavailable, ControlFailed) as exc:
            raise click.ClickException(str(exc)) from None

    @staticmethod
    def text(value: object) -> str:
        return safe_text(value)

    def echo(self, text: str) -> None:
        click.echo(text)

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console()
        return self._console

    @property
    def width(self) -> int:
        """The terminal's columns (COLUMNS, else 80 when not a terminal)."""
        return self.console.width

    def print(self, renderable) -> None:
        """``renderable`` as the terminal shows it, without the spaces a table pads its
        lines with (they end up in files and pipes)."""
        with self.console.capture() as captured:
            self.console.print(renderable)
        click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def connection_options(on_group: bool):
    """``--endpoint``, ``--curve-server-key``, ``--curve-key`` and ``--timeout``, taken
    before the subcommand (``busctl --endpoint X status``, with their environment
    variables and defaults) and after it (``busctl status --endpoint X``, where given
    they win)."""
    where = "" if on_group else " (here, or before the subcommand)"
    options = [
        click.option("--endpoint", envvar=_ENV["endpoint"] if on_group else None,
                     default=DEFAULT_ENDPOINT if on_group else None, show_default=on_group,
                     help=f"The coordinator's endpoint{where}."),
        click.option("--curve-server-key", envvar=_ENV["curve_server_key"] if on_group else None,
                     type=click.Path(exists=True, dir_okay=False), default=None,
                     help=f"With CURVE: the coordinator's public .key file{where}."),
        click.option("--curve-key", envvar=_ENV["curve_key"] if on_group else None,
                     type=click.Path(exists=True, dir_okay=False), default=None,
                     help=f"With CURVE: this client's .key_secret file (its .key on the coordinator's allow-list)"
                          f"{where}."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=5.0 if on_group else None,
                     show_default=on_group, help=f"Seconds to wait for each answer{where}."),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@version_option()
@connection_options(on_group=True)
@click.pass_context
def cli(ctx, endpoint, curve_server_key, curve_key, timeout):
    """Look at a running agentbus coordinator."""
    ctx.obj = Ctl(endpoint, None, timeout)
    ctx.obj.connect_with(curve_server_key=curve_server_key, curve_key=curve_key)
    ctx.call_on_close(ctx.obj.close)


def _subcommand(cmd: Command) -> click.Command:
    """A busctl subcommand for ``cmd``: its docstring, its options, its console."""

    @click.pass_obj
    def run(ctl: Ctl, endpoint, curve_server_key, curve_key, timeout, **options):
        ctl.connect_with(endpoint, curve_server_key, curve_key, timeout)
        cmd.console(ctl, **options)

    for option in reversed(cmd.cli_options):
        run = option(run)
    run = connection_options(on_group=False)(run)
    return click.command(cmd.cli, help=type(cmd).__doc__)(run)


for _cmd in COMMANDS.values():
    if _cmd.cli:
        cli.add_command(_subcommand(_cmd))


@cli.command()
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--rows", type=click.IntRange(min=1), default=15, show_default=True,
              help="Agents shown (the slowest first).")
@click.option("--iterations", type=click.IntRange(min=0), default=0, help="Stop after this many refreshes (0: "
                                                                          "until Ctrl-C).")
@connection_options(on_group=False)
@click.pass_obj
def top(ctl: Ctl, interval: float, rows: int, iterations: int, endpoint, curve_server_key, curve_key, timeout):
    """A live view: the bus's figures and its slowest agents, refreshed every second."""
    ctl.connect_with(endpoint, curve_server_key, curve_key, timeout)
    from rich.console import Group
    from rich.live import Live

    def frame():
        try:
            stats = Stats.from_wire(ctl.request("stats"))
            seen, pages = fetch(ctl, max_pages=TOP_PAGES)
            among = f" of the first {len(seen):,} by id" if pages > TOP_PAGES else ""
            table = agents_table(sort_rows(seen, "p50")[:rows], f"slowest {rows} agents (p50){among}", ctl.text,
                                 ctl.width)
            return Group(status_view(stats, ctl.endpoint, ctl.text), table)
        except click.ClickException as exc:
            from rich.text import Text

            return Text(f"{time.strftime('%H:%M:%S')}  {exc.message}", style="bold red")

    n = 0
    try:
        with Live(frame(), console=ctl.console, refresh_per_second=4, screen=False) as live:
            while not iterations or n < iterations:
                time.sleep(interval)
                live.update(frame())
                n += 1
    except KeyboardInterrupt:
        pass


show_environment(cli)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="busctl", default_map=dotenv_defaults(_ENV))


if __name__ == "__main__":
    sys.exit(main())
