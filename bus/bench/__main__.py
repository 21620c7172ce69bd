"""``busbench``: measure the bus with real coordinator and agent processes."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from agents.__main__ import _SINGLE_THREADED
from bus.bench.run import BenchConfig, cores, environment, measure_r1, run_one


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated agent counts, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter("agent counts must be positive")
    return counts


def _table(result: dict) -> str:
    head = (f"{'agents':>6} {'steps/s':>9} {'E(N)':>6} {'E_peer':>6} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
            f"{'coord us/step':>13} {'RSS MB':>7} {'PSS MB':>7} {'ready s':>7} {'lost':>5}")
    lines = [head]
    for r in result["runs"]:
        if "rate" not in r:
            lines.append(f"{r['agents']:>6}  failed: {'; '.join(r.get('errors', []))}")
            continue
        lat, mem = r["latency_ms"], r["memory_mb"]
        lines.append(
            f"{r['agents']:>6} {r['rate']:>9.0f} {r['efficiency']:>6.1%} {r['efficiency_peer']:>6.1%} "
            f"{lat['p50']:>7.2f} {lat['p95']:>7.2f} {lat['p99']:>7.2f} {r['coordinator_cpu_us_per_step']:>13.1f} "
            f"{mem['rss_per_agent']:>7.1f} {mem['pss_per_agent']:>7.1f} {r['ready_s']:>7.2f} {r['lost_steps']:>5}")
    cfg = result["config"]
    lines.append("")
    lines.append(f"kind {cfg['kind']}" + (f" ({cfg['backend']}, policy_len {cfg['policy_len']})"
                                          if cfg["kind"] == "explorer" else "")
                 + f", mode {cfg['mode']}, transport {cfg['transport']}; cores C = {result['cores']}; "
                 f"r1 = {result['single_agent_rate']:.0f} steps/s ({result['single_agent']['step_us']:.0f} us/step)")
    lines.append("E(N) = R(N) / (min(N, C) x r1); E_peer = R(N) / (N x r1); latency = round trip minus agent compute")
    for r in result["runs"]:
        for e in r.get("errors", []):
            lines.append(f"ERROR at {r['agents']} agents: {e}")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "BUSBENCH"})
@click.option("--agents", "agents", type=click.IntRange(1, 4096), default=None, help="Agent processes to run.")
@click.option("--sweep", default=None, help="Comma-separated agent counts, e.g. 1,2,5,10,20.")
@click.option("--agent-kind", type=click.Choice(["explorer", "null"]), default="explorer", show_default=True)
@click.option("--backend", type=click.Choice(["numpy", "jax"]), default="numpy", show_default=True)
@click.option("--policy-len", type=click.IntRange(1, 8), default=1, show_default=True)
@click.option("--mode", type=click.Choice(["lockstep", "async"]), default="lockstep", show_default=True)
@click.option("--steps", type=click.IntRange(0), default=0, help="Agent-steps in the measured window (0: use --duration).")
@click.option("--duration", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Seconds of measured window (when --steps is 0).")
@click.option("--warmup", type=click.IntRange(0), default=50, show_default=True,
              help="Warm-up steps per agent, excluded from the window.")
@click.option("--transport", type=click.Choice(["ipc", "tcp"]), default="ipc", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--width", type=click.IntRange(1), default=5, show_default=True)
@click.option("--height", type=click.IntRange(1), default=5, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the results here instead of stdout.")
def cli(agents, sweep, agent_kind, backend, policy_len, mode, steps, duration, warmup, transport, seed, width, height,
        fmt, output):
    """Start a coordinator and N agent processes, drive them, and measure throughput,
    efficiency, latency and memory.  Exits non-zero if anything failed."""
    if agents is not None and sweep is not None:
        raise click.UsageError("give --agents or --sweep, not both")
    counts = _counts(sweep) if sweep else [agents or 20]
    if steps == 0 and duration == 0:
        raise click.UsageError("give --steps or a positive --duration")
    cfg = BenchConfig(kind=agent_kind, backend=backend, policy_len=policy_len, mode=mode, steps=steps,
                      duration=duration, warmup=warmup, transport=transport, seed=seed, width=width, height=height)
    for n in counts:
        if n > cfg.free_cells():
            raise click.UsageError(f"{n} agents do not fit a {width}x{height} world ({cfg.free_cells()} free cells); "
                                   "pass a larger --width/--height")
    tty = sys.stderr.isatty()

    def progress(text: str) -> None:
        if tty:
            click.echo(f"busbench: {text}", err=True)

    result = {"tool": "busbench", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **environment(),
              "cores": cores(), "config": {**cfg.__dict__}, "runs": []}
    failed = interrupted = False
    try:
        progress(f"measuring r1 ({agent_kind} alone, no bus, {cfg.solo_duration:.0f} s)")
        solo = measure_r1(cfg)
        result["single_agent"] = solo
        result["single_agent_rate"] = solo["rate"]
        for n in counts:
            run = run_one(cfg, n, solo["rate"], progress)
            result["runs"].append(run)
            failed |= bool(run["errors"])
    except KeyboardInterrupt:
        interrupted = True
        click.echo("busbench: interrupted; every process it started has been stopped", err=True)
    except Exception as exc:  # noqa: BLE001 - reported, then a non-zero exit
        failed = True
        result.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}")
        click.echo(f"busbench: {type(exc).__name__}: {exc}", err=True)
    if "single_agent_rate" in result:
        text = json.dumps(result, indent=2) if fmt == "json" else _table(result)
        if output:
            with open(output, "w") as f:
                f.write(text + "\n")
        else:
            click.echo(text)
    sys.exit(130 if interrupted else 1 if failed else 0)


def main() -> None:
    for var, value in _SINGLE_THREADED.items():
        os.environ.setdefault(var, value)
    cli.main(prog_name="busbench")


if __name__ == "__main__":
    main()
