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
import math
import os
import time

import numpy as np
import zmq

from agentbus_zmq.agents.health import HealthFile
from agentbus_zmq.agents.host import Host
from agentbus_zmq.agents.sdk import Agent, BadObservation
from agentbus_zmq.agents.session import AgentSession, BadFrame, Left, Refused, SessionState, Welcomed
from agentbus_zmq.bus import config
from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus import sockets
from agentbus_zmq.bus.logs import PeerLog, printable
from agentbus_zmq.bus.protocol import ErrorCode
from agentbus_zmq.bus.security import ClientKeys
from agentbus_zmq.bus.signals import StopSignal

__all__ = ["EXIT_AGENT_FAILED", "EXIT_ID_TAKEN", "EXIT_NOT_ALLOWED", "EXIT_REPLACED", "Exit", "Runtime", "run"]

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
#: the coordinator will never let this agent register under its id (its CURVE key is
#: bound to other ids): restarting cannot help, and is not done
EXIT_NOT_ALLOWED = 5
#: reserved: until 0.4 an agent refused ID_TAKEN for a minute stopped with it; it now keeps
#: retrying (a squatter must not end it), and units still list it as not to be restarted
EXIT_ID_TAKEN = 6


class Exit(enum.IntEnum):
    """Why the loop ended on its own (a signal ends it too), as its exit status."""

    DONE = 0              # --max-steps reached
    FAILED = EXIT_AGENT_FAILED
    REPLACED = EXIT_REPLACED
    NOT_ALLOWED = EXIT_NOT_ALLOWED


class _Lane:
    """One registration with the coordinator: an agent (or a host of agents), its id, its
    session and its socket.  A process runs one lane, or several hosts as lanes."""

    __slots__ = ("agent", "agent_id", "session", "sock", "episode")

    def __init__(self, agent: Agent | Host, agent_id: str, session: AgentSession):
        self.agent = agent
        self.agent_id = agent_id
        self.session = session
        self.sock: zmq.Socket | None = None
        #: the world's episode as the last observation said (worlds with episodes)
        self.episode: int | None = None


class Runtime:
    """Runs ``agent`` (one agent, or a Host of many, whose id ``agent_id`` then is the
    host's) against the coordinator at ``endpoint`` until signalled.

    ``lanes``: more hosts (with their ids) run by the same loop in this process, each its
    own registration, session and socket (one ZeroMQ context).  In lock-step per arena
    or async, a host of two lanes steps one lane's agents while the other lane's answer
    and next observation travel: the round trip is hidden behind work instead of waited
    for (docs/performance.md, the tick's budget)."""

    def __init__(self, agent: Agent | Host, endpoint: str, agent_id: str, heartbeat: float = config.DEFAULTS.heartbeat,
                 liveness: int = config.DEFAULTS.liveness, backoff_min: float = config.DEFAULTS.backoff_min,
                 backoff_max: float = config.DEFAULTS.backoff_max, max_steps: int = 0,
                 curve: ClientKeys | None = None, spin: float = 0.0, lanes: list[tuple[Host, str]] = (),
                 health_dir: str | None = None):
        self.endpoint = endpoint
        self.max_steps = max_steps
        self.curve = curve
        self.spin = spin
        # a bad id raises ProtocolError here, not on the wire
        self.lanes = [_Lane(a, i, AgentSession(i, a.kind, os.getpid(), heartbeat, liveness, backoff_min, backoff_max,
                                               members=a.members if isinstance(a, Host) else None))
                      for a, i in [(agent, agent_id), *lanes]]
        self.agent, self.agent_id, self.session = agent, agent_id, self.lanes[0].session
        #: where this process says how it is, for probes (agents.health)
        self.health = HealthFile(health_dir, agent_id) if health_dir else None
        self._plog = PeerLog(log)
        #: why the agent stopped on its own (its BYE's reason), and how it exits
        self.failure = ""
        self.exit: Exit | None = None

    @property
    def steps(self) -> int:
        return sum(lane.session.steps for lane in self.lanes)

    def run(self) -> int:
        clock = time.monotonic
        spin_until = 0.0
        with StopSignal() as stop:
            poller = zmq.Poller()
            poller.register(stop.fd, zmq.POLLIN)
            try:
                while stop.requested is None and self.exit is None:
                    now = clock()
                    wait = MAX_POLL_S
                    for lane in self.lanes:
                        session = lane.session
                        if session.state is SessionState.BACKING_OFF and lane.sock is not None:
                            poller.unregister(lane.sock)
                            lane.sock.close(linger=0)
                            lane.sock = None
                        if session.state is SessionState.CONNECTING:
                            lane.sock = sockets.dealer(self.endpoint, curve=self.curve)
                            poller.register(lane.sock, zmq.POLLIN)
                            session.connect(now)
                        if session.has_output and lane.sock is not None:
                            self._flush(lane)
                        wait = min(wait, session.next_timeout(now))
                    events = None
                    if spin_until:  # busy-poll for the next observation, bounded, then sleep
                        while not events and stop.requested is None and clock() < spin_until:
                            events = poller.poll(0)
                        spin_until = 0.0
                    if not events:
                        events = poller.poll(max(wait, 0.0) * 1000)
                    if events:  # a socket or the stop pipe: draining a socket is harmless
                        ready = {sock for sock, _ in events}
                        for lane in self.lanes:
                            if lane.sock is not None and lane.sock in ready and self.exit is None:
                                spin_until = self._drain(lane) or spin_until
                    for lane in self.lanes:
                        self._on_timer(lane, clock())
                    if self.health is not None and self.health.due(t := clock()):
                        self.health.write(t, all(lane.session.state is SessionState.REGISTERED
                                                 for lane in self.lanes), self.steps)
            finally:
                for lane in self.lanes:
                    lane.session.stop(clock(), self.failure or "agent stopping")
                    if lane.sock is not None:
                        bye = lane.session.take_outbox()
                        self._flush_frames(lane, bye)
                        lane.sock.close(linger=100 if bye else 0)
                    lane.agent.on_stop()
        for lane in self.lanes:
            log.info("%s stopped after %d steps", lane.agent_id, lane.session.steps)
        return int(self.exit) if self.exit is not None else 0

    def _on_timer(self, lane: _Lane, now: float) -> None:
        session = lane.session
        was = session.state
        session.on_timer(now)
        if session.state is SessionState.BACKING_OFF and was is not SessionState.BACKING_OFF:
            log.info("%s: no word from %s for %.1f s%s; reconnecting in %.2f s", lane.agent_id,
                     self.endpoint, session.expiry,
                     "" if was is SessionState.REGISTERED or self.curve is None else
                     " (is this agent's CURVE key on the coordinator's allow-list?)",
                     session.reconnect_at - now)

    def _drain(self, lane: _Lane) -> float:
        """Handle what the lane's socket holds; after a step, return to poll (cheaper
        than a recv that raises Again).  Returns when to stop busy-polling (0: don't)."""
        session, sock, agent = lane.session, lane.sock, lane.agent
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
                    self._info(lane, event.tick, event.info)
                t0, c0 = time.perf_counter_ns(), thread_time_ns()
                try:
                    action = _action(agent.step(event.obs))
                except BadObservation as exc:
                    self._refuse_observation(lane, event.tick, exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - the agent's own code: stop, say why
                    self._fail(lane, "step", exc)
                    return 0.0
                cpu_us = (thread_time_ns() - c0) // 1000
                compute_us = (time.perf_counter_ns() - t0) // 1000
                session.act(event.tick, action, compute_us, time.monotonic(), cpu_us)
                self._flush(lane)
                if self.max_steps and self.steps >= self.max_steps:
                    self.exit = Exit.DONE
                return time.monotonic() + self.spin if self.spin else 0.0
            if etype is P.HostObservation:
                reward = event.info.get("reward") if event.info is not None else None
                if reward is not None and reward.dtype.kind == "f" and not np.isfinite(reward).all():
                    bad = ~np.isfinite(reward)
                    self._refuse_reward(lane, event.tick, f"{int(bad.sum())} of its rewards are not finite numbers")
                    event.info["reward"] = np.where(bad, 0.0, reward)
                try:
                    result = agent.step(event, self._keepalive)
                except BadObservation as exc:
                    self._refuse_observation(lane, event.tick, exc)
                    continue
                now = time.monotonic()
                if result.failed:
                    session.leave(result.failed, result.reason, now)
                session.act_many(event.tick, result.actions, result.compute_us, now, result.cpu_us)
                self._flush(lane)
                if not any(lane.agent.alive.any() for lane in self.lanes):
                    log.error("%s: every agent of this host has failed; stopping", self.agent_id)
                    self.failure = "every agent of this host failed"
                    self.exit = Exit.FAILED
                elif self.max_steps and self.steps >= self.max_steps:
                    self.exit = Exit.DONE
                return time.monotonic() + self.spin if self.spin else 0.0
            if etype is Welcomed:
                if event.new_session:
                    log.info("%s registered with coordinator session %s at %s", lane.agent_id,
                             event.welcome.session, self.endpoint)
                    try:
                        agent.on_start(event.welcome)
                    except Exception as exc:  # noqa: BLE001 - BadWelcome, or the agent's own bug
                        self._fail(lane, "on_start", exc)
                        return 0.0
                    session.ready(time.monotonic())  # building a model may take seconds
                self._flush(lane)
            elif etype is Refused:
                if event.fatal:
                    self.exit = Exit.NOT_ALLOWED if event.error.code == ErrorCode.NOT_ALLOWED else Exit.REPLACED
                    log.error("%s: %s; stopping (exit status %d)", lane.agent_id, printable(event.error.reason),
                              self.exit)
                    return 0.0
                if event.error.code == ErrorCode.ID_TAKEN:
                    self._plog.warning(now, "%s: its id is held by another live connection (%s); %s", lane.agent_id,
                                       printable(event.error.reason, 200),
                                       f"retrying in {session.reconnect_at - now:.0f} s" if session.state is
                                       SessionState.BACKING_OFF else "saying HELLO again")
                elif event.rehello:
                    self._plog.info(now, "%s: coordinator says %s; saying HELLO again", lane.agent_id,
                                    ErrorCode(event.error.code).name)
                    self._flush(lane)
                else:
                    self._plog.warning(now, "%s: coordinator refused a message: %s", lane.agent_id,
                                       event.error.reason[:300])
            elif etype is Left:
                log.info("%s: coordinator left (%s); reconnecting in %.2f s", lane.agent_id, printable(event.reason),
                         session.reconnect_at - now)
                return 0.0
            elif etype is BadFrame:
                self._plog.warning(now, "dropped a bad message from %s: %s", self.endpoint, event.error)

    def _info(self, lane: _Lane, tick: int, info: dict) -> None:
        """A world's reward and episode: ``on_episode`` when the episode changed, then
        ``on_reward``.  A reward that is no finite number is refused (reported, BAD_FIELD)
        and counts as 0: the observation is still answered."""
        episode, reward = info.get("episode"), info.get("reward", 0.0)
        if type(reward) not in (int, float) or not math.isfinite(reward):
            self._refuse_reward(lane, tick, f"its reward {printable(repr(reward), 40)} is not a finite number")
            reward = 0.0
        reward = float(reward)
        if type(episode) is int and episode != lane.episode:
            lane.episode = episode
            lane.agent.on_episode(episode, reward)
        lane.agent.on_reward(reward)

    def _refuse_reward(self, lane: _Lane, tick: int, why: str) -> None:
        now = time.monotonic()
        self._plog.warning(now, "%s: observation for tick %d: %s; counted as 0", lane.agent_id, tick, why)
        lane.session.report(ErrorCode.BAD_FIELD, f"observation for tick {tick}: {why}; counted as 0", now)

    def _refuse_observation(self, lane: _Lane, tick: int, exc: BadObservation) -> None:
        """Not answered (the coordinator counts it missing); reported to it, logged."""
        now = time.monotonic()
        self._plog.warning(now, "%s: refused the observation for tick %d: %s", lane.agent_id, tick, exc)
        lane.session.report(ErrorCode.BAD_FIELD, f"observation for tick {tick} refused: {exc}", now)
        self._flush(lane)

    def _fail(self, lane: _Lane, hook: str, exc: Exception) -> None:
        """The agent's own code raised: one line (the traceback at DEBUG), BYE with the
        reason, exit EXIT_AGENT_FAILED."""
        self.failure = f"{hook} raised {type(exc).__name__}: {exc}"
        log.error("%s: %s; stopping (exit status %d)", lane.agent_id, self.failure[:500], EXIT_AGENT_FAILED)
        log.debug("%s: %s traceback", lane.agent_id, hook, exc_info=exc)
        self.exit = Exit.FAILED

    def _keepalive(self) -> None:
        """During a long frame: every lane's heartbeat, as it falls due."""
        now = time.monotonic()
        for lane in self.lanes:
            if lane.sock is not None:
                lane.session.keepalive(now)
                if lane.session.has_output:
                    self._flush(lane)

    def _flush(self, lane: _Lane) -> None:
        self._flush_frames(lane, lane.session.take_outbox())

    def _flush_frames(self, lane: _Lane, frames: list[bytes]) -> None:
        for frame in frames:
            try:
                lane.sock.send(frame, NOBLOCK)
            except zmq.Again:
                # Not connected yet, or the queue is full: liveness will sort it out.
                log.debug("%s: could not queue a message to %s", lane.agent_id, self.endpoint)


def _action(value):
    """A kind's action as it travels: an int, or an array for array action spaces."""
    if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0):
        import numpy as np

        return np.asarray(value)
    return int(value)


def run(agent: Agent, endpoint: str, agent_id: str, **options) -> int:
    """Run ``agent`` on the bus until SIGINT/SIGTERM; returns an exit status."""
    return Runtime(agent, endpoint, agent_id, **options).run()
