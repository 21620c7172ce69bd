"""Restart policy for the agents a launcher forks: back-off and intensity, sans-IO.

As Erlang supervisors and Ray's ``max_restarts`` do, an agent that dies is restarted
after a delay that doubles with each recent restart (``backoff_min`` to
``backoff_max``), and a launcher whose agents keep dying gives up: more than
``intensity`` restarts of one agent within ``period`` seconds, and the launcher stops
everything and exits non-zero, so that systemd's own limits (or the operator) take over
instead of a fork loop.

:class:`RestartDecisions` decides; ``agents.launcher`` does the forking.  Time is passed in,
so the policy is tested by replaying scripted histories against a fake clock.
"""

from __future__ import annotations

import collections
import dataclasses

__all__ = ["RestartPolicy", "RestartDecisions", "Restart", "GiveUp"]


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    backoff_min: float = 1.0
    backoff_max: float = 30.0
    #: restarts of one agent allowed within ``period`` seconds; one more and we give up
    intensity: int = 5
    period: float = 60.0

    def __post_init__(self) -> None:
        if not (0 < self.backoff_min <= self.backoff_max and self.intensity >= 0 and self.period > 0):
            raise ValueError("restart policy needs 0 < backoff_min <= backoff_max, intensity >= 0, period > 0")


@dataclasses.dataclass(frozen=True, slots=True)
class Restart:
    """Fork the agent again at ``at`` (monotonic seconds)."""

    agent_id: str
    at: float
    attempt: int


@dataclasses.dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop every agent and exit non-zero: ``reason`` says why."""

    agent_id: str
    reason: str


class RestartDecisions:
    """Whether, and when, each agent that died is forked again (it decides; the launcher acts)."""

    def __init__(self, policy: RestartPolicy = RestartPolicy()):
        self.policy = policy
        self._recent: dict[str, collections.deque[float]] = {}
        #: restarts so far, per agent id
        self.restarts: collections.Counter = collections.Counter()

    def on_exit(self, agent_id: str, now: float) -> Restart | GiveUp:
        """Agent ``agent_id`` died (a non-zero exit, or a signal we did not send)."""
        p = self.policy
        recent = self._recent.setdefault(agent_id, collections.deque())
        while recent and now - recent[0] > p.period:
            recent.popleft()
        if len(recent) >= p.intensity:
            return GiveUp(agent_id, f"agent {agent_id} died {len(recent) + 1} times within {p.period:g} s "
                                    f"(the limit is {p.intensity} restarts): giving up")
        delay = min(p.backoff_min * 2 ** len(recent), p.backoff_max)
        recent.append(now)
        self.restarts[agent_id] += 1
        return Restart(agent_id, now + delay, self.restarts[agent_id])
