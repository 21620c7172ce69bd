"""``bus-agent``: run one agent (or ``--replicas N`` forked agents) against a coordinator."""

from __future__ import annotations

import os
import socket
import sys

import click

from agentbus_zmq.bus.config import DEFAULT_ENDPOINT, configure_logging, dotenv_defaults, limit_threads

_ENV = {
    "endpoint": "BUS_ENDPOINT",
    "agent_id": "BUS_AGENT_ID",
    "kind": "BUS_AGENT_KIND",
    "backend": "BUS_BACKEND",
    "policy_len": "BUS_POLICY_LEN",
    "replicas": "BUS_AGENT_REPLICAS",
    "heartbeat": "BUS_HEARTBEAT",
    "seed": "BUS_SEED",
    "log_level": "BUS_LOG_LEVEL",
    "curve_server_key": "BUS_CURVE_SERVER_KEY",
    "curve_key": "BUS_CURVE_KEY",
    "sched": "BUS_AGENT_SCHED",
    "restart": "BUS_AGENT_RESTART",
    "spin_us": "BUS_AGENT_SPIN_US",
}

def client_keys(server_key: str | None, key: str | None):
    """CURVE keys from the two options, or None when neither is given."""
    if not (server_key or key):
        return None
    if not (server_key and key):
        raise ValueError("CURVE needs both --curve-server-key and --curve-key")
    from agentbus_zmq.bus.security import ClientKeys

    return ClientKeys.load(server_key, key)


def default_agent_id() -> str:
    """``$HONCHO_PROCESS_NAME`` (``agent.3`` under honcho), else ``host-pid``."""
    return os.environ.get("HONCHO_PROCESS_NAME") or f"{socket.gethostname()}-{os.getpid()}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--endpoint", envvar=_ENV["endpoint"], default=DEFAULT_ENDPOINT, show_default=True,
              help="Coordinator endpoint to connect to.")
@click.option("--id", "agent_id", envvar=_ENV["agent_id"], default=None,
              help="Agent id [default: $HONCHO_PROCESS_NAME, else host-pid]; with --replicas, ID-1 .. ID-N.")
@click.option("--kind", envvar=_ENV["kind"], type=click.Choice(["explorer", "null"]), default="explorer",
              show_default=True)
@click.option("--backend", envvar=_ENV["backend"], type=click.Choice(["numpy", "jax"]), default="numpy",
              show_default=True, help="Explorer inference backend.")
@click.option("--policy-len", envvar=_ENV["policy_len"], type=click.IntRange(1, 8), default=1, show_default=True)
@click.option("--replicas", envvar=_ENV["replicas"], type=click.IntRange(1, 4096), default=1, show_default=True,
              help="Fork this many agent processes from one prepared parent.")
@click.option("--heartbeat", envvar=_ENV["heartbeat"], type=float, default=0.5, show_default=True)
@click.option("--sched", envvar=_ENV["sched"], type=click.Choice(["batch", "default"]), default="batch",
              show_default=True, help="Linux scheduling policy: batch (CPU-bound, no wakeup preemption) or default.")
@click.option("--restart/--no-restart", envvar=_ENV["restart"], default=False, show_default=True,
              help="With --replicas: fork an agent that died again, under the same id.")
@click.option("--spin-us", envvar=_ENV["spin_us"], type=click.IntRange(0, 1_000_000), default=0, show_default=True,
              help="After each action, busy-poll this many microseconds for the next observation before "
                   "sleeping. Keeps a core hot when every agent has one; costs CPU otherwise (0: never).")
@click.option("--max-steps", type=int, default=0, help="Stop after this many steps (0: run until signalled).")
@click.option("--seed", envvar=_ENV["seed"], type=int, default=0, show_default=True)
@click.option("--curve-server-key", envvar=_ENV["curve_server_key"], type=click.Path(exists=True, dir_okay=False),
              default=None, help="Use CURVE: the coordinator's public .key file.")
@click.option("--curve-key", envvar=_ENV["curve_key"], type=click.Path(exists=True, dir_okay=False), default=None,
              help="With --curve-server-key: this agent's .key_secret file.")
@click.option("--log-level", envvar=_ENV["log_level"], default="INFO", show_default=True)
def cli(endpoint, agent_id, kind, backend, policy_len, replicas, heartbeat, sched, restart, spin_us, max_steps, seed,
        curve_server_key, curve_key, log_level):
    """Run agentbus agents: connect, say HELLO, step on every observation, until signalled."""
    configure_logging(log_level)
    from agentbus_zmq.agents.kinds import create
    from agentbus_zmq.agents.launcher import launch
    from agentbus_zmq.bus.protocol import Hello, ProtocolError
    from agentbus_zmq.bus.sockets import check_endpoint

    options = {"backend": backend, "policy_len": policy_len, "seed": seed} if kind == "explorer" else {}
    agent_id = agent_id or default_agent_id()
    try:  # the longest id the replicas will use, checked before anything forks
        Hello.from_wire([agent_id if replicas == 1 else f"{agent_id}-{replicas}", kind, 0])
    except ProtocolError as exc:
        raise click.UsageError(f"invalid agent id: {exc.reason}") from None
    try:
        check_endpoint(endpoint)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        curve = client_keys(curve_server_key, curve_key)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(launch(lambda: create(kind, **options), endpoint, agent_id, replicas,
                    batch=sched == "batch", restart=restart, heartbeat=heartbeat, max_steps=max_steps, curve=curve,
                    spin=spin_us / 1e6))


def main(argv: list[str] | None = None) -> None:
    limit_threads()
    cli.main(args=argv, prog_name="bus-agent", default_map=dotenv_defaults(_ENV))


if __name__ == "__main__":
    main()
