"""The SDK as an integrator uses it: a small Agent subclass, run in this process."""

from __future__ import annotations

from agentbus_zmq.agents.runtime import run
from agentbus_zmq.agents.sdk import Agent


class Walker(Agent):
    kind = "walker"

    def __init__(self):
        self.width = None
        self.seen: list[list[int]] = []
        self.stopped = False

    def on_start(self, welcome):
        self.width = welcome.params["world"]["width"]

    def step(self, obs):
        self.seen.append(obs)
        return 3  # right

    def on_stop(self):
        self.stopped = True


def test_an_sdk_agent_runs_against_a_real_coordinator(bus):
    bus.coordinator()
    walker = Walker()
    assert run(walker, endpoint=bus.endpoint, agent_id="walker-1", max_steps=30) == 0
    assert walker.width == 5 and walker.stopped
    assert len(walker.seen) == 30 and all(len(o) == 2 for o in walker.seen)
    cells = [o[0] for o in walker.seen]
    assert cells[-1] % 5 == 4 or any(o[1] in (1, 3) for o in walker.seen[-3:])  # at the east wall, or blocked
    stats = bus.stats()
    assert stats["ledger"]["received"] >= 30 and stats["ledger"]["balanced"]
