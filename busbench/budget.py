"""The tick's critical path, measured: where a lock-step tick's time goes, through the
bus and through the peer (Gymnasium's AsyncVectorEnv), for the same agents.

Every process stamps the events it sees with ``CLOCK_MONOTONIC`` (one clock for all
processes of a machine), so the segments of one tick can be laid end to end:

bus (the coordinator runs in this process, behind the same Driver ``bus-coordinator``
runs; hosts are ``bus-agent`` processes)::

    coordinator  last answer in -> world step -> encode -> to send    "coordinator"
    transport    send -> host wakes -> decode -> first agent step     "to the agents"
    agents       first agent step begins -> last agent step ends      "agents"
    transport    last step ends -> encode -> send -> coordinator reads "back"
    barrier      this host's answer read -> the tick's last answer    "waiting for others"

peer: the central loop (observe, hand out, step the vector env, move) and each worker's
first and last step the same way.  Agents are wrapped by :class:`Traced`, which stamps
each step's start and end and writes them out when the process stops.  The sums are
each segment's mean over the measured ticks, per host or worker (the agents' share is
the work; the rest is what the bus or the peer adds).  Run::

    python -m agentbus_zmq.busbench.budget --agents 10 --per-host 5 --ticks 2000
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import json
import os
import statistics
import tempfile
import time

import click
import numpy as np

from agentbus_zmq.agents.sdk import Agent

__all__ = ["Traced", "bus_budget", "peer_budget"]

#: where Traced writes its stamps (a directory), and the kind it wraps
TRACE_DIR_ENV, TRACE_KIND_ENV = "BUSBENCH_TRACE_DIR", "BUSBENCH_TRACE_KIND"
#: stamps kept per process at most (a long run keeps its first ones)
MAX_STAMPS = 2_000_000
#: a tick's segments, in the order they follow one another
SEGMENTS = ("coordinator", "to the agents", "agents", "back", "waiting for others", "tick")


@contextlib.contextmanager
def _tracing(trace: str, kind: str):
    """The environment the traced agents read (set for the processes started or forked
    meanwhile), restored after."""
    saved = {k: os.environ.get(k) for k in (TRACE_DIR_ENV, TRACE_KIND_ENV)}
    os.environ.update({TRACE_DIR_ENV: trace, TRACE_KIND_ENV: kind})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Stamps:
    """This process's step stamps (start, end), written once at exit."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        atexit.register(self.write)
        self.written = False

    def write(self) -> None:
        where = os.environ.get(TRACE_DIR_ENV)
        if self.written or not where or not self.starts:
            return
        self.written = True
        with open(os.path.join(where, f"steps-{os.getpid()}.json"), "w") as f:
            json.dump({"pid": os.getpid(), "starts": self.starts, "ends": self.ends}, f)


_STAMPS: _Stamps | None = None


class Traced(Agent):
    """The kind ``$BUSBENCH_TRACE_KIND`` (explorer by default), each step stamped."""

    kind = "traced"
    OPTIONS = ("backend", "policy_len", "seed")

    def __init__(self, **options):
        from agentbus_zmq.agents.kinds import create, kind_options

        inner = os.environ.get(TRACE_KIND_ENV, "explorer")
        self.inner = create(inner, **kind_options(inner, **options))

    def prepare(self) -> None:
        self.inner.prepare()

    def on_start(self, welcome) -> None:
        global _STAMPS
        if _STAMPS is None:
            _STAMPS = _Stamps()
        self.stamps = _STAMPS
        self.inner.on_start(welcome)

    def step(self, obs):
        stamps, clock = self.stamps, time.monotonic
        start = clock()
        action = self.inner.step(obs)
        if len(stamps.starts) < MAX_STAMPS:
            stamps.starts.append(start)
            stamps.ends.append(clock())
        return action

    def on_stop(self) -> None:
        if _STAMPS is not None:
            _STAMPS.write()


def _frames(path: str, per_frame: int) -> tuple[np.ndarray, np.ndarray]:
    """A process's frames: the first step's start and the last step's end of each run of
    ``per_frame`` steps (a host steps its members back to back)."""
    with open(path) as f:
        data = json.load(f)
    n = len(data["starts"]) // per_frame * per_frame
    starts = np.asarray(data["starts"][:n]).reshape(-1, per_frame)
    ends = np.asarray(data["ends"][:n]).reshape(-1, per_frame)
    return starts[:, 0], ends[:, -1]


def _summary(segments: dict[str, list[float]]) -> dict:
    return {name: {"mean_us": statistics.fmean(v) * 1e6, "p50_us": statistics.median(v) * 1e6, "n": len(v)}
            for name, v in segments.items() if v}


# --- the bus -----------------------------------------------------------------------------


def bus_budget(kind: str, options: dict, agents: int, per_host: int, ticks: int, warmup: int) -> dict:
    """Lock-step ticks of ``agents`` agents in hosts of ``per_host`` (1: a process each),
    the coordinator in this process; returns each segment's mean and median."""
    from agentbus_zmq.bus import protocol as P
    from agentbus_zmq.busbench.procs import Child
    from agentbus_zmq.coordinator.core import CoordinatorCore, Settings
    from agentbus_zmq.coordinator.driver import Driver
    from agentbus_zmq.coordinator.grid import GridWorld, WorldConfig

    ANSWERS, OBSERVATIONS = {P.MsgType.ACTION, P.MsgType.HOST_ACTION}, {P.MsgType.OBSERVATION, P.MsgType.HOST_OBSERVATION}
    sent: dict[bytes, list[tuple[int, float]]] = {}  # peer -> (tick, when its observation was sent)
    answered: dict[bytes, list[float]] = {}
    closes: list[float] = []  # when each tick's last answer was read

    class Tracing(Driver):
        """The coordinator's Driver, stamping when answers are read, when each tick
        closes and when observations are handed to the socket."""

        def receive(self, peer, frames, now, key, address=""):
            t = time.monotonic()
            tick = self.core.tick
            super().receive(peer, frames, now, key, address)
            if P.unpack(frames[0])[1] in ANSWERS:
                answered.setdefault(peer, []).append(t)
            if self.core.tick != tick:
                closes.append(t)

        def deliver(self, peer, frame, now):
            # stamped as it is handed to the socket, not after: a host may wake and start
            # stepping before a loaded coordinator's next line runs
            if P.unpack(frame)[1] in OBSERVATIONS:
                sent.setdefault(peer, []).append((self.core.tick, time.monotonic()))
            return True

    trace = tempfile.mkdtemp(prefix="busbench-budget-")
    core = CoordinatorCore(Settings(mode="lockstep", deadline=10.0), GridWorld(WorldConfig()), "budget")
    driver = Tracing(core, f"ipc://{trace}/bus.ipc")
    args = ["--endpoint", driver.endpoint, "--replicas", str(agents), "--per-host", str(per_host), "--id", "budget",
            "--kind", "agentbus_zmq.busbench.budget:Traced", "--log-level", "WARNING", "--spin-us", "0"]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    with _tracing(trace, kind):
        hosts = Child("agents", "agentbus_zmq.agents", args, log_path=f"{trace}/agents.log")
    processes = -(-agents // per_host)
    try:
        deadline = time.monotonic() + 120
        begin: int | None = None  # the first tick with every process in (lock-step ticks before it are shorter)
        while begin is None or core.tick < begin + warmup + ticks:
            hosts.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{core.tick} ticks in 120 s (log: {trace}/agents.log)")
            driver.run_once(0.05)
            if begin is None and len(core.registry.by_peer) >= processes:
                begin = core.tick + 1
        pids = {e.peer: e.pid for e in core.registry.by_peer.values()}
    finally:
        hosts.stop()
        driver.close()
    segments: dict[str, list[float]] = {name: [] for name in SEGMENTS}
    closes_arr = np.asarray(closes)
    for peer, pid in pids.items():
        path = os.path.join(trace, f"steps-{pid}.json")
        if not os.path.exists(path):
            continue
        unit = core.registry.by_peer[peer]
        count = len(unit.live_idx) if hasattr(unit, "live_idx") else 1
        first, last = _frames(path, count)
        reads = np.asarray(answered.get(peer, []))
        measured = range(begin + warmup, begin + warmup + ticks)
        for s in (when for tick, when in sent.get(peer, []) if tick in measured):
            i = bisect.bisect_right(first, s)
            if i >= len(first):
                break
            j = bisect.bisect_right(reads, last[i])
            k = bisect.bisect_left(closes_arr, reads[j]) if j < len(reads) else len(closes_arr)
            c = bisect.bisect_right(closes_arr, s) - 1
            if j >= len(reads) or k >= len(closes_arr) or c < 0:
                break
            segments["coordinator"].append(s - closes_arr[c])
            segments["to the agents"].append(first[i] - s)
            segments["agents"].append(last[i] - first[i])
            segments["back"].append(reads[j] - last[i])
            segments["waiting for others"].append(closes_arr[k] - reads[j])
            segments["tick"].append(closes_arr[k] - closes_arr[c])
    return {"shape": "bus", "agents": agents, "per_host": per_host, "segments": _summary(segments)}


# --- the peer ------------------------------------------------------------------------------


def peer_budget(kind: str, options: dict, agents: int, per_host: int, ticks: int, warmup: int) -> dict:
    """The same agents under Gymnasium's AsyncVectorEnv (busbench.peer), stamped the same way."""
    from agentbus_zmq.busbench.peer import PeerLoop
    from agentbus_zmq.coordinator.grid import GridWorld, WorldConfig

    trace = tempfile.mkdtemp(prefix="busbench-budget-peer-")
    stamps: list[tuple[float, float, float, float]] = []  # tick start, handed out, vector env returned, moved
    with _tracing(trace, kind):
        Traced(**options).prepare()
        loop = PeerLoop("agentbus_zmq.busbench.budget:Traced", options, GridWorld(WorldConfig()), agents, per_host)
        try:
            loop.reset()  # the workers fork here, with the tracing environment
            for _ in range(warmup + ticks):
                loop.tick(stamps)
        finally:
            loop.close(terminate=False)  # workers close their envs: Traced writes its stamps at exit
    segments: dict[str, list[float]] = {name: [] for name in SEGMENTS}
    workers = []
    for name in sorted(os.listdir(trace)):
        if name.startswith("steps-"):
            with open(os.path.join(trace, name)) as f:
                count = len(json.load(f)["starts"]) // len(stamps)
            workers.append(_frames(os.path.join(trace, name), count))  # frame t: tick t
    for t in range(max(warmup, 1), len(stamps)):
        t0, t1, t2, _ = stamps[t]
        latest = max(last[t] for _, last in workers)
        for first, last in workers:
            segments["coordinator"].append((stamps[t - 1][3] - stamps[t - 1][2]) + (t1 - t0))
            segments["to the agents"].append(first[t] - t1)
            segments["agents"].append(last[t] - first[t])
            segments["waiting for others"].append(latest - last[t])
            segments["back"].append(t2 - latest)
            segments["tick"].append(stamps[t][0] - stamps[t - 1][0])
    return {"shape": "gym", "agents": agents, "per_host": per_host, "segments": _summary(segments)}


def render(results: list[dict]) -> str:
    names = SEGMENTS
    head = ["segment"] + [f"{r['shape']} (us, mean / p50)" for r in results]
    rows = [head] + [[name] + [f"{r['segments'][name]['mean_us']:.0f} / {r['segments'][name]['p50_us']:.0f}"
                               if name in r["segments"] else "-" for r in results] for name in names]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


@click.command()
@click.option("--agents", type=click.IntRange(1), default=10, show_default=True)
@click.option("--per-host", type=click.IntRange(1), default=5, show_default=True)
@click.option("--kind", default="explorer", show_default=True)
@click.option("--ticks", type=click.IntRange(10), default=1000, show_default=True)
@click.option("--warmup", type=click.IntRange(1), default=100, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def cli(agents, per_host, kind, ticks, warmup, fmt):
    """Where a lock-step tick's time goes, through the bus and through Gymnasium's
    AsyncVectorEnv, for the same agents in the same processes (the grid world)."""
    from agentbus_zmq.bus.config import limit_threads

    limit_threads()
    options = {"backend": "numpy", "policy_len": 1, "seed": 0}
    results = [bus_budget(kind, options, agents, per_host, ticks, warmup),
               peer_budget(kind, options, agents, per_host, ticks, warmup)]
    click.echo(json.dumps(results, indent=2) if fmt == "json" else render(results))


def main() -> None:
    cli.main(prog_name="busbench-budget")


if __name__ == "__main__":
    main()
