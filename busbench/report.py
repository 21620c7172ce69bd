"""Turning busbench runs into numbers people can trust: medians over repeats with their
spread, requirements checked PASS/FAIL, changes against a baseline *measured earlier*
(never a constant), and the exit code of a CI gate."""

from __future__ import annotations

import dataclasses
import statistics

__all__ = ["aggregate", "Check", "requirements", "compare", "gate", "notes", "table", "markdown_table", "report_markdown"]

#: Scalar run fields summarised by their median over repeats.
_MEDIAN_KEYS = ("rate", "efficiency", "efficiency_peer", "overhead", "elapsed_s", "coordinator_cpu_us_per_step",
                "coordinator_thread_cpu_us_per_step", "compute_share", "ready_s", "single_agent_rate", "pool_rate",
                "efficiency_pool", "efficiency_live", "agent_cpu_s", "peer_rate", "efficiency_peer_rate")
_SUM_KEYS = ("steps", "ticks", "lost_steps", "late_steps", "missing_steps", "undeliverable")


def _median_map(maps: list[dict | None]) -> dict | None:
    maps = [m for m in maps if m]
    if not maps:
        return None
    return {k: statistics.median(m[k] for m in maps if m.get(k) is not None)
            for k in maps[0] if any(m.get(k) is not None for m in maps)}


def aggregate(repeats: list[dict]) -> dict:
    """One record for an agent count from its repeats: medians, sums of losses, the spread."""
    ok = [r for r in repeats if "rate" in r]
    out: dict = {"agents": repeats[0]["agents"], "repeat": len(repeats),
                 "errors": [e for r in repeats for e in r.get("errors", [])]}
    if not ok:
        return out
    for k in _MEDIAN_KEYS:
        if all(r.get(k) is not None for r in ok):
            out[k] = statistics.median(r[k] for r in ok)
        elif all(k in r for r in ok):
            out[k] = None  # not measured (the pool, with --connect)
    out["per_host"] = ok[0].get("per_host", 1)
    out["deadline_s"] = ok[0].get("deadline_s")
    out["processes"] = ok[0].get("processes", out["agents"])
    for k in _SUM_KEYS:
        out[k] = sum(r[k] for r in ok)
    out["latency_ms"] = _median_map([r["latency_ms"] for r in ok])
    out["memory_mb"] = _median_map([r.get("memory_mb") for r in ok])
    out["memory_growth"] = _median_map([r.get("memory_growth") for r in ok])
    out["registered"] = min(r["registered"] for r in ok)
    out["spin_us"] = ok[0].get("spin_us")  # the same plan for every repeat of a count
    chaos = [r["chaos"] for r in ok if r.get("chaos")]
    if chaos:
        recoveries = [c["recovery_s"]["max"] for c in chaos if c["recovery_s"]["max"] is not None]
        out["chaos"] = {"kills": sum(c["kills"] for c in chaos), "recovered": sum(c["recovered"] for c in chaos),
                        "unrecovered": sum(c["unrecovered"] for c in chaos),
                        "recovery_s": {"p50": statistics.median(c["recovery_s"]["p50"] for c in chaos
                                                                if c["recovery_s"]["p50"] is not None)
                                       if recoveries else None, "max": max(recoveries) if recoveries else None}}
    out["balanced"] = all(r["ledger"]["balanced"] for r in ok)
    out["peer"] = ok[0].get("peer")
    out["spread"] = {k: [min(r[k] for r in ok), max(r[k] for r in ok)]
                     for k in ("rate", "efficiency", "efficiency_pool", "efficiency_peer_rate")
                     if all(r.get(k) is not None for r in ok)}
    out["repeats"] = repeats
    return out


def _agents(n: int) -> str:
    return f"{n} agent" if n == 1 else f"{n} agents"


@dataclasses.dataclass
class Check:
    name: str
    measured: float | None
    threshold: str
    passed: bool | None  # None: not decidable from this run (said why in `threshold`)
    unit: str = ""


#: Agent memory growth allowed per 1,000 steps (pymdp's legacy agent leaked ~0.17 MB).
MAX_GROWTH_MB_PER_1K = 0.05
#: Steps per agent a window needs before its RSS slope means anything: the first few
#: hundred steps of a process still grow its heap (measured: 0.1-0.15 MB per 1,000
#: steps over 5 s windows at 20 agents, flat over 100,000+).
MIN_STEPS_FOR_GROWTH = 2_000


def requirements(result: dict) -> list[Check]:
    """The requirements the peer system's report set out, measured properly."""
    checks = [Check("single-agent inference under 50 ms", result["single_agent"]["step_us"] / 1000, "< 50 ms",
                    result["single_agent"]["step_us"] < 50_000, "ms")]
    runs = [r for r in result["runs"] if "rate" in r]
    # For null agents r1 is the rate of a no-op: their efficiency measures nothing.
    for r in runs if result["config"]["kind"] != "null" else []:
        n = r["agents"]
        checks.append(Check(f"coordination efficiency above 50 % at {_agents(n)}", r["efficiency"] * 100, "> 50 %",
                            r["efficiency"] > 0.5, "%"))
    for r in runs:
        growth = r.get("memory_growth")
        if growth and growth.get("agent_mb_per_1k_steps") is not None:
            worst = max(v for k, v in growth.items() if k.endswith("per_1k_steps") and v is not None)
            per_agent = r["steps"] // (r["agents"] * r.get("repeat", 1))
            name = f"no memory growth at {_agents(r['agents'])}"
            if per_agent < MIN_STEPS_FOR_GROWTH:
                checks.append(Check(name, worst, f"n/a: {per_agent} steps per agent, a slope needs "
                                                 f"{MIN_STEPS_FOR_GROWTH} (use --steps)", None, "MB/1k"))
            else:
                checks.append(Check(name, worst, f"<= {MAX_GROWTH_MB_PER_1K} MB / 1k steps",
                                    worst <= MAX_GROWTH_MB_PER_1K, "MB/1k"))
    calm = [r for r in runs if "chaos" not in r]
    if calm:
        checks.append(Check("no lost steps", sum(r["lost_steps"] for r in calm), "0",
                            all(r["lost_steps"] == 0 for r in calm)))
    for r in runs:
        if "chaos" in r:  # agents are killed on purpose: their steps are lost, but accounted for
            c = r["chaos"]
            checks.append(Check(f"every killed agent recovered at {_agents(r['agents'])}", c["recovered"],
                                f"{c['kills']} kills, at most 1 still recovering", c["unrecovered"] <= 1))
    checks.append(Check("every step accounted for (ledger balanced)", None, "balanced",
                        bool(runs) and all(r["balanced"] for r in runs)))
    checks.append(Check("every run completed", len(runs), f"{len(result['runs'])} runs",
                        len(runs) == len(result["runs"]) and not any(r["errors"] for r in result["runs"])))
    return checks


@dataclasses.dataclass
class Change:
    metric: str
    agents: int | None
    measured: float
    baseline: float
    higher_is_better: bool
    #: compared by difference, not ratio: a regression is being worse by more than this
    absolute: float | None = None

    def regressed(self, max_regression_pct: float) -> bool:
        if self.absolute is not None:
            worse = (self.baseline - self.measured) if self.higher_is_better else (self.measured - self.baseline)
            return worse > self.absolute
        return self.change < -max_regression_pct / 100

    @property
    def change(self) -> float:
        """Relative change, positive = better."""
        if self.baseline == 0:
            return 0.0
        rel = (self.measured - self.baseline) / abs(self.baseline)
        return rel if self.higher_is_better else -rel


_TRACKED = (("rate", True), ("efficiency", True), ("latency_p50_ms", False), ("pss_per_agent_mb", False))
#: What ``--gate-on ratios`` compares: figures a run measures against itself (efficiency
#: against r1 and against the no-bus ceiling, both taken in the same run), the share of
#: steps lost, and memory per agent: none moves with the machine's speed.
_RATIOS = (("efficiency", True), ("efficiency_pool", True), ("efficiency_peer_rate", True), ("pss_per_agent_mb", False))
#: Lost steps are compared by difference (a baseline of 0 has no ratio): one point more
#: of the steps lost is a regression.
LOST_SHARE_TOLERANCE = 0.01


def _tracked(run: dict, key: str) -> float | None:
    if key == "latency_p50_ms":
        return (run.get("latency_ms") or {}).get("p50")
    if key == "pss_per_agent_mb":
        return (run.get("memory_mb") or {}).get("pss_per_agent")
    if key == "lost_share":
        return run["lost_steps"] / max(run["steps"], 1) if "lost_steps" in run else None
    return run.get(key)


def compare(result: dict, baseline: dict, ratios_only: bool = False) -> list[Change]:
    """Each tracked metric against the same metric in an earlier busbench JSON; with
    ``ratios_only``, only what no machine's speed explains (_RATIOS and the lost share)."""
    changes = [] if ratios_only else [Change("single_agent_rate", None, result["single_agent_rate"],
                                             baseline["single_agent_rate"], True)]
    base_runs = {r["agents"]: r for r in baseline.get("runs", []) if "rate" in r}
    tracked = [(k, h) for k, h in (_RATIOS if ratios_only else _TRACKED)
               if not (k.startswith("efficiency") and result["config"]["kind"] == "null")]
    for run in result["runs"]:
        base = base_runs.get(run["agents"])
        if base is None or "rate" not in run:
            continue
        for key, higher in tracked:
            m, b = _tracked(run, key), _tracked(base, key)
            if m is not None and b is not None:
                changes.append(Change(key, run["agents"], m, b, higher))
        if ratios_only:
            m, b = _tracked(run, "lost_share"), _tracked(base, "lost_share")
            if m is not None and b is not None:
                changes.append(Change("lost_share", run["agents"], m, b, False, LOST_SHARE_TOLERANCE))
    return changes


def gate(checks: list[Check], changes: list[Change], max_regression_pct: float | None,
         requirements: bool = True) -> list[str]:
    """What trips the gate: failed requirements (unless ``requirements`` is false) and
    regressions beyond the limit (empty: it passes)."""
    if max_regression_pct is None:
        return []
    if not requirements:
        checks = []
    return ([f"requirement failed: {c.name}" for c in checks if c.passed is False]
            + [f"{c.metric}{f' at {c.agents} agents' if c.agents else ''} is "
               + (f"{c.measured:.3g}, against {c.baseline:.3g} in the baseline" if c.absolute is not None
                  else f"{-c.change:.1%} worse than the baseline")
               for c in changes if c.regressed(max_regression_pct)])


# --- rendering -------------------------------------------------------------------------

_COLUMNS = ("agents", "K", "steps/s", "E(N)", "E_peer", "R_pool", "E_pool", "R_peer", "R/R_peer", "E_live", "p50 ms", "p95 ms", "p99 ms",
            "coord us/step", "RSS MB", "PSS MB", "ready s", "lost")


def _cells(r: dict) -> list[str]:
    if "rate" not in r:
        return [str(r["agents"]), "failed"] + [""] * (len(_COLUMNS) - 2)
    lat, mem = r["latency_ms"], r.get("memory_mb") or {}
    rate = f"{r['rate']:.0f}"
    if r.get("repeat", 1) > 1:
        lo, hi = r["spread"]["rate"]
        rate += f" ({lo:.0f}-{hi:.0f})"
    pool = r.get("pool_rate")
    return [str(r["agents"]), str(r.get("per_host", 1)), rate, f"{r['efficiency']:.1%}", f"{r['efficiency_peer']:.1%}",
            "-" if pool is None else f"{pool:.0f}",
            "-" if r.get("efficiency_pool") is None else f"{r['efficiency_pool']:.1%}",
            "-" if r.get("peer_rate") is None else f"{r['peer_rate']:.0f}",
            "-" if r.get("efficiency_peer_rate") is None else f"{r['efficiency_peer_rate']:.2f}",
            "-" if r.get("efficiency_live") is None else f"{r['efficiency_live']:.1%}", f"{lat['p50']:.2f}",
            f"{lat['p95']:.2f}", f"{lat['p99']:.2f}", f"{r['coordinator_cpu_us_per_step']:.1f}",
            f"{mem.get('rss_per_agent', float('nan')):.1f}", f"{mem.get('pss_per_agent', float('nan')):.1f}",
            f"{r['ready_s']:.2f}", str(r["lost_steps"])]


def _footer(result: dict) -> list[str]:
    cfg = result["config"]
    kind = cfg["kind"] + (f" ({cfg['backend']}, policy_len {cfg['policy_len']})" if cfg["kind"] == "explorer" else "")
    where = f"connected to {cfg['connect']}" if cfg.get("connect") else f"transport {cfg['transport']}"
    line = (f"kind {kind}, mode {cfg['mode']}, {where}; cores C = {result['cores']}; "
            f"r1 = {result['single_agent_rate']:.0f} steps/s ({result['single_agent']['step_us']:.0f} us/step)")
    spinning = [str(r["agents"]) for r in result["runs"] if (r.get("spin_us") or {}).get("agents")]
    line += f"; spin {cfg.get('spin', 'off')}" + (f" (agents spun at N = {', '.join(spinning)})" if spinning else "")
    if cfg.get("repeat", 1) > 1:
        line += f"; medians of {cfg['repeat']} repeats, steps/s (min-max)"
    return [line]


#: What each column of the table means, one line each (docs/busbench.md has the JSON keys).
LEGEND = (
    "columns (docs/busbench.md defines each, with its JSON key):",
    "  agents, K        agents run; agents per process (1: a process each; K > 1: agent hosts of K)",
    "  steps/s          R(N): agent steps per second through the bus, steady state",
    "  E(N)             R(N) / (min(N, C) x r1): the share of C cores' worth of agents stepping alone that the bus "
    "delivers",
    "  E_peer           R(N) / (N x r1): every agent counted as a core, the figure the replaced thread-pool "
    "system reported",
    "  R_pool, E_pool   the same agents and processes with no messaging; E_pool = R / R_pool: what the bus itself "
    "costs",
    "  R_peer, R/R_peer the same agents and processes under Gymnasium's AsyncVectorEnv from a central loop "
    "(--peer); above 1: the bus is ahead",
    "  E_live           the coordinator's own estimate: agent CPU in steps / (window x min(N, C)), what busctl and "
    "its alert show",
    "  p50/p95/p99 ms   latency the bus adds to a step: the round trip less the agent's own compute",
    "  coord us/step    the coordinator's CPU per agent step",
    "  RSS MB, PSS MB   memory per agent: the agent processes' total / N (PSS counts shared pages once)",
    "  ready s          from starting the agents until all N have answered an observation",
    "  lost             steps answered late or never within the window",
)

#: The coordination efficiency the seed's report required (and busctl's alert threshold).
REQUIRED_EFFICIENCY = 0.5
#: A step shorter than this (r1's) is too short for E(N) to measure coordination: a
#: message costs the bus tens of microseconds whatever the step does.
MIN_MEANINGFUL_STEP_US = 200.0
#: E(N) and E_live apart by more than this share get a line saying why.
EFFICIENCIES_APART = 0.25
#: Agent processes per core above which the load is called out.
CROWDED_PER_CORE = 4


def notes(result: dict) -> list[str]:
    """The verdict, then what a reader should know to trust the figures: a step too short
    for E(N) to mean anything, E(N) and E_live apart, more processes than cores."""
    runs = [r for r in result["runs"] if "rate" in r]
    if not runs:
        return ["verdict: no run completed (the errors below say why)"]
    cfg, cores = result["config"], result["cores"]
    step_us = result["single_agent"]["step_us"]
    out = []
    short = step_us < MIN_MEANINGFUL_STEP_US
    worst = min(runs, key=lambda r: r["efficiency"])
    if short:
        out.append(f"verdict: none on efficiency: a {cfg['kind']} step takes {step_us:.0f} us alone, under the "
                   f"{MIN_MEANINGFUL_STEP_US:.0f} us a message's cost needs to be small beside; E(N) and E_live here "
                   f"measure the bus against a near no-op (use --agent-kind explorer, or a kind with real work)")
    elif worst["efficiency"] > REQUIRED_EFFICIENCY:
        out.append(f"verdict: PASS: E(N) above the {REQUIRED_EFFICIENCY:.0%} required at every count (lowest "
                   f"{worst['efficiency']:.1%} at {worst['agents']} agents)")
    else:
        below = [r for r in runs if r["efficiency"] <= REQUIRED_EFFICIENCY]
        why = ""
        if worst.get("efficiency_pool") is not None:
            why = (f"; E_pool {worst['efficiency_pool']:.0%}: "
                   + ("the bus costs little, these agents step slower together than alone (R_pool is the ceiling)"
                      if worst["efficiency_pool"] >= 0.9 else "the bus's own cost (coord us/step, latency)"))
        out.append(f"verdict: BELOW: E(N) {worst['efficiency']:.1%} at {worst['agents']} agents is under the "
                   f"{REQUIRED_EFFICIENCY:.0%} required ({len(below)} of {len(runs)} counts){why}")
    peers = [r for r in runs if r.get("efficiency_peer_rate") is not None]
    if peers:
        behind = [str(r["agents"]) for r in peers if r["efficiency_peer_rate"] < 1]
        out.append(f"against the peer ({peers[0].get('peer') or cfg.get('peer')}): R/R_peer "
                   + ", ".join(f"{r['efficiency_peer_rate']:.2f}" for r in peers)
                   + (f"; the peer is ahead at N = {', '.join(behind)}" if behind else "; the bus is ahead at every count"))
    for r in runs:
        live = r.get("efficiency_live")
        if short or live is None or not r["efficiency"]:
            continue
        if abs(live - r["efficiency"]) > EFFICIENCIES_APART * r["efficiency"] and r.get("agent_cpu_s"):
            cpu_us = r["agent_cpu_s"] * 1e6 / max(r["steps"], 1)
            out.append(f"E(N) {r['efficiency']:.1%} and E_live {live:.1%} differ at {r['agents']} agents: a step used "
                       f"{cpu_us:.0f} us of agent CPU on the bus against {step_us:.0f} us of wall time alone (r1); "
                       f"E_live counts the former, E(N) the latter")
    crowded = [r for r in runs if r.get("processes", r["agents"]) > CROWDED_PER_CORE * cores]
    for r in crowded[:1]:
        out.append(f"load: {r.get('processes', r['agents'])} agent processes on {cores} cores at {r['agents']} agents "
                   f"(more than {CROWDED_PER_CORE} a core): they time-slice, and latency is mostly waiting for a core"
                   + (" (--per-host auto runs them in hosts)" if r.get("per_host", 1) == 1 else ""))
    return out


def table(result: dict) -> str:
    rows = [_COLUMNS] + [_cells(r) for r in result["runs"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [" ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines += ["", *notes(result), "", *_footer(result), *LEGEND]
    lines += [_chaos_line(r) for r in result["runs"] if r.get("chaos")]
    lines += [f"ERROR at {r['agents']} agents: {e}" for r in result["runs"] for e in r.get("errors", [])]
    return "\n".join(lines)


def _chaos_line(r: dict) -> str:
    c = r["chaos"]
    rec = c["recovery_s"]
    timing = f", recovery p50 {rec['p50']:.2f} s, max {rec['max']:.2f} s" if rec["max"] is not None else ""
    return (f"chaos at {r['agents']} agents: {c['kills']} kills, {c['recovered']} recovered{timing}; "
            f"{r['lost_steps']} steps lost, all accounted for: ledger {'balanced' if r['balanced'] else 'NOT balanced'}")


def markdown_table(result: dict) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---:|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in result["runs"]]
    return "\n".join(lines + ["", *(f"- {line}" for line in notes(result)), "",
                               *(f"*{line}*" for line in _footer(result)), "", "```", *LEGEND, "```"])


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.3g} {unit}".strip() if abs(value) < 1000 else f"{value:,.0f} {unit}".strip()


def report_markdown(result: dict, checks: list[Check], changes: list[Change], baseline_name: str | None,
                    max_regression_pct: float | None, gate_requirements: bool = True) -> str:
    """The validation report; with ``gate_requirements`` false (``--gate-on ratios``) the
    requirements are shown for information and do not decide the overall status."""
    cfg = result["config"]
    failed = [c for c in checks if c.passed is False]
    undecided = [c for c in checks if c.passed is None]
    limit = max_regression_pct if max_regression_pct is not None else 0.0
    regressions = [c for c in changes if c.regressed(limit)]
    ok = (not failed or not gate_requirements) and not regressions
    lines = [
        "# busbench validation report",
        f"*{result['started']}, {result['host']['cpu']} ({result['cores']} cores), {cfg['kind']} agents"
        + (f" ({cfg['backend']})" if cfg["kind"] == "explorer" else "") + f", {cfg['mode']}*",
        "",
        f"## Overall status: {'PASS' if ok else 'FAIL'}",
        "",
        *([] if gate_requirements else ["- Gate: ratios against the baseline only (`--gate-on ratios`); the "
                                        "requirements below are for information"]),
        f"- Requirements: {len(checks) - len(failed) - len(undecided)} passed, {len(failed)} failed"
        + (f", {len(undecided)} not decidable from this run" if undecided else ""),
        (f"- Against baseline `{baseline_name}`: {len(changes)} metrics compared, {len(regressions)} worse than "
         f"{limit:g} %" if baseline_name else "- No baseline given (`--baseline FILE.json` compares with an earlier run)"),
        "",
        "## Requirements",
        "",
        "| requirement | measured | threshold | status |",
        "|---|---:|---|---|",
    ]
    lines += [f"| {c.name} | {_fmt(c.measured, c.unit)} | {c.threshold} | "
              f"{'n/a' if c.passed is None else 'PASS' if c.passed else 'FAIL'} |" for c in checks]
    if baseline_name:
        lines += ["", f"## Against the baseline (`{baseline_name}`)", "",
                  "| metric | agents | measured | baseline | change | status |", "|---|---:|---:|---:|---:|---|"]
        for c in changes:
            sign = "better" if c.change >= 0 else "worse"
            status = "REGRESSION" if c in regressions else "ok"
            lines.append(f"| {c.metric} | {c.agents if c.agents is not None else '-'} | {_fmt(c.measured)} | "
                         f"{_fmt(c.baseline)} | {abs(c.change):.1%} {sign} | {status} |")
    profiles = [(r["agents"], p["profile"]) for r in result["runs"] for p in r.get("repeats", [])
                if p.get("profile")]
    if profiles:
        lines += ["", "## Profiles", ""] + [
            f"- {n} agents: " + (f"`{prof['dir']}/summary.md`, flame graphs "
                                 + ", ".join(f"`{f}`" for f in prof["files"] if f.endswith(".svg"))
                                 if "dir" in prof else f"not recorded: {prof.get('error')}")
            for n, prof in profiles]
    lines += ["", "## Runs", "", markdown_table(result), *[f"\n{_chaos_line(r)}" for r in result["runs"]
                                                          if r.get("chaos")], "", "## Environment", "",
              f"Python {result['python']}, pyzmq {result['pyzmq']} (libzmq {result['libzmq']}), msgpack "
              f"{result['msgpack']}, inferactively-pymdp {result['pymdp']}, numpy {result['numpy']}; "
              f"{result['host']['platform']}."]
    return "\n".join(lines) + "\n"
