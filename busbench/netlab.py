"""Several hosts on one machine: Linux network namespaces joined by a bridge, for the
tests and busbench runs that need real links between hosts (a link cut and restored,
delay added), without a second machine.

Layout of a lab with hosts ``coord``, ``a`` and ``b``::

    namespace ab-TAG-sw:     br0 (10.77.0.254/24)  -- p0 -- p1 -- p2   (veth ends)
    namespace ab-TAG-coord:  eth0 10.77.0.1/24     (p0's peer)
    namespace ab-TAG-a:      eth0 10.77.0.2/24     (p1's peer)
    namespace ab-TAG-b:      eth0 10.77.0.3/24     (p2's peer)

Nothing is added to the machine's own namespace (every address lives inside the lab, so
the lab's subnet cannot clash with the machine's networks), and closing the lab deletes
its namespaces, with everything in them.  Needs root and iproute2 (``ip``).

Delay: the kernel's netem qdisc where it has one (``tc``); otherwise (a kernel built
without it, as some VMs are) :class:`DelayProxy`, a TCP proxy in the switch's namespace
that holds every chunk it forwards for a fixed time each way.  Either way ``delay`` is
one way, each direction: a round trip gains twice it.

``python -m agentbus_zmq.busbench.netlab latency`` measures busbench between two
namespaces at several delays (docs/performance.md, "Between hosts"); ``... netlab bench
--hosts 4 --cores-per-host 4 -- BUSBENCH-OPTIONS`` runs busbench with the agents split
between four hosts of four CPUs each.
"""

from __future__ import annotations

import collections
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Sequence

import click

__all__ = ["DelayProxy", "LabUnavailable", "NetLab", "SUBNET", "SWITCH_ADDR"]

#: The lab's /24 (inside its namespaces only).
SUBNET = "10.77.0"
#: The bridge's own address, in the switch namespace (where a DelayProxy listens).
SWITCH_ADDR = f"{SUBNET}.254"
_TIMEOUT = 30


class LabUnavailable(RuntimeError):
    """This machine cannot build a lab; the message says what is missing."""


def requirements() -> str | None:
    """What a lab needs and this process lacks, as one line, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces; CI runs the suite as root)"
    if not shutil.which("ip"):
        return "needs iproute2's ip (.ci/run installs iproute2)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_TIMEOUT, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise LabUnavailable(f"ip {' '.join(args)}: {r.stderr.strip() or f'exit status {r.returncode}'}")
    return r


class NetLab:
    """Hosts as network namespaces on one bridge (see the module's docstring).  Use as a
    context manager: the namespaces go when it exits, whatever happened."""

    def __init__(self, hosts: Sequence[str], tag: str | None = None):
        if not hosts or len(hosts) > 250 or len(set(hosts)) != len(hosts):
            raise ValueError("a lab has 1 to 250 hosts, each named once")
        self.tag = tag or uuid.uuid4().hex[:8]
        self.switch = f"ab-{self.tag}-sw"
        self.hosts = list(hosts)
        self.netns = {h: f"ab-{self.tag}-{h}" for h in hosts}
        self.addr = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(hosts)}
        self._port = {h: f"p{i}" for i, h in enumerate(hosts)}
        self._made: list[str] = []
        self._netem: bool | None = None

    def __enter__(self) -> "NetLab":
        missing = requirements()
        if missing:
            raise LabUnavailable(f"a network lab {missing}")
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        sw = self.switch
        _ip("netns", "add", sw)
        self._made.append(sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "addr", "add", f"{SWITCH_ADDR}/24", "dev", "br0")
        _ip("-n", sw, "link", "set", "br0", "up")
        for host in self.hosts:
            ns, port = self.netns[host], self._port[host]
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", sw, "link", "set", port, "master", "br0")
            _ip("-n", sw, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[host]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def close(self) -> None:
        """Delete the lab's namespaces (their links and addresses go with them).  A process
        still running in one keeps its sockets, cut off from everything."""
        while self._made:
            _ip("netns", "del", self._made.pop(), check=False)

    def prefix(self, host: str | None = None) -> tuple[str, ...]:
        """The command prefix that runs a command on ``host`` (None: on the switch)."""
        return ("ip", "netns", "exec", self.switch if host is None else self.netns[host])

    def link(self, host: str, up: bool) -> None:
        """Cut (``up=False``) or restore ``host``'s link to the bridge, as pulling its cable
        would: the host keeps its address and sockets, and nothing it sends arrives."""
        _ip("-n", self.switch, "link", "set", self._port[host], "up" if up else "down")

    def loss(self, fraction: float) -> None:
        """Drop ``fraction`` of the frames the bridge forwards between hosts, at random,
        each way (nftables' bridge family in the switch's namespace; 0 removes it).  TCP
        turns each loss into a retransmission: a stall of at least its minimum timeout."""
        subprocess.run([*self.prefix(), "nft", "delete", "table", "bridge", "netlab"], capture_output=True,
                       timeout=_TIMEOUT)
        if fraction > 0:
            rules = ("table bridge netlab {\n chain forward {\n  type filter hook forward priority 0; policy accept;\n"
                     f"  numgen random mod 1000000 < {round(fraction * 1_000_000)} drop\n }}\n}}\n")
            r = subprocess.run([*self.prefix(), "nft", "-f", "-"], input=rules, text=True, capture_output=True,
                               timeout=_TIMEOUT)
            if r.returncode:
                raise LabUnavailable(f"nft (loss {fraction:.2%}): {r.stderr.strip()}")

    def rto_min(self, host: str, ms: float) -> None:
        """Set the lab subnet's route on ``host`` to retransmit TCP after ``ms`` at the
        least, instead of Linux's 200 ms (``ip route ... rto_min``): on a lossy link, how
        long one lost segment stalls a connection."""
        _ip("-n", self.netns[host], "route", "replace", f"{SUBNET}.0/24", "dev", "eth0", "proto", "kernel", "scope",
            "link", "src", self.addr[host], "rto_min", f"{ms:g}ms")

    def netem(self) -> bool:
        """Does this kernel have netem (tc's delay qdisc)?  Tried once, on the switch."""
        if self._netem is None:
            r = subprocess.run([*self.prefix(), "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"],
                               capture_output=True, timeout=_TIMEOUT) if shutil.which("tc") else None
            self._netem = r is not None and r.returncode == 0
        return self._netem

    def delay(self, host: str, seconds: float) -> None:
        """netem: everything ``host`` sends waits ``seconds`` (0 removes it)."""
        cmd = [*self.prefix(host), "tc", "qdisc", "replace" if seconds else "del", "dev", "eth0", "root"]
        if seconds:
            cmd += ["netem", "delay", f"{seconds * 1e6:.0f}us"]
        subprocess.run(cmd, check=bool(seconds), capture_output=True, timeout=_TIMEOUT)


# --- a delaying TCP proxy ----------------------------------------------------------------


class _Pipe:
    """One direction of a proxied connection: chunks read from ``src``, each written to
    ``dst`` once its time has come (constant delay: the queue stays in order)."""

    __slots__ = ("src", "dst", "queue", "eof", "closed")

    def __init__(self, src: socket.socket, dst: socket.socket):
        self.src, self.dst = src, dst
        self.queue: collections.deque[list] = collections.deque()   # [due, bytes]; b"" ends it
        self.eof = False
        self.closed = False


class DelayProxy:
    """Forward TCP connections from ``listen`` to ``upstream``, holding each chunk
    ``delay`` seconds in each direction (a link that long, with infinite bandwidth: what
    it holds is not bounded, so it is a lab's tool, not one to face the world with).

    One thread-free loop over ``select.select``, whose timeout has microsecond resolution
    (epoll's has milliseconds); what it adds at delay 0 (a hop through one process) is
    measured beside it, never assumed (``latency`` prints the round trip it measured)."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], delay: float):
        self.upstream, self.delay = upstream, delay
        self.server = socket.create_server(listen)
        self.server.setblocking(False)
        self.pipes: list[_Pipe] = []

    def _accept(self) -> None:
        try:
            down, _ = self.server.accept()
        except OSError:
            return
        try:
            up = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            down.close()
            return
        for s in (down, up):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pipes += [_Pipe(down, up), _Pipe(up, down)]

    def _drop(self, pipe: _Pipe) -> None:
        """Close ``pipe``'s connection, both ways (removed from ``pipes`` by the loop)."""
        for p in self.pipes:
            if p.src in (pipe.src, pipe.dst):
                p.closed = True
        for s in (pipe.src, pipe.dst):
            s.close()

    def _flush(self, pipe: _Pipe, now: float) -> None:
        while pipe.queue and pipe.queue[0][0] <= now:
            chunk = pipe.queue[0][1]
            if not chunk:                       # the source ended: pass the end on
                pipe.queue.popleft()
                try:
                    pipe.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                continue
            try:
                sent = pipe.dst.send(chunk)
            except BlockingIOError:
                return
            except OSError:
                self._drop(pipe)
                return
            if sent < len(chunk):
                pipe.queue[0][1] = chunk[sent:]
                return
            pipe.queue.popleft()

    def serve(self, until: float = float("inf")) -> None:
        while time.monotonic() < until:
            now = time.monotonic()
            due = [p.queue[0][0] for p in self.pipes if p.queue]
            timeout = max(0.0, min(due) - now) if due else 0.5
            readers = [self.server] + [p.src for p in self.pipes if not p.eof]
            writers = [p.dst for p in self.pipes if p.queue and p.queue[0][0] <= now]
            readable, _, _ = select.select(readers, writers, [], min(timeout, until - now))
            now = time.monotonic()
            for s in readable:
                if s.fileno() < 0:
                    continue
                if s is self.server:
                    self._accept()
                    continue
                pipe = next((p for p in self.pipes if p.src is s), None)
                if pipe is None or pipe.closed:
                    continue
                try:
                    data = s.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:               # reset, timed out, unreachable: that connection ends
                    self._drop(pipe)
                    continue
                pipe.queue.append([now + self.delay, data])
                if not data:
                    pipe.eof = True
            for pipe in list(self.pipes):
                if not pipe.closed:
                    self._flush(pipe, time.monotonic())
            for pipe in self.pipes:              # both ways ended and passed on: close it
                other = next((p for p in self.pipes if p.src is pipe.dst), None)
                if pipe.eof and not pipe.queue and (other is None or (other.eof and not other.queue)):
                    self._drop(pipe)
                    break
            self.pipes = [p for p in self.pipes if not p.closed]


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


# --- the command line ----------------------------------------------------------------------


@click.group()
def cli() -> None:
    """Hosts as network namespaces on one machine (root, iproute2)."""


@cli.command()
@click.option("--listen", required=True, metavar="HOST:PORT")
@click.option("--upstream", required=True, metavar="HOST:PORT")
@click.option("--delay", type=float, default=0.0, show_default=True, help="Seconds each chunk waits, each way.")
def proxy(listen: str, upstream: str, delay: float) -> None:
    """A delaying TCP proxy (for kernels without netem); runs until signalled."""
    p = DelayProxy(_hostport(listen), _hostport(upstream), delay)
    print("listening", flush=True)
    p.serve()


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--hosts", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Agent hosts: namespaces the agents are split between, in whole agent hosts.")
@click.option("--cores-per-host", type=click.IntRange(0), default=0, show_default=True,
              help="Pin each host's agents to this many CPUs of their own (taskset; host i gets CPUs "
                   "i*C .. i*C+C-1); 0: unpinned.")
@click.argument("busbench_args", nargs=-1, type=click.UNPROCESSED)
def bench(hosts: int, cores_per_host: int, busbench_args: tuple[str, ...]) -> None:
    """busbench with the coordinator on one host and the agents split between HOSTS
    others (the rest of the command line is busbench's own options): e.g.
    `bench --hosts 4 --cores-per-host 4 -- --agents 1000 --per-host auto`."""
    names = [f"h{i + 1}" for i in range(hosts)]
    if cores_per_host and hosts * cores_per_host > len(os.sched_getaffinity(0)):
        raise click.UsageError(f"{hosts} x {cores_per_host} CPUs: this machine lets us use "
                               f"{len(os.sched_getaffinity(0))}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with NetLab(["coord", *names]) as lab:
        placement = []
        for i, h in enumerate(names):
            placement += ["--agents-netns", lab.netns[h]]
            if cores_per_host:
                placement += ["--agents-cpus", f"{i * cores_per_host}-{(i + 1) * cores_per_host - 1}"]
        cmd = [*lab.prefix("coord"), sys.executable, "-m", "agentbus_zmq.busbench", "--bind", "tcp://0.0.0.0:5555",
               "--agents-endpoint", f"tcp://{lab.addr['coord']}:5555", *placement, *busbench_args]
        code = subprocess.run(cmd, stdin=subprocess.DEVNULL).returncode
    sys.exit(code)


_PING = """
import json, sys, time
from agentbus_zmq.bus.client import ControlClient
with ControlClient(sys.argv[1]) as c:
    c.request("ping", timeout=10)
    rtts = []
    for _ in range(int(sys.argv[2])):
        t = time.perf_counter()
        c.request("ping", timeout=10)
        rtts.append(time.perf_counter() - t)
rtts.sort()
print(json.dumps({"p50_ms": rtts[len(rtts) // 2] * 1e3, "p99_ms": rtts[int(len(rtts) * 0.99)] * 1e3}))
"""


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


@cli.command()
@click.option("--delay", "delays", default="0,0.1,1,10", show_default=True,
              help="One-way delays to add, in ms, comma-separated (a round trip gains twice each).")
@click.option("--loss", "losses", default="", show_default=True,
              help="Also: frames lost at random on the direct path, in %, comma-separated (no delay added).")
@click.option("--rto-min", type=click.FloatRange(min=0, min_open=True), default=None,
              help="TCP's minimum retransmission timeout on both hosts' routes, in ms (Linux: 200).")
@click.option("--mode", "modes", default="lockstep,async", show_default=True)
@click.option("--agents", type=int, default=10, show_default=True)
@click.option("--per-host", default="5", show_default=True)
@click.option("--lanes", type=int, default=1, show_default=True, help="busbench --lanes (with async).")
@click.option("--agent-kind", default="explorer", show_default=True)
@click.option("--duration", type=float, default=5.0, show_default=True)
@click.option("--deadline", type=float, default=None, help="bus-coordinator --deadline (default: its own).")
@click.option("--repeat", type=int, default=1, show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON here.")
def latency(delays: str, losses: str, rto_min: float | None, modes: str, agents: int, per_host: str, lanes: int, agent_kind: str, duration: float,
            deadline: float | None, repeat: int, output: str | None) -> None:
    """busbench with the coordinator on one host and the agents on another, at each added
    delay and mode: R, E_pool, the added latency and the ping round trip measured over the
    same path.  Prints a Markdown table (docs/performance.md, "Between hosts")."""
    rows = []
    # SIGTERM unwinds like Ctrl-C: the lab's namespaces are deleted on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with NetLab(["coord", "agents"]) as lab:
        direct = f"tcp://{lab.addr['coord']}:5555"
        proxy_endpoint = f"tcp://{SWITCH_ADDR}:6000"
        use_netem = lab.netem()
        if rto_min:
            for host in ("coord", "agents"):
                lab.rto_min(host, rto_min)
        # (one-way delay in ms, frames lost in %, path): netem delays in the kernel; without
        # it, the proxy (at 0 too, beside the direct path: what its hop costs)
        cases = [(d, 0.0, "netem") for d in _floats(delays)] if use_netem else \
            [(d, 0.0, how) for d in _floats(delays) for how in (("direct", "proxy") if d == 0 else ("proxy",))]
        cases += [(0.0, p, "direct") for p in _floats(losses)]
        for delay_ms, loss, how in cases:
            proxy_proc = None
            lab.loss(loss / 100)
            if use_netem:
                for host in ("coord", "agents"):
                    lab.delay(host, delay_ms / 1e3)
            endpoint = proxy_endpoint if how == "proxy" else direct
            if how == "proxy":
                proxy_proc = subprocess.Popen(
                    [*lab.prefix(), sys.executable, "-m", "agentbus_zmq.busbench.netlab", "proxy", "--listen",
                     f"{SWITCH_ADDR}:6000", "--upstream", f"{lab.addr['coord']}:5555", "--delay", str(delay_ms / 1e3)],
                    stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
                proxy_proc.stdout.readline()
            if loss:
                how += f", {loss:g} % lost"
            if rto_min:
                how += f", rto_min {rto_min:g} ms"
            try:
                ping = _ping(lab, endpoint)
                for mode in modes.split(","):
                    cmd = [*lab.prefix("coord"), sys.executable, "-m", "agentbus_zmq.busbench",
                           "--agents", str(agents), "--per-host", per_host, "--lanes", str(lanes),
                           "--agent-kind", agent_kind, "--mode", mode, "--duration", str(duration),
                           "--repeat", str(repeat), "--peer", "none", "--format", "json",
                           "--bind", "tcp://0.0.0.0:5555", "--agents-netns", lab.netns["agents"],
                           "--agents-endpoint", endpoint, *(["--deadline", str(deadline)] if deadline else [])]
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
                    if r.returncode not in (0, 3):
                        raise click.ClickException(f"busbench failed ({r.returncode}): {r.stderr[-2000:]}")
                    run = json.loads(r.stdout)["runs"][0]
                    rows.append({"delay_ms": delay_ms, "how": how, "mode": mode, "ping_ms": ping, "rate": run["rate"],
                                 "efficiency": run["efficiency"], "efficiency_pool": run["efficiency_pool"],
                                 "latency_ms": run["latency_ms"], "lost_steps": run["lost_steps"],
                                 "deadline_s": run["deadline_s"]})
                    click.echo(json.dumps(rows[-1]), err=True)
            finally:
                if proxy_proc is not None:
                    proxy_proc.terminate()
                    proxy_proc.wait(10)
    if output:
        with open(output, "w") as f:
            json.dump(rows, f, indent=1)
    click.echo(markdown(rows, agents, per_host, agent_kind, lanes))


def _ping(lab: NetLab, endpoint: str, n: int = 200) -> dict:
    """The round trip of a control ping from the agents' host over ``endpoint``, to a
    coordinator started for it on ``coord`` (and stopped): what the path adds."""
    import tempfile

    from agentbus_zmq.busbench.procs import Child
    from agentbus_zmq.busbench.run import wait_for_file

    bound = os.path.join(tempfile.mkdtemp(prefix="netlab-"), "endpoint")
    coordinator = Child("coordinator", "agentbus_zmq.coordinator", ["--bind", "tcp://0.0.0.0:5555", "--endpoint-file",
                                                                     bound, "--log-level", "ERROR"],
                        prefix=lab.prefix("coord"))
    try:
        wait_for_file(bound, coordinator, 30)   # bound: the proxy's connection upstream finds it
        r = subprocess.run([*lab.prefix("agents"), sys.executable, "-c", _PING, endpoint, str(n)], capture_output=True,
                           text=True, timeout=120, stdin=subprocess.DEVNULL)
    finally:
        coordinator.stop()
    if r.returncode:
        raise click.ClickException(f"ping over {endpoint} failed: {r.stderr[-500:]}")
    return json.loads(r.stdout)


def markdown(rows: list[dict], agents: int, per_host: str, kind: str, lanes: int = 1) -> str:
    """The rows of ``latency`` as docs/performance.md shows them."""
    lanes_each = f", {lanes} lanes each" if lanes > 1 else ""
    lines = [f"{agents} {kind} agents, {per_host} per host process{lanes_each}; coordinator and agents in two "
             "namespaces", "",
             "| added delay, each way | path | ping p50 (ms) | mode | R (steps/s) | E(N) | E_pool "
             "| latency p50 / p95 / p99 (ms) | lost |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r["latency_ms"]
        lines.append(f"| {r['delay_ms']:g} ms | {r['how']} | {r['ping_ms']['p50_ms']:.2f} | {r['mode']} "
                     f"| {r['rate']:,.0f} | {r['efficiency']:.2f} | {r['efficiency_pool']:.2f} "
                     f"| {lat['p50']:.2f} / {lat['p95']:.2f} / {lat['p99']:.2f} | {r['lost_steps']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli()
