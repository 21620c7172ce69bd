"""The agent runtime: one DEALER, the handshake, steps, heartbeats, reconnection, BYE.

Life of an agent process::

    connect -> HELLO -> (WELCOME) -> OBSERVATION -> step -> ACTION -> ...

* Anything from the coordinator proves it alive.  Silent for ``heartbeat * liveness``
  seconds, it is presumed gone: the runtime closes its socket, opens a fresh one and
  says HELLO again, backing off from ``backoff_min`` to ``backoff_max`` (the Paranoid
  Pirate pattern).  A coordinator that restarts answers the old session's ACTIONs
  with NOT_REGISTERED, which also triggers a new HELLO at once.
* The runtime sends HEARTBEAT when it has sent nothing for ``heartbeat`` seconds.
* SIGINT/SIGTERM: BYE, close, ``on_stop``, exit 0.
"""

from __future__ import annotations

import logging
import os
import select
import time

import zmq

from agentbus_zmq.agents.sdk import Agent
from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus import sockets
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.bus.security import ClientKeys
from agentbus_zmq.bus.signals import StopSignal

__all__ = ["Runtime"]

log = logging.getLogger(__name__)

_REHELLO = frozenset({ErrorCode.NOT_REGISTERED, ErrorCode.SHUTTING_DOWN})
NOBLOCK = int(zmq.NOBLOCK)  # a plain int: IntFlag arithmetic costs on every message


class Runtime:
    def __init__(self, agent: Agent, endpoint: str, agent_id: str, heartbeat: float = 0.5, liveness: int = 3,
                 backoff_min: float = 0.05, backoff_max: float = 2.0, max_steps: int = 0,
                 curve: ClientKeys | None = None, spin: float = 0.0):
        P.Hello.from_wire([agent_id, agent.kind, 0])  # a bad id fails here, not on the wire
        self.agent = agent
        self.endpoint = endpoint
        self.agent_id = agent_id
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.max_steps = max_steps
        self.curve = curve
        self.spin = spin
        self.steps = 0
        self.session: str | None = None
        self._params: dict | None = None
        self._hello = P.encode(P.Hello(agent_id, agent.kind, os.getpid()))
        self._heartbeat = P.encode(P.Heartbeat())

    # The loop is one function on purpose: the per-step path stays visible and local.
    def run(self) -> int:
        clock = time.monotonic
        backoff = self.backoff_min
        expiry = self.heartbeat * self.liveness
        sock = None
        with StopSignal() as stop:
            try:
                while stop.requested is None:
                    if sock is None:
                        sock = sockets.dealer(self.endpoint, curve=self.curve)
                        poller = zmq.Poller()
                        poller.register(sock, zmq.POLLIN)
                        poller.register(stop.fd, zmq.POLLIN)
                        self._send(sock, self._hello)
                        last_recv = last_send = clock()
                        registered = False
                        spin_until = 0.0
                    events = None
                    if spin_until:  # busy-poll for the next observation, bounded, then sleep
                        while not events and stop.requested is None and clock() < spin_until:
                            events = poller.poll(0)
                        spin_until = 0.0
                    if not events:
                        events = poller.poll(self.heartbeat * 1000 / 2)
                    now = clock()
                    if events:  # the socket or the stop pipe: draining the socket is harmless
                        while True:
                            try:
                                frame = sock.recv(NOBLOCK)
                            except zmq.Again:
                                break
                            last_recv = now
                            try:
                                msg = P.decode(frame)
                            except P.ProtocolError as exc:
                                log.warning("dropped a bad message from %s: %s", self.endpoint, exc)
                                continue
                            if type(msg) is P.Observation:
                                if not registered:
                                    continue
                                t0 = time.perf_counter_ns()
                                action = self.agent.step(msg.obs)
                                compute_us = (time.perf_counter_ns() - t0) // 1000
                                self._send(sock, P.encode(P.Action(msg.tick, int(action), compute_us)))
                                last_send = now
                                if self.spin:
                                    spin_until = clock() + self.spin
                                self.steps += 1
                                if self.max_steps and self.steps >= self.max_steps:
                                    stop.requested = -1
                                # Back to poll, which reports anything else queued at once:
                                # cheaper than a recv that raises Again (3.3 us).
                                break
                            elif type(msg) is P.Welcome:
                                registered = True
                                backoff = self.backoff_min
                                if msg.session != self.session or msg.params != self._params:
                                    log.info("%s registered with coordinator session %s at %s",
                                             self.agent_id, msg.session, self.endpoint)
                                    self.session, self._params = msg.session, msg.params
                                    self.agent.on_start(msg)
                                    now = last_recv = clock()  # building a model may take seconds
                                # Ready: the coordinator schedules us from our first message on.
                                self._send(sock, self._heartbeat)
                                last_send = now
                            elif type(msg) is P.Error:
                                if msg.code in _REHELLO:
                                    log.info("%s: coordinator says %s; saying HELLO again",
                                             self.agent_id, ErrorCode(msg.code).name)
                                    registered = False
                                    self._send(sock, self._hello)
                                    last_send = now
                                else:
                                    log.warning("%s: coordinator refused a message: %s", self.agent_id, msg.reason)
                            elif type(msg) is P.Bye:
                                log.info("%s: coordinator left (%s); reconnecting", self.agent_id, msg.reason)
                                last_recv = now - expiry  # reconnect below, after backoff
                                break
                    if stop.requested is not None:
                        break
                    if now - last_recv >= expiry:
                        log.info("%s: no word from %s for %.1f s%s; reconnecting in %.2f s", self.agent_id,
                                 self.endpoint, now - last_recv,
                                 "" if registered or self.curve is None else
                                 " (is this agent's CURVE key on the coordinator's allow-list?)", backoff)
                        sock.close(linger=0)
                        sock = None
                        # Interruptible sleep: a stop signal ends the wait at once.
                        select.select([stop.fd], [], [], backoff)
                        backoff = min(backoff * 2, self.backoff_max)
                        continue
                    if now - last_send >= self.heartbeat:
                        # Until WELCOME arrives, repeat HELLO (idempotent) rather than heartbeat.
                        self._send(sock, self._heartbeat if registered else self._hello)
                        last_send = now
            finally:
                if sock is not None:
                    if registered:
                        self._send(sock, P.encode(P.Bye("agent stopping")))
                    sock.close(linger=0 if not registered else 100)
                self.agent.on_stop()
        log.info("%s stopped after %d steps", self.agent_id, self.steps)
        return 0

    def _send(self, sock: zmq.Socket, frame: bytes) -> None:
        try:
            sock.send(frame, NOBLOCK)
        except zmq.Again:
            # Not connected yet, or the queue is full: liveness will sort it out.
            log.debug("%s: could not queue a message to %s", self.agent_id, self.endpoint)
