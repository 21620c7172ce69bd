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
from agentbus_zmq.bus.spaces import Discrete, MultiDiscrete, Space, SpaceError, space_from_wire

__all__ = ["Agent", "BadObservation", "BadWelcome", "spaces_of"]


class BadWelcome(ValueError):
    """WELCOME describes a world this agent cannot (or will not) model: raise it from
    :meth:`Agent.on_start`.  The runtime logs it in one line, says BYE with the reason
    and exits with status 3; a supervising launcher restarts it only with back-off."""


class BadObservation(ValueError):
    """An observation outside what WELCOME described: raise it from :meth:`Agent.step`.
    The runtime does not answer it, reports it to the coordinator (ERROR BAD_FIELD) and
    goes on; any other exception from ``step`` stops the agent as BadWelcome does."""


def spaces_of(welcome: Welcome) -> tuple[Space, Space]:
    """The world's (observation, action) spaces from WELCOME (``params.world.spaces``;
    a coordinator older than spaces describes its grid by ``outcomes`` and ``actions``).
    :class:`BadWelcome` when there are none to read."""
    world = welcome.params.get("world") if isinstance(welcome.params, dict) else None
    if not isinstance(world, dict):
        raise BadWelcome("WELCOME params carry no world")
    try:
        if "spaces" in world:
            spaces = world["spaces"]
            if not isinstance(spaces, dict):
                raise SpaceError("world spaces must be a map")
            return space_from_wire(spaces.get("observation")), space_from_wire(spaces.get("action"))
        cells = world["width"] * world["height"]
        return MultiDiscrete((cells, len(world["outcomes"]))), Discrete(len(world["actions"]))
    except (SpaceError, KeyError, TypeError) as exc:
        raise BadWelcome(f"WELCOME's world spaces cannot be used: {exc}") from None


class Agent:
    """Base class for agents.  Override :meth:`step`; the other hooks are optional.

    What a step gets and returns follows the world's spaces (:func:`spaces_of`): a
    list of ints (one per modality) for discrete observations, a numpy array for array
    ones; an int for a discrete action, an array (or list) otherwise."""

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

    def step(self, obs):
        """Return the action for observation ``obs`` (see the class docstring)."""
        raise NotImplementedError("an Agent subclass must implement step()")

    def on_reward(self, reward: float) -> None:
        """The reward the world gave since the last observation (``info.reward``), told
        before the ``step`` of the observation it came with.  Worlds without rewards
        never call it."""

    def on_episode(self, episode: int, reward: float) -> None:
        """The world's episode changed (``info.episode``: the last one ended, this one
        began; called before the first ``step`` of the new one); ``reward`` the reward
        that came with this observation.  Worlds without episodes never call it."""

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

