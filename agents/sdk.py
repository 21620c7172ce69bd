"""What integrators build on: subclass :class:`Agent`, then run it
(``agentbus_zmq.agents.runtime.run``, or ``bus-agent --kind module:Class``).

An agent is a small object with lifecycle hooks; the runtime owns the socket, the
handshake, heartbeats, reconnection and shutdown::

    from agentbus_zmq.agents.sdk import Agent
    from agentbus_zmq.agents.runtime import run

    class Walker(Agent):
        kind = "walker"
        def step(self, obs):
            return 4            # always "stay"

    run(Walker(), endpoint="tcp://127.0.0.1:5555", agent_id="walker-1")

Agents written in other languages speak the protocol in docs/protocol.md directly.
"""

from __future__ import annotations

from agentbus_zmq.bus.protocol import Welcome

__all__ = ["Agent", "BadObservation", "BadWelcome"]


class BadWelcome(ValueError):
    """WELCOME describes a world this agent cannot (or will not) model: raise it from
    :meth:`Agent.on_start`.  The runtime logs it in one line, says BYE with the reason
    and exits with status 3; a supervising launcher restarts it only with back-off."""


class BadObservation(ValueError):
    """An observation outside what WELCOME described: raise it from :meth:`Agent.step`.
    The runtime does not answer it, reports it to the coordinator (ERROR BAD_FIELD) and
    goes on; any other exception from ``step`` stops the agent as BadWelcome does."""


class Agent:
    """Base class for agents.  Override :meth:`step`; the other hooks are optional."""

    #: Reported to the coordinator in HELLO; must match ``[A-Za-z0-9._:@/+-]{1,128}``.
    kind = "custom"
    #: Names of the keyword options ``__init__`` takes (``bus-agent`` passes only these).
    OPTIONS: tuple[str, ...] = ()
    #: True once :meth:`start_batch` has built one model for a host's agents: the host
    #: then steps them with one :meth:`step_batch` call a tick, else one by one.
    batched: bool = False

    def prepare(self) -> None:
        """Load heavy libraries.  Runs once, before any fork and before any socket exists."""

    def on_start(self, welcome: Welcome) -> None:
        """Registered with a coordinator (again, after it restarted).  ``welcome.params``
        describes the world and the schedule; build or rebuild the model here."""

    def step(self, obs: list[int]) -> int:
        """Return the action for observation ``obs`` (one outcome index per modality)."""
        raise NotImplementedError("an Agent subclass must implement step()")

    def on_stop(self) -> None:
        """The runtime is stopping (signal, or the coordinator said BYE for good)."""

    # --- in an agent host (bus-agent --per-host K): override to batch -----------------

    @classmethod
    def start_batch(cls, agents: list[Agent], welcomes: list[Welcome]) -> None:
        """Start a host's agents of this kind (one WELCOME each).  By default each one's
        :meth:`on_start`; override to build one model for them all."""
        for agent, welcome in zip(agents, welcomes):
            agent.on_start(welcome)

    @classmethod
    def step_batch(cls, agents: list[Agent], obs) -> object:
        """Step several agents of this kind at once: ``obs`` is an ``(n, modalities)``
        array, one row per agent; return ``n`` actions.  A host calls it (one call a
        tick) for agents whose :attr:`batched` is true; an exception then fails every
        agent of the call.  Otherwise a host steps its agents one by one, as this does,
        and a failure is that agent's alone."""
        return [agent.step(row) for agent, row in zip(agents, obs.tolist())]

