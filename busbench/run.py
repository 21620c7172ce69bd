"""One busbench measurement.

r1 runs in a process of its own, right before each bus run.  For each agent count N: a fresh
coordinator and N agent processes (or, with ``--connect``, a coordinator already
running), a warm-up, and a measured window opened and closed by the coordinator (CONTROL
``measure``).  While the window is open busbench samples the processes' memory, cheaply
(RSS), to fit a growth slope; PSS and USS are read once, at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

import psutil

from agentbus_zmq.agents.layout import resolve_per_host
from agentbus_zmq.bus.config import DEFAULTS
from agentbus_zmq.busbench.procs import Child, stop_all
from agentbus_zmq.coordinator.settings import Settings
from agentbus_zmq.coordinator.grid import WorldConfig
from agentbus_zmq.coordinator.worlds import WorldSpec
from agentbus_zmq.bus.client import ControlClient
from agentbus_zmq.bus.report import Roster, Stats
from agentbus_zmq.bus.security import ClientKeys, generate

_WORLD = WorldConfig()

__all__ = ["BenchConfig", "measure_r1", "run_one", "environment", "cores", "slope", "MB"]

log = logging.getLogger(__name__)
MB = 1024 * 1024
#: Seconds between memory samples during a window.
SAMPLE_EVERY_S = 0.5


@dataclasses.dataclass
class BenchConfig:
    kind: str = "explorer"
    backend: str = "numpy"
    policy_len: int = 1
    mode: str = DEFAULTS.mode
    #: lock-step over the whole world or per arena (bus-coordinator --lockstep-scope)
    lockstep_scope: str = "world"
    steps: int = 0
    duration: float = 5.0
    warmup: int = 50
    transport: str = "ipc"
    seed: int = 0
    width: int = _WORLD.width
    height: int = _WORLD.height
    obstacles: int = _WORLD.obstacles
    goals: int = _WORLD.goals
    deadline: float = DEFAULTS.deadline
    timeout: float = 300.0
    solo_duration: float = 2.0
    connect: str | None = None
    #: the coordinator binds here (default: where ``transport`` puts it)
    bind: str | None = None
    #: the agents connect here (default: the bound endpoint)
    agents_endpoint: str | None = None
    #: network namespaces the agents start in, split between them in whole hosts (one
    #: launcher each), and a CPU list for each (taskset -c), or none
    agents_netns: tuple[str, ...] = ()
    agents_cpus: tuple[str, ...] = ()
    #: run the started bus with CURVE (fresh keys per run)
    curve: bool = False
    #: with connect: the server's public key file and this client's secret key file
    curve_server_key: str | None = None
    curve_key: str | None = None
    #: agents SIGKILLed per second during the run (the launcher restarts them)
    chaos_kill_rate: float = 0.0
    #: busy-polling: auto, off, agents or all (see spin_plan)
    spin: str = "auto"
    #: agents per process: 1 (one each), a count K (agent hosts of K), or "auto"
    per_host: int | str = 1
    #: agents per arena (0: every free cell); more agents open more arenas
    arena_agents: int = _WORLD.arena_agents
    #: write py-spy profiles of the coordinator and one agent process here (per count)
    profile: str | None = None
    #: the coordinator serves Prometheus metrics here during the run (HOST:PORT)
    metrics: str | None = None
    #: explorer: its model from this .npz instead of the world (bus-agent --model)
    model: str | None = None
    #: the world (bus-coordinator --world) and its arguments (--world-arg)
    world: str = "grid"
    world_args: dict = dataclasses.field(default_factory=dict)
    #: host processes register their agents as this many lanes (bus-agent --lanes)
    lanes: int = 1
    #: the peer measured beside every run (busbench.peer.PEERS), or None
    peer: str | None = "gym"

    def world_spec(self) -> WorldSpec:
        """The world of every run (the bus, r1 and the pool alike): the grid from the grid
        options, or ``world`` with ``world_args`` (and ``seed`` where it takes one)."""
        if self.world == "grid":
            return WorldSpec("grid", {"width": self.width, "height": self.height, "obstacles": self.obstacles,
                                      "goals": self.goals, "seed": self.seed, "arena_agents": self.arena_agents,
                                      **self.world_args})
        return WorldSpec(self.world, dict(self.world_args)).with_defaults(seed=self.seed)

    def agent_placement(self, n: int, per_host: int) -> list[tuple[int, tuple[str, ...]]]:
        """One launcher per agents' namespace (one in all without): its agent count, whole
        hosts of ``per_host`` dealt round, and its command prefix."""
        places = max(1, len(self.agents_netns))
        hosts = -(-n // per_host)
        counts = [0] * places
        for j in range(hosts):                       # the last host of all may be partial
            counts[j % places] += min(per_host, n - j * per_host)
        out = []
        for i, count in enumerate(counts):
            prefix = ("ip", "netns", "exec", self.agents_netns[i]) if self.agents_netns else ()
            if self.agents_cpus:
                prefix += ("taskset", "-c", self.agents_cpus[i])
            if count > 0:
                out.append((count, prefix))
        return out

    def hosts_for(self, n: int) -> int:
        """Agents per process for ``n`` agents (``per_host`` resolved, auto included)."""
        return resolve_per_host(self.per_host, n, cores())

    def world_options(self) -> list[str]:
        """bus-coordinator's options for this world (the world's args, as the pool gets them)."""
        spec = self.world_spec()
        options = ["--world", spec.name]
        for key, value in spec.args.items():
            options += ["--world-arg", f"{key}={json.dumps(value)}"]
        return options

    def kind_options(self) -> dict:
        """The options the agents get: the same for bus-agent and for r1 (solo)."""
        options = {"backend": self.backend, "policy_len": self.policy_len, "seed": self.seed}
        return {**options, "model": os.path.abspath(self.model)} if self.model else options

    def agent_args(self) -> list[str]:
        """bus-agent's options for this kind (bus-agent passes the kind only those it takes)."""
        args = ["--kind", self.kind]
        for name, value in self.kind_options().items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        return args


def cores() -> int:
    return len(os.sched_getaffinity(0))


#: Microseconds a spinning process busy-polls after each message before it sleeps.
SPIN_US = 2000


def spin_plan(spin: str, n: int, c: int) -> tuple[int, int]:
    """(agent, coordinator) busy-poll budgets in microseconds, for n agents on c cores.

    A process that sleeps between steps comes back to a cold core (measured: a lone pymdp
    step 15-30 % slower after a pause); one that spins keeps it, but takes a core from
    whoever else needs it.  ``auto`` spins only where every spinner has a core: agents
    when N + 1 <= C (the coordinator keeps one), the coordinator too when N + 2 <= C
    (libzmq's I/O threads keep one).
    """
    if spin == "off":
        return 0, 0
    if spin == "agents":
        return SPIN_US, 0
    if spin == "all":
        return SPIN_US, SPIN_US
    return (SPIN_US if n + 1 <= c else 0), (SPIN_US if n + 2 <= c else 0)


def _measure_apart(module: str, what: str, cfg: BenchConfig, n: int, per_host: int) -> dict:
    """Run ``python -m agentbus_zmq.busbench.MODULE`` for ``n`` agents, ``per_host`` a
    process, the run's agents and world: its JSON line."""
    cmd = [sys.executable, "-P", "-m", f"agentbus_zmq.busbench.{module}", "--agents", str(n), "--per-host",
           str(per_host), *cfg.agent_args(), "--world-spec", cfg.world_spec().to_json(), "--warmup", str(cfg.warmup),
           "--duration", str(cfg.solo_duration)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300 + cfg.solo_duration, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"the {what} measurement failed (status {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_pool(cfg: BenchConfig, n: int, per_host: int) -> dict:
    """R_pool(N) in a process of its own (``busbench.pool``): the same agents in the same
    process layout, no messaging."""
    return _measure_apart("pool", "no-bus pool", cfg, n, per_host)


def measure_peer(cfg: BenchConfig, n: int, per_host: int) -> dict:
    """R_peer(N) in a process of its own (``busbench.peer``): the same agents in the same
    process layout under Gymnasium's AsyncVectorEnv."""
    return _measure_apart("peer", f"peer ({cfg.peer})", cfg, n, per_host)


def measure_r1(cfg: BenchConfig) -> dict:
    """r1 in a process of its own (``python -m busbench.solo``)."""
    cmd = [sys.executable, "-P", "-m", "agentbus_zmq.busbench.solo", *cfg.agent_args(), "--world-spec", cfg.world_spec().to_json(),
           "--warmup", str(max(cfg.warmup, 100)), "--duration", str(cfg.solo_duration)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120 + cfg.solo_duration, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"single-agent measurement failed (status {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope dy/dx; 0 for fewer than two distinct x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


class MemorySampler:
    """RSS of the coordinator and of the agents, sampled while busbench waits."""

    def __init__(self, coordinator: list[psutil.Process], n: int):
        self.coordinator, self.n = coordinator, n
        self.samples: list[tuple[float, float, float]] = []  # (monotonic, coordinator MB, mean agent MB)
        self._next = 0.0

    def due(self, now: float) -> bool:
        return now >= self._next

    def sample(self, now: float, agents: list[psutil.Process]) -> None:
        self._next = now + SAMPLE_EVERY_S
        if agents:
            self.samples.append((now, _rss(self.coordinator), _rss(agents) / len(agents)))

    def growth(self, start: float, end: float, rate: float) -> dict:
        """RSS slope over the window: the coordinator's per 1,000 steps of all agents,
        an agent's (mean over agents) per 1,000 of its own steps."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        per_1k = 1000.0 / rate if rate > 0 else 0.0
        coordinator = slope([(t, c) for t, c, _ in inside]) * per_1k if self.coordinator else None
        return {
            "samples": len(inside),
            "coordinator_mb_per_1k_steps": coordinator,
            "agent_mb_per_1k_steps": slope([(t, a) for t, _, a in inside]) * per_1k * self.n,
        }


def _rss(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / MB


def _memory(procs: list[psutil.Process], agents: int) -> dict:
    """Memory of the agent processes, per agent (hosts hold many agents a process)."""
    rss, pss, uss = [], [], []
    for p in procs:
        try:
            m = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss.append(m.rss)
        pss.append(getattr(m, "pss", m.uss))
        uss.append(m.uss)
    n = max(agents, 1)
    return {
        "processes": len(rss),
        "rss_per_agent": sum(rss) / n / MB,
        "pss_per_agent": sum(pss) / n / MB,
        "uss_per_agent": sum(uss) / n / MB,
        "pss_total": sum(pss) / MB,
    }


def wait_for_file(path: str, child: Child, timeout: float) -> str:
    """What a coordinator started with ``--endpoint-file path`` wrote there (its endpoint),
    once it has; fails at once if ``child`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child.check()
        try:
            with open(path) as f:
                text = f.read().strip()
            if text:
                return text
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise TimeoutError(f"the coordinator did not report its endpoint within {timeout:.0f} s")


def _agent_processes(launchers: list[Child]) -> list[psutil.Process]:
    """The agent (or host) processes busbench's launchers forked: their children, or a
    launcher itself where it runs its one agent in-process."""
    procs = []
    for launcher in launchers:
        try:
            parent = psutil.Process(launcher.pid)
            procs += parent.children() or [parent]
        except psutil.NoSuchProcess:
            pass
    return procs


def _stats(client: ControlClient, page: int | None = None) -> Stats:
    return Stats.from_wire(client.request("stats", {} if page is None else {"page": page}, timeout=5))


def _roster(client: ControlClient) -> Roster:
    """Every page of ``stats``' roster, merged (``agent_pids``, ``ready_ids``)."""
    first = _stats(client, 0)
    rosters = [first.roster] + [_stats(client, k).roster for k in range(1, first.pages)]
    return Roster(agent_pids={a: p for r in rosters for a, p in r.agent_pids.items()},
                  ready_ids=[a for r in rosters for a in r.ready_ids])


def _pids(client: ControlClient) -> set[int]:
    """Every pid the coordinator lists for its agents (all pages of ``stats``)."""
    return set(_roster(client).agent_pids.values())


def _local(pids) -> list[psutil.Process]:
    """The agent processes among ``pids`` that run on this host (an agent on another host
    may share a pid with an unrelated local process: its command line tells them apart)."""
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            cmdline = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError):
            continue
        if "agents" in cmdline or "bus-agent" in cmdline:
            procs.append(p)
    return procs


def run_one(cfg: BenchConfig, n: int, r1: float, pool: dict | None = None,
            progress: Callable[[str], None] = lambda s: None, peer: dict | None = None) -> dict:
    """Measure R(N) with ``n`` agents; returns the run's record (docs/busbench.md).
    ``pool`` is R_pool(N) and ``peer`` R_peer(N), measured for the same layout (None with
    --connect, or without a peer)."""
    if cfg.connect is None and n > cfg.world_spec().build().capacity:
        raise ValueError(f"{n} agents do not fit the world {cfg.world_spec().describe()}")
    tmp = tempfile.mkdtemp(prefix="busbench-")
    children: list[Child] = []
    errors: list[str] = []
    per_host = cfg.hosts_for(n)
    processes = -(-n // per_host)
    # The coordinator gives a host's frame more time per member (Settings.deadline_for).
    deadline = Settings(deadline=cfg.deadline).deadline_for(per_host)
    record: dict = {"agents": n, "per_host": per_host, "processes": processes, "deadline_s": deadline}
    args = {"agents": n, "warmup_steps": cfg.warmup * n, "steps": cfg.steps, "duration_s": cfg.duration,
            "timeout_s": max(cfg.timeout, cfg.duration + 120)}
    try:
        server_args, client_args, keys = _curve_args(cfg, tmp)
        agent_spin, coordinator_spin = spin_plan(cfg.spin, processes, cores())
        if cfg.connect:
            endpoint, checks, agent_spin, coordinator_spin = cfg.connect, [], None, None
        else:
            bind = cfg.bind or (f"ipc://{tmp}/bus.ipc" if cfg.transport == "ipc" else "tcp://127.0.0.1:*")
            coord = Child("coordinator", "agentbus_zmq.coordinator",
                          ["--bind", bind, "--endpoint-file", f"{tmp}/endpoint", "--mode", cfg.mode,
                           "--lockstep-scope", cfg.lockstep_scope,
                           "--deadline", str(cfg.deadline), *cfg.world_options(), "--spin-us", str(coordinator_spin),
                           "--log-level", "WARNING", *server_args,
                           *(["--metrics", cfg.metrics] if cfg.metrics else [])],
                          log_path=f"{tmp}/coordinator.log")
            children.append(coord)
            endpoint, checks = wait_for_file(f"{tmp}/endpoint", coord, 30), [coord]
        with ControlClient(endpoint, curve=keys) as client:
            client.wait_ready(10)
            request = client.send("measure", args)
            if not cfg.connect:
                # chaos kills on purpose: restart at once, and never give up on it
                restart = (["--restart", "--restart-backoff", "0.05", "--max-restarts", str(10**9)]
                           if cfg.chaos_kill_rate > 0 else [])
                launchers = []
                for i, (count, prefix) in enumerate(cfg.agent_placement(n, per_host)):
                    name = "agents" if i == 0 else f"agents-{i + 1}"
                    launchers.append(Child(
                        name, "agentbus_zmq.agents",
                        ["--endpoint", cfg.agents_endpoint or endpoint, "--replicas", str(count), "--per-host",
                         str(per_host), "--lanes", str(cfg.lanes), "--id", "bench" if i == 0 else f"bench{i + 1}",
                         "--spin-us", str(agent_spin), "--log-level", "WARNING", *cfg.agent_args(), *client_args,
                         *restart],
                        log_path=f"{tmp}/{name}.log", prefix=prefix))
                children += launchers
                checks += launchers
            else:
                launchers = []
            progress(f"{n} agents in {processes} processes: starting, warming up, measuring")
            sampler: MemorySampler | None = None
            chaos = Chaos(cfg.chaos_kill_rate) if cfg.chaos_kill_rate > 0 else None
            profiler = None
            if cfg.profile and not cfg.connect:
                from agentbus_zmq.busbench.profile import Profiler

                profiler = Profiler(os.path.join(cfg.profile, f"agents-{n}"), cfg.duration or 10.0)
                if profiler.error:
                    progress(f"not profiling: {profiler.error}")

            def idle() -> None:
                nonlocal sampler
                for child in checks:
                    child.check()
                now = time.monotonic()
                if sampler is not None and not sampler.due(now) and chaos is None:
                    return
                stats = _stats(client)
                if sampler is None:
                    if stats.ready >= n:  # all up: start watching (and, with chaos, killing)
                        sampler = MemorySampler(_coordinator(children), n)
                        if profiler is not None and not profiler.error:
                            agent_procs = _agent_processes(launchers)
                            profiler.start({"coordinator": coord.pid,
                                            **({"agent": agent_procs[0].pid} if agent_procs else {})})
                    return
                if sampler.due(now):
                    sampler.sample(now, _agent_processes(launchers) if launchers else _local(_pids(client)))
                if chaos is not None:
                    roster = stats.roster if stats.roster is not None else _roster(client)
                    chaos.step(now, roster, {p.pid for p in _agent_processes(launchers)})

            window = client.wait(request, max(cfg.timeout, cfg.duration + 120) + 5, idle, "measure")
            if profiler is not None:
                record["profile"] = profiler.finish()
                incomplete = [f"{k}: {v['error']}" for k, v in record["profile"].get("processes", {}).items()
                              if "error" in v] + ([record["profile"]["error"]] if "error" in record["profile"] else [])
                if incomplete:
                    progress("profile incomplete: " + "; ".join(incomplete))
            if chaos is not None:  # the window closed: no more kills; wait (bounded) for the last recoveries
                settle_until = time.monotonic() + CHAOS_SETTLE_S
                while chaos.pending and time.monotonic() < settle_until:
                    for child in checks:
                        child.check()
                    chaos.observe(time.monotonic(), _roster(client))
                    time.sleep(0.05)
            procs = _agent_processes(launchers) if launchers else _local(_pids(client))
        record["memory_mb"] = _memory(procs, n) if procs else None
        record["memory_growth"] = (sampler.growth(window["opened_at"], window["closed_at"], window["rate"])
                                   if sampler is not None and procs else None)
        # From the coordinator's receipt of `measure` (sent just before the launch) until
        # every agent has answered its first observation.
        record["ready_s"] = window["ready_s"]
        record["spin_us"] = {"agents": agent_spin, "coordinator": coordinator_spin}
        for child in reversed(children):
            code = child.stop()
            if code != 0:
                errors.append(f"{child.name} exited with status {code} (log: {tmp}/{child.name}.log)")
        children.clear()
    finally:
        stop_all(list(reversed(children)))  # interrupted: all at once, within one grace
    c = cores()
    rate = window["rate"]
    w = window["window"]
    steps = max(window["steps"], 1)
    record.update({
        "rate": rate,
        "efficiency": rate / (min(n, c) * r1),
        "pool_rate": pool["rate"] if pool else None,
        "efficiency_pool": rate / pool["rate"] if pool else None,
        "peer": peer["peer"] if peer else None,
        "peer_rate": peer["rate"] if peer else None,
        "efficiency_peer_rate": rate / peer["rate"] if peer else None,
        "efficiency_peer": rate / (n * r1),
        "overhead": 1 - rate / (min(n, c) * r1),
        "latency_ms": {k: v / 1000 for k, v in window["latency_us"].items()},
        "steps": window["steps"],
        "elapsed_s": window["elapsed_s"],
        "ticks": window["ticks"],
        "coordinator_cpu_us_per_step": window["coordinator_cpu_s"] / steps * 1e6,
        "coordinator_thread_cpu_us_per_step": window["coordinator_thread_cpu_s"] / steps * 1e6,
        "compute_share": window["compute_s"] / (window["elapsed_s"] * min(n, c)),
        # the coordinator's own efficiency formula (agent CPU in steps / (window x min(N, C))),
        # over this window: what its live gauge shows, to compare with E(N)
        "efficiency_live": window.get("efficiency_live"),
        "agent_cpu_s": window.get("agent_cpu_s"),
        "lost_steps": w["missing"] + w["late"],
        "late_steps": w["late"],
        "missing_steps": w["missing"],
        "undeliverable": w["undeliverable"],
        "registered": window["agents"],
        "ledger": window["ledger"],
    })
    if chaos is not None:
        record["chaos"] = chaos.summary()
    elif window["agents"] != n:
        errors.append(f"{window['agents']} agents registered at the end of the window, expected {n}")
    if not window["ledger"]["balanced"]:
        errors.append(f"the coordinator's ledger does not balance: {window['ledger']}")
    record["errors"] = errors
    if not errors:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


#: After the window, how long busbench waits for agents it killed to be back.
CHAOS_SETTLE_S = 30.0


class Chaos:
    """Kill random agent processes (a Poisson process of ``rate`` kills per second) and
    time each one's recovery: until every agent id that process carried (one, or a
    host's) is registered again from a new process and has answered an observation.

    It kills only processes busbench's own launcher forked, never a pid a peer reported
    in its HELLO (a peer may claim any pid)."""

    def __init__(self, rate: float, seed: int = 0):
        self.rate = rate
        self.rng = random.Random(seed)
        self.last: float | None = None
        self.pending: dict[int, tuple[set[str], float]] = {}  # killed pid -> (its agent ids, killed at)
        self.recoveries: list[float] = []
        self.kills = 0

    def observe(self, now: float, roster: Roster) -> None:
        """Note the recoveries that ``roster`` shows."""
        pids, ready = roster.agent_pids, set(roster.ready_ids)
        for old_pid, (ids, killed_at) in list(self.pending.items()):
            if all(a in ready and pids.get(a) != old_pid for a in ids):
                self.recoveries.append(now - killed_at)
                del self.pending[old_pid]

    def step(self, now: float, roster: Roster, ours: set[int]) -> None:
        """Note recoveries, then perhaps kill one of ``ours``."""
        self.observe(now, roster)
        pids, ready = roster.agent_pids, set(roster.ready_ids)
        dt, self.last = (now - self.last if self.last is not None else 0.0), now
        if self.rng.random() >= 1 - math.exp(-self.rate * dt):
            return
        busy = {a for ids, _ in self.pending.values() for a in ids}
        candidates = sorted({pids[a] for a in ready if a in pids and a not in busy and pids[a] in ours})
        if not candidates:
            return
        victim = self.rng.choice(candidates)
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.kills += 1
        self.pending[victim] = ({a for a, p in pids.items() if p == victim}, now)

    def summary(self) -> dict:
        r = sorted(self.recoveries)
        return {
            "kill_rate_per_s": self.rate,
            "kills": self.kills,
            "recovered": len(r),
            "unrecovered": len(self.pending),
            "recovery_s": {"p50": r[len(r) // 2] if r else None, "max": r[-1] if r else None},
        }


def _curve_args(cfg: BenchConfig, tmp: str) -> tuple[list[str], list[str], ClientKeys | None]:
    """Coordinator options, agent options and busbench's own keys for CURVE, if asked for."""
    if cfg.connect:
        if not cfg.curve_server_key:
            return [], [], None
        return [], [], ClientKeys.load(cfg.curve_server_key, cfg.curve_key)
    if not cfg.curve:
        return [], [], None
    server_key, server_secret = generate(f"{tmp}/server", "coordinator")
    _, client_secret = generate(f"{tmp}/clients", "busbench")
    return (["--curve-secret", str(server_secret), "--curve-clients", f"{tmp}/clients"],
            ["--curve-server-key", str(server_key), "--curve-key", str(client_secret)],
            ClientKeys.load(server_key, client_secret))


def _coordinator(children: list[Child]) -> list[psutil.Process]:
    return [p for c in children if c.name == "coordinator" for p in c.processes()]


def environment() -> dict:
    import msgpack
    import numpy
    import zmq

    try:
        from importlib.metadata import version

        pymdp_version = version("inferactively-pymdp")
    except Exception:  # noqa: BLE001 - metadata may be missing in a source checkout
        pymdp_version = "unknown"
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "pymdp": pymdp_version,
        "numpy": numpy.__version__,
        "host": {"cores": cores(), "cpu": cpu, "platform": platform.platform()},
    }
