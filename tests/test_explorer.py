"""The explorer kind: its model built from the world, its steps, and pymdp imported for
inference only (moved out of test_world.py, which tests the world alone)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from agentbus_zmq.agents.model import build_model
from agentbus_zmq.coordinator.grid import GOAL, GridWorld, WorldConfig


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
