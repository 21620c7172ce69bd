"""Prometheus metrics from the coordinator, served from its own poll loop.

:class:`CoreCollector` turns the core's state into metric families when scraped (nothing
is counted twice: the ledger is the source); :class:`MetricsServer` is a small
non-blocking HTTP/1.1 responder whose sockets the driver polls beside the ROUTER, so a
scrape never runs on another thread and never races the core, and a slow or hostile
client costs one bounded buffer (no thread, no blocking read or write).

Series (all prefixed ``agentbus_``; units in names, counters end in ``_total``):
agents and hosts registered, agents ready and pending; agent steps, ticks, the ledger
(observations sent, steps late/missing/outstanding/slow, messages undeliverable);
protocol errors by code, agents dropped by reason, refused CURVE clients, connection
events; bus latency and tick duration histograms; coordinator CPU (total, and per step
over the efficiency window); the live efficiency, its threshold and the alert.

Label policy: no series is labelled by agent id except ``agentbus_straggler_*``, which
lists at most 16 units (the worst), so a bus of 10,000 agents exports the same few
hundred series as one of 10.  Per-agent detail is ``busctl agents``.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import socket
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.coordinator.core import CoordinatorCore
from agentbus_zmq.coordinator.ledger import Histogram
from agentbus_zmq.coordinator.liveness import MAX_STRAGGLERS_LISTED

__all__ = ["CoreCollector", "MetricsServer", "parse_address", "render"]

log = logging.getLogger(__name__)

#: Histogram bucket bounds, seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TICK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: ledger error counters that are not protocol error codes: reason label of agents_dropped
DROP_REASONS = {"expired": "silent", "setup_expired": "setup_grace", "dropped_stragglers": "straggler",
                "connection_closed": "connection_closed", "world_fault": "world_fault"}
_CODES = {c.name for c in ErrorCode}


class CoreCollector:
    """A prometheus_client collector reading a :class:`CoordinatorCore` at scrape time."""

    def __init__(self, core: CoordinatorCore, clock: Callable[[], float] = time.monotonic):
        self.core = core
        self.clock = clock

    def collect(self):
        core, ledger = self.core, self.core.ledger
        live = core.live.figures()

        def gauge(name, doc, value, labels=None):
            g = GaugeMetricFamily(f"agentbus_{name}", doc, labels=list(labels or {}))
            if labels:
                g.add_metric(list(labels.values()), value)
            else:
                g.add_metric([], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"agentbus_{name}", doc)
            c.add_metric([], value)
            return c

        yield gauge("build_info", "Always 1: what this coordinator runs (the series to find coordinators by).", 1.0,
                    {"version": _version(), "protocol": str(P.PROTOCOL_VERSION), "mode": core.settings.mode,
                     "world": core.world.kind})
        yield gauge("agents_registered", "Agents registered (alone or in hosts).", len(core.agents))
        yield gauge("agents_ready", "Agents that have answered an observation.", core.ready)
        yield gauge("agents_pending", "Agents registered and not yet ready (a host's members count each).", core.pending)
        yield gauge("hosts_registered", "Agent hosts registered.", len(core.hosts))
        yield counter("agent_steps_total", "Agent steps answered in time.", ledger.received)
        yield counter("ticks_total", "Lock-step ticks closed.", ledger.ticks)
        yield counter("observations_sent_total", "Observations sent (agent-steps).", ledger.sent)
        yield counter("steps_late_total", "Answers that came after their deadline.", ledger.late)
        yield counter("steps_missing_total", "Observations never answered.", ledger.missing)
        yield counter("steps_slow_total", "Answers in time but after 80% of the deadline.", ledger.slow)
        yield gauge("steps_outstanding", "Observations awaiting an answer.", ledger.outstanding)
        yield counter("messages_undeliverable_total", "Messages the socket could not take (peer gone or queue "
                                                      "full).", ledger.undeliverable)
        errors = CounterMetricFamily("agentbus_protocol_errors_total", "Messages refused, by error code.",
                                     labels=["code"])
        dropped = CounterMetricFamily("agentbus_agents_dropped_total", "Registrations dropped, by reason.",
                                      labels=["reason"])
        for code in sorted(_CODES):
            errors.add_metric([code], ledger.errors.get(code, 0))
        for key, reason in DROP_REASONS.items():
            dropped.add_metric([reason], ledger.errors.get(key, 0))
        yield errors
        yield dropped
        yield counter("curve_refused_total", "CURVE clients refused (not on the allow-list).",
                      ledger.errors.get("unauthorized", 0))
        yield counter("peer_errors_received_total", "ERROR messages peers sent.", ledger.errors.get("received", 0))
        yield counter("bad_actions_total", "Actions refused at the world's door (not values of its action space; "
                                           "the world's default applied).", ledger.errors.get("bad_actions", 0))
        faults = CounterMetricFamily("agentbus_world_faults_total", "Faults of the world (a method raised or handed "
                                     "out what cannot travel), by method; each resets its arena.", labels=["method"])
        for method, n in sorted(core.world.by_method.items()):
            faults.add_metric([method], n)
        yield faults
        yield gauge("world_arenas_closed", "Arenas closed after repeated faults of the world.", len(core.world.closed))
        conns = CounterMetricFamily("agentbus_connection_events_total", "Transport events on the ROUTER.",
                                    labels=["event"])
        for event in ("accepted", "disconnected", "handshake_failed", "accept_failed"):
            conns.add_metric([event], core.connections.get(event, 0))
        yield conns
        yield _histogram("bus_latency_seconds", "Round trip of an answer less the agent's compute.",
                         core.timings.latency, core.timings.latency_sum_us, LATENCY_BUCKETS)
        yield _histogram("tick_duration_seconds", "Lock-step tick, from opening to closing.", core.timings.tick_time,
                         core.timings.tick_time_sum_us, TICK_BUCKETS)
        cpu_s = core.cpu_seconds()
        yield counter("coordinator_cpu_seconds_total", "CPU time of the coordinator process.", cpu_s)
        per_step = (live["coordinator_cpu"] / live["rate"]) if live.get("rate") and live["coordinator_cpu"] else 0.0
        yield gauge("coordinator_cpu_seconds_per_step", "Coordinator CPU per agent step, over the efficiency window.",
                    per_step)
        yield counter("agent_cpu_seconds_total", "CPU time agents reported for their steps.", core.timings.agent_cpu_us / 1e6)
        yield gauge("agent_cores", "Cores the agents can use (C in min(N, C)).", live["cores"])
        yield gauge("step_rate", "Agent steps per second over the efficiency window.", live["rate"] or 0.0)
        yield gauge("efficiency", "Live coordination efficiency: agent CPU in steps / (window x min(N, C)); NaN "
                                  "before a full window.", float("nan") if live["efficiency"] is None
                    else live["efficiency"])
        yield gauge("efficiency_threshold", "Below it for the hold time, the alert is raised.", live["threshold"])
        yield gauge("efficiency_alert", "1 while the efficiency alert is raised.", 1.0 if live["alert"] else 0.0)
        late = GaugeMetricFamily("agentbus_straggler_steps", f"The {MAX_STRAGGLERS_LISTED} worst units' missed, "
                                 "late and slow answers.", labels=["unit", "kind"])
        for name, counts in core.straggler_table().items():
            for kind in ("missed", "late", "slow"):
                late.add_metric([name, kind], counts[kind])
        yield late


def _histogram(name: str, doc: str, hist: Histogram | None, sum_us: float, bounds: tuple[float, ...]):
    h = HistogramMetricFamily(f"agentbus_{name}", doc)
    buckets, seen = [], 0
    counts = hist.counts if hist is not None else []
    # our log-spaced buckets (2 % wide): bucket i holds values below STEP ** i us
    edges = [Histogram.STEP ** i for i in range(len(counts))]
    i = 0
    for bound in bounds:
        limit = bound * 1e6
        while i < len(counts) and edges[i] <= limit:
            seen += counts[i]
            i += 1
        buckets.append((_le(bound), seen))
    buckets.append(("+Inf", hist.n if hist is not None else 0))
    h.add_metric([], buckets, sum_us / 1e6)
    return h


def _le(bound: float) -> str:
    return repr(bound)


@functools.cache
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("agentbus-zmq")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def render(core: CoordinatorCore) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoreCollector(core))
    return generate_latest(registry)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``127.0.0.1:9464``, ``:9464`` for every interface, ``[::1]:9464``)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics takes HOST:PORT (e.g. 127.0.0.1:9464), not {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Conn:
    __slots__ = ("sock", "inbuf", "outbuf", "opened", "peer")

    def __init__(self, sock: socket.socket, now: float, peer: str):
        self.sock, self.inbuf, self.outbuf, self.opened, self.peer = sock, b"", b"", now, peer


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1 (one request a connection), non-blocking, bounded:
    at most MAX_CONNS connections (PER_PEER from one address; when full, the oldest that
    has not finished its request makes way), requests of MAX_REQUEST bytes, TIMEOUT_S
    each.  A scrape is served from a page rendered at most once every RENDER_EVERY_S,
    whoever asks and however often.  The loop's time is bounded whatever comes: at most
    ACCEPTS_PER_S connections are taken a second (a tenth of them each tenth of a second),
    then listening pauses until the tenth is over (the kernel's backlog holds the rest; a flood waits in its connects instead of
    costing the bus), and at most PER_PEER_PER_S of them a second from one address are
    served: the rest are closed as they are taken, so a flooding address drains the
    backlog for the others rather than holding it.  When accept fails (out of descriptors) it says so at most once a
    second and stops accepting for BACKOFF_S, doubling to 1 s."""

    MAX_CONNS = 32
    PER_PEER = 8
    MAX_REQUEST = 8192
    TIMEOUT_S = 5.0
    RENDER_EVERY_S = 1.0
    BACKOFF_S = 0.05
    ACCEPTS_PER_S = 256
    PER_PEER_PER_S = 16

    def __init__(self, address: str, render: Callable[[], bytes]):
        host, port = parse_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, port), family=family, backlog=64)
        self.listener.setblocking(False)
        #: zmq.Poller reports plain sockets by file descriptor
        self.fd = self.listener.fileno()
        self.address = self.listener.getsockname()[:2]
        self.public = host not in ("127.0.0.1", "::1", "localhost")
        self._render = render
        self._conns: dict[int, _Conn] = {}
        self._poller = None
        #: the last page rendered, and when
        self._page, self._page_at = b"", -math.inf
        #: accept failures: listening paused until, the next pause's length, last warning
        self._paused_until, self._backoff, self._warned_at = 0.0, self.BACKOFF_S, -math.inf
        #: connections taken in the current tenth of a second, and when it ends; by address
        #: in the current second
        self._accepted, self._slot_ends, self._second_ends = 0, -math.inf, -math.inf
        self._taken: collections.Counter = collections.Counter()
        #: seconds in which the accept budget ran out (a flood, or more scrapers than it serves)
        self.budget_spent = 0
        self.renders = 0

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}/metrics"

    @property
    def busy(self) -> bool:
        """Connections are open, or accepting is paused (each loop must look: time them
        out, or listen again)."""
        return bool(self._conns) or self._paused_until > 0

    def attach(self, poller) -> None:
        import zmq

        self._poller = poller
        self._pollin, self._pollout = zmq.POLLIN, zmq.POLLOUT
        poller.register(self.listener, zmq.POLLIN)

    def handle(self, ready: dict, now: float) -> None:
        """Serve whatever ``ready`` (the poll's result: fd -> events) says is ready;
        close connections older than TIMEOUT_S."""
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self._poller.register(self.listener, self._pollin)
        elif self.fd in ready and not self._paused_until:
            self._accept(now)
        for fd, conn in list(self._conns.items()):
            events = ready.get(fd, 0)
            if events & self._pollin:
                self._read(fd, conn)
            if fd in self._conns and events & self._pollout:
                self._write(fd, conn)
            if fd in self._conns and now - conn.opened > self.TIMEOUT_S:
                self._close(fd)

    def close(self) -> None:
        for fd in list(self._conns):
            self._close(fd)
        if self._poller is not None and not self._paused_until:  # a paused listener is not registered
            self._poller.unregister(self.listener)
        self.listener.close()

    def _accept(self, now: float) -> None:
        if now >= self._slot_ends:  # the budget comes in tenths of a second: a waiting scrape is taken soon
            self._accepted, self._slot_ends = 0, now + 0.1
        if now >= self._second_ends:
            self._second_ends = now + 1.0
            self._taken.clear()
        for _ in range(self.MAX_CONNS):
            if self._accepted >= self.ACCEPTS_PER_S // 10:  # this tenth's budget is spent: listen again next tenth
                self.budget_spent += 1
                self._poller.unregister(self.listener)
                self._paused_until = self._slot_ends
                return
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                self._backoff = self.BACKOFF_S
                return
            except OSError as exc:  # out of descriptors: pause listening (the kernel keeps the backlog)
                if now - self._warned_at >= 1.0:
                    self._warned_at = now
                    log.warning("metrics: cannot accept a connection: %s; not listening for %.2f s (raise "
                                "`ulimit -n`?)", exc, self._backoff)
                self._poller.unregister(self.listener)
                self._paused_until = now + self._backoff
                self._backoff = min(self._backoff * 2, 1.0)
                return
            self._accepted += 1
            peer = address[0] if isinstance(address, tuple) else ""
            self._taken[peer] += 1
            if self._taken[peer] > self.PER_PEER_PER_S:  # its share of this second is served
                sock.close()
                continue
            mine = [fd for fd, c in self._conns.items() if c.peer == peer]
            if len(mine) >= self.PER_PEER:
                self._close(mine[0])  # its own oldest makes way: one address cannot hold them all
            elif len(self._conns) >= self.MAX_CONNS:
                waiting = [fd for fd, c in self._conns.items() if not c.outbuf]  # not answered yet, oldest first
                if not waiting:
                    sock.close()
                    continue
                self._close(waiting[0])
            sock.setblocking(False)
            self._conns[sock.fileno()] = _Conn(sock, now, peer)
            self._poller.register(sock, self._pollin)

    def _read(self, fd: int, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(self.MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(fd)
            return
        conn.inbuf += data
        if b"\r\n\r\n" not in conn.inbuf:
            if len(conn.inbuf) > self.MAX_REQUEST:
                self._respond(fd, conn, 431, "Request Header Fields Too Large", b"request too large\n")
            return
        line = conn.inbuf.split(b"\r\n", 1)[0].split()
        if len(line) != 3 or line[0] not in (b"GET", b"HEAD"):
            self._respond(fd, conn, 405, "Method Not Allowed", b"GET /metrics\n")
        elif line[1].split(b"?")[0] not in (b"/metrics", b"/"):
            self._respond(fd, conn, 404, "Not Found", b"GET /metrics\n")
        else:
            body = self._current_page()
            self._respond(fd, conn, 200, "OK", body if line[0] == b"GET" else b"", len(body))

    def _current_page(self) -> bytes:
        """The page, rendered again only when the last is RENDER_EVERY_S old: eight
        scrapers, or eight hundred, cost the loop one render a second."""
        now = time.monotonic()
        if now - self._page_at >= self.RENDER_EVERY_S:
            self._page, self._page_at = self._render(), now
            self.renders += 1
        return self._page

    def _respond(self, fd: int, conn: _Conn, status: int, reason: str, body: bytes, length: int | None = None) -> None:
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n")
        conn.outbuf = head.encode() + body
        self._poller.modify(conn.sock, self._pollout)
        self._write(fd, conn)

    def _write(self, fd: int, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            self._close(fd)

    def _close(self, fd: int) -> None:
        conn = self._conns.pop(fd)
        try:
            self._poller.unregister(conn.sock)
        except KeyError:
            pass
        conn.sock.close()
