"""The second-language agent (examples/node-agent, issue #13): it passes bus-conformance
and steps beside Python explorer agents in a busbench --connect run, ledger balanced."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env, wait_until

AGENT = Path(__file__).resolve().parent.parent / "examples" / "node-agent"


@pytest.fixture
def node():
    node = shutil.which("node")
    if node is None or not (AGENT / "node_modules" / "zeromq").is_dir():
        pytest.fail("the Node agent needs node and its packages: install Node.js (apt-get install nodejs npm), "
                    "then `npm ci` in examples/node-agent (the README's test command and .ci/run do)")
    return node


def test_the_node_agent_passes_the_conformance_kit(node):
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.busbench.conformance", "--format", "json", "--",
                        node, str(AGENT / "agent.js")], capture_output=True, text=True, env=cli_env(), timeout=180,
                       stdin=subprocess.DEVNULL)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["passed"], [c for c in report["checks"] if not c["passed"]]


def test_the_node_agent_steps_beside_explorers_in_a_busbench_run(node, bus, tmp_path):
    bus.coordinator()
    bus.agents(2, "--kind", "explorer", agent_id="py")
    env = {**cli_env(), "BUS_ENDPOINT": bus.endpoint, "AGENT_ID": "node-1"}
    proc = subprocess.Popen([node, str(AGENT / "agent.js")], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stats = bus.wait_agents(3, timeout=60)
        assert "node-1" in stats["agent_ids"]
        out = tmp_path / "r.json"
        r = subprocess.run([sys.executable, "-m", "agentbus_zmq.busbench", "--connect", bus.endpoint, "--duration",
                            "2", "--format", "json", "--output", str(out)], capture_output=True, text=True,
                           env=cli_env(), timeout=180, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        (run,) = json.loads(out.read_text())["runs"]
        assert run["agents"] == 3 and run["balanced"] and run["steps"] > 0
        rows = {row["id"]: row for row in bus.client.request("agents")["agents"]}
        assert rows["node-1"]["kind"] == "node-walker" and rows["node-1"]["steps"] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        wait_until(lambda: "node-1" not in bus.stats()["agent_ids"], 5, "the node agent's BYE")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
