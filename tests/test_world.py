"""The grid world and the explorer's model built from it."""

from __future__ import annotations

import numpy as np
import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from agentbus_zmq.coordinator.grid import AGENT, EMPTY, GOAL, OBSTACLE, WALL, GridWorld, WorldConfig, WorldFull

UP, DOWN, LEFT, RIGHT, STAY = range(5)


@pytest.mark.unit
def test_same_seed_same_world_and_placements():
    a, b = GridWorld(WorldConfig(seed=7)), GridWorld(WorldConfig(seed=7))
    assert (a.obstacles, a.goals) == (b.obstacles, b.goals)
    for i in range(5):
        a.place(f"x{i}"), b.place(f"x{i}")
    assert a.positions() == b.positions()
    c = GridWorld(WorldConfig(seed=8))
    assert (a.obstacles, a.goals) != (c.obstacles, c.goals)


def _world(**kw) -> GridWorld:
    return GridWorld(WorldConfig(width=3, height=3, obstacles=0, goals=0, **kw))


def _put(w: GridWorld, agent_id: str, cell: int, arena: int = 0) -> int:
    """Place ``agent_id`` exactly at ``cell`` of ``arena`` (tests only)."""
    while w.arenas <= arena:
        w._open_arenas()
    slot = w.place(agent_id)
    w._occupant[w.arena[slot], w.cell[slot]] = -1
    w._count[w.arena[slot]] -= 1
    w.arena[slot], w.cell[slot], w.found[slot] = arena, cell, EMPTY
    w._occupant[arena, cell] = slot
    w._count[arena] += 1
    return slot


@pytest.mark.unit
def test_walls_obstacles_and_agents_block_and_are_observed():
    w = _world()
    w._set_layout(frozenset({1}), frozenset({4}))
    a, b = _put(w, "a", 0), _put(w, "b", 3)
    w.move(a, UP)
    assert w.observe(a) == [0, WALL]
    w.move(a, RIGHT)
    assert w.observe(a) == [0, OBSTACLE]
    w.move(a, DOWN)
    assert w.observe(a) == [0, AGENT]
    w.move(b, RIGHT)
    assert w.observe(b) == [4, GOAL] and w.goal_visits == 1
    w.move(b, 99)                                  # out of range: stay
    assert w.observe(b) == [4, GOAL] and w.goal_visits == 2


@pytest.mark.unit
def test_simultaneous_moves_first_claim_wins_and_vacated_cells_stay_blocked():
    w = _world()
    b, a = _put(w, "b", 3), _put(w, "a", 5)         # both want cell 4
    c = _put(w, "c", 0)                             # wants 3, which b is leaving
    w.move_many(np.array([b, a, c]), np.array([RIGHT, LEFT, DOWN]))
    assert w.positions() == {"b": (0, 4), "a": (0, 5), "c": (0, 0)}
    assert w.observe(a) == [5, AGENT] and w.observe(c) == [0, AGENT] and w.observe(b) == [4, EMPTY]


@pytest.mark.unit
def test_agents_in_different_arenas_never_meet():
    w = _world(arena_agents=1)
    a, b = w.place("a"), w.place("b")
    assert (w.arena[a], w.arena[b]) == (0, 1) and w.arenas >= 2
    _put(w, "a", 3, 0)
    _put(w, "b", 5, 1)
    w.move_many(np.array([a, b]), np.array([RIGHT, LEFT]))  # both into cell 4, of their own arenas
    assert w.observe(a) == [4, EMPTY] and w.observe(b) == [4, EMPTY]


@st.composite
def _batches(draw):
    n = draw(st.integers(1, 150))
    cells = draw(st.lists(st.integers(0, 8), min_size=n, max_size=n))
    arenas = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    actions = draw(st.lists(st.integers(-1, 6), min_size=n, max_size=n))
    return list(zip(cells, arenas, actions))


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(_batches(), st.sampled_from([np.int64, np.uint8]))
def test_vectorised_and_one_by_one_moves_agree(batch, dtype):
    """The array path (many agents) and the scalar path (a few) apply one rule."""
    worlds = []
    for _ in range(2):
        w = GridWorld(WorldConfig(width=3, height=3, obstacles=1, goals=1, seed=4, max_arenas=10))
        (obstacle,) = w.obstacles
        slots, seen = [], set()
        for i, (cell, arena, action) in enumerate(batch):
            if (arena, cell) in seen or cell == obstacle:
                continue
            seen.add((arena, cell))
            slots.append((_put(w, f"a{i}", cell, arena), action))
        worlds.append((w, slots))
    (w1, s1), (w2, s2) = worlds
    slots = np.array([s for s, _ in s1], dtype=np.int64)
    actions = np.array([a % 256 if dtype is np.uint8 else a for _, a in s1], dtype=dtype)
    w1.move_many(slots, actions)                   # vectorised when more than a few
    w2._move_few(slots.tolist(), actions.tolist())  # one by one
    assert w1.positions() == w2.positions()
    assert w1.found[slots].tolist() == w2.found[slots].tolist() and w1.goal_visits == w2.goal_visits
    occupied = w1._occupant[w1._occupant >= 0]
    assert len(occupied) == len(set(occupied.tolist()))  # one agent per cell, each in one cell


@pytest.mark.unit
@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(-1, 6)), min_size=1, max_size=60))
def test_a_single_move_is_a_batch_of_one(moves):
    """``move`` (the async path) applies the batch rule to one agent."""
    a, b = (GridWorld(WorldConfig(width=3, height=3, obstacles=1, goals=2, seed=5)) for _ in range(2))
    for w in (a, b):
        for i in range(6):
            w.place(f"a{i}")
    for slot, action in moves:
        a.move(slot, action)
        b._move_few([slot], [action])
        assert a.positions() == b.positions() and a.found.tolist() == b.found.tolist()
    assert a.goal_visits == b.goal_visits


@pytest.mark.unit
def test_a_full_world_refuses_another_agent_and_a_freed_cell_is_reused():
    w = GridWorld(WorldConfig(width=2, height=2, obstacles=1, goals=0, max_arenas=1))
    for i in range(3):
        w.place(f"a{i}")
    with pytest.raises(WorldFull):
        w.place("a3")
    w.remove("a0")
    assert w.arena[w.place("a3")] == 0


@pytest.mark.unit
def test_arenas_open_as_needed_and_placement_cost_ignores_the_world_size():
    w = GridWorld(WorldConfig(width=300, height=300, obstacles=23_000, goals=2, arena_agents=10))
    for i in range(1_000):
        w.place(f"a{i}")
    assert w.arenas >= 100 and sorted(set(w.arena[[w.slot(f"a{i}") for i in range(1000)]].tolist())) == list(range(100))
    w.remove("a5")
    assert w.arena[w.place("new")] == 0            # the lowest arena with room
