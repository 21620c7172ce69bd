"""The grid world and the explorer's model built from it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from agentbus_zmq.agents.model import build_model
from agentbus_zmq.coordinator.world import AGENT, EMPTY, GOAL, OBSTACLE, WALL, GridWorld, WorldConfig, WorldFull

UP, DOWN, LEFT, RIGHT, STAY = range(5)


@pytest.mark.unit
def test_same_seed_same_world_and_placements():
    a, b = GridWorld(WorldConfig(seed=7)), GridWorld(WorldConfig(seed=7))
    assert (a.obstacles, a.goals) == (b.obstacles, b.goals)
    assert [a.place(f"x{i}") for i in range(5)] == [b.place(f"x{i}") for i in range(5)]
    c = GridWorld(WorldConfig(seed=8))
    assert (a.obstacles, a.goals) != (c.obstacles, c.goals)


def _world(**kw) -> GridWorld:
    w = GridWorld(WorldConfig(width=3, height=3, obstacles=0, goals=0, **kw))
    return w


def _put(w: GridWorld, agent_id: str, cell: int) -> None:
    w.position[agent_id] = cell
    w._occupant[cell] = agent_id
    w._found[agent_id] = EMPTY


@pytest.mark.unit
def test_walls_obstacles_and_agents_block_and_are_observed():
    w = _world()
    w.obstacles = frozenset({1})
    w.goals = frozenset({4})
    _put(w, "a", 0)
    _put(w, "b", 3)
    w.move("a", UP)
    assert w.observe("a") == [0, WALL]
    w.move("a", RIGHT)
    assert w.observe("a") == [0, OBSTACLE]
    w.move("a", DOWN)
    assert w.observe("a") == [0, AGENT]
    w.move("b", RIGHT)
    assert w.observe("b") == [4, GOAL] and w.goal_visits == 1


@pytest.mark.unit
def test_conflicting_moves_resolve_in_agent_id_order():
    w = _world()
    _put(w, "b", 3)   # both want cell 4
    _put(w, "a", 5)
    w.step({"b": RIGHT, "a": LEFT})
    assert w.position == {"a": 4, "b": 3}
    assert w.observe("b") == [3, AGENT]


@pytest.mark.unit
def test_full_world_refuses_another_agent():
    w = GridWorld(WorldConfig(width=2, height=2, obstacles=1, goals=0))
    for i in range(3):
        w.place(f"a{i}")
    with pytest.raises(WorldFull):
        w.place("a3")
    w.remove("a0")
    assert w.place("a3") in range(4)


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
    w.place("e1")
    actions = set()
    for _ in range(300):
        a = agent.step(w.observe("e1"))
        assert a in range(5)
        actions.add(a)
        w.move("e1", a)
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
