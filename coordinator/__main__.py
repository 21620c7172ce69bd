"""``bus-coordinator``: run the coordinator until SIGINT or SIGTERM."""

from __future__ import annotations

import logging
import os
import sys

import click
import zmq

from agentbus_zmq.bus.config import (DEFAULT_ENDPOINT, DEFAULTS, LOG_LEVELS, configure_logging, dotenv_defaults,
                                     show_environment, version_option)
from agentbus_zmq.bus.security import ServerKeys
from agentbus_zmq.bus.sockets import check_endpoint
from agentbus_zmq.coordinator.settings import LOCKSTEP_SCOPES, MODES, ConfigError, Settings
from agentbus_zmq.coordinator.grid import RANGES, WorldConfig
from agentbus_zmq.coordinator.worlds import WorldSpec, WorldUnavailable, available_worlds, parse_world_args

_ENV = {
    "bind": "BUS_ENDPOINT",
    "mode": "BUS_MODE",
    "lockstep_scope": "BUS_LOCKSTEP_SCOPE",
    "deadline": "BUS_DEADLINE",
    "member_deadline": "BUS_MEMBER_DEADLINE",
    "heartbeat": "BUS_HEARTBEAT",
    "world": "BUS_WORLD",
    "world_arg": "BUS_WORLD_ARGS",
    "width": "BUS_WORLD_WIDTH",
    "height": "BUS_WORLD_HEIGHT",
    "obstacles": "BUS_WORLD_OBSTACLES",
    "goals": "BUS_WORLD_GOALS",
    "seed": "BUS_SEED",
    "arena_agents": "BUS_ARENA_AGENTS",
    "max_arenas": "BUS_MAX_ARENAS",
    "log_level": "BUS_LOG_LEVEL",
    "curve_secret": "BUS_CURVE_SECRET",
    "curve_clients": "BUS_CURVE_CLIENTS",
    "spin_us": "BUS_COORDINATOR_SPIN_US",
    "setup_grace": "BUS_SETUP_GRACE",
    "max_pending": "BUS_MAX_PENDING",
    "drop_after": "BUS_DROP_AFTER",
    "metrics": "BUS_METRICS",
    "alert_threshold": "BUS_ALERT_THRESHOLD",
    "alert_for": "BUS_ALERT_FOR",
    "alert_hook": "BUS_ALERT_HOOK",
    "efficiency_window": "BUS_EFFICIENCY_WINDOW",
    "agent_cores": "BUS_AGENT_CORES",
}

_WORLD = WorldConfig()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@version_option()
@click.option("--bind", envvar=_ENV["bind"], default=DEFAULT_ENDPOINT, show_default=True,
              help="Endpoint to bind the ROUTER on (tcp://host:port or ipc:///path).")
@click.option("--mode", envvar=_ENV["mode"], type=click.Choice(MODES), default=DEFAULTS.mode, show_default=True,
              help="lockstep: ticks close when every agent answered; async: each agent steps on its own.")
@click.option("--lockstep-scope", envvar=_ENV["lockstep_scope"], type=click.Choice(LOCKSTEP_SCOPES), default="world",
              show_default=True, help="lockstep over the whole world, or per arena: agents that share no arena "
                                      "(directly or through a host's members) tick independently.")
@click.option("--deadline", envvar=_ENV["deadline"], type=float, default=DEFAULTS.deadline, show_default=True,
              help="Seconds a tick (or, async, an observation) waits for answers.")
@click.option("--member-deadline", envvar=_ENV["member_deadline"], type=click.FloatRange(min=0),
              default=DEFAULTS.member_deadline, show_default=True,
              help="Seconds an agent host's frame waits in addition, per member it carries (its agents step in "
                   "turn): a host of K agents gets --deadline + K x this.")
@click.option("--heartbeat", envvar=_ENV["heartbeat"], type=float, default=DEFAULTS.heartbeat, show_default=True,
              help=f"Heartbeat interval in seconds; a peer silent for {DEFAULTS.liveness} intervals is dead.")
@click.option("--world", envvar=_ENV["world"], default="grid", show_default=True,
              help=f"The world: {', '.join(available_worlds())} (found here), pettingzoo:MODULE (a PettingZoo "
                   f"environment module), or package.module:factory (docs/worlds.md).")
@click.option("--world-arg", "world_arg", envvar=_ENV["world_arg"], multiple=True, metavar="KEY=VALUE",
              help="An argument for the world's factory (repeatable; VALUE read as JSON where it parses, e.g. 3, "
                   "false, null, else as a string; in BUS_WORLD_ARGS, several separated by spaces).")
@click.option("--width", envvar=_ENV["width"], type=click.IntRange(*RANGES["width"]), default=_WORLD.width, show_default=True,
              help="Grid world: width in cells.")
@click.option("--height", envvar=_ENV["height"], type=click.IntRange(*RANGES["height"]), default=_WORLD.height, show_default=True,
              help="Grid world: height in cells.")
@click.option("--obstacles", envvar=_ENV["obstacles"], type=click.IntRange(*RANGES["obstacles"]), default=_WORLD.obstacles,
              show_default=True, help="Grid world: cells no agent may enter, placed by --seed.")
@click.option("--goals", envvar=_ENV["goals"], type=click.IntRange(*RANGES["goals"]), default=_WORLD.goals, show_default=True,
              help="Grid world: goal cells (an agent on one observes found = 1), placed by --seed.")
@click.option("--seed", envvar=_ENV["seed"], type=click.IntRange(*RANGES["seed"]), default=_WORLD.seed, show_default=True,
              help="World layout and placement seed (same seed, same world).")
@click.option("--arena-agents", envvar=_ENV["arena_agents"], type=click.IntRange(*RANGES["arena_agents"]), default=_WORLD.arena_agents,
              show_default=True, help="Agents per arena (a copy of the world) at most; 0: every free cell. "
                                      "More agents open more arenas.")
@click.option("--max-arenas", envvar=_ENV["max_arenas"], type=click.IntRange(*RANGES["max_arenas"]), default=_WORLD.max_arenas,
              show_default=True, help="Arenas the coordinator may open; past that, agents get WORLD_FULL.")
@click.option("--endpoint-file", type=click.Path(dir_okay=False), default=None,
              help="Write the endpoint actually bound here (useful with a wildcard port, tcp://127.0.0.1:*).")
@click.option("--curve-secret", envvar=_ENV["curve_secret"], type=click.Path(exists=True, dir_okay=False),
              default=None, help="Turn CURVE on: the coordinator's .key_secret file (bus-keys writes one).")
@click.option("--curve-clients", envvar=_ENV["curve_clients"], type=click.Path(exists=True, file_okay=False),
              default=None, help="With --curve-secret: directory of the client public keys allowed (*.key).")
@click.option("--spin-us", envvar=_ENV["spin_us"], type=click.IntRange(0, 1_000_000), default=0, show_default=True,
              help="After each message, busy-poll this many microseconds before sleeping: answers sooner "
                   "when the coordinator has a core to itself; costs CPU otherwise (0: never).")
@click.option("--setup-grace", envvar=_ENV["setup_grace"], type=click.FloatRange(min=0, min_open=True),
              default=Settings.setup_grace, show_default=True,
              help="Seconds from HELLO until a registration must say it is ready; past it, it is dropped and "
                   "its cells freed (repeating HELLO does not extend it).")
@click.option("--max-pending", envvar=_ENV["max_pending"], type=click.IntRange(1), default=Settings.max_pending,
              show_default=True, help="Agents registered and not yet ready, at most (a host counts its "
                                      "members), and half that from one CURVE key or address; more are refused "
                                      "with BUSY and retried by the agents.")
@click.option("--drop-after", envvar=_ENV["drop_after"], type=click.IntRange(0), default=Settings.drop_after,
              show_default=True, help="Drop an agent (or host) from the schedule after this many deadlines in a "
                                      "row that it missed or answered late or slowly (after 80% of the "
                                      "deadline); it may rejoin (bus-agent does at once). 0: never.")
@click.option("--metrics", envvar=_ENV["metrics"], default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9464). Off by default.")
@click.option("--efficiency-window", envvar=_ENV["efficiency_window"], type=click.FloatRange(min=0, min_open=True),
              default=Settings.efficiency_window, show_default=True,
              help="Seconds over which the live efficiency is computed.")
@click.option("--agent-cores", envvar=_ENV["agent_cores"], default="auto", show_default=True,
              help="Cores the agents can use (C in min(N, C)): a number, or auto (this machine's, for local agents).")
@click.option("--alert-threshold", envvar=_ENV["alert_threshold"], type=click.FloatRange(0, 1),
              default=Settings.alert_threshold, show_default=True,
              help="Raise the efficiency alert when efficiency stays below this ...")
@click.option("--alert-for", envvar=_ENV["alert_for"], type=click.FloatRange(min=0), default=Settings.alert_for,
              show_default=True, help="... for this many seconds (it is then logged once, the gauge set, and the "
                                      "hook run; again when it clears).")
@click.option("--alert-hook", envvar=_ENV["alert_hook"], default=None, metavar="COMMAND",
              help="Run COMMAND when the alert is raised or cleared, with BUS_ALERT_STATE, BUS_ALERT_EFFICIENCY, "
                   "BUS_ALERT_CAUSE ... in its environment.")
@click.option("--log-level", envvar=_ENV["log_level"], type=click.Choice(LOG_LEVELS, case_sensitive=False),
              default="INFO", show_default=True, help="Log lines at this level and above, to stderr.")
def cli(bind, mode, lockstep_scope, deadline, member_deadline, heartbeat, world, world_arg, width, height, obstacles, goals, seed, arena_agents, max_arenas,
        endpoint_file, curve_secret, curve_clients, spin_us, setup_grace, max_pending, drop_after, metrics,
        efficiency_window, agent_cores, alert_threshold, alert_for, alert_hook, log_level):
    """Run the agentbus coordinator: it owns the world, the schedule and the registry."""
    configure_logging(log_level)
    from agentbus_zmq.coordinator.driver import EXIT_CORE_FAILED, CoreFailed, serve

    try:
        if agent_cores == "auto":
            agent_cores = len(os.sched_getaffinity(0))
        elif not agent_cores.isdigit() or int(agent_cores) < 1:
            raise ValueError(f"--agent-cores takes a positive number or auto, not {agent_cores!r}")
        settings = Settings(mode=mode, lockstep_scope=lockstep_scope, deadline=deadline, member_deadline=member_deadline, heartbeat=heartbeat, setup_grace=setup_grace,
                            max_pending=max_pending, drop_after=drop_after, efficiency_window=efficiency_window,
                            agent_cores=int(agent_cores), alert_threshold=alert_threshold, alert_for=alert_for)
        if metrics is not None:
            from agentbus_zmq.coordinator.prometheus import parse_address

            parse_address(metrics)
        spec = world_spec(world, world_arg, width=width, height=height, obstacles=obstacles, goals=goals, seed=seed,
                          arena_agents=arena_agents, max_arenas=max_arenas)
        world = spec.build()
        check_endpoint(bind)
        curve = None
        if curve_secret or curve_clients:
            if not (curve_secret and curve_clients):
                raise ValueError("CURVE needs both --curve-secret and --curve-clients")
            curve = ServerKeys.load(curve_secret, curve_clients)
    except (ValueError, WorldUnavailable) as exc:
        raise click.UsageError(str(exc)) from None
    _raise_fd_limit()
    try:
        serve(bind, settings, world, endpoint_file=endpoint_file, curve=curve, spin=spin_us / 1e6, metrics=metrics,
              alert_hook=alert_hook)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    except CoreFailed as exc:
        logging.getLogger(__name__).critical("%s: exiting with status %d so that a supervisor restarts the "
                                             "coordinator (its log above has the first traceback)", exc,
                                             EXIT_CORE_FAILED)
        sys.exit(EXIT_CORE_FAILED)
    except zmq.ZMQError as exc:
        hint = (" Another coordinator (or program) holds it: stop that one, or choose another --bind."
                if exc.errno == zmq.EADDRINUSE else "")
        raise click.ClickException(f"cannot bind {bind}: {exc.strerror}.{hint}") from None


def world_spec(name: str, pairs, **grid) -> WorldSpec:
    """The world the options name: the grid options (``--width`` ...) are the grid's
    arguments; every world gets ``--seed`` and ``--max-arenas`` if it takes them; a
    ``--world-arg`` wins over both."""
    args = parse_world_args(pairs)
    if name == "grid":
        return WorldSpec("grid", {**grid, **args})
    return WorldSpec(name, args).with_defaults(seed=grid["seed"], max_arenas=grid["max_arenas"])


def _raise_fd_limit() -> None:
    """Each agent or host connection takes a file descriptor: use all the process may."""
    import logging
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logging.getLogger(__name__).debug("cannot raise the file descriptor limit to %s: %s", hard, exc)
            return
    logging.getLogger(__name__).debug("file descriptors: up to %s", hard)


show_environment(cli)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="bus-coordinator", default_map=dotenv_defaults(_ENV, multiple=("world_arg",)))


if __name__ == "__main__":
    sys.exit(main())
