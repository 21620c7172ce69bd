"""The thin ZeroMQ loop around :class:`~coordinator.core.CoordinatorCore`.

Poll; drain every frame that is ready into the core; run its timers; hand its outbox to
the socket.  A frame the socket refuses (peer gone, queue full: ``ROUTER_MANDATORY``)
is counted by the core, never lost silently.
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
from agentbus_zmq.bus.security import ZAP_ENDPOINT, ServerKeys, zap_verdict
from agentbus_zmq.bus.signals import StopSignal
from agentbus_zmq.coordinator.core import ConfigError, CoordinatorCore, Settings
from agentbus_zmq.coordinator.world import GridWorld, WorldConfig

__all__ = ["serve"]

log = logging.getLogger(__name__)

#: Frames taken from the socket before timers run and the outbox is flushed.
DRAIN_BUDGET = 256
#: Frames of one (invalid) multi-frame message held at once; a million-frame message
#: is read and dropped frame by frame, never collected.
MAX_FRAMES_KEPT = 4
#: Longest the loop ever sleeps, so every wait stays bounded.
MAX_POLL_S = 0.25


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


def flush(sock: zmq.Socket, core: CoordinatorCore) -> None:
    send = sock.send
    for peer, frame in core.take_outbox():
        try:
            # With ROUTER_MANDATORY an unroutable peer fails on the first frame, so a
            # message is never half-sent.
            send(peer, MORE_NOBLOCK)
            send(frame, NOBLOCK)
        except zmq.Again:
            core.on_undeliverable(peer, "its send queue is full", time.monotonic())
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            core.on_undeliverable(peer, "its connection is gone", time.monotonic(), gone=True)


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


def serve(endpoint: str, settings: Settings, world: WorldConfig, session: str | None = None,
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
    core = CoordinatorCore(settings, GridWorld(world), session or uuid.uuid4().hex[:12],
                           key_patterns=curve.allowed if curve is not None else None,
                           histograms=metrics is not None, load=lambda: os.getloadavg()[0])
    hook = AlertHook(alert_hook, core.session) if alert_hook else None
    exporter = None
    if metrics is not None:
        from agentbus_zmq.coordinator.exporter import MetricsServer, render

        try:
            exporter = MetricsServer(metrics, lambda: render(core))
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {metrics}: {exc.strerror or exc}; choose another --metrics "
                              f"address") from None
        if exporter.public:
            log.warning("serving metrics on %s, beyond loopback: anyone who can reach it reads the bus's figures",
                        metrics)
        log.info("metrics on %s", exporter.url)
    zap = None
    if curve is not None:
        # The ZAP handler must exist before the ROUTER accepts its first connection.
        zap = sockets.context().socket(zmq.REP)
        zap.setsockopt(zmq.LINGER, 0)
        zap.bind(ZAP_ENDPOINT)
        log.info("CURVE on: %d client keys allowed from %s", len(curve.allowed), curve.allow_dir)
    sock = sockets.router(endpoint, max_bytes=settings.max_message_bytes, curve=curve)
    clock = time.monotonic
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    if endpoint_file:
        tmp = f"{endpoint_file}.tmp"
        with open(tmp, "w") as f:
            f.write(endpoint + "\n")
        os.replace(tmp, endpoint_file)  # atomic: readers never see half a line
    log.info("coordinator %s listening on %s (mode %s, %dx%d world, seed %d)", core.session, endpoint,
             settings.mode, world.width, world.height, world.seed)
    try:
        with StopSignal() as stop:
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(stop.fd, zmq.POLLIN)
            if zap is not None:
                poller.register(zap, zmq.POLLIN)
            monitor = sock.get_monitor_socket(MONITORED)
            poller.register(monitor, zmq.POLLIN)
            if exporter is not None:
                exporter.attach(poller)
            recv = sock.recv
            getsockopt = sock.getsockopt
            # With CURVE, each message carries the key its connection authenticated with
            # (the User-Id our ZAP answer gave it): the core binds registrations to keys.
            keyed = curve is not None
            key = None
            spin_until = 0.0
            while stop.requested is None:
                now = clock()
                wake = now + min(core.next_timeout(now), MAX_POLL_S)
                events = None
                if spin_until > now:  # bounded busy-poll, never past the next timer
                    spin_until = min(spin_until, wake)
                    while not events and (now := clock()) < spin_until:
                        events = poller.poll(0)
                ready = dict(events or poller.poll(max(wake - now, 0.0) * 1000))
                if sock in ready:
                    if spin:
                        spin_until = clock() + spin
                    for _ in range(DRAIN_BUDGET):
                        try:
                            peer = recv(NOBLOCK)
                        except zmq.Again:
                            break
                        if keyed:
                            first = recv(NOBLOCK, copy=False)
                            frames = [first.bytes]
                            key = first.get("User-Id").encode()
                        else:
                            frames = [recv(NOBLOCK)]  # a ROUTER always has a frame after the routing id
                        while getsockopt(RCVMORE):  # a protocol violation: keep a few, count the rest
                            frame = recv(NOBLOCK)
                            if len(frames) < MAX_FRAMES_KEPT:
                                frames.append(frame)
                            else:
                                frames[-1] = b""
                        try:
                            core.on_frames(peer, frames, clock(), key)
                        except Exception:  # a bug must not take the bus down: count, log, answer
                            log.exception("unexpected error handling a message from peer %s", peer.hex())
                            core.on_unexpected(peer)
                        if core.has_output:
                            flush(sock, core)
                        if not getsockopt(EVENTS) & POLLIN:  # 1.5 us, against 3.3 for an Again
                            break
                if monitor in ready:
                    for _ in range(DRAIN_BUDGET):  # bounded: libzmq repeats a failing accept (EMFILE) at once
                        if not monitor.poll(0):
                            break
                        event = recv_monitor_message(monitor)
                        core.on_connection_event(_EVENT_NAMES.get(event["event"], str(event["event"])), clock(),
                                                 event["value"] if event["event"] == zmq.EVENT_ACCEPT_FAILED else 0)
                if zap is not None and zap in ready:
                    reply, allowed, who = zap_verdict(zap.recv_multipart(), curve.allowed)
                    zap.send_multipart(reply)
                    core.on_handshake(who, allowed, clock())
                if exporter is not None and (exporter.busy or exporter.fd in ready):
                    exporter.handle(ready, clock())
                core.on_timer(clock())
                alerts = core.take_alerts()
                if hook is not None:
                    hook.reap()
                    for event in alerts:
                        hook.fire(event)
                flush(sock, core)
            log.info("signal %d: shutting down", stop.requested)
            core.shutdown(clock())
            flush(sock, core)
            sock.disable_monitor()
            monitor.close(linger=0)
    finally:
        sock.close(linger=0)
        if zap is not None:
            zap.close(linger=0)
        if exporter is not None:
            exporter.close()
    ledger = core.ledger.snapshot()
    log.info("coordinator stopped after %d ticks; ledger %s", core.tick, ledger)
    return core
