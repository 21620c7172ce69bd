"""The grid world as a PettingZoo ParallelEnv (needs the ``worlds`` extra).

One arena of the grid with ``agents`` agents named ``agent_0`` ..: observations are the
grid's ``[cell, found]`` (a MultiDiscrete), actions its five moves (a Discrete), a
reward of 1 for standing on a goal, no termination, truncation after ``max_cycles``.
Each episode draws its layout from ``reset``'s seed, unless ``layout_seed`` fixes one
layout for every episode (then only the agents' starting cells change): a world where
what an agent learns about the place carries over from one episode to the next.
PettingZoo's own ``parallel_api_test`` passes for it (tests/test_worlds.py), and it runs
on the bus like any PettingZoo environment::

    bus-coordinator --world pettingzoo:agentbus_zmq.coordinator.grid_parallel --world-arg agents=4
"""

from __future__ import annotations

import functools

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from agentbus_zmq.coordinator.grid import ACTIONS, GOAL, OUTCOMES, GridWorld, WorldConfig

__all__ = ["GridParallelEnv", "parallel_env"]


class GridParallelEnv(ParallelEnv):
    metadata = {"name": "agentbus_grid_v0", "render_modes": []}

    def __init__(self, agents: int = 4, max_cycles: int = 100, width: int = 5, height: int = 5, obstacles: int = 2,
                 goals: int = 2, layout_seed: int | None = None):
        self._n, self.max_cycles = agents, max_cycles
        self._config = dict(width=width, height=height, obstacles=obstacles, goals=goals, layout_seed=layout_seed)
        if agents > width * height - obstacles:
            raise ValueError(f"{agents} agents do not fit a {width}x{height} grid with {obstacles} obstacles")
        self.possible_agents = [f"agent_{i}" for i in range(agents)]
        self.agents: list[str] = []
        self._cells = width * height
        self._world: GridWorld | None = None

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one space object per agent, as PettingZoo expects
    def observation_space(self, agent: str) -> spaces.Space:
        return spaces.MultiDiscrete([self._cells, len(OUTCOMES)])

    @functools.lru_cache(maxsize=None)  # noqa: B019
    def action_space(self, agent: str) -> spaces.Space:
        return spaces.Discrete(len(ACTIONS))

    def reset(self, seed: int | None = None, options: dict | None = None):
        self._world = GridWorld(WorldConfig(**self._config, seed=seed or 0, arena_agents=self._n, max_arenas=1))
        self._slots = {a: self._world.place(a) for a in self.possible_agents}
        self.agents = list(self.possible_agents)
        self._t = 0
        return {a: self._obs(a) for a in self.agents}, {a: {} for a in self.agents}

    def _obs(self, agent: str) -> np.ndarray:
        return np.array(self._world.observe(self._slots[agent]), dtype=np.int64)

    def step(self, actions: dict):
        order = sorted(self.agents, key=lambda a: self._slots[a])
        self._world.move_many([self._slots[a] for a in order], [int(actions[a]) for a in order])
        self._t += 1
        obs = {a: self._obs(a) for a in self.agents}
        rewards = {a: float(obs[a][1] == GOAL) for a in self.agents}
        done = self._t >= self.max_cycles
        terminations = {a: False for a in self.agents}
        truncations = {a: done for a in self.agents}
        infos = {a: {} for a in self.agents}
        if done:
            self.agents = []
        return obs, rewards, terminations, truncations, infos


def parallel_env(**kwargs) -> GridParallelEnv:
    return GridParallelEnv(**kwargs)
