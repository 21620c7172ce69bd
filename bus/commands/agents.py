"""``agents``: one row per agent, a page at a time (busctl agents)."""

from __future__ import annotations

import json

import click

from agentbus_zmq.bus.commands import Call, Command, Server, command, page_arg
from agentbus_zmq.bus.report import PAGE_SIZE, AgentRow, AgentsPage

__all__ = ["AgentsCommand", "MAX_PAGES", "SORTS", "agents_table", "fetch", "fetch_all", "sort_rows"]

#: busctl's sort keys: option value -> (row field, largest first)
SORTS = {"id": ("id", False), "steps": ("steps", True), "p50": ("p50_us", True), "p99": ("p99_us", True),
         "missed": ("missed", True), "late": ("late", True), "slow": ("slow", True),
         "last-seen": ("last_seen_s", True), "bad-actions": ("bad_actions", True)}


@command
class AgentsCommand(Command):
    """One row per agent: id, pid or host, state, steps, step time p50/p99, late/missing, last seen."""

    name = "agents"
    args_doc = "`page` (optional int, default 0)"
    result_doc = ("`{page, pages, agents}`: one row per agent (128 a page, by id): `id, pid, host, kind, state, "
                  "steps, p50_us, p99_us` (step time, wall, the last 32 steps), `missed, late, slow, last_seen_s`, `bad_actions` (refused at the world's door, its default "
                  "applied); "
                  "`state` is `joining` (registered, not yet ready), `idle` (ready, nothing outstanding) or "
                  "`stepping` (an observation outstanding); a host's agents show their host's figures, and a "
                  "member's `steps` are its host's frames answered in time (each steps every member listed)")
    cli = "agents"
    cli_options = (
        click.option("--sort", type=click.Choice(list(SORTS)), default="id", show_default=True,
                     help="Order of the rows (numbers: largest first)."),
        click.option("--limit", type=click.IntRange(min=0), default=0, help="Show this many rows at most (0: all)."),
        click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True),
    )

    def parse(self, args: dict) -> int:
        return page_arg(args, self.name, 0)

    def execute(self, server: Server, call: Call, page: int) -> dict:
        return server.agents_page(page, call.now).to_wire()

    def console(self, ctl, sort: str = "id", limit: int = 0, fmt: str = "table") -> None:
        # pages come by id: the first rows by id need only their pages
        rows, total = fetch(ctl, limit if sort == "id" else 0)
        rows = sort_rows(rows, sort)
        if limit:
            rows = rows[:limit]
        if fmt == "json":
            ctl.echo(json.dumps([r.to_wire() for r in rows], indent=2))
        else:
            title = f"{len(rows)} agents, by {sort}" + (f" (of the first {MAX_PAGES * PAGE_SIZE:,} by id; the "
                                                         f"coordinator lists {total:,} pages)" if total > MAX_PAGES else "")
            ctl.print(agents_table(rows, title, ctl.text, ctl.width))


#: pages busctl follows at most, whatever count a coordinator claims (131,072 agents)
MAX_PAGES = 1024


def fetch(ctl, limit: int = 0, max_pages: int = MAX_PAGES) -> tuple[list[AgentRow], int]:
    """The agents' rows, page by page in id order: all of them, the first ``limit``, or
    the first ``max_pages`` pages; and the page count the coordinator said.  A page holds
    PAGE_SIZE rows at most, whatever it carries."""
    first = AgentsPage.from_wire(ctl.request("agents", {"page": 0}))
    pages = min(first.pages, max_pages, -(-limit // PAGE_SIZE) if limit else max_pages)
    rows = list(first.agents[:PAGE_SIZE])
    for page in range(1, pages):
        rows += AgentsPage.from_wire(ctl.request("agents", {"page": page})).agents[:PAGE_SIZE]
    return rows, first.pages


def fetch_all(ctl) -> list[AgentRow]:
    """Every agent's row (at most MAX_PAGES pages)."""
    return fetch(ctl)[0]


def sort_rows(rows: list[AgentRow], sort: str) -> list[AgentRow]:
    key, descending = SORTS[sort]
    present = [r for r in rows if getattr(r, key) is not None]
    return (sorted(present, key=lambda r: getattr(r, key), reverse=descending)
            + [r for r in rows if getattr(r, key) is None])


def _ms(us) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


#: ``busctl agents``' columns: name, justification, and the order in which a narrow
#: terminal drops them (higher first; 0, the id, never)
_COLUMNS = (("id", "left", 0), ("pid / host", "left", 9), ("state", "left", 1), ("steps", "right", 3),
            ("p50 ms", "right", 7), ("p99 ms", "right", 2), ("late", "right", 5), ("missed", "right", 4),
            ("slow", "right", 8), ("seen", "right", 6))
#: columns ranked this high or higher (state, p99 ms, steps) show at any width
_ALWAYS = 3


def agents_table(rows: list[AgentRow], title: str, text=str, width: int | None = None):
    """The ``busctl agents`` table; ``text`` makes peer-supplied strings safe to show.

    In ``width`` columns (a terminal's), the columns that do not fit are dropped, least
    needed first, and the caption names them; the id, state, p99 and steps always show, and
    the id is never cut: it stays on one line while it fits beside them, and only one longer
    than that folds onto the next lines, whole.
    """
    from rich.cells import cell_len
    from rich.table import Table

    cells = [[text(r.id), text(r.host) if r.host else str(r.pid), text(r.state), f"{r.steps:,}", _ms(r.p50_us),
              _ms(r.p99_us), str(r.late), str(r.missed), str(r.slow), f"{r.last_seen_s:.1f}s"] for r in rows]
    shown = list(range(len(_COLUMNS)))
    if width:
        widths = [max([cell_len(name)] + [cell_len(row[i]) for row in cells]) for i, (name, _, _) in enumerate(_COLUMNS)]
        # the id stays whole on one line while it fits beside the columns that matter most;
        # only a longer one folds (onto as many lines as it needs, every character kept)
        kept = [i for i, c in enumerate(_COLUMNS) if 0 < c[2] <= _ALWAYS]
        widths[0] = min(widths[0], max(20, width - 1 - 3 - sum(widths[i] + 3 for i in kept)))
        for i in sorted((i for i, c in enumerate(_COLUMNS) if c[2] > _ALWAYS), key=lambda i: -_COLUMNS[i][2]):
            if sum(widths[j] + 3 for j in shown) + 1 <= width:   # a cell's padding and border: 3; the edge: 1
                break
            shown.remove(i)
    hidden = [_COLUMNS[i][0] for i in range(len(_COLUMNS)) if i not in shown]
    caption = (f"not shown in {width} columns: {', '.join(hidden)} (a wider terminal, or --format json)"
               if hidden else None)
    t = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for i in shown:
        name, justify, _ = _COLUMNS[i]
        if i == 0:
            t.add_column(name, justify=justify, overflow="fold")
        else:
            t.add_column(name, justify=justify, no_wrap=True)
    for row in cells:
        t.add_row(*(row[i] for i in shown))
    return t
