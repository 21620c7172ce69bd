"""The interface the coordinator steps a world through (:class:`World`).

The coordinator talks to its world only through :class:`World`: placement (``place``,
``remove``, ``capacity``, arenas), observation and dynamics (``observe``, ``move`` and
their vectorised twins over many slots), the description agents get in WELCOME
(``params``) and the figures it reports (``figures``).  No I/O.
"""

from __future__ import annotations

import abc

import numpy as np

from agentbus_zmq.bus.spaces import Discrete, Space

__all__ = ["World", "WorldFull"]

class WorldFull(Exception):
    """No arena has room for another agent and no more arenas may be opened."""


class World(abc.ABC):
    """What the coordinator needs of a world.  Agents live in *slots* (small integers
    handed out by :meth:`place`); every per-step call takes slots, never ids.

    A world describes itself in WELCOME (:meth:`params`, with ``kind`` and ``spaces``);
    one with rewards or episodes sets ``has_info`` and reports them per agent
    (:meth:`info`, :meth:`info_many`), which then travel with each observation."""

    #: the world's name in WELCOME (``grid``, ``pettingzoo``, ...)
    kind = "world"
    #: whether observations carry ``info`` (reward, episode)
    has_info = False

    @abc.abstractmethod
    def spaces(self) -> tuple[Space, Space]:
        """(observation space, action space), the same for every agent."""

    @property
    def discrete_actions(self) -> bool:
        """Whether an action is one integer (then actions travel and batch as int arrays)."""
        return isinstance(self.spaces()[1], Discrete)

    def info(self, slot: int) -> dict | None:
        """What the agent's next observation carries beside it (reward since the last one,
        episode); None for a world without them."""
        return None

    def info_many(self, slots: np.ndarray) -> dict | None:
        """:meth:`info` for several agents: arrays, one entry per slot."""
        return None

    @abc.abstractmethod
    def state_hash(self) -> str:
        """A digest of the world's state now (two runs with one seed agree, tick by tick)."""

    @property
    @abc.abstractmethod
    def capacity(self) -> int:
        """Agents the world can ever hold at once."""

    @property
    @abc.abstractmethod
    def arenas(self) -> int:
        """Arenas open now (independent copies of the world)."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Agents placed now."""

    @abc.abstractmethod
    def __contains__(self, agent_id: str) -> bool: ...

    @abc.abstractmethod
    def place(self, agent_id: str) -> int:
        """Place a new agent (a returning one keeps its slot); its slot, or WorldFull."""

    @abc.abstractmethod
    def remove(self, agent_id: str) -> None:
        """The agent leaves; its slot and its place are free again."""

    @abc.abstractmethod
    def arenas_of(self, slots: np.ndarray) -> np.ndarray:
        """Each slot's arena."""

    @abc.abstractmethod
    def observe(self, slot: int) -> list[int]:
        """One agent's observation, one integer per modality."""

    @abc.abstractmethod
    def observe_many(self, slots: np.ndarray) -> np.ndarray:
        """Observations of several agents: an ``(n, modalities)`` unsigned array."""

    @abc.abstractmethod
    def move(self, slot: int, action: int) -> None:
        """Apply one agent's action now (asynchronous mode)."""

    @abc.abstractmethod
    def move_many(self, slots, actions) -> None:
        """Apply several agents' actions at once, simultaneously, in the given order."""

    @abc.abstractmethod
    def params(self) -> dict:
        """The world as WELCOME describes it to agents."""

    def figures(self) -> dict:
        """What ``stats`` reports about the world (``goal_visits`` for the grid)."""
        return {}

    def arena_of(self, slot: int) -> int:
        return int(self.arenas_of(np.array([slot]))[0])



