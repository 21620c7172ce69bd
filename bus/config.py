"""Configuration: one precedence rule for every entry point.

command line  >  process environment  >  ``.env`` in the working directory  >  defaults

The command line and the environment are handled by click (each option names its
``BUS_*`` variable); ``.env`` values reach click as its ``default_map``, so they sit
exactly one step below the environment.  This is the same file honcho reads for the
Procfile, so an operator sets ``BUS_ENDPOINT`` once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

__all__ = ["DEFAULT_ENDPOINT", "MODES", "DEFAULTS", "Defaults", "read_dotenv", "dotenv_defaults",
           "configure_logging", "limit_threads", "set_batch_scheduling", "version_option"]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
#: The coordinator's schedules (docs/protocol.md).
MODES = ("lockstep", "async")


@dataclasses.dataclass(frozen=True)
class Defaults:
    """Every default that more than one process must agree on, in one place: the
    coordinator's Settings, the agent runtime, busbench and every command's ``--help``
    read them from here."""

    mode: str = "lockstep"
    #: seconds a tick (lock-step) or an observation (async) waits for its answer
    deadline: float = 1.0
    #: seconds a host's frame waits in addition, per member (its agents step in turn)
    member_deadline: float = 0.004
    #: heartbeat interval in seconds, both ways
    heartbeat: float = 0.5
    #: a peer silent for heartbeat x liveness seconds is presumed gone
    liveness: int = 3
    #: an agent's reconnection back-off, doubling from min to max (seconds)
    backoff_min: float = 0.05
    backoff_max: float = 2.0


DEFAULTS = Defaults()


def read_dotenv(path: str | os.PathLike = ".env") -> dict[str, str]:
    """``KEY=value`` pairs of a ``.env`` file, read by python-dotenv (comments, quotes,
    inline ``# comments``, ``export``); a missing or unreadable file is empty."""
    from dotenv import dotenv_values

    if not Path(path).is_file():
        return {}
    try:
        return {k: v for k, v in dotenv_values(path, interpolate=False).items() if v is not None}
    except (OSError, UnicodeDecodeError):
        return {}


def dotenv_defaults(options: dict[str, str], path: str | os.PathLike = ".env",
                    multiple: tuple[str, ...] = ()) -> dict:
    """click ``default_map`` from ``.env``: ``options`` maps parameter name -> variable.
    A repeatable option (``multiple``) is split on whitespace, as click splits its
    environment variable."""
    env = read_dotenv(path)
    return {param: env[var].split() if param in multiple else env[var] for param, var in options.items() if var in env}


#: What ``--log-level`` takes (any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def show_environment(command):
    """Have ``--help`` name each option's environment variable (``[env var: BUS_MODE]``):
    an operator writing ``.env`` or a unit's ``Environment=`` reads the names there."""
    import click

    for param in command.params:
        if isinstance(param, click.Option):
            param.show_envvar = True
    return command


def configure_logging(level: str = "INFO") -> None:
    """Configure logging for a process.  Called once, from ``main()`` only."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-5s %(name)s[%(process)d] %(message)s",
        stream=sys.stderr,
    )


#: Agents are single-threaded by design (one process per agent, no BLAS or XLA thread
#: pools fighting over the cores); set before numpy or JAX is first imported.
SINGLE_THREADED = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}


def limit_threads() -> None:
    """Keep numeric libraries single-threaded unless the environment says otherwise."""
    for var, value in SINGLE_THREADED.items():
        os.environ.setdefault(var, value)


def set_batch_scheduling() -> bool:
    """Mark this process (and what it forks) CPU-bound: Linux ``SCHED_BATCH``.

    Batch tasks do not preempt others on wakeup, so an agent's step runs to its end
    instead of being cut by another process's incoming message.  Measured with 10
    explorer agents on 2 cores: involuntary context switches per step 1.0 -> 0.3,
    lock-step throughput +17 % (docs/performance.md).  Needs no privilege; returns
    False where the policy does not exist.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        return True
    except (AttributeError, OSError):
        return False


def version_option():
    """Every command's ``--version``: the distribution's version and the wire protocol's,
    so an operator can tell which coordinator and agents may talk."""
    import click

    from agentbus_zmq.bus.protocol import PROTOCOL_VERSION

    return click.version_option(package_name="agentbus-zmq",
                                message=f"%(prog)s (agentbus-zmq %(version)s, protocol {PROTOCOL_VERSION})")
