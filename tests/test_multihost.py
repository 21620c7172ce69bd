"""Beyond one machine, on one machine: hosts as network namespaces joined by a bridge
(busbench.netlab), the coordinator on one, agent hosts on others, over TCP with CURVE
(each host's key bound to its own ids).  Links are cut and restored as a cable would be.

Every test needs root and iproute2; where either is missing it fails saying so (CI runs
as root and .ci/run installs iproute2): these are not tests to skip quietly."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import time

import pytest

from agentbus_zmq.bus.report import AgentsPage
from agentbus_zmq.bus.security import generate
from agentbus_zmq.busbench.netlab import NetLab, requirements
from agentbus_zmq.busbench.procs import Child
from tests.conftest import cli_env, free_port, wait_until

HEARTBEAT = 0.5
#: a peer silent this long is declared dead (bus-coordinator --heartbeat: 3 intervals)
LIVENESS_S = 3 * HEARTBEAT
PER_HOST = 4
OBSERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ns_observer.py")


class Observer:
    """A control client inside a namespace (tests/ns_observer.py), driven line by line."""

    def __init__(self, lab: NetLab, host: str, endpoint: str, keys: tuple[str, str] | None = None):
        self.proc = subprocess.Popen([*lab.prefix(host), sys.executable, "-P", OBSERVER, endpoint, *(keys or ())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self._answer(60) == "ready"

    def _answer(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the observer did not answer within {timeout} s"
        line = self.proc.stdout.readline()
        assert line, f"the observer exited (status {self.proc.poll()})"
        answer = json.loads(line)
        assert "ok" in answer, answer["error"]
        return answer["ok"]

    def request(self, cmd: str, args: dict | None = None) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, "args": args or {}}) + "\n")
        return self._answer(30)

    def stats(self) -> dict:
        return self.request("stats")

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Site:
    """A lab with its processes (the ``bus`` fixture's, which stops them), and observers."""

    def __init__(self, lab: NetLab, bus):
        self.lab, self.bus, self.tmp = lab, bus, bus.tmp
        self.observers: list[Observer] = []

    @property
    def children(self) -> list[Child]:
        return self.bus.children

    def start(self, host: str, name: str, module: str, *args: str) -> Child:
        return self.bus.start(name, module, *args, "--heartbeat", str(HEARTBEAT), prefix=self.lab.prefix(host))

    def observe(self, host: str, endpoint: str, keys: tuple[str, str] | None = None) -> Observer:
        self.observers.append(Observer(self.lab, host, endpoint, keys))
        return self.observers[-1]

    def close(self) -> None:
        for o in self.observers:
            o.close()
        self.bus.close()


@pytest.fixture
def site(bus, request):
    missing = requirements()
    assert missing is None, f"multi-host tests: a network lab {missing}"   # fails, never skips
    with NetLab(request.param) as lab:
        s = Site(lab, bus)
        try:
            yield s
        finally:
            s.close()


def curve_bus(site: Site, hosts: list[str]):
    """Keys (the coordinator's, an admin's, one per agent host bound to HOST-*), the
    coordinator on ``coord`` bound to every address of its namespace, an observer on its
    loopback, and PER_HOST agents in one host process on each of ``hosts``."""
    tmp = site.tmp
    server_pub, server_secret = generate(tmp / "server", "coordinator")
    _, admin_secret = generate(tmp / "allowed", "admin")
    secrets = {h: generate(tmp / "allowed", h, agents=[f"{h}-*", h])[1] for h in hosts}
    coordinator = site.start("coord", "coordinator", "agentbus_zmq.coordinator", "--bind", "tcp://0.0.0.0:5555",
                             "--curve-secret", str(server_secret), "--curve-clients", str(tmp / "allowed"))
    observer = site.observe("coord", "tcp://127.0.0.1:5555", (str(server_pub), str(admin_secret)))
    endpoint = f"tcp://{site.lab.addr['coord']}:5555"
    for h in hosts:
        site.start(h, f"agents-{h}", "agentbus_zmq.agents", "--endpoint", endpoint, "--kind", "null", "--replicas",
                   str(PER_HOST), "--per-host", str(PER_HOST), "--id", h, "--curve-server-key", str(server_pub),
                   "--curve-key", str(secrets[h]))
    return coordinator, observer


def stepping(observer: Observer, ids: set[str], more_ticks: int = 20) -> dict:
    """Wait until exactly ``ids`` are registered and ready and the schedule has ticked
    ``more_ticks`` more times; the stats then, their ledger balanced."""
    first = wait_until(lambda: (s := observer.stats())["ready"] == len(ids) and set(s["agent_ids"]) == ids and s,
                       60, f"{sorted(ids)} registered and stepping")
    later = wait_until(lambda: (s := observer.stats())["ledger"]["ticks"] >= first["ledger"]["ticks"] + more_ticks and s,
                       60, f"{more_ticks} more ticks")
    assert set(later["agent_ids"]) == ids and later["ledger"]["balanced"], later["ledger"]
    return later


def ids_of(*hosts: str) -> set[str]:
    return {f"{h}-{i}" for h in hosts for i in range(1, PER_HOST + 1)}


def noticed(host: Child, times: int) -> None:
    """Wait until agent host ``host`` has reconnected ``times`` times after hearing nothing
    from the coordinator for 3 heartbeats (its log says so each time)."""
    wait_until(lambda: host.log_path.read_text().count("no word from") >= times, 60,
               f"{host.name} to notice the coordinator's silence {times} times")


def dead_after(log_text: str, host: str) -> list[float]:
    """The silences after which the coordinator's log declared ``host``'s unit dead."""
    return [float(s) for s in re.findall(rf"host {re.escape(host)}\S* silent for ([\d.]+) s: declared dead", log_text)]


@pytest.mark.parametrize("site", [["coord", "a", "b", "c"]], indirect=True)
def test_a_hosts_link_cut_and_restored(site):
    """Three agent hosts on three machines: one host's link goes down.  Its agents are
    declared dead within the liveness limit while the others keep stepping and every step
    is accounted for; the link comes back and its agents rejoin under their ids."""
    coordinator, observer = curve_bus(site, ["a", "b", "c"])
    before = stepping(observer, ids_of("a", "b", "c"))

    site.lab.link("a", up=False)
    cut = stepping(observer, ids_of("b", "c"))
    silences = dead_after(coordinator.log_path.read_text(), "a")
    assert silences and all(LIVENESS_S <= s <= LIVENESS_S + 2.0 for s in silences), silences
    # what was lost is a's, whole frames of it (the tick out when the link went, and the
    # next until a was declared dead); b and c missed nothing
    lost = cut["ledger"]["missing"] - before["ledger"]["missing"]
    assert lost >= PER_HOST and lost % PER_HOST == 0 and cut["ledger"]["late"] == before["ledger"]["late"], lost
    rows = AgentsPage.from_wire(observer.request("agents", {"page": 0})).agents
    assert sorted(r.id for r in rows) == sorted(ids_of("b", "c")) and not any(r.missed for r in rows), rows
    # and a's host, cut off, has given up on its connection and tried afresh, twice
    noticed(site.children[1], 2)

    site.lab.link("a", up=True)
    after = stepping(observer, ids_of("a", "b", "c"))
    # the same ids, registered once more each: a's four, and nobody else
    assert {k: v for k, v in after["restarts"].items() if v} == {i: 1 for i in ids_of("a")}, after["restarts"]
    assert after["ledger"]["errors"].get("unauthorized", 0) == 0 and after["session"] == before["session"]


@pytest.mark.parametrize("site", [["coord", "a", "b", "c"]], indirect=True)
def test_the_coordinators_link_cut_and_restored(site):
    """The coordinator's own link goes down: every host is declared dead, every host
    notices the silence and keeps trying; the link comes back and every host rejoins, its
    agents under their ids, with the ledger balanced across the cut."""
    coordinator, observer = curve_bus(site, ["a", "b", "c"])
    before = stepping(observer, ids_of("a", "b", "c"))

    site.lab.link("coord", up=False)
    wait_until(lambda: observer.stats()["agents"] == 0, 30, "every host declared dead")
    for h in ("a", "b", "c"):
        assert dead_after(coordinator.log_path.read_text(), h), f"{h} not declared dead"
    for host in site.children[1:]:
        noticed(host, 2)

    site.lab.link("coord", up=True)
    after = stepping(observer, ids_of("a", "b", "c"))
    assert after["restarts"] == {i: 1 for i in ids_of("a", "b", "c")}, after["restarts"]
    assert after["ledger"]["sent"] > before["ledger"]["sent"] and after["ledger"]["balanced"]


@pytest.mark.parametrize("site", [["c1", "c2", "agents"]], indirect=True)
def test_two_coordinators_each_own_their_arenas(site):
    """Past one coordinator: two coordinators on two hosts, each owning its own arenas,
    and agents on a third host split between them (by arena: each agent host is pointed
    at the coordinator that owns its arena).  Each coordinator's ledger balances and each
    steps only its own agents."""
    observers = {}
    for c in ("c1", "c2"):
        site.start(c, f"coordinator-{c}", "agentbus_zmq.coordinator", "--bind", f"tcp://{site.lab.addr[c]}:5555",
                   "--arena-agents", str(PER_HOST))
        observers[c] = site.observe(c, f"tcp://{site.lab.addr[c]}:5555")
    for c in ("c1", "c2"):
        site.start("agents", f"agents-{c}", "agentbus_zmq.agents", "--endpoint", f"tcp://{site.lab.addr[c]}:5555",
                   "--kind", "null", "--replicas", str(2 * PER_HOST), "--per-host", str(PER_HOST), "--id", f"{c}x")
    for c, observer in observers.items():
        s = stepping(observer, {f"{c}x-{i}" for i in range(1, 2 * PER_HOST + 1)})
        assert s["arenas"] == 2 and s["hosts"] == 2, s


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))
    return server, server.getsockname()[1]


def test_the_delaying_proxy_keeps_every_byte_in_order_and_delays_each_way():
    """busbench.netlab's proxy, for kernels without netem: 2 MB through it and back, in
    order; a round trip takes at least twice its delay (never less: load only adds)."""
    server, port = _echo_server()
    proxy_port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "agentbus_zmq.busbench.netlab", "proxy", "--listen",
                              f"127.0.0.1:{proxy_port}", "--upstream", f"127.0.0.1:{port}", "--delay", "0.05"],
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=cli_env())
    try:
        assert proxy.stdout.readline().strip() == "listening"
        client = socket.create_connection(("127.0.0.1", proxy_port), timeout=30)
        upstream, _ = server.accept()
        upstream.settimeout(30)
        payload = bytes(range(256)) * 8192                # 2 MB
        start = time.monotonic()
        client.sendall(b"x")
        assert upstream.recv(1) == b"x"
        upstream.sendall(b"y")
        assert client.recv(1) == b"y"
        assert time.monotonic() - start >= 0.1            # 50 ms each way
        got = bytearray()
        client.sendall(payload)
        while len(got) < len(payload):
            chunk = upstream.recv(1 << 16)
            assert chunk, "the proxy closed early"
            got += chunk
        assert bytes(got) == payload
        client.shutdown(socket.SHUT_WR)                   # an end passes through, after the data
        assert upstream.recv(1) == b""
        client.close()
        upstream.close()
    finally:
        server.close()
        proxy.terminate()
        proxy.wait(10)


def _namespaces() -> set[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=True)
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


def test_busbench_splits_its_agents_between_hosts_and_leaves_no_namespace_behind():
    """`netlab bench`: the coordinator on one host, the agents in whole hosts on two others,
    each pinned to a CPU of its own; every agent counted, memory sampled on both hosts."""
    missing = requirements()
    assert missing is None, f"netlab bench: a network lab {missing}"
    before = _namespaces()
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.busbench.netlab", "bench", "--hosts", "2",
                        "--cores-per-host", "1", "--", "--agents", "8", "--per-host", "2", "--agent-kind", "null",
                        "--duration", "1", "--peer", "none", "--format", "json"],
                       capture_output=True, text=True, env=cli_env(), timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    run = result["runs"][0]
    assert len(result["config"]["agents_netns"]) == 2 and result["config"]["agents_cpus"] == ["0-0", "1-1"]
    assert run["registered"] == 8 and run["lost_steps"] == 0 and run["balanced"] and run["rate"] > 0
    assert run["memory_mb"]["processes"] == 4            # both launchers' hosts, two in each namespace
    assert _namespaces() == before


_RECEIVE = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
print("ready", flush=True)
s.settimeout(2)
n = 0
try:
    while True:
        n += s.recv(16) == b"x"
except TimeoutError:
    pass
print(n)
"""

_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(1000):
    s.sendto(b"x", (sys.argv[1], 9999))
    time.sleep(0.0005)
"""


def _datagrams_through(lab: NetLab) -> int:
    """1,000 datagrams sent from a to b, paced; how many arrived."""
    receiver = subprocess.Popen([*lab.prefix("b"), sys.executable, "-c", _RECEIVE], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "ready"
        subprocess.run([*lab.prefix("a"), sys.executable, "-c", _SEND, lab.addr["b"]], check=True, timeout=60)
        return int(receiver.communicate(timeout=60)[0])
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait(10)


@pytest.mark.parametrize("site", [["a", "b"]], indirect=True)
def test_the_lab_loses_the_share_of_frames_it_is_told_to(site):
    """netlab's loss (nftables on the bridge): none by default, about 30 % when told 30 %,
    none again once removed."""
    assert _datagrams_through(site.lab) >= 990
    site.lab.loss(0.3)
    assert 550 <= _datagrams_through(site.lab) <= 850      # 700 expected; 3 sd is +-45
    site.lab.loss(0)
    assert _datagrams_through(site.lab) >= 990
