"""The shared world: a seeded multi-agent grid.  Plain Python, no I/O.

Cells are numbered ``y * width + x``.  Each agent observes two modalities:

* its location (the cell index), and
* what it found there: ``empty``, ``obstacle``, ``goal``, ``agent`` or ``wall`` -- the
  peer system's five outcomes, made informative.  ``goal`` when the agent stands on a
  goal cell; ``obstacle``, ``agent`` or ``wall`` when its last move was blocked by one
  (it then stays where it was); ``empty`` otherwise.

A cell holds at most one agent.  Moves are resolved deterministically: agents move one
after another in agent-id order, each against the positions left by those before it.
"""

from __future__ import annotations

import dataclasses
import random

__all__ = ["OUTCOMES", "ACTIONS", "WorldConfig", "WorldFull", "GridWorld"]

OUTCOMES = ("empty", "obstacle", "goal", "agent", "wall")
EMPTY, OBSTACLE, GOAL, AGENT, WALL = range(len(OUTCOMES))
ACTIONS = ("up", "down", "left", "right", "stay")
MOVES = ((0, -1), (0, 1), (-1, 0), (1, 0), (0, 0))
STAY = len(ACTIONS) - 1


class WorldFull(Exception):
    """No free cell is left for another agent."""


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Layout parameters.  The same config and seed always give the same world."""

    width: int = 5
    height: int = 5
    obstacles: int = 2
    goals: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError("the world needs width and height of at least 1")
        if self.obstacles < 0 or self.goals < 0 or self.obstacles + self.goals > self.width * self.height:
            raise ValueError("obstacles + goals must fit in width x height cells")


class GridWorld:
    """Positions of agents on a grid with obstacles and goals."""

    def __init__(self, config: WorldConfig = WorldConfig()):
        self.config = config
        self.width, self.height = config.width, config.height
        rng = random.Random(config.seed)
        cells = rng.sample(range(self.width * self.height), config.obstacles + config.goals)
        self.obstacles = frozenset(cells[: config.obstacles])
        self.goals = frozenset(cells[config.obstacles:])
        self._placement_rng = random.Random(config.seed + 1)
        self.position: dict[str, int] = {}
        self._occupant: dict[int, str] = {}
        self._found: dict[str, int] = {}
        self.goal_visits = 0

    # --- membership -------------------------------------------------------------

    def place(self, agent_id: str) -> int:
        """Put a new agent on a free cell (seeded choice); keep a returning one where it was."""
        if agent_id in self.position:
            return self.position[agent_id]
        free = [c for c in range(self.width * self.height) if c not in self.obstacles and c not in self._occupant]
        if not free:
            raise WorldFull(f"all {len(self.position)} free cells of the {self.width}x{self.height} world are taken")
        cell = self._placement_rng.choice(free)
        self.position[agent_id] = cell
        self._occupant[cell] = agent_id
        self._found[agent_id] = GOAL if cell in self.goals else EMPTY
        return cell

    def remove(self, agent_id: str) -> None:
        cell = self.position.pop(agent_id, None)
        if cell is not None:
            del self._occupant[cell]
        self._found.pop(agent_id, None)

    # --- observation and dynamics -----------------------------------------------

    def observe(self, agent_id: str) -> list[int]:
        return [self.position[agent_id], self._found[agent_id]]

    def move(self, agent_id: str, action: int) -> None:
        """Apply one agent's action now (asynchronous mode, and each step of :meth:`step`)."""
        cell = self.position.get(agent_id)
        if cell is None:
            return
        if not 0 <= action < len(MOVES):
            action = STAY
        dx, dy = MOVES[action]
        x, y = cell % self.width + dx, cell // self.width + dy
        if not (0 <= x < self.width and 0 <= y < self.height):
            self._found[agent_id] = WALL
            return
        target = y * self.width + x
        if target == cell:
            found = GOAL if cell in self.goals else EMPTY
        elif target in self.obstacles:
            found = OBSTACLE
        elif target in self._occupant:
            found = AGENT
        else:
            del self._occupant[cell]
            self._occupant[target] = agent_id
            self.position[agent_id] = target
            found = GOAL if target in self.goals else EMPTY
        if found == GOAL:
            self.goal_visits += 1
        self._found[agent_id] = found

    def step(self, actions: dict[str, int]) -> None:
        """Apply one lock-step tick's actions, in agent-id order (deterministic)."""
        for agent_id in sorted(actions):
            self.move(agent_id, actions[agent_id])

    def params(self) -> dict:
        """The layout as sent in WELCOME, enough for an agent to build its model."""
        return {
            "width": self.width,
            "height": self.height,
            "obstacles": sorted(self.obstacles),
            "goals": sorted(self.goals),
            "outcomes": list(OUTCOMES),
            "actions": list(ACTIONS),
            "seed": self.config.seed,
        }
