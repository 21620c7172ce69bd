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

Nothing here reads the network: a probe costs one directory listing.  Both sides
assume the directory may be shared with someone hostile: the agent writes each file
through a temporary of an unpredictable name, created exclusively and never through a
link, then renamed over the file, and refuses a directory others may write to unless it
is sticky (``/tmp``'s mode); the probe opens only regular files, without blocking (a FIFO
named ``*.json`` cannot hold it), and reads a bounded amount of each.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
import sys
import time
from pathlib import Path

import click

__all__ = ["HealthFile", "check", "check_directory"]

#: Seconds between writes of one health file, at most.
WRITE_EVERY_S = 1.0
#: Bytes of a health file the probe reads at most, and files it reads at most.
MAX_FILE_BYTES = 4096
MAX_FILES = 100_000


def check_directory(directory: str | os.PathLike) -> None:
    """ValueError when ``directory`` is not a directory, or others may write to it and it
    is not sticky (anyone could then plant or remove the files an agent writes)."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise ValueError(f"health directory {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"health directory {directory} is not a directory")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise ValueError(f"health directory {directory} is writable by every user and not sticky: anyone could "
                         f"plant links there; use a directory of this user's (or chmod +t it)")


class HealthFile:
    """One process's health file, rewritten (atomically: a rename) at most every
    WRITE_EVERY_S seconds: its loop asks :meth:`due` every turn (one comparison) and
    gathers what :meth:`write` needs only when it is."""

    def __init__(self, directory: str | os.PathLike, name: str):
        check_directory(directory)
        self.path = Path(directory) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.json"
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
        tmp = self.path.with_name(f".{self.path.stem}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError:  # a full or read-only disk (or a name planted already) must not stop the agent
            return
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(body))
            os.replace(tmp, self.path)  # a rename replaces a link planted at the path; it never follows one
        except OSError:  # the probe says stale
            try:
                os.unlink(tmp)
            except OSError:
                pass


def check(directory: str | os.PathLike, max_age: float, stepping: bool, now: float) -> str | None:
    """What is wrong with the processes whose files are in ``directory`` (one line), or None."""
    try:
        files = sorted(Path(directory).glob("*.json"))
    except OSError as exc:
        return f"cannot list {directory}: {exc.strerror}"
    if not files:
        return f"no health files in {directory}: no agent process has started its loop"
    if len(files) > MAX_FILES:
        return f"{len(files):,} health files in {directory}: more than {MAX_FILES:,}"
    for path in files:
        try:
            state = json.loads(_read(path))
            updated, stepped, registered = float(state["updated"]), state["stepped"], bool(state["registered"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{path.name}: unreadable ({exc if isinstance(exc, _NotRegular) else type(exc).__name__})"
        if now - updated > max_age:
            return f"{path.name}: its loop has not turned for {now - updated:.0f} s (more than {max_age:g})"
        if stepping and not registered:
            return f"{path.name}: not registered with the coordinator"
        if stepping and (stepped is None or now - float(stepped) > max_age):
            return f"{path.name}: no step for more than {max_age:g} s"
    return None


class _NotRegular(OSError):
    pass


def _read(path: Path) -> str:
    """At most MAX_FILE_BYTES of ``path`` if it is a regular file (not a link, a FIFO, a
    device): opened without blocking or following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _NotRegular("a link, not a file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _NotRegular("not a regular file")
        return os.read(fd, MAX_FILE_BYTES).decode("utf-8", "replace")
    finally:
        os.close(fd)


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
