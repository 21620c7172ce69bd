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


class SpaceChecker(Agent):
    """A custom kind for any world: it reads the spaces from WELCOME (``spaces_of``) and
    refuses (BadObservation) any observation that is not what they say, so a world whose
    values did not reach the SDK as described shows as refused observations."""

    kind = "space-checker"

    def on_start(self, welcome) -> None:
        from agentbus_zmq.agents.sdk import spaces_of

        self.obs_space, self.act_space = spaces_of(welcome)
        self.calls = 0

    def step(self, obs):
        import numpy as np

        from agentbus_zmq.agents.sdk import BadObservation

        if not self.obs_space.is_observation(obs):
            raise BadObservation(f"{type(obs).__name__} {obs!r:.40} is not in {self.obs_space}")
        self.calls += 1
        return self.act_space.sample(np.random.default_rng(self.calls))


class CellParity(Agent):
    """A deterministic kind for checking what reaches an agent and what comes back: it
    answers 1 (down) on an even cell and 0 (up) on an odd one, and counts its steps."""

    kind = "cell-parity"

    def __init__(self):
        self.steps = 0

    def step(self, obs: list[int]) -> int:
        if type(obs) is not list:
            raise TypeError(f"a grid observation is a list of ints, not {type(obs).__name__}")
        self.steps += 1
        return 1 if obs[0] % 2 == 0 else 0


class Busy(Agent):
    """Works (spins) one millisecond a step, then stays: a known cost to find in a budget."""

    kind = "busy"

    def step(self, obs) -> int:
        import time

        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass
        return 4


class SlowStart(Agent):
    """Builds its model for 2.5 s (as a JAX compile does), silent meanwhile, then stays."""

    kind = "slow-start"

    def on_start(self, welcome) -> None:
        import time

        time.sleep(2.5)

    def step(self, obs) -> int:
        return 4
