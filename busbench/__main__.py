"""``busbench``: measure the bus with real coordinator and agent processes.

Exit status: 0 all runs completed; 1 a run failed (a process died, steps went
unaccounted, a wait timed out); 2 usage error; 3 the ``--fail-on-regression`` gate
tripped (a requirement failed, or a metric regressed beyond the limit); 130 interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time

import click

from agentbus_zmq.agents.kinds import kind_help, kind_param
from agentbus_zmq.agents.kinds.explorer import BACKENDS
from agentbus_zmq.bus.config import MODES, limit_threads, show_environment, version_option
from agentbus_zmq.bus.sockets import check_endpoint
from agentbus_zmq.busbench import report as rpt
from agentbus_zmq.agents.layout import PerHost
from agentbus_zmq.coordinator.worlds import WorldUnavailable, parse_world_args
from agentbus_zmq.busbench.peer import PEERS
from agentbus_zmq.busbench.run import BenchConfig, cores, environment, measure_peer, measure_pool, measure_r1, run_one

EXIT_FAILED, EXIT_GATE, EXIT_INTERRUPTED = 1, 3, 130
_CFG = BenchConfig()


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated agent counts, got {text!r}", param_hint="--sweep") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter("agent counts must be positive", param_hint="--sweep")
    return counts


def _load_baseline(path: str) -> dict:
    try:
        with open(path) as f:
            baseline = json.load(f)
        baseline["single_agent_rate"], baseline["runs"]  # noqa: B018 - the keys a baseline needs
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise click.BadParameter(f"{path} is not busbench JSON output ({exc})", param_hint="--baseline") from None
    return baseline


class _Progress:
    """Live status on stderr when it is a terminal (rich); silent otherwise."""

    def __init__(self) -> None:
        self._status = None
        if sys.stderr.isatty():
            from rich.console import Console

            self._status = Console(stderr=True).status("busbench: starting")

    def __enter__(self) -> _Progress:
        if self._status is not None:
            self._status.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)

    def __call__(self, text: str) -> None:
        if self._status is not None:
            self._status.update(f"busbench: {text}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "BUSBENCH",
                                 "show_default": True})
@version_option()
@click.option("--agents", type=click.IntRange(1, 1_000_000), default=None,
              help="Agents to run [default: 20; with --connect, those registered].")
@click.option("--sweep", default=None, help="Comma-separated agent counts, e.g. 1,2,5,10,20.")
@click.option("--agent-kind", type=kind_param(), default=_CFG.kind, help=kind_help())
@click.option("--backend", type=click.Choice(BACKENDS), default=_CFG.backend, help="Explorer inference backend.")
@click.option("--policy-len", type=click.IntRange(1, 8), default=_CFG.policy_len,
              help="Explorer: moves each policy plans ahead (5 ** L policies: a step's cost grows with it).")
@click.option("--mode", type=click.Choice(MODES), default=_CFG.mode, help="Coordinator schedule.")
@click.option("--lockstep-scope", type=click.Choice(["world", "arena"]), default=_CFG.lockstep_scope,
              help="Lock-step over the whole world, or per arena (agents that share no arena tick independently; "
                   "bus-coordinator --lockstep-scope).")
@click.option("--steps", type=click.IntRange(0), default=_CFG.steps, help="Agent-steps in the measured window (0: --duration).")
@click.option("--duration", type=click.FloatRange(0), default=_CFG.duration, help="Seconds of measured window (without --steps).")
@click.option("--timeout", type=click.FloatRange(1), default=_CFG.timeout,
              help="Seconds one count may take, start-up and warm-up included (at least --duration + 120).")
@click.option("--warmup", type=click.IntRange(0), default=_CFG.warmup, help="Warm-up steps per agent, excluded.")
@click.option("--repeat", type=click.IntRange(1, 100), default=1, help="Repeat each count; report medians and spread.")
@click.option("--transport", type=click.Choice(["ipc", "tcp"]), default=_CFG.transport,
              help="The bus's sockets: ipc (a Unix socket) or tcp on loopback.")
@click.option("--seed", type=int, default=_CFG.seed, help="The world's seed (layouts, starting cells).")
@click.option("--width", type=click.IntRange(1), default=_CFG.width,
              help="Grid world: width in cells (the explorer's model has width x height states).")
@click.option("--height", type=click.IntRange(1), default=_CFG.height, help="Grid world: height in cells.")
@click.option("--per-host", type=PerHost(), default=_CFG.per_host,
              help="Agents per process: 1 (one process each), K (agent hosts of K: one frame per host per "
                   "tick), or auto (enough hosts to fill the cores). The no-bus pool uses the same layout.")
@click.option("--lanes", type=click.IntRange(1, 16), default=_CFG.lanes,
              help="With hosts: each host process registers its agents as this many lanes and steps one while the "
                   "others' round trips travel (bus-agent --lanes). The pool and the peer keep the same processes.")
@click.option("--world", default=_CFG.world, help="The world, as bus-coordinator --world takes it: grid, "
              "pettingzoo:MODULE, a name from the agentbus.worlds entry points, or package.module:factory.")
@click.option("--world-arg", "world_arg", multiple=True, metavar="KEY=VALUE",
              help="An argument for the world (repeatable; VALUE as JSON where it parses). r1 and the pool use the "
                   "same world.")
@click.option("--arena-agents", type=click.IntRange(0), default=_CFG.arena_agents,
              help="Agents per arena (a copy of the world) at most; 0: every free cell.")
@click.option("--connect", default=None, metavar="ENDPOINT",
              help="Measure a coordinator already running there instead of starting one.")
@click.option("--bind", default=None, metavar="ENDPOINT",
              help="The coordinator binds here instead of where --transport puts it (e.g. tcp://0.0.0.0:5555 for "
                   "agents on another host or namespace).")
@click.option("--agents-endpoint", default=None, metavar="ENDPOINT",
              help="The agents connect here instead of the bound endpoint (through a proxy, or another address).")
@click.option("--agents-netns", multiple=True, metavar="NAME",
              help="Start the agents in this Linux network namespace (ip netns exec; root): busbench between hosts "
                   "on one machine (busbench.netlab). Repeat it to split the agents between namespaces, in whole "
                   "hosts, one launcher each.")
@click.option("--agents-cpus", multiple=True, metavar="CPUS",
              help="With --agents-netns: the CPUs each namespace's agents may use (taskset -c, e.g. 0-3), one per "
                   "--agents-netns.")
@click.option("--deadline", type=click.FloatRange(min=0, min_open=True), default=_CFG.deadline,
              help="Seconds a tick (or, async, an observation) waits for answers (bus-coordinator --deadline).")
@click.option("--peer", type=click.Choice([*PEERS, "none"]), default=_CFG.peer,
              help="Also step the same agents, in the same process layout and world, under the tool a user would "
                   "pick instead (gym: Gymnasium's AsyncVectorEnv from a central loop), alternating with the bus "
                   "run: R_peer and R / R_peer (peer_rate, efficiency_peer_rate).")
@click.option("--spin", type=click.Choice(["auto", "off", "agents", "all"]), default=_CFG.spin,
              help="Busy-poll for the next message instead of sleeping at once: auto does it where every "
                   "spinning process has a core of its own (docs/performance.md).")
@click.option("--chaos-kill-rate", type=click.FloatRange(0), default=0.0, metavar="R",
              help="SIGKILL R random agents per second during the run; they are restarted and their recovery timed.")
@click.option("--curve", is_flag=True, default=False, help="Encrypt and authenticate the bus it starts (CURVE).")
@click.option("--curve-server-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="With --connect to a CURVE bus: the coordinator's public .key file.")
@click.option("--curve-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="With --curve-server-key: busbench's own .key_secret file (on the allow-list).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown"]), default="table",
              help="table (with the verdict and a legend), json (docs/busbench.md: the keys) or markdown.")
@click.option("--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the results here instead of stdout.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write a Markdown validation report (requirements, baseline, PASS/FAIL).")
@click.option("--baseline", type=click.Path(exists=True, dir_okay=False), default=None,
              help="busbench JSON of an earlier run to compare with.")
@click.option("--fail-on-regression", type=click.FloatRange(0), default=None, metavar="PCT",
              help="Exit 3 if a requirement fails or a metric is more than PCT % worse than the baseline.")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False), default=None,
              help="Sample the coordinator and one agent process with py-spy during each measured window; write "
                   "flame graphs (SVG) and a per-layer summary into DIR/agents-N/.")
@click.option("--model", "model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Explorer: its generative model from this .npz (bus-agent --model), for r1 and the bus alike.")
@click.option("--metrics", "metrics", default=None, metavar="HOST:PORT",
              help="Have the coordinator serve Prometheus metrics there during the run (to watch it, or to "
                   "measure what serving them costs).")
@click.option("--gate-on", type=click.Choice(["all", "ratios"]), default="all", show_default=True,
              help="What --fail-on-regression compares: all (requirements, rates, latency, memory) or ratios "
                   "(E(N), E_pool and memory per agent by ratio, lost steps by difference; no requirements, no "
                   "absolute rates): a gate for CI machines of unknown speed.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write throughput and efficiency against agent count as a PNG.")
def cli(agents, sweep, agent_kind, backend, policy_len, mode, lockstep_scope, steps, duration, timeout, warmup, repeat, transport, seed, width,
        height, per_host, lanes, world, world_arg, arena_agents, connect, bind, agents_endpoint, agents_netns, agents_cpus, deadline, peer, spin, chaos_kill_rate, curve, curve_server_key, curve_key, fmt, output, report_path, baseline, fail_on_regression,
        gate_on, profile_dir, metrics, model, plot_path):
    """Start a coordinator and N agent processes, drive them, and measure throughput,
    efficiency, latency, CPU and memory, beside the same agents with no bus and under
    the tool a user would pick instead.  Exits non-zero if anything failed.

    \b
    The figures (docs/busbench.md defines every column and JSON key):
      r1      steps/s of one agent of the same kind stepping alone, no bus
      R(N)    agent steps/s through the bus with N agents, steady state
      C       cores this process may use; K: agents per process (--per-host)
      E(N)    R(N) / (min(N, C) x r1): coordination efficiency (50 % required)
      E_pool  R / R_pool, R_pool the same agents and processes with no messaging
      R_peer  the same agents under Gymnasium's AsyncVectorEnv (--peer gym)
      E_live  the coordinator's own estimate, as busctl and its alert show it

    Options also come from BUSBENCH_<OPTION> variables (BUSBENCH_AGENTS=50).
    """
    if agents is not None and sweep is not None:
        raise click.UsageError("give --agents or --sweep, not both")
    if steps == 0 and duration == 0:
        raise click.UsageError("give --steps or a positive --duration")
    if bool(curve_server_key) != bool(curve_key):
        raise click.UsageError("CURVE needs both --curve-server-key and --curve-key")
    if connect:
        try:
            check_endpoint(connect)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--connect") from None
    for name, value in (("--bind", bind), ("--agents-endpoint", agents_endpoint)):
        if value:
            try:
                check_endpoint(value)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=name) from None
            if connect:
                raise click.UsageError(f"{name} is for the bus busbench starts; it cannot be used with --connect")
    if agents_cpus and len(agents_cpus) != len(agents_netns):
        raise click.UsageError("give one --agents-cpus per --agents-netns")
    if chaos_kill_rate and connect:
        raise click.UsageError("--chaos-kill-rate kills agents busbench started; it cannot be used with --connect")
    base = _load_baseline(baseline) if baseline else None
    cfg = BenchConfig(kind=agent_kind, backend=backend, policy_len=policy_len, mode=mode, lockstep_scope=lockstep_scope,
                      steps=steps,
                      duration=0.0 if steps else duration, timeout=timeout, warmup=warmup, transport=transport, seed=seed, width=width, height=height,
                      connect=connect, bind=bind, agents_endpoint=agents_endpoint, agents_netns=tuple(agents_netns),
                      agents_cpus=tuple(agents_cpus), deadline=deadline, spin=spin, chaos_kill_rate=chaos_kill_rate, curve=curve, curve_server_key=curve_server_key, curve_key=curve_key,
                      per_host=per_host, lanes=lanes, world=world, world_args=parse_world_args(world_arg), arena_agents=arena_agents, profile=profile_dir, metrics=metrics,
                      model=model, peer=None if peer == "none" or connect else peer)
    if model is not None:  # a model file that cannot be used is one line now, as bus-agent says it
        from agentbus_zmq.agents.kinds import create, kind_options

        options = kind_options(agent_kind, **cfg.kind_options())
        if "model" not in options:
            raise click.UsageError(f"--model is for kinds that take a model (explorer); {agent_kind} does not")
        try:
            create(agent_kind, **options)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    counts = _counts(sweep) if sweep else [agents] if agents else None
    if counts is None:
        counts = [_registered(connect, cfg)] if connect else [20]
    if not connect:
        try:
            built = cfg.world_spec().build()
        except (ValueError, WorldUnavailable) as exc:
            raise click.UsageError(str(exc)) from None
        for n in counts:
            if n > built.capacity:
                raise click.UsageError(f"{n} agents do not fit the world {cfg.world_spec().describe()} (room for "
                                       f"{built.capacity})")
            if cfg.hosts_for(n) == 1 and n > 4096:
                raise click.UsageError(f"{n} agent processes is too many: give --per-host K or auto")
    result = {"tool": "busbench", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **environment(),
              "cores": cores(), "config": {**cfg.__dict__, "repeat": repeat, "counts": counts}, "runs": []}
    solos: list[dict] = []
    per_n: dict[int, list[dict]] = {n: [] for n in counts}
    failed = interrupted = False
    with _Progress() as progress:
        try:
            # Repeats go round all counts, so that drift on a noisy host touches every N alike,
            # and r1 is measured right before each bus run: E(N) is a ratio of two figures
            # taken seconds apart, not minutes.
            for k in range(repeat):
                tag = f"[{k + 1}/{repeat}] " if repeat > 1 else ""
                for n in counts:
                    progress(f"{tag}measuring r1 ({agent_kind} alone, no bus, {cfg.solo_duration:.0f} s)")
                    solos.append(measure_r1(cfg))
                    pool = None
                    if not connect:
                        progress(f"{tag}measuring the ceiling ({n} agents, {_layout(cfg.hosts_for(n))}, no bus)")
                        pool = measure_pool(cfg, n, cfg.hosts_for(n))
                    peer_run = None
                    if cfg.peer:
                        progress(f"{tag}measuring the peer ({n} agents under {cfg.peer}, {_layout(cfg.hosts_for(n))})")
                        peer_run = measure_peer(cfg, n, cfg.hosts_for(n))
                    run = run_one(cfg, n, solos[-1]["rate"], pool, lambda text, tag=tag: progress(tag + text), peer_run)
                    run["single_agent_rate"] = solos[-1]["rate"]
                    per_n[n].append(run)
                    failed |= bool(run["errors"])
        except KeyboardInterrupt:
            interrupted = True
            click.echo("busbench: interrupted; every process it started has been stopped", err=True)
        except Exception as exc:  # noqa: BLE001 - reported, then a non-zero exit
            failed = True
            result["errors"] = [f"{type(exc).__name__}: {exc}"]
            click.echo(f"busbench: {type(exc).__name__}: {exc}", err=True)
    if not solos:
        sys.exit(EXIT_INTERRUPTED if interrupted else EXIT_FAILED)
    result["single_agent"] = {"rate": statistics.median(s["rate"] for s in solos),
                              "step_us": statistics.median(s["step_us"] for s in solos), "repeats": solos}
    result["single_agent_rate"] = result["single_agent"]["rate"]
    result["runs"] = [rpt.aggregate(per_n[n]) for n in counts if per_n[n]]
    for run in result["runs"]:  # steadier where r1 differs from process to process (many-core VMs)
        if "rate" in run:
            ideal = min(run["agents"], result["cores"]) * result["single_agent_rate"]
            run["efficiency_median_r1"] = run["rate"] / ideal
    # the verdict and what to know before trusting the figures (the table prints them too)
    result["notes"] = rpt.notes(result)
    _emit(result, fmt, output)
    for run in result["runs"]:
        for rep_run in run.get("repeats", [run]):
            prof = rep_run.get("profile")
            if prof:
                where = (f"{prof['dir']}/summary.md (flame graphs: "
                         + ", ".join(os.path.basename(f) for f in prof["files"] if f.endswith(".svg")) + ")"
                         if "dir" in prof else prof.get("error", "not recorded"))
                click.echo(f"busbench: profile at {run['agents']} agents: {where}", err=True)
    checks = rpt.requirements(result) if result["runs"] else []
    changes = rpt.compare(result, base, ratios_only=gate_on == "ratios") if base else []
    if report_path:
        with open(report_path, "w") as f:
            f.write(rpt.report_markdown(result, checks, changes, baseline, fail_on_regression,
                                        gate_requirements=gate_on == "all"))
    if plot_path and result["runs"]:
        from agentbus_zmq.busbench.plot import plot

        plot(result, plot_path)
    if interrupted:
        sys.exit(EXIT_INTERRUPTED)
    if failed:
        sys.exit(EXIT_FAILED)
    tripped = rpt.gate(checks, changes, fail_on_regression, requirements=gate_on == "all")
    if tripped:
        click.echo("busbench: gate failed (--fail-on-regression):\n  " + "\n  ".join(tripped), err=True)
        sys.exit(EXIT_GATE)


def _layout(per_process: int) -> str:
    return "a process each" if per_process == 1 else f"{per_process} agents a process"


def _emit(result: dict, fmt: str, output: str | None) -> None:
    text = {"json": lambda: json.dumps(result, indent=2), "markdown": lambda: rpt.markdown_table(result),
            "table": lambda: rpt.table(result)}[fmt]()
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
    else:
        click.echo(text)


def _registered(endpoint: str, cfg: BenchConfig) -> int:
    from agentbus_zmq.bus.client import BusUnavailable, ControlClient
    from agentbus_zmq.bus.report import Stats
    from agentbus_zmq.bus.security import ClientKeys

    keys = ClientKeys.load(cfg.curve_server_key, cfg.curve_key) if cfg.curve_server_key else None
    with ControlClient(endpoint, curve=keys) as client:
        try:
            n = Stats.from_wire(client.request("stats", timeout=5)).agents
        except BusUnavailable as exc:
            raise click.UsageError(str(exc)) from None
    if n < 1:
        raise click.UsageError(f"no agents are registered with the coordinator at {endpoint}")
    return n


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops busbench as Ctrl-C does: children reaped, results kept


show_environment(cli)


def main() -> None:
    limit_threads()
    signal.signal(signal.SIGTERM, _interrupt)
    cli.main(prog_name="busbench")


if __name__ == "__main__":
    main()
