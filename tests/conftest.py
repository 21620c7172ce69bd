"""Fixtures that start real coordinator and agent processes and always stop them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable

import psutil
import pytest

from agentbus_zmq.busbench.procs import Child
from agentbus_zmq.bus.client import ControlClient
from agentbus_zmq.bus.config import limit_threads

# Tests start many Python processes on 2 cores: keep each single-threaded.
limit_threads()


def cli_env() -> dict:
    """The environment for a test's commands: the console scripts beside this interpreter
    first on PATH (pip installs them there), and nothing from the checkout on the import
    path, so the installed package is what runs."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)
    return env


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def reap(proc: subprocess.Popen, extra: list[psutil.Process]) -> None:
    """Kill what a test started with its own session, and any descendants it listed."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    for p in extra:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


class Bus:
    """Processes of one test: a coordinator, agent launchers, a control client."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.children: list[Child] = []
        self.endpoint: str | None = None
        self._client: ControlClient | None = None

    def coordinator(self, bind: str | None = None, *args: str) -> str:
        bind = bind or f"ipc://{self.tmp}/bus.ipc"
        path = self.tmp / f"endpoint-{len(self.children)}"
        child = self.start("coordinator", "agentbus_zmq.coordinator", "--bind", bind, "--endpoint-file", str(path), *args)
        self.endpoint = wait_until(lambda: path.exists() and path.read_text().strip(), 20, "the coordinator to bind")
        self.client.wait_ready(10)
        self.coordinator_child = child
        return self.endpoint

    def agents(self, n: int = 1, *args: str, endpoint: str | None = None, agent_id: str = "t") -> Child:
        return self.start("agents", "agentbus_zmq.agents", "--endpoint", endpoint or self.endpoint, "--replicas", str(n),
                          "--id", agent_id, *args)

    def start(self, name: str, module: str, *args: str, prefix: tuple[str, ...] = ()) -> Child:
        log = self.tmp / f"{name}-{len(self.children)}.log"
        child = Child(name, module, [*args, "--log-level", "INFO"], log_path=log, prefix=prefix)
        self.children.append(child)
        return child

    @property
    def client(self) -> ControlClient:
        if self._client is None:
            self._client = ControlClient(self.endpoint)
        return self._client

    def stats(self) -> dict:
        return self.client.request("stats", timeout=5)

    def wait_agents(self, n: int, timeout: float = 30, ready: bool = True) -> dict:
        key = "ready" if ready else "agents"
        return wait_until(lambda: (s := self.stats())[key] == n and s["agents"] == n and s, timeout,
                          f"{n} agents {'stepping' if ready else 'registered'}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        for child in reversed(self.children):
            child.stop(timeout=10)


@pytest.fixture
def bus(tmp_path):
    b = Bus(tmp_path)
    try:
        yield b
    finally:
        b.close()
