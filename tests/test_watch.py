"""Watching a live bus (issue #12): /metrics scraped during a real run, the efficiency
alert raised and cleared around a stalled agent, and busctl as an operator uses it
(``busctl top`` in tmux, as a person would see it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import cli_env, wait_until


def _metrics_url(bus) -> str:
    found = wait_until(lambda: re.search(r"metrics on (http://\S+/metrics)", bus.coordinator_child.log_path.read_text()),
                       10, "the metrics address in the log")
    return found.group(1)


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _busctl(bus, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**cli_env(), "BUS_ENDPOINT": bus.endpoint, "COLUMNS": "160"}
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.bus.ctl", *args], capture_output=True, text=True,
                       env=env, timeout=60, stdin=subprocess.DEVNULL)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_metrics_during_a_run_match_the_ledger(bus):
    bus.coordinator(None, "--metrics", "127.0.0.1:0")
    url = _metrics_url(bus)
    bus.agents(3, "--kind", "null")
    bus.wait_agents(3)
    def bracketed():  # a page is rendered at most once a second: until one falls between two stats
        before, m, after = bus.stats(), _scrape(url), bus.stats()
        steps = m[("agentbus_agent_steps_total", ())]
        return before["ledger"]["received"] <= steps <= after["ledger"]["received"] and (before, m, after)

    before, m, after = wait_until(bracketed, 10, "a page rendered between two stats requests", interval=0.1)
    steps = m[("agentbus_agent_steps_total", ())]
    assert steps > 0
    assert before["ledger"]["sent"] <= m[("agentbus_observations_sent_total", ())] <= after["ledger"]["sent"]
    assert m[("agentbus_agents_registered", ())] == 3 and m[("agentbus_agents_ready", ())] == 3
    assert m[("agentbus_bus_latency_seconds_count", ())] == pytest.approx(steps, abs=3)
    assert m[("agentbus_connection_events_total", (("event", "accepted"),))] >= 3
    for name in ("agentbus_ticks_total", "agentbus_steps_late_total", "agentbus_steps_missing_total",
                 "agentbus_messages_undeliverable_total", "agentbus_curve_refused_total",
                 "agentbus_coordinator_cpu_seconds_total", "agentbus_efficiency", "agentbus_efficiency_alert",
                 "agentbus_tick_duration_seconds_count", "agentbus_agent_cpu_seconds_total"):
        assert (name, ()) in m, name
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=5)
    assert info.value.code == 404


def test_a_stalled_agent_raises_the_alert_naming_it_and_its_return_clears_it(bus, tmp_path):
    log = tmp_path / "hook.log"
    hook = (f"{sys.executable} -c \"import os; open('{log}', 'a').write(os.environ['BUS_ALERT_STATE'] + '|' + "
            f"os.environ['BUS_ALERT_CAUSE'] + chr(10))\"")
    bus.coordinator(None, "--metrics", "127.0.0.1:0", "--deadline", "0.2", "--heartbeat", "3", "--drop-after", "0",
                    "--efficiency-window", "2", "--alert-for", "1", "--alert-threshold", "0.2", "--alert-hook", hook)
    url = _metrics_url(bus)
    bus.agents(2, "--kind", "explorer")
    stats = bus.wait_agents(2, timeout=60)
    wait_until(lambda: (bus.stats()["live"]["efficiency"] or 0) > 0.2, 30, "a healthy efficiency first")
    victim, pid = sorted(stats["agent_pids"].items())[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        raised = wait_until(lambda: log.exists() and [line for line in log.read_text().splitlines()
                                                     if line.startswith("raised|")], 30, "the alert's hook")
        assert victim in raised[0] and "missed" in raised[0]
        wait_until(lambda: _scrape(url)[("agentbus_efficiency_alert", ())] == 1, 5, "the page to show the alert")
        assert bus.stats()["live"]["alert"] is True
        text = bus.coordinator_child.log_path.read_text()
        assert text.count("below the 20% threshold") == 1 and victim in text
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: "cleared|" in log.read_text(), 30, "the alert to clear")
    wait_until(lambda: _scrape(url)[("agentbus_efficiency_alert", ())] == 0, 5, "the page to show it cleared")
    assert "efficiency alert cleared" in bus.coordinator_child.log_path.read_text()


def test_busctl_status_and_agents_show_what_stats_says(bus):
    bus.coordinator()
    bus.agents(3, "--kind", "null")
    bus.wait_agents(3)
    shown = json.loads(_busctl(bus, "status", "--format", "json").stdout)
    stats = bus.stats()
    assert set(shown) == set(stats)
    for key in ("session", "mode", "agents", "ready", "hosts", "arenas", "agent_ids", "agent_pids", "pending"):
        assert shown[key] == stats[key], key
    rows = json.loads(_busctl(bus, "agents", "--format", "json", "--sort", "steps").stdout)
    assert sorted(r["id"] for r in rows) == sorted(stats["agent_ids"])
    assert [r["steps"] for r in rows] == sorted((r["steps"] for r in rows), reverse=True)
    assert all(r["state"] in ("idle", "stepping") and r["p50_us"] is not None for r in rows)
    table = _busctl(bus, "status").stdout
    assert stats["session"] in table and "efficiency" in table and "3 registered" in table
    table = _busctl(bus, "agents", "--sort", "p99", "--limit", "2").stdout
    assert "2 agents, by p99" in table
    ping = _busctl(bus, "ping").stdout                    # a command object (bus/commands/ping.py) and nothing else
    assert re.fullmatch(rf"agentbus at {re.escape(bus.endpoint)}: session {stats['session']}, answered in "
                        rf"[\d.]+ ms\n", ping), ping


def test_busctl_fits_80_columns_with_whole_ids_and_no_trailing_spaces(bus):
    """At 80 columns (a default terminal, and what rich assumes of a pipe) the table used
    to cut ids to `agent…` and headers to `l…`, and `status` padded every line."""
    long_id = "an-agent-whose-id-is-long-enough-to-matter"
    bus.coordinator()
    bus.agents(2, "--kind", "null", agent_id=long_id)
    bus.wait_agents(2)
    env = {**cli_env(), "BUS_ENDPOINT": bus.endpoint, "COLUMNS": "80"}
    for args in (["agents"], ["status"]):
        out = subprocess.run([sys.executable, "-m", "agentbus_zmq.bus.ctl", *args], capture_output=True, text=True,
                             env=env, timeout=60, stdin=subprocess.DEVNULL, check=True).stdout
        lines = out.splitlines()
        assert lines and all(line == line.rstrip() for line in lines), args
        assert max(map(len, lines)) <= 80 and "…" not in out, out
    agents = subprocess.run([sys.executable, "-m", "agentbus_zmq.bus.ctl", "agents"], capture_output=True, text=True,
                            env=env, timeout=60, stdin=subprocess.DEVNULL, check=True).stdout
    assert f"{long_id}-1" in agents and f"{long_id}-2" in agents      # whole, on one line each
    header = next(line for line in agents.splitlines() if " id " in line)
    assert "state" in header and "p99 ms" in header                     # the columns that matter most stay
    assert "not shown in 80 columns: pid / host" in agents             # and the caption says what went


def test_busctl_takes_its_connection_options_before_or_after_the_subcommand(bus, tmp_path):
    bus.coordinator()
    bus.agents(1, "--kind", "null")
    bus.wait_agents(1)
    nowhere = f"ipc://{tmp_path}/nothing-here.ipc"
    for argv in (["--endpoint", bus.endpoint, "status", "--format", "json"],
                 ["status", "--endpoint", bus.endpoint, "--format", "json"],
                 ["--endpoint", nowhere, "status", "--endpoint", bus.endpoint, "--timeout", "5", "--format", "json"],
                 ["agents", "--endpoint", bus.endpoint, "--format", "json"]):
        r = subprocess.run([sys.executable, "-m", "agentbus_zmq.bus.ctl", *argv], capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL, env=cli_env())
        assert r.returncode == 0, (argv, r.stderr)
        shown = json.loads(r.stdout)
        assert (shown["agents"] == 1) if isinstance(shown, dict) else (len(shown) == 1), argv


def test_busctl_says_where_it_tried_when_nothing_answers(tmp_path):
    # A refused connection ends it at once: its --timeout of 10 minutes is never waited out
    # (the subprocess' own 60 s would end the test first).
    env = {**cli_env(), "BUS_ENDPOINT": f"ipc://{tmp_path}/nobody.ipc"}
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.bus.ctl", "--timeout", "600", "status"],
                       capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and f"ipc://{tmp_path}/nobody.ipc" in r.stderr
    assert "nothing listens there (connection refused)" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_busctl_top_in_tmux_as_a_person_sees_it(bus, tmp_path):
    if shutil.which("tmux") is None:
        pytest.fail("busctl top is tested in tmux: install it (apt-get install tmux; .ci/run does)")
    bus.coordinator()
    # tmux's default 80 columns, and an id that the table used to cut ("watched-agent-in-…")
    watched = "watched-agent-in-a-narrow-terminal"
    bus.agents(2, "--kind", "null", agent_id=watched)
    bus.wait_agents(2)
    session = f"busctl-{os.getpid()}"
    command = (f"env -u COLUMNS -u LINES BUS_ENDPOINT={bus.endpoint} PATH={os.path.dirname(sys.executable)}:{os.environ['PATH']} "
               f"{sys.executable} -m agentbus_zmq.bus.ctl top --interval 0.5 2>{tmp_path}/top.err")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", command], check=True,
                   timeout=10)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                              timeout=10).stdout

    try:
        deadline = time.monotonic() + 20
        while f"{watched}-1" not in (first := screen()) or "efficiency" not in first:
            if time.monotonic() > deadline:
                err = (tmp_path / "top.err").read_text() if (tmp_path / "top.err").exists() else ""
                pytest.fail(f"busctl top did not draw the bus; the screen:\n{first}\nits stderr:\n{err}")
            time.sleep(0.1)
        assert f"{watched}-2" in first and ("stepping" in first or "idle" in first) and "…" not in first
        tick = re.search(r"tick ([\d,]+)", first).group(1)
        wait_until(lambda: (m := re.search(r"tick ([\d,]+)", screen())) and m.group(1) != tick, 10,
                   "the view to refresh")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], timeout=10)


def test_busbench_reports_the_live_efficiency_by_the_gauges_formula(tmp_path):
    """busbench's E_live is the coordinator's formula over busbench's window: the agents'
    CPU in steps / (window x min(N, C)).  (How close it comes to E(N) is a measurement,
    not a test: docs/observability.md.)"""
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.busbench", "--agents", "2", "--agent-kind", "explorer",
                        "--duration", "2", "--format", "json", "--output", str(out)],
                       capture_output=True, text=True, env=cli_env(), timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["agent_cpu_s"] > 0
    assert run["efficiency_live"] == pytest.approx(run["agent_cpu_s"] / (run["elapsed_s"] * min(2, result["cores"])),
                                                   rel=1e-6)
    assert 0 < run["efficiency_live"] <= 1.05             # at most the cores' time (a step may straddle an edge)


def test_an_id_longer_than_the_terminal_folds_whole_and_the_columns_that_matter_stay():
    from rich.console import Console

    from agentbus_zmq.bus.commands.agents import agents_table
    from agentbus_zmq.bus.report import AgentRow

    rows = [AgentRow(id=f"a-{i}", pid=100 + i, state="stepping", steps=10_000, p50_us=900, p99_us=2_100)
            for i in range(3)] + [AgentRow(id="x" * 100 + "-end", pid=1, state="idle")]
    for width in (80, 120):
        console = Console(width=width, record=True)
        console.print(agents_table(rows, "t", str, width))
        lines = console.export_text().splitlines()
        assert max(map(len, lines)) <= width
        ids = "".join(line.split("│")[1].strip() for line in lines if line.startswith("│"))
        assert "x" * 100 + "-end" in ids                    # folded over lines, every character kept
        header = next(line for line in lines if line.startswith("┃"))
        assert all(name in header for name in ("id", "state", "steps", "p99 ms"))
