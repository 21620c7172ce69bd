"""CONTROL commands, one object each, as circus's ``commands/`` are.

A command is everything about one CONTROL request in one place: its name on the wire,
its arguments (parsed and bounded here, refused with a coded :class:`CommandError`),
what it does on the coordinator (:meth:`Command.execute`, against the narrow
:class:`Server` interface the coordinator implements), how ``busctl`` shows it
(:meth:`Command.console`) and its documentation (the class docstring is the busctl
help; ``args_doc`` and ``result_doc`` are the row of docs/protocol.md's CONTROL table,
which a test checks against :func:`markdown_table`).

Adding a command is one new module in this package defining one :class:`Command`
subclass decorated with :func:`command`, and its test: the coordinator serves it and
busctl offers it (when it sets ``cli``) without another change.  This package imports
nothing above ``bus/``: the coordinator is reached only through :class:`Server`.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import pkgutil
from typing import Any, ClassVar, Protocol

from agentbus_zmq.bus.protocol import ERROR_HINTS, ErrorCode

__all__ = ["COMMANDS", "Call", "Command", "CommandError", "Server", "command", "markdown_table", "refusal"]


class CommandError(Exception):
    """A CONTROL request refused; ``code`` travels in the REPLY's ``result``."""

    def __init__(self, code: ErrorCode, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def refusal(code: ErrorCode, reason: str) -> dict:
    """A refused request's ``result``: what went wrong, its code, what to do."""
    return {"error": reason, "code": int(code), "code_name": code.name, "hint": ERROR_HINTS.get(code, "")}


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """Who asked, and when: a command answered later (``measure``) replies to it."""

    peer: bytes
    request_id: int
    now: float


class Server(Protocol):
    """What commands may ask of the coordinator (its facade implements this)."""

    session: str

    def stats(self, now: float, page: int | None = None) -> Any:
        """A :class:`~agentbus_zmq.bus.report.Stats`."""

    def agents_page(self, page: int, now: float) -> Any:
        """An :class:`~agentbus_zmq.bus.report.AgentsPage`."""

    def measure(self, call: Call, request: Any) -> None:
        """Start (or queue) a measurement; the coordinator replies when it closes."""


class Command(abc.ABC):
    """One CONTROL command.  Subclasses set ``name`` and implement :meth:`execute`; one
    that busctl offers (``cli``) also has ``console(ctl, **options)``: ask
    (``ctl.request(name, args)``) and print what came back."""

    name: ClassVar[str] = ""
    #: the protocol table's args and result columns (docs/protocol.md)
    args_doc: ClassVar[str] = "none"
    result_doc: ClassVar[str] = ""
    #: the busctl subcommand that shows it, or None
    cli: ClassVar[str | None] = None
    #: click options of that subcommand (decorators, applied in order)
    cli_options: ClassVar[tuple] = ()

    def parse(self, args: dict) -> Any:
        """Validate ``args``; raise :class:`CommandError` (BAD_FIELD) on anything off.
        Arguments a command does not know are ignored (as the protocol has always done)."""
        return None

    @abc.abstractmethod
    def execute(self, server: Server, call: Call, parsed: Any) -> dict | None:
        """The REPLY's result, or None when the server answers later."""


#: name -> command, every command this package holds
COMMANDS: dict[str, Command] = {}


def command(cls: type[Command]) -> type[Command]:
    """Register a command class (one instance serves every request)."""
    if not cls.name or cls.name in COMMANDS:
        raise ValueError(f"command {cls.__name__}: name {cls.name!r} missing or taken")
    if cls.cli and not callable(getattr(cls, "console", None)):
        raise ValueError(f"command {cls.__name__}: busctl offers it ({cls.cli!r}) but it has no console()")
    COMMANDS[cls.name] = cls()
    return cls


def page_arg(args: dict, name: str, default: int | None = 0) -> int | None:
    """The optional ``page`` argument (the only one ``stats`` and ``agents`` read)."""
    page = args.get("page", default)
    if page is None and default is None:  # a command whose page may be left out says so with its default
        return None
    if type(page) is not int or page < 0:
        raise CommandError(ErrorCode.BAD_FIELD, f"{name}'s page must be a non-negative integer")
    return page


def markdown_table() -> str:
    """docs/protocol.md's CONTROL table, from the commands themselves."""
    rows = ["| command | args | result |", "|---|---|---|"]
    rows += [f"| `{c.name}` | {c.args_doc} | {c.result_doc} |" for c in COMMANDS.values()]
    return "\n".join(rows)


def _load() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_load()
