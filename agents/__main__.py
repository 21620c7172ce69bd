"""``bus-agent``: run one agent (or ``--replicas N`` forked agents) against a coordinator."""

from __future__ import annotations

import os
import socket
import sys

import click

from agentbus_zmq.agents.kinds import kind_help, kind_param
from agentbus_zmq.agents.kinds.explorer import BACKENDS
from agentbus_zmq.agents.layout import PerHost
from agentbus_zmq.agents.restarts import RestartPolicy
from agentbus_zmq.bus.config import (DEFAULT_ENDPOINT, DEFAULTS, LOG_LEVELS, configure_logging, dotenv_defaults,
                                     limit_threads, show_environment, version_option)

_ENV = {
    "endpoint": "BUS_ENDPOINT",
    "agent_id": "BUS_AGENT_ID",
    "kind": "BUS_AGENT_KIND",
    "backend": "BUS_BACKEND",
    "policy_len": "BUS_POLICY_LEN",
    "model": "BUS_MODEL",
    "max_model_mb": "BUS_MAX_MODEL_MB",
    "replicas": "BUS_AGENT_REPLICAS",
    "per_host": "BUS_AGENT_PER_HOST",
    "lanes": "BUS_AGENT_LANES",
    "heartbeat": "BUS_HEARTBEAT",
    "seed": "BUS_SEED",
    "log_level": "BUS_LOG_LEVEL",
    "curve_server_key": "BUS_CURVE_SERVER_KEY",
    "curve_key": "BUS_CURVE_KEY",
    "sched": "BUS_AGENT_SCHED",
    "restart": "BUS_AGENT_RESTART",
    "spin_us": "BUS_AGENT_SPIN_US",
    "max_restarts": "BUS_AGENT_MAX_RESTARTS",
    "restart_period": "BUS_AGENT_RESTART_PERIOD",
    "restart_backoff": "BUS_AGENT_RESTART_BACKOFF",
    "health_dir": "BUS_AGENT_HEALTH_DIR",
}
_POLICY = RestartPolicy()

def client_keys(server_key: str | None, key: str | None):
    """CURVE keys from the two options, or None when neither is given."""
    from agentbus_zmq.bus.security import ClientKeys

    return ClientKeys.from_options(server_key, key)


def default_agent_id() -> str:
    """``$HONCHO_PROCESS_NAME`` (``agent.3`` under honcho), else ``host-pid``."""
    return os.environ.get("HONCHO_PROCESS_NAME") or f"{socket.gethostname()}-{os.getpid()}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@version_option()
@click.option("--endpoint", envvar=_ENV["endpoint"], default=DEFAULT_ENDPOINT, show_default=True,
              help="Coordinator endpoint to connect to.")
@click.option("--id", "agent_id", envvar=_ENV["agent_id"], default=None,
              help="Agent id [default: $HONCHO_PROCESS_NAME, else host-pid]; with --replicas, ID-1 .. ID-N.")
@click.option("--kind", envvar=_ENV["kind"], type=kind_param(), default="explorer", show_default=True,
              help=kind_help())
@click.option("--backend", envvar=_ENV["backend"], type=click.Choice(BACKENDS), default=BACKENDS[0],
              show_default=True, help="Explorer inference backend.")
@click.option("--policy-len", envvar=_ENV["policy_len"], type=click.IntRange(1, 8), default=1, show_default=True,
              help="Explorer: moves each policy plans ahead (5 ** L policies: a step's cost grows with it).")
@click.option("--model", envvar=_ENV["model"], type=click.Path(exists=True, dir_okay=False), default=None,
              help="Explorer: an .npz of A0, A1, B0, C0, C1, D0 (and E) to use instead of the model built from "
                   "the world; checked against the world in WELCOME.")
@click.option("--max-model-mb", envvar=_ENV["max_model_mb"], type=click.IntRange(1, 1 << 20), default=1024,
              show_default=True, help="Explorer, learner: the memory their model and planning may take, estimated "
                                      "from WELCOME before anything is allocated; a WELCOME that needs more is "
                                      "refused (BYE, exit 3).")
@click.option("--replicas", envvar=_ENV["replicas"], type=click.IntRange(1, 1_000_000), default=1, show_default=True,
              help="Run this many agents, forked from one prepared parent (one process each, or --per-host).")
@click.option("--per-host", envvar=_ENV["per_host"], type=PerHost(), default="1", show_default=True,
              help="With --replicas: agents per process. K runs them in ceil(N / K) agent hosts (one frame "
                   "per host per tick); auto: enough hosts to fill the cores, and no more.")
@click.option("--lanes", envvar=_ENV["lanes"], type=click.IntRange(1, 16), default=1, show_default=True,
              help="With --per-host: each host process registers its agents as this many hosts (lanes) and steps "
                   "one lane while the others' answers travel, so its core does not wait on the round trip.")
@click.option("--heartbeat", envvar=_ENV["heartbeat"], type=float, default=DEFAULTS.heartbeat, show_default=True,
              help="Seconds between heartbeats; the coordinator silent for 3 of them is taken for gone (and "
                   "rejoined). Give every process the same.")
@click.option("--sched", envvar=_ENV["sched"], type=click.Choice(["batch", "default"]), default="batch",
              show_default=True, help="Linux scheduling policy: batch (CPU-bound, no wakeup preemption) or default.")
@click.option("--restart/--no-restart", envvar=_ENV["restart"], default=False, show_default=True,
              help="Fork an agent that died again, under the same id, backing off from --restart-backoff "
                   "seconds (doubling, at most 30 s).")
@click.option("--max-restarts", envvar=_ENV["max_restarts"], type=click.IntRange(0), default=_POLICY.intensity,
              show_default=True, help="With --restart: give up (stop all, exit 1) when one agent dies more than "
                                      "this often within --restart-period.")
@click.option("--restart-period", envvar=_ENV["restart_period"], type=click.FloatRange(0, min_open=True),
              default=_POLICY.period, show_default=True, help="Seconds over which --max-restarts counts.")
@click.option("--restart-backoff", envvar=_ENV["restart_backoff"], type=click.FloatRange(0, min_open=True),
              default=_POLICY.backoff_min, show_default=True, help="Seconds before the first restart.")
@click.option("--spin-us", envvar=_ENV["spin_us"], type=click.IntRange(0, 1_000_000), default=0, show_default=True,
              help="After each action, busy-poll this many microseconds for the next observation before "
                   "sleeping. Keeps a core hot when every agent has one; costs CPU otherwise (0: never).")
@click.option("--max-steps", type=int, default=0, help="Stop after this many steps (0: run until signalled).")
@click.option("--seed", envvar=_ENV["seed"], type=int, default=0, show_default=True,
              help="Seed of the agent's own choices, mixed with its id: agents of one seed still differ.")
@click.option("--curve-server-key", envvar=_ENV["curve_server_key"], type=click.Path(exists=True, dir_okay=False),
              default=None, help="Use CURVE: the coordinator's public .key file.")
@click.option("--curve-key", envvar=_ENV["curve_key"], type=click.Path(exists=True, dir_okay=False), default=None,
              help="With --curve-server-key: this agent's .key_secret file.")
@click.option("--health-dir", envvar=_ENV["health_dir"], type=click.Path(file_okay=False, writable=True),
              default=None, help="Each agent process keeps a health file here (its id.json, once a second) for "
                                 "probes: python -m agentbus_zmq.agents.health DIR [--stepping].")
@click.option("--log-level", envvar=_ENV["log_level"], type=click.Choice(LOG_LEVELS, case_sensitive=False),
              default="INFO", show_default=True, help="Log lines at this level and above, to stderr.")
def cli(endpoint, agent_id, kind, backend, policy_len, model, max_model_mb, replicas, per_host, lanes, heartbeat, sched, restart, max_restarts,
        restart_period, restart_backoff, spin_us, max_steps, seed, curve_server_key, curve_key, health_dir, log_level):
    """Run agentbus agents: connect, say HELLO, step on every observation, until signalled."""
    configure_logging(log_level)
    from agentbus_zmq.agents.kinds import KindUnavailable, create, kind_options
    from agentbus_zmq.agents.launcher import launch
    from agentbus_zmq.agents.layout import AUTO, auto_per_host
    from agentbus_zmq.bus.protocol import Hello, ProtocolError
    from agentbus_zmq.bus.sockets import check_endpoint

    options = kind_options(kind, backend=backend, policy_len=policy_len, seed=seed, model=model,
                           max_model_mb=max_model_mb)
    if model is not None and "model" not in options:
        raise click.UsageError(f"--model is for kinds that take a model (explorer); {kind} does not")
    if model is not None:
        try:
            create(kind, **options)  # a model file that cannot be used is one line now, not in every child
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    agent_id = agent_id or default_agent_id()
    try:  # the longest id the replicas will use, checked before anything forks
        Hello.from_wire([agent_id if replicas == 1 else f"{agent_id}-{replicas}", kind, 0])
        Hello.from_wire([f"{agent_id}-host{replicas}-{lanes}", kind, 0])
    except ProtocolError as exc:
        raise click.UsageError(f"invalid agent id: {exc.reason}") from None
    try:
        check_endpoint(endpoint)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if health_dir:
        try:
            os.makedirs(health_dir, exist_ok=True)
        except OSError as exc:
            raise click.BadParameter(f"cannot create {health_dir}: {exc.strerror}", param_hint="--health-dir") from None
        from agentbus_zmq.agents.health import check_directory

        try:
            check_directory(health_dir)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--health-dir") from None
    try:
        curve = client_keys(curve_server_key, curve_key)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    policy = RestartPolicy(backoff_min=restart_backoff, backoff_max=max(restart_backoff, _POLICY.backoff_max),
                           intensity=max_restarts, period=restart_period)
    try:
        if per_host == AUTO:
            per_host = auto_per_host(replicas, len(os.sched_getaffinity(0)))
        if per_host == 1 and replicas > 4096:
            raise click.UsageError(f"{replicas} agent processes is too many for one launcher: "
                                   "give --per-host K or --per-host auto")
        status = launch(lambda: create(kind, **options), endpoint, agent_id, replicas, per_host, batch=sched == "batch",
                        restart=restart, policy=policy, lanes=lanes, heartbeat=heartbeat, max_steps=max_steps, curve=curve,
                        spin=spin_us / 1e6, health_dir=health_dir)
    except KindUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(status)


show_environment(cli)


def main(argv: list[str] | None = None) -> None:
    limit_threads()
    cli.main(args=argv, prog_name="bus-agent", default_map=dotenv_defaults(_ENV))


if __name__ == "__main__":
    main()
