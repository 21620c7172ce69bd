"""Health files, for probes that run beside the agents (Kubernetes exec probes, a
systemd watchdog script): each agent process (``bus-agent --health-dir DIR``) keeps
``DIR/<its id>.json`` up to date, at most once a second, from its own loop:

    {"pid": 7, "registered": true, "steps": 4120, "updated": 8812.5, "stepped": 8812.4}

``updated`` and ``stepped`` are this machine's monotonic clock (CLOCK_MONOTONIC, shared by
every process on it, immune to the wall clock being set): when the loop last ran, and
when the step count last grew.

``python -m agentbus_zmq.agents.health DIR`` checks them (exit 0, or 1 with one line):

- liveness (the default): every file was updated within ``--max-age`` seconds: each
  process's loop is turning, whether or not the coordinator is reachable (an agent waits
  for its coordinator; restarting it would not help);
- ``--stepping`` (readiness): and every process is registered and stepped within
  ``--max-age`` seconds.

Nothing here reads the network: a probe costs one directory listing.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import click

__all__ = ["HealthFile", "check"]

#: Seconds between writes of one health file, at most.
WRITE_EVERY_S = 1.0


class HealthFile:
    """One process's health file, rewritten (atomically: a rename) at most every
    WRITE_EVERY_S seconds: its loop asks :meth:`due` every turn (one comparison) and
    gathers what :meth:`write` needs only when it is."""

    def __init__(self, directory: str | os.PathLike, name: str):
        self.path = Path(directory) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.json"
        self._tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        self._written = -float("inf")
        self._steps: int | None = None
        self._stepped: float | None = None

    def due(self, now: float) -> bool:
        return now - self._written >= WRITE_EVERY_S

    def write(self, now: float, registered: bool, steps: int) -> None:
        """The count grew since the last write: it stepped (to within WRITE_EVERY_S)."""
        if self._steps is not None and steps != self._steps:
            self._stepped = now
        self._steps, self._written = steps, now
        body = {"pid": os.getpid(), "registered": registered, "steps": steps, "updated": now, "stepped": self._stepped}
        try:
            self._tmp.write_text(json.dumps(body))
            os.replace(self._tmp, self.path)
        except OSError:  # a full or read-only disk must not stop the agent: the probe says stale
            pass


def check(directory: str | os.PathLike, max_age: float, stepping: bool, now: float) -> str | None:
    """What is wrong with the processes whose files are in ``directory`` (one line), or None."""
    files = sorted(Path(directory).glob("*.json"))
    if not files:
        return f"no health files in {directory}: no agent process has started its loop"
    for path in files:
        try:
            state = json.loads(path.read_text())
            updated, stepped, registered = float(state["updated"]), state["stepped"], bool(state["registered"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{path.name}: unreadable ({type(exc).__name__})"
        if now - updated > max_age:
            return f"{path.name}: its loop has not turned for {now - updated:.0f} s (more than {max_age:g})"
        if stepping and not registered:
            return f"{path.name}: not registered with the coordinator"
        if stepping and (stepped is None or now - float(stepped) > max_age):
            return f"{path.name}: no step for more than {max_age:g} s"
    return None


@click.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--max-age", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds since each process's last loop turn (and, with --stepping, its last step).")
@click.option("--stepping", is_flag=True, help="Also require every process registered and stepping (readiness).")
def main(directory: str, max_age: float, stepping: bool) -> None:
    """Exit 0 if the agent processes writing health files in DIRECTORY are alive (and,
    with --stepping, registered and stepping); else 1, with what is wrong."""
    problem = check(directory, max_age, stepping, time.monotonic())
    if problem:
        click.echo(problem, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
