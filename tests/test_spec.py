"""The protocol page keeps its promises: its minimal agent, extracted from the page, runs
against a real coordinator with nothing of agentbus imported (issue #13)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import cli_env, wait_until

PAGE = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def _minimal_agent() -> str:
    text = PAGE.read_text()
    section = text[text.index("## A minimal agent"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_pages_minimal_agent_steps_and_says_bye(bus, tmp_path):
    code = _minimal_agent()
    assert "agentbus" not in code                         # pyzmq and msgpack only
    script = tmp_path / "minimal_agent.py"
    script.write_text(code)
    bus.coordinator()
    env = {**cli_env(), "BUS_ENDPOINT": bus.endpoint, "AGENT_ID": "minimal-1"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: bus.stats()["ready"] == 1, 20, "the minimal agent to step")
        received = bus.stats()["ledger"]["received"]
        wait_until(lambda: bus.stats()["ledger"]["received"] > received + 100, 10, "it to keep stepping")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stdout.read()
        stats = wait_until(lambda: (s := bus.stats())["agents"] == 0 and s, 5, "its BYE")
        assert "expired" not in stats["ledger"]["errors"] and stats["ledger"]["balanced"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
