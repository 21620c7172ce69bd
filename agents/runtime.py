"""The agent runtime: a thin ZeroMQ loop around :class:`~agentbus_zmq.agents.session.AgentSession`.

Life of an agent process::

    connect -> HELLO -> (WELCOME) -> on_start -> ready -> OBSERVATION -> step -> ACTION -> ...

The session decides everything (handshake, readiness, heartbeats, liveness, back-off);
this loop only owns the socket, the agent (or the :class:`~agentbus_zmq.agents.host.Host`
of many agents) and the clock:

* it opens a fresh DEALER whenever the session is CONNECTING, and closes the old one
  when the session backs off (the Paranoid Pirate pattern: a silent coordinator's
  socket may hold a broken connection);
* it calls the agent's hooks: ``on_start`` on a new session, ``step`` on every
  OBSERVATION, ``on_stop`` once at the end;
* SIGINT/SIGTERM: BYE, close, ``on_stop``, exit 0.

It trusts nothing the coordinator sends: an observation the agent refuses
(:class:`~agentbus_zmq.agents.sdk.BadObservation`) is reported and skipped; a WELCOME it
cannot build a model from, or a ``step`` that raises, makes it say BYE with the reason
and exit with status :data:`EXIT_AGENT_FAILED` (a supervising launcher restarts it, with
back-off); a coordinator saying another connection took its id over (REPLACED) makes it
exit with :data:`EXIT_REPLACED`, which is not restarted.  Every line a coordinator can
cause is rate-limited.
"""

from __future__ import annotations

import enum
import logging
import os
import select
import time

import zmq

from agentbus_zmq.agents.host import Host
from agentbus_zmq.agents.sdk import Agent, BadObservation
from agentbus_zmq.agents.session import AgentSession, BadFrame, Left, Refused, SessionState, Welcomed
from agentbus_zmq.bus import config
from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus import sockets
from agentbus_zmq.bus.logs import PeerLog
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.bus.security import ClientKeys
from agentbus_zmq.bus.signals import StopSignal

__all__ = ["EXIT_AGENT_FAILED", "EXIT_REPLACED", "Exit", "Runtime", "run"]

log = logging.getLogger(__name__)

#: CPU time of this thread: what a step cost in work, not in waiting for a CPU.
thread_time_ns = time.thread_time_ns
NOBLOCK = int(zmq.NOBLOCK)  # a plain int: IntFlag arithmetic costs on every message
#: Longest the loop sleeps, so every wait stays bounded whatever the session says.
MAX_POLL_S = 1.0
#: Exit statuses: every agent of a host failed, or the agent's own code (``on_start``,
#: ``step``) raised; another connection took this agent's id over (do not restart).
EXIT_AGENT_FAILED = 3
EXIT_REPLACED = 4


class Exit(enum.IntEnum):
    """Why the loop ended on its own (a signal ends it too), as its exit status."""

    DONE = 0              # --max-steps reached
    FAILED = EXIT_AGENT_FAILED
    REPLACED = EXIT_REPLACED


class Runtime:
    """Runs ``agent`` (one agent, or a Host of many, whose id ``agent_id`` then is the
    host's) against the coordinator at ``endpoint`` until signalled."""

    def __init__(self, agent: Agent | Host, endpoint: str, agent_id: str, heartbeat: float = config.DEFAULTS.heartbeat,
                 liveness: int = config.DEFAULTS.liveness, backoff_min: float = config.DEFAULTS.backoff_min,
                 backoff_max: float = config.DEFAULTS.backoff_max, max_steps: int = 0,
                 curve: ClientKeys | None = None, spin: float = 0.0):
        self.agent = agent
        self.endpoint = endpoint
        self.agent_id = agent_id
        self.max_steps = max_steps
        self.curve = curve
        self.spin = spin
        # a bad id raises ProtocolError here, not on the wire
        self.session = AgentSession(agent_id, agent.kind, os.getpid(), heartbeat, liveness, backoff_min, backoff_max,
                                    members=agent.members if isinstance(agent, Host) else None)
        self._plog = PeerLog(log)
        #: why the agent stopped on its own (its BYE's reason), and how it exits
        self.failure = ""
        self.exit: Exit | None = None
        #: the world's episode as the last observation said (worlds with episodes)
        self._episode: int | None = None

    @property
    def steps(self) -> int:
        return self.session.steps

    def run(self) -> int:
        session = self.session
        clock = time.monotonic
        sock = poller = None
        spin_until = 0.0
        with StopSignal() as stop:
            try:
                while stop.requested is None and self.exit is None:
                    now = clock()
                    if session.state is SessionState.BACKING_OFF:
                        if sock is not None:
                            sock.close(linger=0)
                            sock = None
                        # Interruptible sleep: a stop signal ends the wait at once.
                        select.select([stop.fd], [], [], min(session.next_timeout(now), MAX_POLL_S))
                        session.on_timer(clock())
                        continue
                    if session.state is SessionState.CONNECTING:
                        sock = sockets.dealer(self.endpoint, curve=self.curve)
                        poller = zmq.Poller()
                        poller.register(sock, zmq.POLLIN)
                        poller.register(stop.fd, zmq.POLLIN)
                        session.connect(now)
                    if session.has_output:
                        self._flush(sock)
                    events = None
                    if spin_until:  # busy-poll for the next observation, bounded, then sleep
                        while not events and stop.requested is None and clock() < spin_until:
                            events = poller.poll(0)
                        spin_until = 0.0
                    if not events:
                        events = poller.poll(min(session.next_timeout(clock()), MAX_POLL_S) * 1000)
                    if events:  # the socket or the stop pipe: draining the socket is harmless
                        spin_until = self._drain(sock)
                    was = session.state
                    session.on_timer(clock())
                    if session.state is SessionState.BACKING_OFF and was is not SessionState.BACKING_OFF:
                        log.info("%s: no word from %s for %.1f s%s; reconnecting in %.2f s", self.agent_id,
                                 self.endpoint, session.expiry,
                                 "" if was is SessionState.REGISTERED or self.curve is None else
                                 " (is this agent's CURVE key on the coordinator's allow-list?)",
                                 session.reconnect_at - clock())
            finally:
                session.stop(clock(), self.failure or "agent stopping")
                if sock is not None:
                    bye = session.take_outbox()
                    self._flush_frames(sock, bye)
                    sock.close(linger=100 if bye else 0)
                self.agent.on_stop()
        log.info("%s stopped after %d steps", self.agent_id, session.steps)
        return int(self.exit) if self.exit is not None else 0

    def _drain(self, sock: zmq.Socket) -> float:
        """Handle what the socket holds; after a step, return to poll (cheaper than a
        recv that raises Again).  Returns when to stop busy-polling (0: don't)."""
        session = self.session
        while True:
            try:
                frame = sock.recv(NOBLOCK)
            except zmq.Again:
                return 0.0
            now = time.monotonic()
            event = session.receive(frame, now)
            if event is None:
                continue
            etype = type(event)
            if etype is P.Observation:
                if event.info is not None:
                    self._info(event.info)
                t0, c0 = time.perf_counter_ns(), thread_time_ns()
                try:
                    action = _action(self.agent.step(event.obs))
                except BadObservation as exc:
                    self._refuse_observation(sock, event.tick, exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - the agent's own code: stop, say why
                    self._fail("step", exc)
                    return 0.0
                cpu_us = (thread_time_ns() - c0) // 1000
                compute_us = (time.perf_counter_ns() - t0) // 1000
                session.act(event.tick, action, compute_us, time.monotonic(), cpu_us)
                self._flush(sock)
                if self.max_steps and session.steps >= self.max_steps:
                    self.exit = Exit.DONE
                return time.monotonic() + self.spin if self.spin else 0.0
            if etype is P.HostObservation:
                try:
                    result = self.agent.step(event, lambda: self._keepalive(sock))
                except BadObservation as exc:
                    self._refuse_observation(sock, event.tick, exc)
                    continue
                now = time.monotonic()
                if result.failed:
                    session.leave(result.failed, result.reason, now)
                session.act_many(event.tick, result.actions, result.compute_us, now, result.cpu_us)
                self._flush(sock)
                if not self.agent.alive.any():
                    log.error("%s: every agent of this host has failed; stopping", self.agent_id)
                    self.failure = "every agent of this host failed"
                    self.exit = Exit.FAILED
                elif self.max_steps and session.steps >= self.max_steps:
                    self.exit = Exit.DONE
                return time.monotonic() + self.spin if self.spin else 0.0
            if etype is Welcomed:
                if event.new_session:
                    log.info("%s registered with coordinator session %s at %s", self.agent_id,
                             event.welcome.session, self.endpoint)
                    try:
                        self.agent.on_start(event.welcome)
                    except Exception as exc:  # noqa: BLE001 - BadWelcome, or the agent's own bug
                        self._fail("on_start", exc)
                        return 0.0
                    session.ready(time.monotonic())  # building a model may take seconds
                self._flush(sock)
            elif etype is Refused:
                if event.fatal:
                    log.error("%s: %s; stopping (exit status %d)", self.agent_id, event.error.reason[:300],
                              EXIT_REPLACED)
                    self.exit = Exit.REPLACED
                    return 0.0
                if event.rehello:
                    self._plog.info(now, "%s: coordinator says %s; saying HELLO again", self.agent_id,
                                    ErrorCode(event.error.code).name)
                    self._flush(sock)
                else:
                    self._plog.warning(now, "%s: coordinator refused a message: %s", self.agent_id,
                                       event.error.reason[:300])
            elif etype is Left:
                log.info("%s: coordinator left (%s); reconnecting in %.2f s", self.agent_id, event.reason[:300],
                         session.reconnect_at - now)
                return 0.0
            elif etype is BadFrame:
                self._plog.warning(now, "dropped a bad message from %s: %s", self.endpoint, event.error)

    def _info(self, info: dict) -> None:
        """A world's reward and episode: ``on_episode`` when the episode changed, then
        ``on_reward``."""
        episode, reward = info.get("episode"), info.get("reward", 0.0)
        reward = float(reward) if type(reward) in (int, float) else 0.0
        if type(episode) is int and episode != self._episode:
            self._episode = episode
            self.agent.on_episode(episode, reward)
        self.agent.on_reward(reward)

    def _refuse_observation(self, sock: zmq.Socket, tick: int, exc: BadObservation) -> None:
        """Not answered (the coordinator counts it missing); reported to it, logged."""
        now = time.monotonic()
        self._plog.warning(now, "%s: refused the observation for tick %d: %s", self.agent_id, tick, exc)
        self.session.report(ErrorCode.BAD_FIELD, f"observation for tick {tick} refused: {exc}", now)
        self._flush(sock)

    def _fail(self, hook: str, exc: Exception) -> None:
        """The agent's own code raised: one line (the traceback at DEBUG), BYE with the
        reason, exit EXIT_AGENT_FAILED."""
        self.failure = f"{hook} raised {type(exc).__name__}: {exc}"
        log.error("%s: %s; stopping (exit status %d)", self.agent_id, self.failure[:500], EXIT_AGENT_FAILED)
        log.debug("%s: %s traceback", self.agent_id, hook, exc_info=exc)
        self.exit = Exit.FAILED

    def _keepalive(self, sock: zmq.Socket) -> None:
        self.session.keepalive(time.monotonic())
        if self.session.has_output:
            self._flush(sock)

    def _flush(self, sock: zmq.Socket) -> None:
        self._flush_frames(sock, self.session.take_outbox())

    def _flush_frames(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        for frame in frames:
            try:
                sock.send(frame, NOBLOCK)
            except zmq.Again:
                # Not connected yet, or the queue is full: liveness will sort it out.
                log.debug("%s: could not queue a message to %s", self.agent_id, self.endpoint)


def _action(value):
    """A kind's action as it travels: an int, or an array for array action spaces."""
    if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0):
        import numpy as np

        return np.asarray(value)
    return int(value)


def run(agent: Agent, endpoint: str, agent_id: str, **options) -> int:
    """Run ``agent`` on the bus until SIGINT/SIGTERM; returns an exit status."""
    return Runtime(agent, endpoint, agent_id, **options).run()
