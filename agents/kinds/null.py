"""``null``: answers every observation at once with ``stay``.  It isolates the bus's
own cost: with null agents, busbench measures nothing but messaging."""

from agentbus_zmq.agents.sdk import Agent

STAY = 4


class NullAgent(Agent):
    kind = "null"

    def step(self, obs: list[int]) -> int:
        return STAY
