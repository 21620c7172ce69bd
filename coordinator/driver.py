"""The thin ZeroMQ loop around :class:`~coordinator.core.CoordinatorCore`.

:class:`Driver` binds a ROUTER and runs one loop: poll; drain every frame that is ready
into the core; run its timers; hand its outbox to the socket.  A frame the socket
refuses (peer gone, queue full: ``ROUTER_MANDATORY``) is counted by the core, never
lost silently.  :func:`serve` (``bus-coordinator``) sets up CURVE, metrics and the
alert hook around it; ``bus-conformance`` runs the same Driver, watching every frame.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
import uuid

import zmq
from zmq.utils.monitor import recv_monitor_message

from agentbus_zmq.bus import sockets
from agentbus_zmq.bus.clock import SystemClock
from agentbus_zmq.bus.security import ZAP_ENDPOINT, ServerKeys, zap_verdict
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.bus.signals import StopSignal
from agentbus_zmq.coordinator.core import ConfigError, CoordinatorCore, Settings
from agentbus_zmq.coordinator.world import World

__all__ = ["Driver", "serve", "CoreFailed", "CORE_FAILURES_TO_EXIT", "EXIT_CORE_FAILED"]

log = logging.getLogger(__name__)

#: Frames taken from the socket before timers run and the outbox is flushed.
DRAIN_BUDGET = 256
#: Frames of one (invalid) multi-frame message held at once; a million-frame message
#: is read and dropped frame by frame, never collected.
MAX_FRAMES_KEPT = 4
#: Longest the loop ever sleeps, so every wait stays bounded.
MAX_POLL_S = 0.25
#: Turns of the loop in a row in which the core's timers raised: its state can no longer
#: be trusted, and the coordinator exits (EXIT_CORE_FAILED) for its supervisor to restart it.
CORE_FAILURES_TO_EXIT = 50
#: The exit status then (EX_SOFTWARE): a supervisor restarts it (deploy/systemd: Restart=on-failure).
EXIT_CORE_FAILED = 70


class CoreFailed(RuntimeError):
    """The core's timers raised CORE_FAILURES_TO_EXIT turns in a row (the message says where)."""


#: Connection events counted in stats["connections"]: a peer that connects and never
#: speaks shows as an open connection with no registration; an oversized message shows
#: as a disconnect (libzmq drops the connection); a refused CURVE client as a failed
#: handshake.
_EVENT_NAMES = {
    zmq.EVENT_ACCEPTED: "accepted",
    zmq.EVENT_DISCONNECTED: "disconnected",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed",
    zmq.EVENT_ACCEPT_FAILED: "accept_failed",
}
MONITORED = 0
for _event in _EVENT_NAMES:
    MONITORED |= _event

# Plain ints: zmq's flags are IntFlag enums, and `|` on those costs 0.5 us a message.
NOBLOCK = int(zmq.NOBLOCK)
MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
RCVMORE = int(zmq.RCVMORE)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)


def _peer_address(frame: zmq.Frame) -> str:
    """Where a connection comes from, as admission charges it: the remote IP for TCP, the
    user and group for ipc:// (libzmq says ``localhost:UID:GID:PID``; a process's pid
    would let one user count as many), "" where libzmq cannot say (inproc)."""
    try:
        address = frame.get("Peer-Address")
    except zmq.ZMQError:
        return ""
    if address.startswith("localhost:") and address.count(":") == 3:
        return address.rpartition(":")[0]
    return address


class AlertHook:
    """Runs the operator's command when the efficiency alert is raised or cleared, with
    the figures in its environment (BUS_ALERT_*).  One at a time, never waited for: a
    hook still running when the next event comes is not started again (logged)."""

    def __init__(self, command: str, session: str):
        self.argv = shlex.split(command)
        self.session = session
        self.proc: subprocess.Popen | None = None

    def fire(self, event) -> None:
        if self.proc is not None and self.proc.poll() is None:
            log.warning("alert hook %s still running: not started for this event", self.argv[0])
            return
        f = event.figures
        env = {**os.environ, "BUS_ALERT_STATE": "raised" if event.raised else "cleared",
               "BUS_ALERT_EFFICIENCY": f"{event.efficiency:.4f}", "BUS_ALERT_THRESHOLD": f"{event.threshold:.4f}",
               "BUS_ALERT_CAUSE": event.cause, "BUS_ALERT_SESSION": self.session,
               "BUS_ALERT_AGENTS": str(f.get("agents", 0)), "BUS_ALERT_RATE": f"{f.get('rate') or 0:.1f}",
               "BUS_ALERT_LOST_STEPS": str(f.get("lost", 0))}
        try:
            self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.error("alert hook %r could not start: %s", self.argv[0], exc)

    def reap(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            if self.proc.returncode:
                log.warning("alert hook %s exited with status %d", self.argv[0], self.proc.returncode)
            self.proc = None


class Driver:
    """A ROUTER on ``endpoint`` in front of ``core``: the loop, in one place.

    Subclasses may watch or hold back frames: :meth:`receive` gets every message in,
    :meth:`deliver` every frame out (return False to keep it back).  ``spin``
    (seconds): busy-poll that long after each message before sleeping, never past the
    next timer.  ``curve`` answers ZAP with the allow-list; ``exporter`` (a
    MetricsServer) and ``hook`` (an AlertHook) are served from the same loop."""

    def __init__(self, core: CoordinatorCore, endpoint: str, curve: ServerKeys | None = None, spin: float = 0.0,
                 exporter=None, hook: AlertHook | None = None):
        self.core = core
        self.curve = curve
        self.spin = spin
        self.exporter = exporter
        self.hook = hook
        self.clock = SystemClock().now
        self.zap = None
        if curve is not None:
            # The ZAP handler must exist before the ROUTER accepts its first connection.
            self.zap = sockets.context().socket(zmq.REP)
            self.zap.setsockopt(zmq.LINGER, 0)
            self.zap.bind(ZAP_ENDPOINT)
        try:
            self.sock = sockets.router(endpoint, max_bytes=core.settings.max_message_bytes, curve=curve)
        except Exception:
            if self.zap is not None:
                self.zap.close(linger=0)
            raise
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.monitor = self.sock.get_monitor_socket(MONITORED)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        if self.zap is not None:
            self.poller.register(self.zap, zmq.POLLIN)
        if exporter is not None:
            exporter.attach(self.poller)
        self._spin_until = 0.0
        #: peers found gone while sending, not yet told to the core
        self._gone: list[bytes] = []
        #: turns in a row whose timers raised (CORE_FAILURES_TO_EXIT)
        self._failing = 0

    # --- hooks ---------------------------------------------------------------------

    def receive(self, peer: bytes, frames: list[bytes], now: float, key: bytes | None, address: str = "") -> None:
        self.core.on_frames(peer, frames, now, key, address)

    def deliver(self, peer: bytes, frame: bytes, now: float) -> bool:
        return True

    # --- the loop --------------------------------------------------------------------

    def flush(self) -> None:
        send, core = self.sock.send, self.core
        now = self.clock()
        for peer, frame in core.take_outbox():
            if not self.deliver(peer, frame, now):
                continue
            try:
                # With ROUTER_MANDATORY an unroutable peer fails on the first frame, so a
                # message is never half-sent.
                send(peer, MORE_NOBLOCK)
                send(frame, NOBLOCK)
            except zmq.Again:
                self._call(core.on_undeliverable, peer, "its send queue is full", self.clock())
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                self._gone.append(peer)  # told to the core after the next drain (see _settle_gone)

    def run_once(self, max_wait: float = MAX_POLL_S, extra: dict | None = None) -> dict:
        """One turn of the loop: wait (at most ``max_wait`` s, never past the core's next
        timer) for input, handle it, run the timers, flush.  Returns what was ready (a
        caller's own sockets or fds, registered with :attr:`poller`, are among it)."""
        clock, core, sock = self.clock, self.core, self.sock
        now = clock()
        wake = now + min(core.next_timeout(now), max_wait)
        events = None
        if self._spin_until > now:  # bounded busy-poll, never past the next timer
            spin_until = min(self._spin_until, wake)
            while not events and (now := clock()) < spin_until:
                events = self.poller.poll(0)
        ready = dict(events or self.poller.poll(max(wake - now, 0.0) * 1000))
        if sock in ready:
            if self.spin:
                self._spin_until = clock() + self.spin
            self._drain()
        if self.monitor in ready:
            monitor = self.monitor
            for _ in range(DRAIN_BUDGET):  # bounded: libzmq repeats a failing accept (EMFILE) at once
                if not monitor.poll(0):
                    break
                event = recv_monitor_message(monitor)
                self._call(core.on_connection_event, _EVENT_NAMES.get(event["event"], str(event["event"])), clock(),
                           event["value"] if event["event"] == zmq.EVENT_ACCEPT_FAILED else 0)
        if self.zap is not None and self.zap in ready:
            reply, allowed, who = zap_verdict(self.zap.recv_multipart(), self.curve.allowed)
            self.zap.send_multipart(reply)
            self._call(core.on_handshake, who, allowed, clock())
        if self.exporter is not None and (self.exporter.busy or self.exporter.fd in ready):
            self.exporter.handle(ready, clock())
        self._timers(clock())
        if self._gone:
            self._settle_gone()
        alerts = core.take_alerts()
        if self.hook is not None:
            self.hook.reap()
            for event in alerts:
                self.hook.fire(event)
        self.flush()
        return ready

    def _call(self, method, *args) -> None:
        """A call into the core that must not take the loop down: a bug is logged and counted."""
        try:
            method(*args)
        except Exception:
            log.exception("unexpected error in the coordinator's %s (counted; serving goes on)", method.__name__)
            self.core.ledger.errors[ErrorCode.UNEXPECTED.name] += 1

    def _timers(self, now: float) -> None:
        """The core's timers: an exception is logged (its traceback once in a row) and
        counted, and the loop goes on; CORE_FAILURES_TO_EXIT turns in a row raise CoreFailed."""
        try:
            self.core.on_timer(now)
        except Exception as exc:
            self._failing += 1
            self.core.ledger.errors[ErrorCode.UNEXPECTED.name] += 1
            if self._failing == 1:
                log.exception("unexpected error in the coordinator's timers (counted; serving goes on)")
            if self._failing >= CORE_FAILURES_TO_EXIT:
                raise CoreFailed(f"the coordinator's timers raised {self._failing} turns in a row, the last "
                                 f"{type(exc).__name__}: {exc}") from exc
            return
        self._failing = 0

    def _settle_gone(self) -> None:
        """Peers whose connection was gone when a frame for them was sent: read what the
        socket still holds first (a departing agent's BYE may sit there, sent before it
        closed), so that one that said goodbye leaves as such, then tell the core."""
        for _ in range(4):  # bounded: each round may find more gone peers
            self._drain()
            gone, self._gone = self._gone, []
            for peer in gone:
                self._call(self.core.on_undeliverable, peer, "its connection is gone", self.clock(), True)
            self.flush()
            if not self._gone:
                return

    def _drain(self) -> None:
        sock, core, clock = self.sock, self.core, self.clock
        recv, getsockopt = sock.recv, sock.getsockopt
        # With CURVE, each message carries the key its connection authenticated with
        # (the User-Id our ZAP answer gave it): the core binds registrations to keys.
        keyed = self.curve is not None
        # Without CURVE, a connection not registered is charged by its address while it
        # gets ready (admission); a registered one's messages are read the cheaper way.
        registered = core.registry.by_peer
        key, address = None, ""
        for _ in range(DRAIN_BUDGET):
            try:
                peer = recv(NOBLOCK)
            except zmq.Again:
                break
            if keyed:
                first = recv(NOBLOCK, copy=False)
                frames = [first.bytes]
                key = first.get("User-Id").encode()
            elif peer in registered:
                frames, address = [recv(NOBLOCK)], ""  # a ROUTER always has a frame after the routing id
            else:
                first = recv(NOBLOCK, copy=False)
                frames, address = [first.bytes], _peer_address(first)
            while getsockopt(RCVMORE):  # a protocol violation: keep a few, count the rest
                frame = recv(NOBLOCK)
                if len(frames) < MAX_FRAMES_KEPT:
                    frames.append(frame)
                else:
                    frames[-1] = b""
            try:
                self.receive(peer, frames, clock(), key, address)
            except Exception:  # a bug must not take the bus down: count, log, answer
                log.exception("unexpected error handling a message from peer %s", peer.hex())
                core.on_unexpected(peer)
            if core.has_output:
                self.flush()
            if not getsockopt(EVENTS) & POLLIN:  # 1.5 us, against 3.3 for an Again
                break

    def pump(self, seconds: float) -> None:
        """Run the loop for ``seconds``."""
        end = self.clock() + seconds
        while (left := end - self.clock()) > 0:
            self.run_once(min(left, 0.05))

    def run(self, stop: StopSignal) -> None:
        """Run until SIGINT/SIGTERM, then say BYE to everyone."""
        self.poller.register(stop.fd, zmq.POLLIN)
        while stop.requested is None:
            self.run_once()
        log.info("signal %d: shutting down", stop.requested)
        self.core.shutdown(self.clock())
        self.flush()

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        if self.zap is not None:
            self.zap.close(linger=0)
        if self.exporter is not None:
            self.exporter.close()


def serve(endpoint: str, settings: Settings, world: World, session: str | None = None,
          endpoint_file: str | None = None, curve: ServerKeys | None = None, spin: float = 0.0,
          metrics: str | None = None, alert_hook: str | None = None) -> CoordinatorCore:
    """Run the coordinator on ``endpoint`` until SIGINT/SIGTERM; returns the core.

    ``endpoint`` may use a wildcard port (``tcp://127.0.0.1:*``); the endpoint actually
    bound is logged and, with ``endpoint_file``, written there once the socket is ready.
    With ``spin`` (seconds), the loop busy-polls that long after each message before it
    sleeps: a core kept hot answers sooner (use it when the coordinator has a core to itself).
    ``metrics`` (HOST:PORT) serves Prometheus metrics from this loop; ``alert_hook`` is a
    command run when the efficiency alert is raised or cleared.
    """
    if sockets.endpoint_is_public(endpoint) and curve is None:
        log.warning("binding %s beyond loopback without CURVE: anyone who can reach it can join and read the "
                    "traffic (docs/security.md)", endpoint)
    core = CoordinatorCore(settings, world, session or uuid.uuid4().hex[:12],
                           key_patterns=curve.allowed if curve is not None else None, histograms=metrics is not None)
    hook = AlertHook(alert_hook, core.session) if alert_hook else None
    exporter = None
    if metrics is not None:
        from agentbus_zmq.coordinator.prometheus import MetricsServer, render

        try:
            exporter = MetricsServer(metrics, lambda: render(core))
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {metrics}: {exc.strerror or exc}; choose another --metrics "
                              f"address") from None
        if exporter.public:
            log.warning("serving metrics on %s, beyond loopback: anyone who can reach it reads the bus's figures",
                        metrics)
        log.info("metrics on %s", exporter.url)
    if curve is not None:
        log.info("CURVE on: %d client keys allowed from %s", len(curve.allowed), curve.allow_dir)
    try:
        driver = Driver(core, endpoint, curve=curve, spin=spin, exporter=exporter, hook=hook)
    except Exception:
        if exporter is not None:
            exporter.close()
        raise
    try:
        with StopSignal() as stop:
            if endpoint_file:
                tmp = f"{endpoint_file}.tmp"
                with open(tmp, "w") as f:
                    f.write(driver.endpoint + "\n")
                os.replace(tmp, endpoint_file)  # atomic: readers never see half a line
            log.info("coordinator %s listening on %s (mode %s, world %s, capacity %d agents)", core.session,
                     driver.endpoint, settings.mode, world.kind, world.capacity)
            driver.run(stop)
    finally:
        driver.close()
    log.info("coordinator stopped after %d ticks: %s", core.tick, core.ledger.summary())
    return core
