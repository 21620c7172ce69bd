"""One busbench measurement: r1 once, then per agent count N a fresh coordinator and
N agent processes, a warm-up and a measured window opened and closed by the
coordinator (CONTROL ``measure``), memory sampled from the agent processes."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

import psutil

from bus.bench.procs import Child
from bus.client import ControlClient

__all__ = ["BenchConfig", "measure_r1", "run_one", "environment", "MB"]

log = logging.getLogger(__name__)
MB = 1024 * 1024


@dataclasses.dataclass
class BenchConfig:
    kind: str = "explorer"
    backend: str = "numpy"
    policy_len: int = 1
    mode: str = "lockstep"
    steps: int = 0
    duration: float = 5.0
    warmup: int = 50
    transport: str = "ipc"
    seed: int = 0
    width: int = 5
    height: int = 5
    obstacles: int = 2
    goals: int = 2
    deadline: float = 1.0
    timeout: float = 300.0
    solo_duration: float = 3.0

    def world(self) -> dict:
        return {"width": self.width, "height": self.height, "obstacles": self.obstacles, "goals": self.goals,
                "seed": self.seed}

    def free_cells(self) -> int:
        return self.width * self.height - self.obstacles

    def agent_args(self) -> list[str]:
        args = ["--kind", self.kind, "--seed", str(self.seed)]
        if self.kind == "explorer":
            args += ["--backend", self.backend, "--policy-len", str(self.policy_len)]
        return args


def cores() -> int:
    return len(os.sched_getaffinity(0))


def measure_r1(cfg: BenchConfig) -> dict:
    """r1 in a process of its own (``python -m bus.bench.solo``)."""
    cmd = [sys.executable, "-m", "bus.bench.solo", "--kind", cfg.kind, "--backend", cfg.backend,
           "--policy-len", str(cfg.policy_len), "--world", json.dumps(cfg.world()),
           "--warmup", str(max(cfg.warmup, 100)), "--duration", str(cfg.solo_duration)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120 + cfg.solo_duration, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"single-agent measurement failed (status {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _wait_for_file(path: str, child: Child, timeout: float) -> str:
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


def _memory(procs: list[psutil.Process]) -> dict:
    rss, pss, uss = [], [], []
    for p in procs:
        try:
            m = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss.append(m.rss)
        pss.append(getattr(m, "pss", m.uss))
        uss.append(m.uss)
    n = max(len(rss), 1)
    return {
        "processes": len(rss),
        "rss_per_agent": sum(rss) / n / MB,
        "pss_per_agent": sum(pss) / n / MB,
        "uss_per_agent": sum(uss) / n / MB,
        "pss_total": sum(pss) / MB,
    }


def run_one(cfg: BenchConfig, n: int, r1: float, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Measure R(N) with ``n`` agent processes; returns the run's record (see docs/busbench.md)."""
    if n > cfg.free_cells():
        raise ValueError(f"{n} agents do not fit a {cfg.width}x{cfg.height} world with {cfg.obstacles} obstacles; "
                         f"pass a larger --width/--height")
    tmp = tempfile.mkdtemp(prefix="busbench-")
    bind = f"ipc://{tmp}/bus.ipc" if cfg.transport == "ipc" else "tcp://127.0.0.1:*"
    children: list[Child] = []
    errors: list[str] = []
    record: dict = {"agents": n}
    try:
        coord = Child("coordinator", "coordinator",
                      ["--bind", bind, "--endpoint-file", f"{tmp}/endpoint", "--mode", cfg.mode,
                       "--deadline", str(cfg.deadline), "--width", str(cfg.width), "--height", str(cfg.height),
                       "--obstacles", str(cfg.obstacles), "--goals", str(cfg.goals), "--seed", str(cfg.seed),
                       "--log-level", "WARNING"], log_path=f"{tmp}/coordinator.log")
        children.append(coord)
        endpoint = _wait_for_file(f"{tmp}/endpoint", coord, 30)
        with ControlClient(endpoint) as client:
            client.wait_ready(10)
            request = client.send("measure", {
                "agents": n, "warmup_steps": cfg.warmup * n, "steps": cfg.steps, "duration_s": cfg.duration,
                "timeout_s": cfg.timeout})
            agents = Child("agents", "agents", ["--endpoint", endpoint, "--replicas", str(n), "--id", "bench",
                                                 "--log-level", "WARNING", *cfg.agent_args()],
                           log_path=f"{tmp}/agents.log")
            children.append(agents)
            progress(f"{n} agents: starting, warming up, measuring")

            def idle() -> None:
                coord.check()
                agents.check()

            window = client.wait(request, cfg.timeout + 5, idle, "measure")
            agent_procs = agents.processes()
            if n > 1:
                agent_procs = agent_procs[1:]  # the launcher forks the agents; it is not one
            record["memory_mb"] = _memory(agent_procs)
        # From the coordinator's receipt of `measure` (sent just before the launch) until
        # every agent has answered its first observation.
        record["ready_s"] = window["ready_s"]
        for child in reversed(children):
            code = child.stop()
            if code != 0:
                errors.append(f"{child.name} exited with status {code} (log: {tmp}/{child.name}.log)")
        children.clear()
    finally:
        for child in reversed(children):
            child.stop()
    c = cores()
    rate = window["rate"]
    lat = window["latency_us"]
    w = window["window"]
    record.update({
        "rate": rate,
        "efficiency": rate / (min(n, c) * r1),
        "efficiency_peer": rate / (n * r1),
        "latency_ms": {k: v / 1000 for k, v in lat.items()},
        "steps": window["steps"],
        "elapsed_s": window["elapsed_s"],
        "ticks": window["ticks"],
        "coordinator_cpu_us_per_step": window["coordinator_cpu_s"] / max(window["steps"], 1) * 1e6,
        "coordinator_thread_cpu_us_per_step": window["coordinator_thread_cpu_s"] / max(window["steps"], 1) * 1e6,
        "compute_share": window["compute_s"] / (window["elapsed_s"] * min(n, c)),
        "lost_steps": w["missing"] + w["late"],
        "late_steps": w["late"],
        "missing_steps": w["missing"],
        "undeliverable": w["undeliverable"],
        "registered": window["agents"],
        "ledger": window["ledger"],
    })
    if window["agents"] != n:
        errors.append(f"{window['agents']} agents registered at the end of the window, expected {n}")
    if not window["ledger"]["balanced"]:
        errors.append(f"the coordinator's ledger does not balance: {window['ledger']}")
    record["errors"] = errors
    if not errors:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


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
