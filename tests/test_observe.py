"""Seeing the bus (issue #12): live efficiency and its alert against a fake clock, the
Prometheus series against the core's own ledger, and the ops files against the series
the coordinator really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.clock import FakeClock
from agentbus_zmq.coordinator.core import CoordinatorCore, Settings
from agentbus_zmq.coordinator.efficiency import LiveEfficiency, Sample
from agentbus_zmq.coordinator.prometheus import render
from agentbus_zmq.coordinator.grid import GridWorld, WorldConfig
from agentbus_zmq.coordinator.liveness import MAX_STRAGGLERS_LISTED

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent


def test_efficiency_is_agent_cpu_over_window_times_parallelism():
    live = LiveEfficiency(window=10.0, cores=2, threshold=0.5, hold=5.0)
    for t in range(12):                                   # 3 agents, 1.5 CPU-seconds a second of steps
        live.sample(Sample(float(t), int(t * 1.5e6), t * 100, 0, 0.1 * t), agents=3)
    f = live.figures()
    assert f["efficiency"] == pytest.approx(1.5 / 2)      # min(3, 2) = 2 cores' worth
    assert f["rate"] == pytest.approx(100) and f["coordinator_cpu"] == pytest.approx(0.1)
    live.sample(Sample(12.0, int(12 * 1.5e6), 1200, 0, 1.2), agents=1)
    assert live.figures()["efficiency"] == pytest.approx(1.5 / 1)  # one agent: min(1, 2)


def test_the_alert_is_raised_once_after_the_hold_and_cleared_on_recovery():
    live = LiveEfficiency(window=2.0, cores=1, threshold=0.5, hold=3.0)
    cpu, events = 0, []

    def tick(t: float, share: float):
        nonlocal cpu
        cpu += int(share * 0.5e6)                          # samples every 0.5 s
        live.sample(Sample(t, cpu, int(t * 10), 0, 0.0), agents=1)
        e = live.update(t)
        if e is not None:
            events.append((t, e.raised, round(e.efficiency, 2)))

    t = 0.0
    for _ in range(10):                                   # healthy: 90 %
        tick(t, 0.9)
        t += 0.5
    for _ in range(20):                                   # sick: 10 %, for 10 s
        tick(t, 0.1)
        t += 0.5
    for _ in range(10):                                   # healthy again
        tick(t, 0.9)
        t += 0.5
    raised = [e for e in events if e[1]]
    cleared = [e for e in events if not e[1]]
    assert len(raised) == 1 and len(cleared) == 1          # once, however long it stays low
    assert raised[0][0] >= 5.0 + 3.0 and raised[0][2] < 0.5   # not before the hold has passed
    assert cleared[0][0] > raised[0][0] and cleared[0][2] >= 0.5


def test_an_alert_names_the_agents_missing_their_deadlines():
    # drop_after=0: 'stuck' stays (the default policy would drop it before the alert is due)
    core = CoordinatorCore(Settings(deadline=0.1, efficiency_window=1.0, alert_for=0.5, alert_threshold=0.5,
                                    drop_after=0),
                           GridWorld(WorldConfig(seed=1)), "s", clock=FakeClock())
    now = 0.0
    for peer, agent in ((b"ok", "fine"), (b"stuck", "stuck")):
        core.on_message(peer, P.Hello(agent, "k", 1), now)
        core.on_message(peer, P.Heartbeat(), now)
    for _ in range(40):                                   # 'fine' answers every tick at once; 'stuck' never
        core.take_outbox()
        now += 0.001
        core.on_message(b"ok", P.Action(core.tick, 4, 900, 900), now)
        core.on_message(b"stuck", P.Heartbeat(), now)     # alive, though
        now += 0.1
        core.on_timer(now)
    (event,) = [e for e in core.take_alerts() if e.raised]
    assert "stuck (" in event.cause and "missed" in event.cause and "steps lost" in event.cause
    assert core.stats(now).live.alert is True


def _core_with_traffic() -> CoordinatorCore:
    core = CoordinatorCore(Settings(deadline=1.0), GridWorld(WorldConfig(seed=1)), "s",
                           clock=FakeClock(cpu=1.0), histograms=True)
    now = 0.0
    for i in range(3):
        core.on_message(f"p{i}".encode(), P.Hello(f"a{i}", "k", 1), now)
        core.on_message(f"p{i}".encode(), P.Heartbeat(), now)
    core.on_message(b"h", P.HostHello("h1", "k", 1, "m", 0, 4), now)
    core.on_message(b"h", P.Heartbeat(), now)
    for _ in range(50):
        now += 0.002
        for i in range(3):
            core.on_message(f"p{i}".encode(), P.Action(core.tick, 4, 500, 400), now)
        if core.hosts["h1"].state.value == "stepping":
            core.on_message(b"h", P.HostAction(core.tick, __import__("numpy").zeros(4, "u1"), 800, 700), now)
        core.on_timer(now)
    core.on_frames(b"x", [b"\xc1"], now)
    core.take_outbox()
    return core


def _scrape(core: CoordinatorCore) -> dict:
    out = {}
    for family in text_string_to_metric_families(render(core).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_the_metrics_match_the_ledger():
    core = _core_with_traffic()
    m, ledger = _scrape(core), core.ledger
    assert m[("agentbus_agent_steps_total", ())] == ledger.received > 0
    assert m[("agentbus_observations_sent_total", ())] == ledger.sent
    assert m[("agentbus_ticks_total", ())] == ledger.ticks
    assert m[("agentbus_steps_missing_total", ())] == ledger.missing
    assert m[("agentbus_agents_registered", ())] == 7 and m[("agentbus_hosts_registered", ())] == 1
    assert m[("agentbus_protocol_errors_total", (("code", "MALFORMED"),))] == 1
    answers = m[("agentbus_bus_latency_seconds_count", ())]
    assert answers == ledger.received                      # a host's frame counts each of its agents
    assert m[("agentbus_bus_latency_seconds_bucket", (("le", "+Inf"),))] == answers
    assert m[("agentbus_tick_duration_seconds_count", ())] == ledger.ticks
    assert m[("agentbus_agent_cpu_seconds_total", ())] == pytest.approx(core.timings.agent_cpu_us / 1e6)
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in m.items()
                     if k[0] == "agentbus_bus_latency_seconds_bucket")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)   # cumulative


def test_per_agent_series_stay_bounded_with_many_agents():
    core = CoordinatorCore(Settings(deadline=0.01), GridWorld(WorldConfig(seed=1, max_arenas=1000)), "s",
                           clock=FakeClock())
    now = 0.0
    for i in range(300):                                  # 300 agents that never answer: all stragglers
        core.on_message(f"p{i}".encode(), P.Hello(f"a{i}", "k", 1), now)
        core.on_message(f"p{i}".encode(), P.Heartbeat(), now)
    for _ in range(5):
        now += 0.02
        core.on_timer(now)
    units = {dict(k[1])["unit"] for k in _scrape(core) if k[0] == "agentbus_straggler_steps"}
    assert 0 < len(units) <= 16


def _exported_names() -> set[str]:
    names = set()
    for family in text_string_to_metric_families(render(_core_with_traffic()).decode()):
        names |= {family.name} | {s.name for s in family.samples}   # a family with no samples yet counts
    return names


def _names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bagentbus_[a-z_]+", expr))


def test_every_dashboard_panel_queries_an_exported_metric():
    dashboard = json.loads((ROOT / "deploy/grafana/agentbus.json").read_text())
    exported = _exported_names()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    for expr in exprs:
        used = _names_in(expr)
        assert used and used <= exported, f"{expr}: {used - exported} not exported"


def test_the_alert_rules_mirror_the_built_in_alert_and_use_exported_metrics():
    rules = yaml.safe_load((ROOT / "deploy/prometheus/agentbus-rules.yml").read_text())
    exported = _exported_names()
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert "AgentbusEfficiencyLow" in alerts
    low = alerts["AgentbusEfficiencyLow"]
    assert "agentbus_efficiency" in low["expr"] and "agentbus_efficiency_threshold" in low["expr"]
    assert low["for"] and low["labels"]["severity"] and low["annotations"]["summary"]
    for rule in alerts.values():
        assert _names_in(rule["expr"]) <= exported, rule["alert"]
    # Every rule evaluates on series the coordinator exports, so a dead coordinator
    # (no series at all) fires none of them: two rules watch the scrape itself.
    down = [r for r in alerts.values() if re.search(r'\bup\{job="agentbus"\} == 0', r["expr"])]
    absent = [r for r in alerts.values() if 'absent(up{job="agentbus"})' in r["expr"]]
    assert down and absent and down[0]["labels"]["severity"] == "critical"
    # One condition, one alert: no rule restates another's (the coordinator's own alert
    # is the efficiency rule, not a second rule beside it).
    assert not any("agentbus_efficiency_alert" in r["expr"] for r in alerts.values())
    assert len({r["expr"] for r in alerts.values()}) == len(alerts)


def test_the_dashboard_scopes_every_query_to_its_coordinator_and_panels_say_what_they_show():
    dashboard = json.loads((ROOT / "deploy/grafana/agentbus.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "agentbus_build_info" in variables["instance"]["definition"]
    assert "agentbus_build_info" in _exported_names()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for selector in re.findall(r"\bagentbus_[a-z_]+(\{[^}]*\})?", target["expr"]):
                assert selector == '{instance=~"$instance"}', (panel["title"], target["expr"])
    panels = {p["title"]: p for p in dashboard["panels"]}
    lost = next(p for t, p in panels.items() if t.startswith("Steps lost"))
    assert not any("slow" in t["expr"] for t in lost["targets"])           # slow answers are not lost
    stragglers = next(p for t, p in panels.items() if t.startswith("Stragglers"))
    assert f"the {MAX_STRAGGLERS_LISTED} worst" in stragglers["title"] and "topk" not in stragglers["targets"][0]["expr"]
    cpu = next(p for t, p in panels.items() if t.startswith("Coordinator CPU"))
    per_step = next(t["refId"] for t in cpu["targets"] if "per_step" in t["expr"])
    override = next(o for o in cpu["fieldConfig"]["overrides"] if o["matcher"]["options"] == per_step)
    assert {"id": "custom.axisPlacement", "value": "right"} in override["properties"]   # seconds apart from cores


def test_an_agent_that_reports_its_wait_as_work_cannot_clear_the_alert_and_is_named():
    """A straggler answering 0.7 s after each observation (inside the deadline) and
    reporting those 0.7 s as CPU used to lift live efficiency to 105 %: the bus crawled and
    the alert cleared.  Claims are bounded by the median of what agents claim, and the
    cause names the agents that cost the tick most by the coordinator's own clock."""
    core = CoordinatorCore(Settings(deadline=1.0, efficiency_window=4.0, alert_for=1.0, alert_threshold=0.5,
                                    drop_after=0), GridWorld(WorldConfig(seed=1)), "s", clock=FakeClock())
    now = 0.0
    honest = [(b"h%d" % i, f"honest-{i}") for i in range(3)]
    for peer, agent in honest + [(b"liar", "liar")]:
        core.on_message(peer, P.Hello(agent, "k", 1), now)
        core.on_message(peer, P.Heartbeat(), now)
    events = []
    for _ in range(40):
        core.take_outbox()
        tick = core.tick
        now += 0.001
        for peer, _ in honest:
            core.on_message(peer, P.Action(tick, 4, 900, 900), now)          # 0.9 ms of work each
        now += 0.7
        core.on_message(b"liar", P.Action(tick, 4, 700_000, 700_000), now)  # 0.7 s "of work"
        core.on_timer(now)
        events += core.take_alerts()
    raised = [e for e in events if e.raised]
    assert raised and not [e for e in events if not e.raised], events      # raised, never cleared
    assert "slowest: liar (" in raised[0].cause
    assert core.stats(now).live.efficiency < 0.1 and core.ledger.errors["cpu_us_capped"] > 0


def test_lying_hosts_cannot_keep_the_alert_off_while_the_step_rate_falls():
    """Three one-member hosts, the majority of the units, answer late and claim the wait
    as CPU: efficiency reads high whatever the bus does.  The alert also watches the step
    rate per agent against its own recent history, which no claim moves: a fall of 100x
    and more raises it, and says so."""
    core = CoordinatorCore(Settings(deadline=1.0, efficiency_window=4.0, alert_for=2.0, alert_threshold=0.5,
                                    drop_after=0), GridWorld(WorldConfig(seed=1)), "s", clock=FakeClock())
    now = 0.0
    honest = [(b"a%d" % i, f"honest-{i}") for i in range(2)]
    hosts = [(b"h%d" % i, f"liar-{i}") for i in range(3)]
    for peer, host in hosts:
        core.on_message(peer, P.HostHello(host, "k", 1, f"{host}-m", 0, 1), now)
        core.on_message(peer, P.Heartbeat(), now)
    for peer, agent in honest:
        core.on_message(peer, P.Hello(agent, "k", 1), now)
        core.on_message(peer, P.Heartbeat(), now)
    events = []

    def tick(wait: float) -> None:
        nonlocal now, events
        core.take_outbox()
        t = core.tick
        now += 0.001
        for peer, _ in honest:
            core.on_message(peer, P.Action(t, 4, 900, 900), now)
        now += wait
        claim = int(wait * 1e6)
        for peer, _ in hosts:
            core.on_message(peer, P.HostAction(t, np.array([4], np.uint8), claim, claim), now)
        core.on_timer(now)
        events += core.take_alerts()

    while now < 10.0:                     # answering at once: the rate it is used to
        tick(0.001)
    assert not [e for e in events if e.raised]
    rate = core.stats(now).live.rate
    while now < 30.0:                     # the liars wait 0.6 s a tick and claim it all as work
        tick(0.6)
    live = core.stats(now).live
    assert live.efficiency > 0.5                       # what the claims say ...
    assert live.rate * 100 < rate                      # ... and what the bus did
    raised = [e for e in events if e.raised]
    assert raised and live.alert, "the claims turned the alert off while the rate stayed fallen"
    assert all(e.raised for e in events[events.index(raised[0]):])    # never cleared since


def test_a_fall_of_the_step_rate_alone_raises_the_alert_whatever_the_claims():
    """Efficiency reads 100 % throughout (every agent claims a full core): the rate per
    agent falls 100x, and the alert is raised for that, and says so."""
    live = LiveEfficiency(window=4.0, cores=2, threshold=0.5, hold=2.0)
    cpu, steps, t, events = 0, 0, 0.0, []
    while t < 40.0:
        t += 0.5
        cpu += int(0.5 * 2 * 1e6)                       # two agents, a full core each, claimed
        steps += 500 if t < 15.0 else 5                 # 1,000 steps/s, then 10
        event = live.watch(Sample(t, cpu, steps, 0, 0.0), 2, t, lambda f: "named by the core")
        if event is not None:
            events.append(event)
    (raised,) = events
    assert raised.raised and raised.efficiency >= 0.99
    assert raised.cause.startswith("the step rate fell to 5/s per agent from its recent 500")
    assert "whatever the agents claim" in raised.cause and raised.cause.endswith("named by the core")

