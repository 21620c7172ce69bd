"""busbench: option parsing, aggregation, requirements, baseline comparison and the gate
(no processes), then short real sweeps end to end."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from agentbus_zmq.busbench import report as rpt
from agentbus_zmq.busbench.__main__ import cli
from agentbus_zmq.busbench.run import slope
from tests.conftest import cli_env as _env


def _run(agents: int, rate: float, efficiency: float, lost: int = 0, balanced: bool = True, growth: float = 0.0,
         steps: int = 100_000) -> dict:
    return {
        "agents": agents, "rate": rate, "efficiency": efficiency, "efficiency_peer": efficiency, "overhead": 1 - efficiency,
        "elapsed_s": 5.0, "coordinator_cpu_us_per_step": 30.0, "coordinator_thread_cpu_us_per_step": 20.0,
        "compute_share": 0.8, "ready_s": 0.4, "steps": steps, "ticks": 100, "lost_steps": lost,
        "late_steps": 0, "missing_steps": lost, "undeliverable": 0, "registered": agents,
        "latency_ms": {"p50": 0.3, "p95": 1.0, "p99": 2.0},
        "memory_mb": {"processes": agents, "rss_per_agent": 40.0, "pss_per_agent": 8.0, "uss_per_agent": 3.0,
                      "pss_total": 8.0 * agents},
        "memory_growth": {"samples": 10, "coordinator_mb_per_1k_steps": 0.0, "agent_mb_per_1k_steps": growth},
        "ledger": {"balanced": balanced}, "errors": [],
    }


def _result(runs: list[list[dict]], r1: float = 1000.0, kind: str = "explorer") -> dict:
    return {
        "started": "now", "python": "3", "pyzmq": "z", "libzmq": "l", "msgpack": "m", "pymdp": "p", "numpy": "n",
        "host": {"cores": 2, "cpu": "cpu", "platform": "linux"}, "cores": 2,
        "config": {"kind": kind, "backend": "numpy", "policy_len": 1, "mode": "lockstep", "transport": "ipc",
                   "repeat": len(runs[0])},
        "single_agent": {"rate": r1, "step_us": 1e6 / r1}, "single_agent_rate": r1,
        "runs": [rpt.aggregate(reps) for reps in runs],
    }


@pytest.mark.unit
def test_aggregate_takes_medians_sums_losses_and_keeps_the_spread():
    agg = rpt.aggregate([_run(10, 900, 0.45), _run(10, 1000, 0.5, lost=2), _run(10, 1500, 0.75)])
    assert agg["rate"] == 1000 and agg["efficiency"] == 0.5
    assert agg["spread"]["rate"] == [900, 1500] and agg["lost_steps"] == 2 and agg["repeat"] == 3
    assert agg["latency_ms"]["p99"] == 2.0 and len(agg["repeats"]) == 3


@pytest.mark.unit
def test_the_verdict_says_pass_below_or_why_there_is_none():
    passing = rpt.notes(_result([[_run(2, 1200, 0.6)], [_run(10, 1500, 0.75)]]))
    assert passing[0] == "verdict: PASS: E(N) above the 50% required at every count (lowest 60.0% at 2 agents)"
    below = _run(10, 900, 0.45)
    below["efficiency_pool"] = 0.95
    line = rpt.notes(_result([[_run(2, 1200, 0.6)], [below]]))[0]
    assert line.startswith("verdict: BELOW: E(N) 45.0% at 10 agents is under the 50% required (1 of 2 counts)")
    assert "E_pool 95%: the bus costs little" in line
    # a step of 1 us: the efficiency of a no-op says nothing, and the verdict says so
    assert rpt.notes(_result([[_run(2, 1200, 0.001)]], r1=1e6, kind="null"))[0].startswith(
        "verdict: none on efficiency: a null step takes 1 us alone")


@pytest.mark.unit
def test_the_notes_explain_efficiencies_apart_the_peer_and_a_crowded_machine():
    run = _run(40, 1200, 0.6)
    run.update(efficiency_live=0.3, agent_cpu_s=0.5, efficiency_peer_rate=0.9, peer="gym")
    notes = rpt.notes(_result([[run]]))
    assert "against the peer (gym): R/R_peer 0.90; the peer is ahead at N = 40" in notes
    apart = next(n for n in notes if n.startswith("E(N) 60.0% and E_live 30.0% differ at 40 agents"))
    assert "a step used 5 us of agent CPU on the bus against 1000 us of wall time alone (r1)" in apart
    assert any(n.startswith("load: 40 agent processes on 2 cores") and "--per-host auto" in n for n in notes)
    close = _run(2, 1200, 0.6)
    close.update(efficiency_live=0.55, agent_cpu_s=0.5)
    assert [n for n in rpt.notes(_result([[close]])) if "differ" in n or n.startswith("load")] == []


@pytest.mark.unit
def test_requirements_pass_and_fail_on_the_measured_figures():
    good = {c.name: c.passed for c in rpt.requirements(_result([[_run(10, 1200, 0.6)]]))}
    assert all(v is True for v in good.values()) and "coordination efficiency above 50 % at 10 agents" in good
    assert "no memory growth at 10 agents" in good
    bad = {c.name: c.passed for c in rpt.requirements(_result([[_run(10, 800, 0.4, lost=3, balanced=False,
                                                                          growth=0.2)]]))}
    assert bad["coordination efficiency above 50 % at 10 agents"] is False
    assert bad["no lost steps"] is False and bad["every step accounted for (ledger balanced)"] is False
    assert bad["no memory growth at 10 agents"] is False
    short = {c.name: c for c in rpt.requirements(_result([[_run(20, 1000, 0.6, growth=0.2, steps=5_000)]]))}
    assert short["no memory growth at 20 agents"].passed is None  # 250 steps per agent: undecidable
    assert rpt.gate(list(short.values()), [], 10.0) == []
    slow = _result([[_run(1, 10, 0.9)]], r1=10)  # 100 ms a step
    assert {c.name: c.passed for c in rpt.requirements(slow)}["single-agent inference under 50 ms"] is False


@pytest.mark.unit
def test_null_agents_get_no_efficiency_requirement():
    names = [c.name for c in rpt.requirements(_result([[_run(2, 9000, 0.002)]], kind="null"))]
    assert not any("efficiency" in n for n in names)


@pytest.mark.unit
def test_baseline_changes_know_which_way_is_better():
    base = _result([[_run(10, 1000, 0.5)]])
    cur = _result([[_run(10, 900, 0.45)]])
    cur["runs"][0]["latency_ms"]["p50"] = 0.15  # latency halved: better
    changes = {(c.metric, c.agents): c for c in rpt.compare(cur, base)}
    assert changes[("rate", 10)].change == pytest.approx(-0.10)
    assert changes[("latency_p50_ms", 10)].change == pytest.approx(0.5)
    assert changes[("single_agent_rate", None)].change == 0


@pytest.mark.unit
def test_gate_trips_on_regression_beyond_the_limit_or_a_failed_requirement():
    base = _result([[_run(10, 1000, 0.6)]])
    worse = _result([[_run(10, 900, 0.54)]])
    checks = rpt.requirements(worse)
    changes = rpt.compare(worse, base)
    assert rpt.gate(checks, changes, None) == []      # no gate asked for
    assert rpt.gate(checks, changes, 15.0) == []      # 10 % worse, 15 % allowed
    tripped = rpt.gate(checks, changes, 5.0)          # 10 % worse, 5 % allowed
    assert "rate at 10 agents is 10.0% worse than the baseline" in tripped
    failing = _result([[_run(10, 1000, 0.4)]])
    assert rpt.gate(rpt.requirements(failing), [], 50.0) == [
        "requirement failed: coordination efficiency above 50 % at 10 agents"]


@pytest.mark.unit
def test_report_markdown_states_each_figure_and_the_overall_status():
    base = _result([[_run(10, 1000, 0.6)]])
    cur = _result([[_run(10, 500, 0.3)]])
    checks, changes = rpt.requirements(cur), rpt.compare(cur, base)
    text = rpt.report_markdown(cur, checks, changes, "base.json", 10.0)
    assert "## Overall status: FAIL" in text
    assert "| coordination efficiency above 50 % at 10 agents | 30 % | > 50 % | FAIL |" in text
    assert "| rate | 10 | 500 | 1,000 | 50.0% worse | REGRESSION |" in text
    good = rpt.report_markdown(base, rpt.requirements(base), [], None, None)
    assert "## Overall status: PASS" in good and "No baseline given" in good


@pytest.mark.unit
def test_slope_fits_a_line():
    assert slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2.0)
    assert slope([(0, 1)]) == 0.0 and slope([(1, 1), (1, 2)]) == 0.0


@pytest.mark.parametrize("args, message", [
    (["--agents", "2", "--sweep", "1,2"], "not both"),
    (["--sweep", "1,x"], "comma-separated"),
    (["--sweep", "0,2"], "positive"),
    (["--agents", "5000"], "give --per-host K or auto"),
    (["--arena-agents", "99"], "arena_agents must be 0 .. 23"),
    (["--per-host", "0"], "neither a count"),
    (["--steps", "0", "--duration", "0"], "--steps or a positive --duration"),
    (["--mode", "turbo"], "turbo"),
])
def test_bad_options_are_refused_before_anything_starts(args, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and message in result.output


def test_baseline_must_be_busbench_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    result = CliRunner().invoke(cli, ["--agents", "1", "--baseline", str(bad)])
    assert result.exit_code == 2 and "not busbench JSON" in result.output


def test_options_come_from_busbench_environment_variables():
    result = CliRunner().invoke(cli, ["--agents", "1"], env={"BUSBENCH_MODE": "warp"})
    assert result.exit_code == 2 and "warp" in result.output


def _busbench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentbus_zmq.busbench", *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_sweep_end_to_end_with_report_plot_and_gate(tmp_path):
    out, report, plot = tmp_path / "run.json", tmp_path / "report.md", tmp_path / "plot.png"
    r = _busbench("--sweep", "1,2", "--agent-kind", "null", "--duration", "0.5", "--warmup", "5", "--format", "json",
                  "--output", str(out), "--report", str(report), "--plot", str(plot))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert [run["agents"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert run["lost_steps"] == 0 and run["balanced"] and run["memory_mb"]["processes"] == run["agents"]
    assert "## Overall status: PASS" in report.read_text()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same run as its own baseline, made ten times better: the gate must trip (exit 3).
    better = copy.deepcopy(result)
    for run in better["runs"]:
        run["rate"] *= 10
    base = tmp_path / "better.json"
    base.write_text(json.dumps(better))
    r = _busbench("--agents", "2", "--agent-kind", "null", "--duration", "0.5", "--warmup", "5", "--baseline", str(base),
                  "--fail-on-regression", "20", "--report", str(report))
    assert r.returncode == 3, r.stderr
    assert "REGRESSION" in report.read_text()
    # Against a baseline ten times worse in every tracked figure, the same gate passes.
    worse = copy.deepcopy(result)
    worse["single_agent_rate"] /= 10
    for run in worse["runs"]:
        run["rate"] /= 10
        run["latency_ms"]["p50"] *= 10
        run["memory_mb"]["pss_per_agent"] *= 10
    base.write_text(json.dumps(worse))
    r = _busbench("--agents", "2", "--agent-kind", "null", "--duration", "0.5", "--warmup", "5", "--baseline", str(base),
                  "--fail-on-regression", "20")
    assert r.returncode == 0, r.stderr


def test_steps_decide_the_window_whatever_the_duration(tmp_path):
    r = _busbench("--agents", "2", "--agent-kind", "null", "--steps", "3000", "--duration", "0.01", "--warmup", "5",
                  "--format", "json")
    assert r.returncode == 0, r.stderr
    (run,) = json.loads(r.stdout)["runs"]
    assert run["steps"] == 3000


def test_connect_measures_a_running_bus(bus):
    endpoint = bus.coordinator()
    bus.agents(2, "--kind", "null")
    bus.wait_agents(2)
    r = _busbench("--connect", endpoint, "--agent-kind", "null", "--duration", "0.5", "--format", "json")
    assert r.returncode == 0, r.stderr
    (run,) = json.loads(r.stdout)["runs"]
    assert run["agents"] == 2 and run["rate"] > 0 and run["lost_steps"] == 0
    assert run["memory_mb"]["processes"] == 2  # the agents are local: their memory is read
    assert bus.stats()["agents"] == 2  # busbench left the running bus alone
    assert os.path.exists(bus.tmp)


@pytest.mark.unit
def test_spin_auto_only_where_every_spinner_has_a_core():
    from agentbus_zmq.busbench.run import SPIN_US, spin_plan

    assert spin_plan("auto", 1, 2) == (SPIN_US, 0)  # agent + coordinator fill 2 cores
    assert spin_plan("auto", 2, 2) == (0, 0)
    assert spin_plan("auto", 10, 16) == (SPIN_US, SPIN_US)
    assert spin_plan("auto", 15, 16) == (SPIN_US, 0)
    assert spin_plan("auto", 16, 16) == (0, 0)
    assert spin_plan("off", 1, 16) == (0, 0)
    assert spin_plan("agents", 20, 2) == (SPIN_US, 0)
    assert spin_plan("all", 20, 2) == (SPIN_US, SPIN_US)


def test_the_no_bus_pool_runs_the_same_layout_as_the_bus_run():
    from agentbus_zmq.busbench.pool import pool_rate
    from agentbus_zmq.coordinator.worlds import WorldSpec

    hosts = pool_rate("null", {}, WorldSpec(), agents=5, per_host=2, warmup=5, duration=0.2)
    singles = pool_rate("null", {}, WorldSpec(), agents=3, per_host=1, warmup=5, duration=0.2)
    assert (hosts["processes"], hosts["per_host"], singles["processes"]) == (3, 2, 3)
    assert hosts["steps"] > 0 and singles["steps"] > 0 and hosts["rate"] == hosts["steps"] / hosts["elapsed_s"]


@pytest.mark.unit
@pytest.mark.parametrize("count, rows", [(1, 1), (2, 3)])
def test_the_peers_environment_is_its_agents_turned_inside_out(count, rows):
    """A Gymnasium environment whose action is its agents' observations (padded rows
    ignored) and whose observation is their actions, as the agents themselves answer."""
    from agentbus_zmq.busbench.peer import _agents_env
    from agentbus_zmq.coordinator.worlds import WorldSpec

    world = WorldSpec().build()
    env = _agents_env("tests.kinds_demo:CellParity", {}, world.params(), [0] * count, 1, rows, world.spaces())
    assert env.action_space.shape == (rows, 2) and env.observation_space.shape == (rows,)
    actions, _ = env.reset(seed=0)
    cells = np.array([[2, 0], [7, 1], [99, 99]])[:rows]
    actions, reward, terminated, truncated, _ = env.step(cells)
    assert actions[:count].tolist() == [1, 0][:count] and not (terminated or truncated)
    env.close()


def test_the_peer_runs_the_same_layout_as_the_bus_run():
    from agentbus_zmq.busbench.peer import peer_rate
    from agentbus_zmq.coordinator.worlds import WorldSpec

    hosts = peer_rate("tests.kinds_demo:CellParity", {}, WorldSpec(), agents=5, per_host=2, warmup=3, duration=0.3)
    singles = peer_rate("null", {}, WorldSpec(), agents=3, per_host=1, warmup=3, duration=0.3)
    assert (hosts["processes"], hosts["per_host"], singles["processes"]) == (3, 2, 3)
    for run in (hosts, singles):
        assert run["peer"] == "gym" and run["ticks"] > 0 and run["steps"] == run["ticks"] * (5 if run is hosts else 3)
        assert run["rate"] == pytest.approx(run["steps"] / run["elapsed_s"])


@pytest.mark.parametrize("per_host", [1, 2])
def test_the_tick_budget_lays_each_processs_tick_end_to_end_for_the_bus_and_the_peer(per_host):
    """Every tick of every process is found, each segment in causal order (none
    negative), and the agents' segment is the work they do (1 ms a step each)."""
    from agentbus_zmq.busbench.budget import bus_budget, peer_budget

    for budget in (bus_budget, peer_budget):
        result = budget("tests.kinds_demo:Busy", {}, agents=4, per_host=per_host, ticks=60, warmup=5)
        segments = result["segments"]
        processes = 4 // per_host
        # every measured tick of every process (ticks are counted from the first with every
        # process in: under load the processes join ticks apart, and a lock-step tick runs
        # with the ones in)
        assert segments["tick"]["n"] == processes * 60, (budget.__name__, segments)
        assert all(s["p50_us"] >= 0 for s in segments.values()), segments
        assert 1000 * per_host <= segments["agents"]["p50_us"] < 3000 * per_host + 1000, segments
        parts = sum(segments[k]["mean_us"] for k in ("coordinator", "to the agents", "agents", "back",
                                                      "waiting for others"))
        assert parts == pytest.approx(segments["tick"]["mean_us"], rel=0.05), segments


@pytest.mark.unit
def test_the_ratio_gate_ignores_machine_speed_and_catches_what_speed_cannot_explain():
    base = _result([[{**_run(2, 500, 0.6), "efficiency_pool": 0.65}]], r1=300)
    slower_machine = _result([[{**_run(2, 250, 0.58), "efficiency_pool": 0.62}]], r1=150)  # half the speed
    changes = rpt.compare(slower_machine, base, ratios_only=True)
    assert {c.metric for c in changes} == {"efficiency", "efficiency_pool", "pss_per_agent_mb", "lost_share"}
    assert rpt.gate([], changes, 40.0, requirements=False) == []      # rates halved: not a regression
    worse_bus = _result([[{**_run(2, 500, 0.3), "efficiency_pool": 0.32}]], r1=300)
    tripped = rpt.gate([], rpt.compare(worse_bus, base, ratios_only=True), 40.0, requirements=False)
    assert "efficiency at 2 agents is 50.0% worse than the baseline" in tripped
    lossy = _result([[{**_run(2, 500, 0.6, lost=2_000), "efficiency_pool": 0.65}]], r1=300)  # 2 % of steps
    tripped = rpt.gate([], rpt.compare(lossy, base, ratios_only=True), 40.0, requirements=False)
    assert tripped == ["lost_share at 2 agents is 0.02, against 0 in the baseline"]


@pytest.mark.unit
def test_profile_layers_follow_the_innermost_frame_that_tells():
    from agentbus_zmq.busbench.profile import classify, flamegraph_svg, parse_collapsed, summarise

    base = ["<module> (bus-agent:8)", "run (agents/runtime.py:120)"]
    assert classify(base + ["step (agents/kinds/explorer.py:80)", "infer (pymdp/agent.py:9)",
                            "0x1 (libc.so.6)"]) == "pymdp/numpy/jax"           # libc under numpy: numpy's
    assert classify(base + ["Socket.send (zmq/sugar/socket.py:7)", "zmq_msg_send (libzmq.so.5)",
                            "0x2 (libc.so.6)"]) == "kernel"                     # libc under libzmq: a system call
    assert classify(base + ["Poller.poll (zmq/sugar/poll.py:3)", "zmq_poll (libzmq.so.5)"]) == "idle"
    assert classify(base + ["decode (bus/protocol.py:700)", "unpackb (msgpack/fallback.py:1)"]) == "msgpack"
    assert classify(base + ["_drain (agents/runtime.py:150)"]) == "ours"
    assert classify(base + ["json.dumps (json/__init__.py:231)"]) == "other Python"
    stacks = parse_collapsed("a (bus/x.py:1);b (zmq/y.py:2) 3\na (bus/x.py:1) 1\nnot a line\n")
    summary = summarise(stacks)
    assert summary["samples"] == 4 and summary["layers"]["pyzmq/libzmq"] == 0.75 and summary["layers"]["ours"] == 0.25
    svg = flamegraph_svg(stacks, "t")
    assert svg.startswith("<svg") and svg.count("<rect") == 3 and "b (zmq/y.py:2) (3 samples, 75.0%)" in svg


def test_profile_writes_flame_graphs_and_a_summary_of_both_processes(tmp_path):
    prof = tmp_path / "prof"
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.busbench", "--agents", "2", "--agent-kind", "null",
                        "--duration", "2", "--profile", str(prof), "--format", "json", "--output", str(out)],
                       capture_output=True, text=True, env=_env(), timeout=180, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    (run,) = json.loads(out.read_text())["runs"]
    profile = run["repeats"][0]["profile"]
    assert "error" not in profile, profile
    for name in ("coordinator", "agent"):
        p = profile["processes"][name]
        assert "error" not in p, p
        assert p["samples"] > 50 and abs(sum(p["layers"].values()) - 1) < 1e-9
        assert (prof / "agents-2" / f"{name}.svg").read_text().startswith("<svg")
    assert profile["processes"]["coordinator"]["layers"]["idle"] > 0   # it waits for the agents in poll
    summary = (prof / "agents-2" / "summary.md").read_text()
    assert "| coordinator (pid" in summary and "| agent (pid" in summary
    assert f"{prof}/agents-2/summary.md" in r.stderr                  # the run names where they are


@pytest.mark.unit
def test_a_ratio_gated_report_passes_on_ratios_and_shows_requirements_for_information():
    base = _result([[{**_run(2, 500, 0.6), "efficiency_pool": 0.65}]])
    cur = _result([[{**_run(2, 500, 0.45), "efficiency_pool": 0.6}]])    # E under the 50 % requirement
    checks, changes = rpt.requirements(cur), rpt.compare(cur, base, ratios_only=True)
    assert "## Overall status: FAIL" in rpt.report_markdown(cur, checks, changes, "b.json", 40.0)
    text = rpt.report_markdown(cur, checks, changes, "b.json", 40.0, gate_requirements=False)
    assert "## Overall status: PASS" in text and "requirements below are for information" in text
    assert "| coordination efficiency above 50 % at 2 agents | 45 % | > 50 % | FAIL |" in text
