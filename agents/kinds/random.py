"""``random``: a uniformly random action from the world's action space, whatever the
world (discrete, multi-discrete or array actions).  The baseline a learning agent must
beat, and a load that costs almost nothing to compute."""

from __future__ import annotations

import zlib

from agentbus_zmq.agents.sdk import Agent, spaces_of
from agentbus_zmq.bus.protocol import Welcome

__all__ = ["RandomAgent"]


class RandomAgent(Agent):
    kind = "random"
    OPTIONS = ("seed",)

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._space = None
        self._rng = None

    def on_start(self, welcome: Welcome) -> None:
        import numpy as np

        _, self._space = spaces_of(welcome)
        self._rng = np.random.default_rng([self.seed, zlib.crc32(welcome.agent_id.encode())])

    def step(self, obs):
        return self._space.sample(self._rng)
