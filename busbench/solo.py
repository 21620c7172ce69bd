"""r1: the single-agent rate -- one agent of the same kind and model, stepping alone in
one process against the same world, with no bus.  Run as its own process so that its
imports and threads never touch busbench's, and printed as JSON::

    python -m busbench.solo --kind explorer --backend numpy --duration 2
"""

from __future__ import annotations

import functools
import json
import sys
import time

import click

from agentbus_zmq.bus.config import limit_threads
from agentbus_zmq.coordinator.worlds import WorldSpec

SOLO_ID = "solo"


def solo_rate(kind: str, options: dict, world: WorldSpec, warmup_steps: int, duration: float) -> dict:
    from agentbus_zmq.agents.kinds import create
    from agentbus_zmq.bus import protocol as P

    env = world.build()
    agent = create(kind, **options)
    agent.prepare()
    slot = env.place(SOLO_ID)
    agent.on_start(P.Welcome("solo", SOLO_ID, {"world": env.params(), "arena": env.arena_of(slot)}))
    step, observe, move = agent.step, env.observe, env.move
    for _ in range(warmup_steps):
        move(slot, step(observe(slot)))
    steps = 0
    clock = time.perf_counter
    start = clock()
    end = start + duration
    while True:
        for _ in range(50):
            move(slot, step(observe(slot)))
        steps += 50
        now = clock()
        if now >= end:
            break
    elapsed = now - start
    return {"rate": steps / elapsed, "steps": steps, "elapsed_s": elapsed, "step_us": elapsed / steps * 1e6}


def measurement_options(command):
    """The options a no-bus measurement (r1 here, R_pool in busbench.pool) takes: the
    agents' kind and options, the world, the warm-up and the duration.  The command gets
    ``kind``, ``options`` (for the kind), ``world`` (a WorldSpec), ``warmup`` and ``duration``."""

    @click.option("--kind", default="explorer")
    @click.option("--backend", default="numpy")
    @click.option("--policy-len", type=int, default=1)
    @click.option("--seed", type=int, default=0)
    @click.option("--model", default=None)
    @click.option("--world-spec", "world_json", default='{"name": "grid"}', help="The WorldSpec, as JSON.")
    @click.option("--warmup", type=int, default=50, help="Warm-up steps per agent.")
    @click.option("--duration", type=float, default=2.0)
    @functools.wraps(command)
    def wrapper(kind, backend, policy_len, seed, model, world_json, **rest):
        from agentbus_zmq.agents.kinds import kind_options

        options = kind_options(kind, backend=backend, policy_len=policy_len, seed=seed, model=model)
        result = command(kind=kind, options=options, world=WorldSpec.from_json(world_json), **rest)
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")

    return wrapper


@click.command()
@measurement_options
def cli(kind, options, world, warmup, duration):
    return solo_rate(kind, options, world, warmup, duration)


def main() -> None:
    limit_threads()
    cli.main(prog_name="busbench-solo")


if __name__ == "__main__":
    main()
