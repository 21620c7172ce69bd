"""The grid world and the explorer's model built from it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from agentbus_zmq.agents.model import build_model
from hypothesis import given, settings
from hypothesis import strategies as st

from agentbus_zmq.coordinator.world import AGENT, EMPTY, GOAL, OBSTACLE, WALL, GridWorld, WorldConfig, WorldFull

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


@pytest.mark.unit
def test_model_matches_the_world():
    w = GridWorld(WorldConfig(seed=3))
    m = build_model(w.params())
    S = 25
    assert m.A[0].shape == (S, S) and m.A[1].shape == (5, S) and m.B[0].shape == (S, S, 5)
    for A in m.A:
        assert np.allclose(A.sum(axis=0), 1.0)
    assert np.allclose(m.B[0].sum(axis=0), 1.0)
    for g in w.goals:
        assert m.A[1][:, g].argmax() == GOAL
    # a move into an obstacle never succeeds in the model either
    ob = min(w.obstacles)
    for s in range(S):
        for a in range(5):
            if s != ob:
                assert m.B[0][ob, s, a] == 0.0
    assert m.D[0][list(w.obstacles)].sum() == 0.0


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_explorer_steps_in_the_world_with_bounded_history(backend):
    from agentbus_zmq.agents.kinds.explorer import Explorer

    w = GridWorld(WorldConfig(seed=2))
    agent = Explorer(backend=backend)
    agent.prepare()
    agent.configure(w.params(), "e1")
    slot = w.place("e1")
    actions = set()
    for _ in range(300):
        a = agent.step(w.observe(slot))
        assert a in range(5)
        actions.add(a)
        w.move(slot, a)
    assert len(actions) > 1  # it explores, it does not stand still
    if backend == "numpy":
        assert len(agent._impl.agent.prev_actions) <= 1


def test_slim_pymdp_import_defers_plotting_and_numpy_extras_but_keeps_them_usable():
    code = (
        "import sys\n"
        "from agentbus_zmq.agents.kinds._pymdp import legacy_agent_class\n"
        "legacy_agent_class()\n"
        "assert not any(m.split('.')[0] in ('matplotlib', 'seaborn', 'pandas') for m in sys.modules), 'loaded'\n"
        "import pymdp.legacy.utils as u\n"
        "assert type(u.plt).__name__ == '_Deferred'\n"
        "import matplotlib\n"
        "assert type(matplotlib).__name__ == 'module' and hasattr(matplotlib, '__version__')\n"
        "assert u.sns.color_palette is not None\n"
        "assert 'numpy.f2py' not in sys.modules and 'numpy.testing' not in sys.modules, 'numpy extras loaded'\n"
        "import numpy, numpy.testing, numpy.f2py\n"
        "assert type(numpy.testing).__name__ == 'module' and numpy.testing.assert_allclose\n"
        "assert type(numpy.f2py).__name__ == 'module' and numpy.f2py.run_main\n"
        "from scipy._lib.array_api_compat import numpy as compat\n"
        "compat.testing.assert_allclose(1.0, 1.0)  # scipy's clone keeps a working placeholder\n"
        "print('ok')\n"
    )
    _prints_ok(code)


def _prints_ok(code: str, **env: str) -> None:
    """Run ``code`` in a fresh interpreter (imports are what is tested); it must print ok."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_slim_jax_pymdp_import_defers_plotting_too():
    code = (
        "import sys\n"
        "from agentbus_zmq.agents.kinds._pymdp import jax_agent_class\n"
        "Agent = jax_agent_class()\n"
        "assert Agent.__module__ == 'pymdp.agent'\n"
        "assert not [m for m in ('matplotlib', 'seaborn', 'numpy.f2py', 'numpy.testing') if m in sys.modules]\n"
        "import pymdp.utils as u, matplotlib.pyplot\n"
        "assert type(u.plt).__name__ == '_Deferred' and type(matplotlib.pyplot).__name__ == 'module'\n"
        "assert u.plt.close is matplotlib.pyplot.close  # the placeholder reaches the real pyplot\n"
        "print('ok')\n"
    )
    _prints_ok(code, JAX_PLATFORMS="cpu")


def test_a_host_of_jax_explorers_is_one_batched_model_stepped_in_one_call():
    from agentbus_zmq.agents.host import Host
    from agentbus_zmq.agents.kinds import create
    from agentbus_zmq.bus import protocol as P

    w = GridWorld(WorldConfig(seed=2))
    host = Host(lambda: create("explorer", backend="jax"), "j-", 1, 6)
    host.prepare()
    slots = np.array([w.place(i) for i in host.ids])
    host.on_start(P.HostWelcome("s", "h", {"world": w.params()}, w.arena[slots].astype(np.uint32)))
    assert all(a.batched for a in host.agents) and len({id(a._impl) for a in host.agents}) == 1
    seen = set()
    for _ in range(30):
        result = host.step(P.HostObservation(0, np.arange(6, dtype=np.uint16), w.observe_many(slots)))
        assert result.failed == [] and result.actions.shape == (6,)
        seen.update(result.actions.tolist())
        w.move_many(slots, result.actions)
    assert seen <= set(range(5)) and len(seen) > 1
    batch = host.agents[0]._impl
    prior_before = [np.asarray(p)[1].copy() for p in batch._prior]
    some = np.array([0, 2], dtype=np.uint16)              # member 1 is not stepped: its beliefs stay
    host.step(P.HostObservation(0, some, w.observe_many(slots[[0, 2]])))
    assert all(np.array_equal(np.asarray(p)[1], b) for p, b in zip(batch._prior, prior_before))
