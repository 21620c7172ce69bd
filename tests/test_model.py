"""Bring your own generative model (issue #13): the explorer's --model FILE.npz, checked
against the world in WELCOME, each mistake named by array, axis and expected value."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from agentbus_zmq.agents.model import ModelError, build_model, check_model, load_model, save_model
from agentbus_zmq.coordinator.grid import GridWorld, WorldConfig
from tests.conftest import cli_env


def _world(width: int = 5, height: int = 5) -> dict:
    return GridWorld(WorldConfig(width=width, height=height, seed=3)).params()


@pytest.mark.unit
def test_a_saved_model_loads_and_fits_its_world(tmp_path):
    model = build_model(_world())
    model.E = np.full(5, 0.2)
    save_model(tmp_path / "m.npz", model)
    back = load_model(tmp_path / "m.npz")
    assert all(np.array_equal(a, b) for a, b in zip(back.A + back.B + back.C + back.D, model.A + model.B + model.C
                                                   + model.D))
    check_model(back, _world(), policy_len=1)


@pytest.mark.unit
@pytest.mark.parametrize("spoil, message", [
    (lambda m: m.A.__setitem__(1, m.A[1][:4]), r"A1 has 4 entries on axis 0; the 5x5 world needs 5 \(outcomes of "
                                               r"the found modality\)"),
    (lambda m: m.A.__setitem__(0, m.A[0] * 0.5), r"A0\[:, 0\] sums to 0.5 over axis 0; every column must be a "
                                                 r"distribution"),
    (lambda m: m.B.__setitem__(0, m.B[0][:, :, :4]), r"B0 has 4 entries on axis 2; the 5x5 world needs 5 \(actions\)"),
    (lambda m: m.D.__setitem__(0, m.D[0] * 2), r"D0 must be a distribution over the 25 cells"),
    (lambda m: m.C.pop(), r"C has 1 arrays; the world has 2 modalities"),
    (lambda m: setattr(m, "E", np.ones(3) / 3), r"E must be a distribution over the 5 policies of length 1"),
    (lambda m: m.A[1].__setitem__((0, 0), np.nan), r"A1 holds values that are not finite"),
])
def test_each_mistake_is_named(spoil, message):
    model = build_model(_world())
    spoil(model)
    with pytest.raises(ModelError, match=message):
        check_model(model, _world())


@pytest.mark.unit
def test_a_model_for_another_world_size_is_refused_at_welcome(tmp_path):
    save_model(tmp_path / "m.npz", build_model(_world(5, 5)))
    with pytest.raises(ModelError, match=r"A0 has 25 entries on axis 0; the 6x6 world needs 36"):
        check_model(load_model(tmp_path / "m.npz"), _world(6, 6))


@pytest.mark.unit
def test_files_that_are_not_models_say_so(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="is not an .npz"):
        load_model(tmp_path / "junk.npz")
    np.savez(tmp_path / "partial.npz", A0=np.eye(2), B0=np.ones((2, 2, 5)) / 2, C0=np.zeros(2))
    with pytest.raises(ModelError, match="has no D0"):
        load_model(tmp_path / "partial.npz")
    np.savez(tmp_path / "objects.npz", A0=np.array([np.eye(2), np.eye(3)], dtype=object), B0=np.eye(2),
             C0=np.eye(2), D0=np.eye(2))
    with pytest.raises(ModelError, match="holds object values"):         # no pickles
        load_model(tmp_path / "objects.npz")


def _npz_with_header(path, name: str, header: dict, data: bytes = b"") -> None:
    """An .npz whose one array's header says what a hostile file would (no data needed)."""
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{name}.npy", buf.getvalue() + data)


@pytest.mark.parametrize("case, expect", [
    ({"descr": "<f8", "fortran_order": False, "shape": (10**12,)}, "declares 7450.6 GiB"),   # a lying header
    ({"descr": "<f4", "fortran_order": False, "shape": (1 << 28,)}, "declares 2.0 GiB"),     # a deflate bomb's size
    ({"descr": [("a", "<f8"), ("b", "<i4")], "fortran_order": False, "shape": (4,)}, "real numbers"),
    ({"descr": "<c16", "fortran_order": False, "shape": (4,)}, "holds complex128 values"),
    ({"descr": "<f8", "fortran_order": False, "shape": (2, 2, 2, 2)}, "has 4 axes"),
])
def test_a_hostile_model_file_is_refused_from_its_headers_before_anything_is_allocated(tmp_path, case, expect):
    import resource

    _npz_with_header(tmp_path / "evil.npz", "A0", case)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelError, match=re.escape(expect)):
        load_model(tmp_path / "evil.npz")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000   # KB: nothing big was made


def test_a_model_file_with_other_entries_or_a_plain_npy_says_so(tmp_path):
    np.savez(tmp_path / "extra.npz", A0=np.eye(2), notes=np.zeros(2))
    with pytest.raises(ModelError, match="holds 'notes.npy'; a model holds only"):
        load_model(tmp_path / "extra.npz")
    np.save(tmp_path / "plain.npy", np.eye(2))
    with pytest.raises(ModelError, match="is not an .npz"):
        load_model(tmp_path / "plain.npy")


def test_an_explorer_steps_with_its_own_model_and_a_bad_one_is_one_line(bus, tmp_path):
    bus.coordinator()                     # the default 5x5 world
    model = build_model(_world())          # built for another seed's layout: same sizes, valid
    model.C[1] = np.array([0.0, -1.0, 4.0, 0.0, -1.0])   # its own preferences
    save_model(tmp_path / "mine.npz", model)
    bus.agents(1, "--kind", "explorer", "--model", str(tmp_path / "mine.npz"))
    bus.wait_agents(1, timeout=60)
    (tmp_path / "bad.npz").write_bytes(b"nope")
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.agents", "--endpoint", bus.endpoint, "--kind", "explorer",
                        "--model", str(tmp_path / "bad.npz")], capture_output=True, text=True, env=cli_env(),
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "is not an .npz" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.busbench", "--agents", "2", "--model",
                        str(tmp_path / "bad.npz")], capture_output=True, text=True, env=cli_env(), timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "is not an .npz" in r.stderr and "Traceback" not in r.stderr   # busbench too
