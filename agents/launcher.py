"""Start one agent, or fork many from one prepared parent.

``bus-agent --replicas N`` imports the agent kind's libraries once (pymdp: 0.3 s),
then forks N agent processes that share those pages copy-on-write.  Measured on 2
cores: 20 explorer agents stepping well under a second after the first fork, at a few
MB PSS each, against 2.5-16 s and 30-110 MB each for 20 fresh interpreters.

Forking is safe here because the parent never creates a ZeroMQ context, a socket or a
thread of its own before it forks; every child creates its context itself (see
``bus.sockets.context``).  JAX starts thread pools when it initialises, so the ``jax``
backend is imported by each child after the fork instead.

With ``--per-host K`` each child is an agent host of K agents (``agents.host``) instead
of a single agent: the same ids, fewer processes.

The parent supervises: it forwards SIGINT/SIGTERM to its children, reaps them, and
exits non-zero if any child failed: with the child's own status when every failure was a
refusal no restart can heal (4, its id taken over; 5, its key may not use its id; 6, its id
held by another live process), else 1.  With ``--restart`` it forks a dead agent (or host)
again, backing off and giving up as ``agents.restarts`` decides.  Children die with the
parent (PR_SET_PDEATHSIG), so a SIGKILLed launcher leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import time
from typing import Callable

from agentbus_zmq.agents.host import Host
from agentbus_zmq.agents.layout import host_layout
from agentbus_zmq.agents.runtime import EXIT_NOT_ALLOWED, EXIT_REPLACED, Runtime
from agentbus_zmq.bus import sockets
from agentbus_zmq.agents.sdk import Agent
from agentbus_zmq.agents.restarts import Restart, RestartPolicy, RestartDecisions
from agentbus_zmq.bus.config import set_batch_scheduling
from agentbus_zmq.bus.signals import StopSignal

__all__ = ["launch"]

log = logging.getLogger(__name__)

#: Seconds children get to say BYE and exit after SIGTERM, before SIGKILL.
STOP_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1


def launch(factory: Callable[[], Agent], endpoint: str, agent_id: str, replicas: int = 1, per_host: int = 1,
           batch: bool = True, restart: bool = False, policy: RestartPolicy = RestartPolicy(), lanes: int = 1,
           **runtime_options) -> int:
    """Run ``replicas`` agents made by ``factory``, ``per_host`` to a process; returns
    the exit status.

    One agent per process: ids ``agent_id-1`` .. ``agent_id-N`` (``agent_id`` alone for
    one).  In hosts: the same agent ids, hosts named ``agent_id-host1`` ...  With
    ``restart``, processes that die are forked again under ``policy`` (even a single
    agent: it then runs in a child of this process)."""
    if batch and not set_batch_scheduling():
        log.debug("SCHED_BATCH is not available here; agents run under the default policy")
    if replicas == 1 and not restart:
        agent = factory()
        agent.prepare()
        return Runtime(agent, endpoint, agent_id, **runtime_options).run()

    template = factory()
    if getattr(template, "forkable", True):
        template.prepare()
    parent = os.getpid()
    if per_host > 1 and replicas > 1:
        layout = {f"{agent_id}-host{j}": (first, count)
                  for j, (first, count) in enumerate(host_layout(replicas, per_host), 1)}

        def make(child_id: str):
            first, count = layout[child_id]
            if lanes <= 1 or count < 2:
                return Host(factory, f"{agent_id}-", first, count)
            return [(Host(factory, f"{agent_id}-", first + sub - 1, n), f"{child_id}-{k}")
                    for k, (sub, n) in enumerate(host_layout(count, -(-count // lanes)), 1)]

        ids = list(layout)
        what = f"{replicas} {template.kind} agents in {len(ids)} hosts ({agent_id}-1 .. {agent_id}-{replicas})"
    else:
        def make(child_id: str):
            return factory()

        ids = [agent_id] if replicas == 1 else [f"{agent_id}-{i}" for i in range(1, replicas + 1)]
        what = f"{replicas} {template.kind} agents ({ids[0]} .. {ids[-1]})"

    def spawn(child_id: str) -> int:
        pid = os.fork()
        if pid == 0:  # child: never returns
            code = _child(make, endpoint, child_id, parent, runtime_options)
            try:
                sockets.term()  # the BYE its runtime queued goes out before the process does
            finally:
                os._exit(code)
        return pid

    children = {spawn(child_id): child_id for child_id in ids}
    log.info("started %s", what)
    return _supervise(children, spawn, RestartDecisions(policy) if restart else None)


def _child(make: Callable[[str], Agent | Host], endpoint: str, child_id: str, parent: int, runtime_options: dict) -> int:
    """A forked agent (or host) process: build what ``make`` makes, run it, exit."""
    # A child forked by the supervisor inherits its flag-setting handlers and wakeup fd:
    # until this agent's runtime installs its own, a signal must act as by default.
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    try:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass  # not Linux: the supervisor's signal forwarding still applies
        if os.getppid() != parent:
            return 1  # the launcher died before we could ask to die with it
        made = make(child_id)
        if isinstance(made, list):  # lanes: one process, several host registrations
            (agent, lane_id), *more = made
            for host, _ in made:
                host.prepare()
            return Runtime(agent, endpoint, lane_id, lanes=more, **runtime_options).run()
        made.prepare()
        return Runtime(made, endpoint, child_id, **runtime_options).run()
    except BaseException:
        log.exception("%s failed", child_id)
        return 1


def _supervise(children: dict[int, str], spawn: Callable[[str], int], supervisor: RestartDecisions | None) -> int:
    """Reap children; with a ``supervisor``, fork a dead agent again under the same id
    when it says so (the agent rejoins with HELLO and the coordinator replaces its
    registration), and stop everything when it gives up."""
    failed: list[str] = []
    #: exit statuses of refusals that no restart can heal (EXIT_REPLACED, EXIT_NOT_ALLOWED)
    permanent: list[int] = []
    gave_up: str | None = None
    due: dict[str, float] = {}  # agent id -> when to fork it again
    stop_at: float | None = None
    clock = time.monotonic
    with StopSignal() as stop:
        while children or (due and stop.requested is None and gave_up is None):
            if (stop.requested is not None or gave_up) and stop_at is None:
                if stop.requested is not None:
                    log.info("signal %d: stopping %d agents", stop.requested, len(children))
                _signal_all(children, signal.SIGTERM)
                stop_at = clock() + STOP_GRACE_S
                due.clear()
            if stop_at is not None and clock() >= stop_at:
                log.warning("%d agents did not stop within %.0f s: killing them", len(children), STOP_GRACE_S)
                _signal_all(children, signal.SIGKILL)
                stop_at = float("inf")
            now = clock()
            for agent_id, at in list(due.items()):
                if now >= at:
                    del due[agent_id]
                    children[spawn(agent_id)] = agent_id
            wait = min([0.1, *(at - now for at in due.values())])
            select.select([stop.fd], [], [], max(wait, 0.0))
            stop.drain()
            while children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    children.clear()
                    break
                if pid == 0:
                    break
                agent_id = children.pop(pid, None)
                if agent_id is None:
                    continue
                code = os.waitstatus_to_exitcode(status)
                stopping = stop.requested is not None or gave_up is not None
                if code == 0 or (stopping and code in (-signal.SIGTERM, -signal.SIGKILL)):
                    continue
                if code == EXIT_REPLACED:  # another process holds its id: restarting would fight it
                    log.error("agent %s (pid %d): another connection took its id over; not restarted", agent_id, pid)
                    failed.append(agent_id)
                    permanent.append(code)
                    continue
                if code == EXIT_NOT_ALLOWED:  # refused for good: restarting cannot help
                    log.error("agent %s (pid %d): the coordinator does not allow this id for its CURVE key; not "
                              "restarted (give it an id its key may use, or the key the id's patterns)", agent_id, pid)
                    failed.append(agent_id)
                    permanent.append(code)
                    continue
                if supervisor is not None and not stopping:
                    decision = supervisor.on_exit(agent_id, clock())
                    if isinstance(decision, Restart):
                        log.warning("agent %s (pid %d) exited with status %d: restart %d in %.1f s", agent_id,
                                    pid, code, decision.attempt, decision.at - clock())
                        due[agent_id] = decision.at
                        continue
                    gave_up = decision.reason
                    log.error("%s; stopping the other agents", decision.reason)
                failed.append(agent_id)
                log.error("agent %s (pid %d) exited with status %d", agent_id, pid, code)
    if supervisor is not None and supervisor.restarts:
        log.info("restarts: %s", ", ".join(f"{a} {n}" for a, n in sorted(supervisor.restarts.items())))
    if failed or gave_up:
        log.error("%d agents failed: %s", len(failed), ", ".join(sorted(failed)))
        if not gave_up and len(permanent) == len(failed):
            # Every failure was a refusal for good: exit with its status, which a service
            # manager is told not to restart (deploy/systemd: RestartPreventExitStatus).
            return max(permanent)
        return 1
    return 0


def _signal_all(children: dict[int, str], sig: int) -> None:
    for pid in children:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
