"""The interface the coordinator steps a world through (:class:`World`).

The coordinator talks to its world only through :class:`World`: placement (``place``,
``remove``, ``capacity``, arenas), observation and dynamics (``observe``, ``move`` and
their vectorised twins over many slots), the description agents get in WELCOME
(``params``) and the figures it reports (``figures``).  No I/O.
"""

from __future__ import annotations

import abc

import numpy as np

from agentbus_zmq.bus.spaces import Discrete, MultiDiscrete, Space

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
    #: whether :meth:`move_many` raises, if it raises, before it changes anything: then the
    #: coordinator steps all arenas in one call and, should it raise, repeats it arena by
    #: arena to find the arena at fault; otherwise it calls it arena by arena
    atomic_moves = False

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

    def default_action(self, slot: int):
        """The action applied for an agent whose own was refused at the door (not a value
        of the action space): 0, zeros, or zeros clipped into an array space's bounds."""
        space = self.spaces()[1]
        if isinstance(space, Discrete):
            return 0
        if isinstance(space, MultiDiscrete):
            return np.zeros(len(space.nvec), np.int64)
        lo = -np.inf if space.low is None else space.low
        hi = np.inf if space.high is None else space.high
        return np.clip(np.zeros(space.shape, space.dtype), lo, hi).astype(space.dtype)

    def reset_arena(self, arena: int) -> None:
        """Start ``arena`` afresh (a new episode) after one of its steps failed: its agents
        stay in it.  A world that cannot raises NotImplementedError, and the arena is closed
        at its first fault instead (see coordinator.guard)."""
        raise NotImplementedError(f"{type(self).__name__} has no reset_arena")

    def arena_of(self, slot: int) -> int:
        return int(self.arenas_of(np.array([slot]))[0])



