"""The coordinator's per-step cost in-process: the core and its decoding, no sockets.

N agents (or hosts of K) answer every observation at once with ``stay``; the loop feeds
the core their encoded ACTIONs and decodes nothing it sends (an agent's decode is the
agent's cost).  It prints the core's wall time per agent-step, the median of
``--repeat`` rounds::

    python -m agentbus_zmq.busbench.corebench --agents 20 --mode lockstep

This is the figure issue reviews quote as "the coordinator's in-process N-agent path";
it is deterministic in what it does, so two builds compare by running it alternately.
"""

from __future__ import annotations

import json
import statistics
import time

import click
import numpy as np

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.config import MODES


def _round(mode: str, agents: int, per_host: int, steps: int) -> float:
    from agentbus_zmq.coordinator.core import CoordinatorCore, Settings

    core = CoordinatorCore(Settings(mode=mode, deadline=60.0, heartbeat=60.0), session="bench")
    now = 1.0
    core.on_timer(now)
    peers = []
    if per_host <= 1:
        for i in range(agents):
            peer = b"p%d" % i
            core.on_frames(peer, [P.encode(P.Hello(f"a{i}", "bench", 1))], now)
            peers.append(peer)
    else:
        for j, first in enumerate(range(0, agents, per_host)):
            peer = b"h%d" % j
            count = min(per_host, agents - first)
            core.on_frames(peer, [P.encode(P.HostHello(f"h{j}", "bench", 1, "a", first, count))], now)
            peers.append(peer)
    for peer in peers:
        core.on_frames(peer, [P.encode(P.Heartbeat())], now)
    # Answers are encoded once per tick number: the agents' own encoding is not measured
    # (their decoding of the observation, ~1 us, is: the same in every build).
    actions: dict[int, bytes] = {}
    answered = 0
    start = time.perf_counter()
    while answered < steps:
        out = core.take_outbox()
        if not out:
            break
        for peer, frame in out:
            obj = P.unpack(frame)
            if obj[1] == P.MsgType.OBSERVATION:
                frame = actions.get(obj[2])
                if frame is None:
                    frame = actions[obj[2]] = P.encode(P.Action(obj[2], 4, 1))
                core.on_frames(peer, [frame], now)
                answered += 1
            elif obj[1] == P.MsgType.HOST_OBSERVATION:
                n = len(obj[3])
                core.on_frames(peer, [P.encode(P.HostAction(obj[2], np.full(n, 4, np.uint8), 1))], now)
                answered += n
    elapsed = time.perf_counter() - start
    if answered < steps or not core.ledger.balanced():
        raise SystemExit(f"{answered} of {steps} steps answered; ledger {core.ledger.snapshot()}")
    return elapsed / max(answered, 1) * 1e6


@click.command()
@click.option("--agents", type=click.IntRange(1), default=20, show_default=True)
@click.option("--per-host", type=click.IntRange(1), default=1, show_default=True)
@click.option("--mode", type=click.Choice(MODES), default="lockstep", show_default=True)
@click.option("--steps", type=click.IntRange(1), default=200_000, show_default=True)
@click.option("--repeat", type=click.IntRange(1), default=5, show_default=True)
def cli(agents, per_host, mode, steps, repeat):
    """The core's wall time per agent-step, in-process (microseconds)."""
    rounds = [_round(mode, agents, per_host, steps) for _ in range(repeat)]
    click.echo(json.dumps({"agents": agents, "per_host": per_host, "mode": mode, "us_per_step": statistics.median(rounds),
                           "rounds": [round(r, 3) for r in rounds]}))


def main() -> None:
    cli.main(prog_name="busbench-corebench")


if __name__ == "__main__":
    main()
