"""What the package installs, and the layering it promises.

* ``bus/`` (the ground floor) imports nothing above it; ``coordinator/`` and ``agents/``
  import neither each other nor busbench.
* The wheel and the sdist install exactly one top-level name, ``agentbus_zmq``; beside
  the OpenAI Agents SDK (which owns a top-level ``agents``) both import, and removing
  ours leaves theirs whole.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NS = "agentbus_zmq"
#: layer -> the layers it may not import
FORBIDDEN = {
    "bus": {"agents", "coordinator", "busbench"},
    "coordinator": {"agents", "busbench"},
    "agents": {"coordinator", "busbench"},
}
#: the OpenAI Agents SDK release the clash was seen with
OPENAI_AGENTS = "openai-agents==0.24.0"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; use {NS}.<layer>"
            names.add(node.module or "")
    return names


@pytest.mark.unit
@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_lies_beneath_it(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files
    for path in files:
        for name in _imports(path):
            parts = name.split(".")
            assert parts[0] not in {"bus", "agents", "coordinator", "busbench"}, \
                f"{path.relative_to(ROOT)} imports {name}: import it as {NS}.{name}"
            if parts[0] == NS and len(parts) > 1:
                assert parts[1] not in FORBIDDEN[layer], f"{path.relative_to(ROOT)} imports {name}"


def _run(*cmd, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """An sdist, and a wheel built from it (python -m build does sdist -> wheel)."""
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--outdir", out, ROOT, timeout=900)
    return out


@pytest.mark.install
def test_the_wheel_and_the_sdist_hold_one_namespace_and_every_layer(dist):
    (wheel,) = dist.glob("agentbus_zmq-*.whl")
    (sdist,) = dist.glob("agentbus_zmq-*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {NS, f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for layer in ("bus/protocol.py", "coordinator/core.py", "agents/session.py", "busbench/run.py"):
        assert f"{NS}/{layer}" in names
    # every module of the checkout's four layers is in the wheel (a subpackage missing from
    # pyproject's package list installs nothing, and only a non-editable install shows it)
    sources = {f"{NS}/{p.relative_to(ROOT).as_posix()}" for layer in ("bus", "agents", "coordinator", "busbench")
               for p in (ROOT / layer).rglob("*.py")}
    assert sources - set(names) == set()
    assert f"{NS}/__init__.py" not in names  # a namespace package: nothing else can shadow its layers
    import tarfile

    members = tarfile.open(sdist).getnames()
    assert any(m.endswith("/bus/protocol.py") for m in members) and any(m.endswith("/pyproject.toml") for m in members)


@pytest.mark.install
def test_installed_beside_openai_agents_both_import_and_uninstalling_ours_leaves_theirs(dist, tmp_path):
    (wheel,) = dist.glob("agentbus_zmq-*.whl")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    _run(py, "-m", "pip", "install", "-q", OPENAI_AGENTS, wheel, timeout=900)
    check = ("import agents, agentbus_zmq.agents.sdk as sdk, agentbus_zmq.bus.protocol as p; "
             "from agents import Agent, Runner; "
             "assert 'openai' in open(agents.__file__).read().lower() or hasattr(agents, 'Runner'); "
             "assert sdk.Agent is not Agent and p.PROTOCOL_VERSION >= 1; print(agents.__file__)")
    out = _run(py, "-c", check, cwd=tmp_path).stdout  # not the checkout: its agents/ folder would shadow
    assert "site-packages/agents/__init__.py" in out
    # The base install has no pymdp (an extra): the explorer says what to install, in one line.
    r = subprocess.run([venv / "bin" / "bus-agent", "--kind", "explorer", "--endpoint", f"ipc://{tmp_path}/x"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert r.returncode == 1 and "pip install 'agentbus-zmq[pymdp]'" in r.stderr and "Traceback" not in r.stderr
    _run(py, "-m", "pip", "uninstall", "-y", "-q", "agentbus-zmq")
    _run(py, "-c", "from agents import Agent, Runner; import agents, sys; "
                   "sys.exit('agentbus_zmq' in sys.modules)", cwd=tmp_path)


@pytest.mark.install
def test_an_editable_install_imports_from_the_checkout(tmp_path):
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    _run(py, "-m", "pip", "install", "-q", "--no-deps", "-e", ROOT, timeout=900)
    out = _run(py, "-c", "import importlib.util as u; print(u.find_spec('agentbus_zmq.bus').origin)", cwd=tmp_path)
    assert out.stdout.strip() == str(ROOT / "bus" / "__init__.py")
