"""R_peer(N): the same agents stepped by the tool a user would pick instead of the bus.

``--peer gym``: Gymnasium's ``AsyncVectorEnv``, the field's standard way to step many
environments from one loop in subprocesses (pipes for commands and what goes in, shared
memory for what comes out).  Turned inside out for agents: each sub-environment is one
process of the bus run's layout (one agent, or a host's K agents), its *action* the
observations of its agents and its *observation* their actions.  A central loop owns
the one world, as the coordinator does, and each tick observes every agent, steps the
vector env (all processes at once) and moves every agent, simultaneously, in slot order.
The agents are built as the bus builds them (the same kind, options, WELCOME and, for K
agents, the same ``Host``), so the two runs differ only in how observations and actions
travel and who waits for whom.  Run as its own process, printed as JSON::

    python -m agentbus_zmq.busbench.peer --agents 20 --per-host 10 --kind explorer --duration 2
"""

from __future__ import annotations

import time

import click
import numpy as np

from agentbus_zmq.bus.config import limit_threads
from agentbus_zmq.busbench.solo import measurement_options
from agentbus_zmq.coordinator.worlds import WorldSpec

__all__ = ["PEERS", "PeerLoop", "peer_rate"]

#: the peers busbench can measure (``--peer``)
PEERS = ("gym",)


def _box(space, rows: int):
    """A Gymnasium Box for ``rows`` values of one of our spaces (a row an agent)."""
    from gymnasium import spaces as gs

    from agentbus_zmq.bus.spaces import Array, Discrete, MultiDiscrete

    if isinstance(space, Discrete):
        return gs.Box(0, space.n - 1, shape=(rows,), dtype=np.int64)
    if isinstance(space, MultiDiscrete):
        return gs.Box(0, max(space.nvec) - 1, shape=(rows, len(space.nvec)), dtype=np.int64)
    if isinstance(space, Array):
        return gs.Box(-np.inf, np.inf, shape=(rows, *space.shape), dtype=np.dtype(space.dtype))
    raise ValueError(f"no Gymnasium box for {space}")


def _agents_env(kind: str, options: dict, params: dict, arenas: list[int], first: int, rows: int,
                spaces: tuple):
    """An environment whose action is ``len(arenas)`` agents' observations (``rows`` rows,
    padded) and whose observation is their actions.  The agents are built at the first
    ``reset``, in the vector env's subprocess."""
    import gymnasium

    from agentbus_zmq.agents.host import Host
    from agentbus_zmq.agents.kinds import create
    from agentbus_zmq.bus import protocol as P
    from agentbus_zmq.bus.spaces import Array

    count = len(arenas)
    array_obs = isinstance(spaces[0], Array)

    class AgentsEnv(gymnasium.Env):
        action_space = _box(spaces[0], rows)
        observation_space = _box(spaces[1], rows)

        def __init__(self):
            from agentbus_zmq.busbench.procs import die_with_parent

            die_with_parent()  # a worker must not outlive the measurement that forked it
            self._step = None
            self._out = np.zeros(self.observation_space.shape, dtype=self.observation_space.dtype)

        def _build(self):
            if count == 1:
                agent = create(kind, **options)
                agent.prepare()
                agent.on_start(P.Welcome("peer", f"peer-{first}", {"world": params, "arena": arenas[0]}))
                self._stop = agent.on_stop
                return lambda obs: [agent.step(obs[0] if array_obs else obs[0].tolist())]
            host = Host(lambda: create(kind, **options), "peer-", first, count)
            host.prepare()
            host.on_start(P.HostWelcome("peer", "peer", {"world": params}, np.asarray(arenas, dtype=np.uint32)))
            members = np.arange(count, dtype=np.uint16)
            self._stop = host.on_stop
            return lambda obs: host.step(P.HostObservation(0, members, obs[:count])).actions

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            if self._step is None:
                self._step = self._build()
            return self._out, {}

        def step(self, action):
            self._out[:count] = self._step(action)
            return self._out, 0.0, False, False, {}

        def close(self):
            if self._step is not None:
                self._stop()  # the agents' on_stop, as the bus's runtime calls it

    return AgentsEnv()


class PeerLoop:
    """The peer's central loop over ``agents`` agents of ``kind`` (``per_host`` a process)
    in ``env``: one AsyncVectorEnv, one sub-environment a process.  :meth:`tick` observes
    every agent, steps the vector env and moves every agent, in slot order."""

    def __init__(self, kind: str, options: dict, env, agents: int, per_host: int):
        import functools

        from gymnasium.vector import AsyncVectorEnv

        from agentbus_zmq.agents.layout import host_layout

        self.env = env
        layout = host_layout(agents, per_host) if per_host > 1 else [(i, 1) for i in range(1, agents + 1)]
        rows = max(count for _, count in layout)
        self.slots = np.array([env.place(f"peer-{i}") for i in range(1, agents + 1)], dtype=np.int64)
        arenas = env.arenas_of(self.slots).tolist()
        params, spaces = env.params(), env.spaces()
        # row r of sub-env e is agent gather[e, r] (padding repeats the group's first agent);
        # valid picks the real rows out of the flattened (env, row) actions, in slot order
        self.gather = np.zeros((len(layout), rows), dtype=np.int64)
        valid = []
        for e, (first, count) in enumerate(layout):
            self.gather[e, :count] = np.arange(first - 1, first - 1 + count)
            self.gather[e, count:] = first - 1
            valid += range(e * rows, e * rows + count)
        self.valid = np.asarray(valid)
        self.processes = len(layout)
        fns = [functools.partial(_agents_env, kind, options, params, arenas[first - 1:first - 1 + count], first, rows,
                                 spaces) for first, count in layout]
        self.vec = AsyncVectorEnv(fns, shared_memory=True, copy=False, context="fork")
        self.flat = (len(layout) * rows, *self.vec.single_observation_space.shape[1:])

    def reset(self) -> None:
        self.vec.reset(seed=0)  # the agents are built now, in their processes

    def tick(self, stamps: list | None = None) -> None:
        """One lock-step tick; with ``stamps``, append when it began, handed out, the
        vector env returned and the moves were applied (CLOCK_MONOTONIC)."""
        clock = time.monotonic
        t0 = clock() if stamps is not None else 0.0
        obs = self.env.observe_many(self.slots)[self.gather]
        t1 = clock() if stamps is not None else 0.0
        actions, *_ = self.vec.step(obs)
        t2 = clock() if stamps is not None else 0.0
        self.env.move_many(self.slots, actions.reshape(self.flat)[self.valid])
        if stamps is not None:
            stamps.append((t0, t1, t2, clock()))

    def close(self, terminate: bool = True) -> None:
        self.vec.close(terminate=terminate)


def peer_rate(kind: str, options: dict, world: WorldSpec, agents: int, per_host: int, warmup: int,
              duration: float) -> dict:
    """Agent-steps per second of ``agents`` agents (``per_host`` a process) under
    Gymnasium's AsyncVectorEnv, lock-step from a central loop, over ``duration`` seconds
    after ``warmup`` ticks."""
    from agentbus_zmq.agents.kinds import create

    template = create(kind, **options)
    if getattr(template, "forkable", True):
        template.prepare()  # import once, fork after, as the launcher does
    loop = PeerLoop(kind, options, world.build(), agents, per_host)
    try:
        loop.reset()
        for _ in range(warmup):
            loop.tick()
        ticks, clock = 0, time.perf_counter
        start = clock()
        end = start + duration
        while clock() < end:
            loop.tick()
            ticks += 1
        elapsed = clock() - start
    finally:
        loop.close()
    return {"peer": "gym", "rate": agents * ticks / elapsed, "steps": agents * ticks, "ticks": ticks,
            "elapsed_s": elapsed, "processes": loop.processes, "per_host": per_host}


@click.command()
@click.option("--agents", type=int, required=True)
@click.option("--per-host", type=int, default=1)
@measurement_options
def cli(agents, per_host, kind, options, world, warmup, duration):
    return peer_rate(kind, options, world, agents, per_host, warmup, duration)


def main() -> None:
    limit_threads()
    cli.main(prog_name="busbench-peer")


if __name__ == "__main__":
    main()
