"""An integrator's agent kind, as the README's integrator section writes it: used by
tests/test_kinds.py through ``--kind tests.kinds_demo:Walker`` and an entry point."""

from __future__ import annotations

import random

from agentbus_zmq.agents.sdk import Agent


class Walker(Agent):
    """Walks at random, never into what it last bumped into."""

    kind = "walker"
    OPTIONS = ("seed",)

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.last = 4

    def step(self, obs: list[int]) -> int:
        bumped = obs[-1] in (1, 3, 4)  # obstacle, agent, wall
        choices = [a for a in range(5) if not (bumped and a == self.last)]
        self.last = self.rng.choice(choices)
        return self.last


class NotAnAgent:
    kind = "nope"

    def step(self, obs):
        return 0
