"""A grid world with an ordinary bug, for ``--world tests.faulty_world:grid``: from its
``after``-th move once ``agents`` agents are placed, any move of an agent in arena
``bad_arena`` raises, as a researcher's world with a bug would (issue #26)."""

from __future__ import annotations

import numpy as np

from agentbus_zmq.coordinator.grid import GridWorld, WorldConfig

__all__ = ["grid"]


class FaultyGrid(GridWorld):
    def __init__(self, bad_arena: int, after: int, agents: int, **config):
        super().__init__(WorldConfig(**config))
        self.bad_arena, self.after, self.agents, self.moves = bad_arena, after, agents, 0

    def move_many(self, slots, actions):
        self.moves += len(self) >= self.agents  # counted once every agent is in
        if self.moves > self.after and self.bad_arena in self.arena[np.asarray(slots, np.int64)].tolist():
            raise ZeroDivisionError("the world's own bug")
        super().move_many(slots, actions)


def grid(bad_arena: int = 0, after: int = 100, agents: int = 1, **config) -> FaultyGrid:
    return FaultyGrid(bad_arena, after, agents, **config)
