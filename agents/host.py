"""Agent hosts: many agents in one process, one frame per host per tick.

A :class:`Host` holds ``count`` agents of one kind, named ``prefix + str(first + i)``.
The runtime registers them all with one HOST_HELLO and, every tick, hands the host one
HOST_OBSERVATION (a row per member) and sends back one HOST_ACTION.  Each agent keeps
its own id, registration, ledger entries and lifecycle hooks; the host only batches.

* **Start-up**: the host imports the kind's libraries once and builds every member's
  model from the one HOST_WELCOME (``Agent.start_batch``: a kind may build one batched
  model for all of them, as the JAX explorer does).
* **Stepping**: ``Agent.step_batch`` when the members are ``batched`` (one jitted,
  vmapped call, for the JAX explorer); otherwise the members step one after another.
* **Failure**: a member whose ``step`` raises is reported (logged, and HOST_BYE to the
  coordinator) and dropped; its host-mates keep stepping.  A host whose members have all
  failed stops.  A host that dies takes its agents with it; the coordinator declares
  them dead together, and a supervising launcher restarts the host under the same id.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import numpy as np

from agentbus_zmq.agents.sdk import Agent, BadObservation
from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.logs import PeerLog

__all__ = ["Host", "FrameResult"]

log = logging.getLogger(__name__)

#: members stepped between two keepalive calls
KEEPALIVE_EVERY = 32


@dataclasses.dataclass(slots=True)
class FrameResult:
    """One HOST_OBSERVATION stepped: the actions (one per member that did not fail, in
    the frame's order), the members that failed, and the time it took."""

    actions: np.ndarray
    failed: list[int]
    reason: str
    compute_us: int
    #: thread CPU time of the frame (see ACTION's cpu_us)
    cpu_us: int | None = None


class Host:
    """``count`` agents made by ``factory``, stepped together."""

    def __init__(self, factory: Callable[[], Agent], prefix: str, first: int, count: int):
        if not 1 <= count <= P.MAX_HOST_AGENTS:
            raise ValueError(f"a host holds 1 .. {P.MAX_HOST_AGENTS} agents, not {count}")
        self.members = (prefix, first, count)
        self.ids = [f"{prefix}{first + i}" for i in range(count)]
        self.agents = [factory() for _ in range(count)]
        self.cls = type(self.agents[0])
        self.kind = self.agents[0].kind
        self.alive = np.ones(count, dtype=bool)
        self._plog = PeerLog(log)
        #: members step on array rows (an array observation space), else on lists of ints
        self._array_obs = False
        #: each member's episode as the last frame said (worlds with episodes)
        self._episode: list[int | None] = [None] * count

    @property
    def forkable(self) -> bool:
        return getattr(self.agents[0], "forkable", True)

    def prepare(self) -> None:
        """Import the kind's libraries once, for every member."""
        self.agents[0].prepare()

    def on_start(self, welcome: P.HostWelcome) -> None:
        """Build every member's model from the host's WELCOME (each member sees the
        WELCOME it would have had alone: its own id and arena)."""
        welcomes = [P.Welcome(welcome.session, agent_id, {**welcome.params, "arena": int(arena)})
                    for agent_id, arena in zip(self.ids, welcome.arenas.tolist())]
        world = welcome.params.get("world")
        spaces = world.get("spaces") if isinstance(world, dict) else None
        self._array_obs = isinstance(spaces, dict) and isinstance(spaces.get("observation"), dict) \
            and spaces["observation"].get("type") == "array"
        self.cls.start_batch(self.agents, welcomes)

    def step(self, msg: P.HostObservation, keepalive: Callable[[], None] | None = None) -> FrameResult:
        """Step the members ``msg`` lists; ``keepalive`` is called every KEEPALIVE_EVERY
        members, so a long frame can still send heartbeats."""
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        self.check(msg)
        members = msg.members.tolist()
        if msg.info is not None:
            self._info(members, msg.info)
        failed: list[int] = []
        reason = ""
        if members and self.agents[members[0]].batched:
            try:
                actions = np.asarray(self.cls.step_batch([self.agents[i] for i in members], msg.obs))
                if actions.shape != (len(members),):
                    raise ValueError(f"step_batch returned shape {actions.shape}, expected ({len(members)},)")
            except BadObservation:
                raise
            except Exception as exc:  # noqa: BLE001 - the kind's code: report it, drop who it affects
                log.exception("host: %s.step_batch raised; dropping the %d agents it stepped", self.cls.__name__,
                              len(members))
                failed, reason, actions = list(members), f"step_batch raised {type(exc).__name__}: {exc}", None
        else:
            agents = self.agents
            out = []
            rows = msg.obs if self._array_obs else msg.obs.tolist()
            for k, (i, row) in enumerate(zip(members, rows)):
                if keepalive is not None and k % KEEPALIVE_EVERY == KEEPALIVE_EVERY - 1:
                    keepalive()
                try:
                    out.append(agents[i].step(row))
                except BadObservation:
                    raise
                except Exception as exc:  # noqa: BLE001 - one agent's failure is its own
                    self._plog.log(logging.ERROR, time.monotonic(), "agent %s: step raised %s: %s; it leaves, its "
                                   "host-mates go on", self.ids[i], type(exc).__name__, exc)
                    failed.append(i)
                    reason = f"step raised {type(exc).__name__}: {exc}"
            actions = np.stack([np.asarray(a) for a in out]) if out and np.ndim(out[0]) else np.asarray(out, dtype=np.int64)
        if failed:
            self.alive[failed] = False
            if actions is None:
                actions = np.zeros(0, dtype=np.int64)
        if actions.ndim == 1 and actions.dtype.kind not in "iu":
            actions = actions.astype(np.int64)
        small = actions.ndim == 1 and (actions.size == 0 or (actions.min() >= 0 and actions.max() < 256))
        return FrameResult(actions.astype(np.uint8) if small else actions, failed, reason,
                           (time.perf_counter_ns() - t0) // 1000, (time.thread_time_ns() - c0) // 1000)

    def _info(self, members: list[int], info: dict) -> None:
        """Each member hears of its new episode (``Agent.on_episode``) and its reward
        (``Agent.on_reward``), as an agent of its own process does."""
        rewards = info["reward"].tolist() if "reward" in info else [0.0] * len(members)
        episodes = info["episode"].tolist() if "episode" in info else [None] * len(members)
        for i, episode, reward in zip(members, episodes, rewards):
            agent = self.agents[i]
            if episode is not None and episode != self._episode[i]:
                self._episode[i] = episode
                agent.on_episode(episode, float(reward))
            agent.on_reward(float(reward))

    def check(self, msg: P.HostObservation) -> None:
        """A frame from the coordinator must list live members of this host, once each,
        with one row of observations per member; else :class:`BadObservation`."""
        members, obs = msg.members, msg.obs
        count = len(self.agents)
        if obs.ndim < 2 or (obs.ndim != 2 and not self._array_obs) or obs.shape[0] != len(members):
            raise BadObservation(f"HOST_OBSERVATION has {obs.shape} observations for {len(members)} members")
        if len(members) and (members.max() >= count or not self.alive[members].all()
                             or len(np.unique(members)) != len(members)):
            raise BadObservation(f"HOST_OBSERVATION lists members that are not this host's {count} live agents, "
                                 f"or lists one twice")

    def on_stop(self) -> None:
        for agent in self.agents:
            try:
                agent.on_stop()
            except Exception:  # noqa: BLE001 - one agent's failure must not stop the others' on_stop
                log.exception("on_stop raised")
