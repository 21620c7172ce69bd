"""R_pool(N): the ceiling a bus run is measured against, in the same run.

The same N agents, in the same process layout as the bus run (one agent per process, or
the same hosts of K), each process stepping its own copy of the world with no messaging
at all: observe, step, move, again.  The processes start together, warm up, then count
agent-steps for ``duration`` seconds; R_pool is their sum over the duration.  Run as its
own process, so its forks never touch busbench's, and printed as JSON::

    python -m agentbus_zmq.busbench.pool --agents 20 --per-host 10 --kind explorer --duration 2
"""

from __future__ import annotations

import json
import os
import select
import signal
import time

import click

from agentbus_zmq.bus.config import limit_threads, set_batch_scheduling
from agentbus_zmq.busbench.solo import measurement_options
from agentbus_zmq.coordinator.worlds import WorldSpec

#: seconds a pool may take to build its agents and warm up before it is abandoned
SETUP_TIMEOUT_S = 300.0


def _worker(kind: str, options: dict, world: WorldSpec, first: int, count: int, warmup: int, duration: float,
            go_fd: int, out_fd: int) -> None:
    """One process of the pool: ``count`` agents (a host's worth, or one), their own world."""
    import numpy as np

    set_batch_scheduling()  # as the launcher's agent processes are

    from agentbus_zmq.agents.host import Host
    from agentbus_zmq.agents.kinds import create
    from agentbus_zmq.bus import protocol as P
    env = world.build()
    if count == 1:
        agent = create(kind, **options)
        agent.prepare()
        slot = env.place(f"pool-{first}")
        agent.on_start(P.Welcome("pool", f"pool-{first}", {"world": env.params(), "arena": env.arena_of(slot)}))

        def step() -> int:
            env.move(slot, agent.step(env.observe(slot)))
            return 1
    else:
        host = Host(lambda: create(kind, **options), "pool-", first, count)
        host.prepare()
        slots = np.array([env.place(i) for i in host.ids], dtype=np.int64)
        host.on_start(P.HostWelcome("pool", "pool", {"world": env.params()}, env.arenas_of(slots).astype(np.uint32)))
        members = np.arange(count, dtype=np.uint16)

        def step() -> int:
            result = host.step(P.HostObservation(0, members, env.observe_many(slots)))
            env.move_many(slots, result.actions)
            return count

    for _ in range(warmup):
        step()
    os.write(out_fd, b"r")
    select.select([go_fd], [], [], SETUP_TIMEOUT_S)
    steps, clock = 0, time.perf_counter
    start = clock()
    end = start + duration
    while clock() < end:
        steps += step()
    os.write(out_fd, json.dumps({"steps": steps, "elapsed_s": clock() - start}).encode() + b"\n")


def pool_rate(kind: str, options: dict, world: WorldSpec, agents: int, per_host: int, warmup: int,
              duration: float) -> dict:
    from agentbus_zmq.agents.kinds import create
    from agentbus_zmq.agents.layout import host_layout

    template = create(kind, **options)
    if getattr(template, "forkable", True):
        template.prepare()  # import once, fork after, as the launcher does
    layout = host_layout(agents, per_host) if per_host > 1 else [(i, 1) for i in range(1, agents + 1)]
    go_r, go_w = os.pipe()
    children = []
    try:
        for first, count in layout:
            out_r, out_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    os.close(out_r)
                    _worker(kind, options, world, first, count, warmup, duration, go_r, out_w)
                except BaseException:  # noqa: BLE001 - reported by the parent as a failed pool
                    import traceback

                    traceback.print_exc()
                    code = 1
                os._exit(code)
            os.close(out_w)
            children.append((pid, os.fdopen(out_r, "rb")))
        for _, out in children:  # every process built and warmed up
            if out.read(1) != b"r":
                raise RuntimeError("a pool process failed while starting (see the traceback above)")
        os.write(go_w, b"g" * len(children))
        results = [json.loads(out.readline()) for _, out in children]
    finally:
        for pid, out in children:  # done by now, or failed: reap them all
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            out.close()
        os.close(go_r)
        os.close(go_w)
    steps = sum(r["steps"] for r in results)
    elapsed = max(r["elapsed_s"] for r in results)
    return {"rate": steps / elapsed, "steps": steps, "elapsed_s": elapsed, "processes": len(layout),
            "per_host": per_host}


@click.command()
@click.option("--agents", type=int, required=True)
@click.option("--per-host", type=int, default=1)
@measurement_options
def cli(agents, per_host, kind, options, world, warmup, duration):
    return pool_rate(kind, options, world, agents, per_host, warmup, duration)


def main() -> None:
    limit_threads()
    cli.main(prog_name="busbench-pool")


if __name__ == "__main__":
    main()
