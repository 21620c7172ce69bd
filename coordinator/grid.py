"""The grid world: copies (arenas) of one seeded grid, stepped together.  No I/O.

Every arena has the same layout (size, obstacles, goals: one seed), so every explorer
builds the same model whatever its arena; agents interact only with the agents of their
own arena.  An arena holds at most ``arena_agents`` agents; the world opens another
when the open ones are full, up to ``max_arenas``.

Cells are numbered ``y * width + x`` within an arena.  Each agent observes two
modalities:

* its location (the cell index), and
* what it found there: ``empty``, ``obstacle``, ``goal``, ``agent`` or ``wall`` -- the
  peer system's five outcomes, made informative.  ``goal`` when the agent stands on a
  goal cell; ``obstacle``, ``agent`` or ``wall`` when its last move was blocked by one
  (it then stays where it was); ``empty`` otherwise.

Agents live in *slots* (small integers handed out by :meth:`GridWorld.place`); the
world keeps their arena, cell and last outcome in numpy arrays, so that a whole tick is
a handful of array operations whatever the number of agents.

Moves (:meth:`GridWorld.move_many`) are simultaneous: an agent moves when its target is
inside the grid, not an obstacle, not occupied when the moves begin, and not claimed by
an agent earlier in the given order (the coordinator orders by slot, i.e. by
registration).  A cell being vacated in the same tick counts as occupied, so no two
agents ever swap or chain; the outcome does not depend on anything but the order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import random

import numpy as np

from agentbus_zmq.bus.spaces import Discrete, MultiDiscrete, Space
from agentbus_zmq.coordinator.world import World, WorldFull

__all__ = ["OUTCOMES", "ACTIONS", "WorldConfig", "GridWorld", "WorldFull"]

OUTCOMES = ("empty", "obstacle", "goal", "agent", "wall")
EMPTY, OBSTACLE, GOAL, AGENT, WALL = range(len(OUTCOMES))
ACTIONS = ("up", "down", "left", "right", "stay")
MOVES = ((0, -1), (0, 1), (-1, 0), (1, 0), (0, 0))
STAY = len(ACTIONS) - 1
_DX = np.array([m[0] for m in MOVES], dtype=np.int64)
_DY = np.array([m[1] for m in MOVES], dtype=np.int64)
#: random cells tried before a placement falls back to listing the arena's free cells
_PLACEMENT_TRIES = 8
#: below this many agents, a batch of moves is applied one by one (same rule, less overhead)
_SCALAR_BATCH = 48

#: The grid's arguments and their ranges (the options' and --world-arg's alike): a side
#: as the explorer models it at most, cells whose per-arena tables stay a few MB.
MAX_SIDE = 4096
MAX_CELLS = 1 << 20
RANGES = {"width": (1, MAX_SIDE), "height": (1, MAX_SIDE), "obstacles": (0, MAX_CELLS), "goals": (0, MAX_CELLS),
          "seed": (0, 2**32 - 1), "layout_seed": (0, 2**32 - 1), "arena_agents": (0, MAX_CELLS),
          "max_arenas": (1, 1_000_000)}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Layout parameters.  The same config and seed always give the same world."""

    width: int = 5
    height: int = 5
    obstacles: int = 2
    goals: int = 2
    seed: int = 0
    #: the layout's own seed, where it must stay while ``seed`` changes the placements
    #: (a world whose episodes start agents anew on one layout); None: ``seed``
    layout_seed: int | None = None
    #: agents per arena at most (0: every free cell)
    arena_agents: int = 0
    #: arenas the world may open
    max_arenas: int = 10_000

    def __post_init__(self) -> None:
        for name, (lo, hi) in RANGES.items():  # --world-arg values meet the options' ranges, before anything is built
            value = getattr(self, name)
            if name == "layout_seed" and value is None:
                continue
            if type(value) is not int or not lo <= value <= hi:
                raise ValueError(f"grid argument {name} must be an integer in [{lo}, {hi}], got {value!r:.40}")
        if self.width * self.height > MAX_CELLS:
            raise ValueError(f"grid arguments width x height must be at most {MAX_CELLS:,} cells, got "
                             f"{self.width} x {self.height}")
        if self.obstacles + self.goals > self.width * self.height:
            raise ValueError("obstacles + goals must fit in width x height cells")
        if self.obstacles >= self.width * self.height:
            raise ValueError("the world needs at least one cell without an obstacle")
        if not 0 <= self.arena_agents <= self.free_cells or self.max_arenas < 1:
            raise ValueError(f"arena_agents must be 0 .. {self.free_cells} (the free cells) and max_arenas >= 1")

    @property
    def free_cells(self) -> int:
        return self.width * self.height - self.obstacles

    @property
    def per_arena(self) -> int:
        return self.arena_agents or self.free_cells

    @property
    def capacity(self) -> int:
        return self.per_arena * self.max_arenas


class GridWorld(World):
    """Positions of agents in arenas of one grid layout with obstacles and goals."""

    kind = "grid"
    #: move_many checks nothing that can fail after it starts writing (the door has
    #: checked the actions): one call steps every arena
    atomic_moves = True

    def __init__(self, config: WorldConfig = WorldConfig()):
        self.config = config
        self.width, self.height = config.width, config.height
        self.cells = config.width * config.height
        rng = random.Random(config.seed if config.layout_seed is None else config.layout_seed)
        layout = rng.sample(range(self.cells), config.obstacles + config.goals)
        self._set_layout(frozenset(layout[: config.obstacles]), frozenset(layout[config.obstacles:]))
        self._rng = random.Random(config.seed + 1)
        self.per_arena = config.per_arena
        # per arena: occupant slot of each cell (-1: none), and how many agents it holds
        self._occupant = np.full((0, self.cells), -1, dtype=np.int64)
        self._count = np.zeros(0, dtype=np.int64)
        self._open: list[int] = []  # arenas that may have room, lowest first (checked on use)
        # per slot
        self.arena = np.zeros(0, dtype=np.int64)
        self.cell = np.zeros(0, dtype=np.int64)
        self.found = np.zeros(0, dtype=np.int64)
        self._free_slots: list[int] = []
        self._slot: dict[str, int] = {}
        self.goal_visits = 0

    def _set_layout(self, obstacles: frozenset, goals: frozenset) -> None:
        """The obstacles and goals, and every table derived from them."""
        self.obstacles, self.goals = obstacles, goals
        self._is_obstacle = np.zeros(self.cells, dtype=bool)
        self._is_obstacle[list(obstacles)] = True
        self._is_goal = np.zeros(self.cells, dtype=bool)
        self._is_goal[list(goals)] = True
        # the cell each action leads to from each cell (-1: off the grid), and what an
        # agent standing on a cell finds there
        xs, ys = np.arange(self.cells) % self.width, np.arange(self.cells) // self.width
        nx, ny = xs[:, None] + _DX[None, :], ys[:, None] + _DY[None, :]
        inside = (nx >= 0) & (nx < self.width) & (ny >= 0) & (ny < self.height)
        self._next = np.where(inside, ny * self.width + nx, -1)
        self._outcome_at = np.where(self._is_goal, GOAL, EMPTY)
        # the same tables as lists, for the few-agents path (list indexing is 3x cheaper)
        self._next_list = self._next.tolist()
        self._outcome_list = self._outcome_at.tolist()
        self._obstacle_list = self._is_obstacle.tolist()

    # --- membership -------------------------------------------------------------

    @property
    def arenas(self) -> int:
        return len(self._count)

    @property
    def capacity(self) -> int:
        return self.config.capacity

    def arenas_of(self, slots: np.ndarray) -> np.ndarray:
        return self.arena[slots]

    def arena_of(self, slot: int) -> int:
        return self.arena.item(slot)

    def figures(self) -> dict:
        return {"goal_visits": self.goal_visits}

    def spaces(self) -> tuple[Space, Space]:
        return (MultiDiscrete((self.cells, len(OUTCOMES)), ("location", "found")), Discrete(len(ACTIONS), ACTIONS))

    @property
    def discrete_actions(self) -> bool:
        return True

    def state_hash(self) -> str:
        slots = np.array(sorted(self._slot.values()), dtype=np.int64)
        h = hashlib.blake2b(digest_size=8)
        for a in (slots, self.arena[slots], self.cell[slots], self.found[slots]):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        h.update(str(self.goal_visits).encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, agent_id: str) -> bool:
        return agent_id in self._slot

    def slot(self, agent_id: str) -> int:
        return self._slot[agent_id]

    def place(self, agent_id: str) -> int:
        """Put a new agent on a free cell of an arena with room (seeded choice) and
        return its slot; a returning agent keeps its slot, arena and cell.  Costs the
        same whatever the world's size (random probes, then one scan of one arena)."""
        slot = self._slot.get(agent_id)
        if slot is not None:
            return slot
        arena = self._arena_with_room()
        cell = self._free_cell(arena)
        slot = self._free_slots.pop() if self._free_slots else self._grow_slots()
        self._slot[agent_id] = slot
        self.arena[slot], self.cell[slot] = arena, cell
        self.found[slot] = GOAL if self._is_goal[cell] else EMPTY
        self._occupant[arena, cell] = slot
        self._count[arena] += 1
        return slot

    def remove(self, agent_id: str) -> None:
        slot = self._slot.pop(agent_id, None)
        if slot is None:
            return
        arena = int(self.arena[slot])
        self._occupant[arena, self.cell[slot]] = -1
        self._count[arena] -= 1
        if self._count[arena] == self.per_arena - 1:
            heapq.heappush(self._open, arena)
        self._free_slots.append(slot)

    def reset_arena(self, arena: int) -> None:
        """Its agents on new free cells (seeded), as if just placed, in slot order."""
        slots = sorted(s for s in self._slot.values() if self.arena.item(s) == arena)
        self._occupant[arena, :] = -1
        for slot in slots:
            cell = self._free_cell(arena)
            self.cell[slot] = cell
            self.found[slot] = GOAL if self._is_goal[cell] else EMPTY
            self._occupant[arena, cell] = slot

    def default_action(self, slot: int) -> int:
        return STAY

    def _arena_with_room(self) -> int:
        while self._open:  # a heap; an arena may appear twice or be full by now: checked here
            arena = self._open[0]
            if self._count[arena] < self.per_arena:
                return arena
            heapq.heappop(self._open)
        if self.arenas >= self.config.max_arenas:
            raise WorldFull(f"all {self.arenas} arenas of the {self.width}x{self.height} world hold "
                            f"{self.per_arena} agents each")
        return self._open_arenas()

    def _open_arenas(self) -> int:
        """Double the arenas (at most to max_arenas); returns the first new one."""
        first = self.arenas
        add = min(max(1, first), self.config.max_arenas - first)
        self._occupant = np.vstack([self._occupant, np.full((add, self.cells), -1, np.int64)])
        self._count = np.concatenate([self._count, np.zeros(add, np.int64)])
        for arena in range(first, first + add):
            heapq.heappush(self._open, arena)
        return first

    def _free_cell(self, arena: int) -> int:
        occupant = self._occupant[arena]
        for _ in range(_PLACEMENT_TRIES):
            cell = self._rng.randrange(self.cells)
            if occupant[cell] < 0 and not self._is_obstacle[cell]:
                return cell
        return self._rng.choice(np.flatnonzero((occupant < 0) & ~self._is_obstacle).tolist())

    def _grow_slots(self) -> int:
        n = len(self.arena)
        grow = max(16, n)
        for name in ("arena", "cell", "found"):
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(grow, np.int64)]))
        self._free_slots.extend(range(n + grow - 1, n, -1))
        return n

    # --- observation and dynamics -----------------------------------------------

    def observe(self, slot: int) -> list[int]:
        """One agent's observation, ``[cell, found]``."""
        return [self.cell.item(slot), self.found.item(slot)]

    def observe_many(self, slots: np.ndarray) -> np.ndarray:
        """Observations of several agents, an ``(n, 2)`` array in the order of ``slots``."""
        out = np.empty((len(slots), 2), dtype=np.uint32 if self.cells > 0xFFFF else np.uint16)
        out[:, 0] = self.cell[slots]
        out[:, 1] = self.found[slots]
        return out

    def move(self, slot: int, action: int) -> None:
        """Apply one agent's action now (asynchronous mode): :meth:`_move_few` for one
        agent, without its array indexing (this is the per-step path of async agents)."""
        cell, arena = self.cell.item(slot), self.arena.item(slot)
        target = self._next_list[cell][action if 0 <= action < len(MOVES) else STAY]
        if target < 0:
            found = WALL
        elif target == cell:
            found = self._outcome_list[cell]
        elif self._obstacle_list[target]:
            found = OBSTACLE
        elif self._occupant[arena, target] >= 0:
            found = AGENT
        else:
            self._occupant[arena, cell] = -1
            self._occupant[arena, target] = slot
            self.cell[slot] = target
            found = self._outcome_list[target]
        if found == GOAL:
            self.goal_visits += 1
        self.found[slot] = found

    def _move_few(self, slots: list[int], actions: list[int]) -> None:
        """The rule of :meth:`move_many` in plain Python, for a few agents (an array
        operation costs more than a whole agent here).  A cell left earlier in the
        batch still counts as occupied."""
        occupant, cells, found_out = self._occupant, self.cell, self.found
        nxt, obstacle, outcome = self._next_list, self._obstacle_list, self._outcome_list
        arenas = self.arena[slots].tolist()
        vacated = set()
        found_all = []
        for slot, action, arena, cell in zip(slots, actions, arenas, cells[slots].tolist()):
            target = nxt[cell][action if 0 <= action < len(MOVES) else STAY]
            if target < 0:
                found = WALL
            elif target == cell:
                found = outcome[cell]
            elif obstacle[target]:
                found = OBSTACLE
            elif occupant[arena, target] >= 0 or (arena, target) in vacated:
                found = AGENT
            else:
                occupant[arena, cell] = -1
                occupant[arena, target] = slot
                cells[slot] = target
                vacated.add((arena, cell))
                found = outcome[target]
            found_all.append(found)
        found_out[slots] = found_all
        self.goal_visits += found_all.count(GOAL)

    def move_many(self, slots: np.ndarray | list[int], actions: np.ndarray | list[int]) -> None:
        """Apply the actions of ``slots`` at once (see the module docstring); an action
        out of range is ``stay``.  Arrays or lists."""
        if len(slots) <= _SCALAR_BATCH:  # the same rule, cheaper for a few agents
            self._move_few(slots if type(slots) is list else slots.tolist(),
                           actions if type(actions) is list else np.asarray(actions).tolist())
            return
        slots = np.asarray(slots, dtype=np.int64)
        actions = np.asarray(actions)
        if actions.dtype.kind == "u":
            actions = np.minimum(actions, STAY)  # not negative; beyond the last action: stay
        actions = np.where((actions >= 0) & (actions < len(MOVES)), actions, STAY)
        cell, arena = self.cell[slots], self.arena[slots]
        target = self._next[cell, actions]     # -1: off the grid
        wall = target < 0
        target = np.where(wall, cell, target)
        moving = target != cell
        obstacle = moving & self._is_obstacle[target]
        free = moving & ~obstacle
        occupied = free & (self._occupant[arena, target] >= 0)
        candidates = np.flatnonzero(free & ~occupied)
        if len(candidates):
            # the first claim on each (arena, cell) in the given order wins
            _, first = np.unique(arena[candidates] * self.cells + target[candidates], return_index=True)
            winners = candidates[first]
            if len(winners) < len(candidates):
                occupied[candidates] = True
                occupied[winners] = False
            moved = slots[winners]
            self._occupant[arena[winners], cell[winners]] = -1
            self._occupant[arena[winners], target[winners]] = moved
            self.cell[moved] = target[winners]
        found = self._outcome_at[self.cell[slots]]
        found[occupied] = AGENT
        found[obstacle] = OBSTACLE
        found[wall] = WALL
        self.found[slots] = found
        self.goal_visits += int(np.count_nonzero(found == GOAL))

    def positions(self) -> dict[str, tuple[int, int]]:
        """``agent id -> (arena, cell)``, for tests and tools (not the step path)."""
        return {a: (int(self.arena[s]), int(self.cell[s])) for a, s in self._slot.items()}

    def params(self) -> dict:
        """The layout as sent in WELCOME, enough for an agent to build its model (its
        keys before ``kind`` and ``spaces`` are version 1's)."""
        observation, action = self.spaces()
        return {
            "kind": self.kind,
            "spaces": {"observation": observation.to_wire(), "action": action.to_wire()},
            "width": self.width,
            "height": self.height,
            "obstacles": sorted(self.obstacles),
            "goals": sorted(self.goals),
            "outcomes": list(OUTCOMES),
            "actions": list(ACTIONS),
            "seed": self.config.seed,
        }
