"""PettingZoo environments as worlds: ``--world pettingzoo:MODULE``.

Each arena is one ParallelEnv (``MODULE.parallel_env(**args)``, or an AEC-only
``MODULE.env(**args)`` through PettingZoo's ``aec_to_parallel``); bus agents take the
environment's agent names in order as they join an arena, and a full arena opens the
next.  The environment's spaces must be the same for all its agents (most are); they
travel in WELCOME as ``bus.spaces``.

Stepping: a lock-step tick steps every arena with an agent in it, once, with every live
environment agent's action: the bus agent's, or, for a name no bus agent holds (yet) or
whose answer did not come in time, a default (seeded samples of the action space, so a
run repeats under its seed).  In async mode an arena steps when each of its bus agents
has sent an action since its last step (a second action replaces the first).  Rewards
accumulate per agent and travel with its next observation (``info``); when every
environment agent is done (terminated or truncated), the environment is reset with the
next seed and ``info.episode`` counts up.  An agent the environment has finished with
sees its last observation until the episode ends.
"""

from __future__ import annotations

import hashlib
import importlib

import numpy as np

from agentbus_zmq.bus.spaces import Array, Discrete, MultiDiscrete, Space, SpaceError, from_gymnasium
from agentbus_zmq.coordinator.world import World, WorldFull

__all__ = ["PettingZooWorld", "make_parallel_env", "check_args"]


def make_parallel_env(module: str, args: dict):
    """``module``'s ParallelEnv, built with ``args``."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        hint = " (pip install 'agentbus-zmq[worlds]' for PettingZoo)" if "pettingzoo" in str(exc) else ""
        raise ImportError(f"cannot import {module}: {exc}{hint}") from None
    if hasattr(mod, "parallel_env"):
        return mod.parallel_env(**args)
    if hasattr(mod, "env"):
        from pettingzoo.utils.conversions import aec_to_parallel

        return aec_to_parallel(mod.env(**args))
    raise ImportError(f"{module} has neither parallel_env nor env: not a PettingZoo environment module")


#: Ranges of the arguments worlds are built with (``--world-arg``), checked before any
#: environment is: agent counts (PettingZoo's own names for them), episode lengths, and
#: any other number within +-MAX_NUMBER; strings and lists short.  Past these an
#: environment would take minutes or gigabytes to build, or a step as long.
ARG_RANGES = {"seed": (0, 2**32 - 1), "max_arenas": (1, 1_000_000), "max_cycles": (1, 10_000_000)}
AGENT_COUNTS = frozenset({"N", "num_agents", "n_agents", "num_good", "num_adversaries", "num_obstacles",
                          "num_landmarks", "n_pursuers", "n_evaders", "n_poisons", "n_coop", "num_archers",
                          "num_knights", "num_swords", "num_arrows", "max_zombies", "num_players", "players"})
MAX_AGENTS_IN_ENV = 1024
MAX_NUMBER = 10**7


def check_args(args: dict) -> None:
    """ValueError naming the first argument out of its range (module docstring of ARG_RANGES)."""
    import math

    for key, value in args.items():
        lo, hi = ARG_RANGES.get(key, (0, MAX_AGENTS_IN_ENV) if key in AGENT_COUNTS else (-MAX_NUMBER, MAX_NUMBER))
        if key in ARG_RANGES or key in AGENT_COUNTS:
            if type(value) is not int or not lo <= value <= hi:
                raise ValueError(f"world argument {key} must be an integer in [{lo}, {hi:,}], got {value!r:.40}")
        elif type(value) in (int, float):
            if not (math.isfinite(value) and lo <= value <= hi):
                raise ValueError(f"world argument {key} must be a finite number in [{lo:,}, {hi:,}], got {value!r:.40}")
        elif isinstance(value, (str, list, dict)) and len(value) > 256:
            raise ValueError(f"world argument {key} must be at most 256 long, got {len(value):,}")


class _Arena:
    __slots__ = ("env", "obs", "episode", "holders", "pending", "rng")

    def __init__(self, env, rng):
        self.env = env
        self.obs: dict = {}
        self.episode = 0
        #: environment agent name -> slot of the bus agent holding it
        self.holders: dict[str, int] = {}
        #: async: name -> action since the last step
        self.pending: dict[str, object] = {}
        self.rng = rng


class PettingZooWorld(World):
    kind = "pettingzoo"
    has_info = True

    def __init__(self, module: str, seed: int = 0, max_arenas: int = 1000, **env_args):
        check_args({"seed": seed, "max_arenas": max_arenas, **env_args})
        self.module, self.seed, self.max_arenas, self.env_args = module, seed, max_arenas, env_args
        probe = make_parallel_env(module, env_args)
        self.names = list(probe.possible_agents)
        if not self.names:
            raise ValueError(f"{module}: the environment has no agents")
        spaces = {(repr(probe.observation_space(a)), repr(probe.action_space(a))) for a in self.names}
        if len(spaces) != 1:
            raise SpaceError(f"{module}: its agents' spaces differ ({len(spaces)} kinds); the bus needs one "
                             f"observation and one action space for all of them")
        self._obs_space = from_gymnasium(probe.observation_space(self.names[0]))
        self._act_space = from_gymnasium(probe.action_space(self.names[0]))
        self._gym_action = probe.action_space(self.names[0])
        probe.close()
        self._arenas: list[_Arena] = []
        self._slot: dict[str, int] = {}
        self._arena_of: list[int] = []
        self._name_of: list[str] = []
        self._reward: list[float] = []
        self._free_slots: list[int] = []
        self.episodes = 0
        #: rewards the bus agents earned in all (stats' world figures)
        self.reward = 0.0

    # --- membership -------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return len(self.names) * self.max_arenas

    @property
    def arenas(self) -> int:
        return len(self._arenas)

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, agent_id: str) -> bool:
        return agent_id in self._slot

    def place(self, agent_id: str) -> int:
        slot = self._slot.get(agent_id)
        if slot is not None:
            return slot
        index = next((i for i, a in enumerate(self._arenas) if len(a.holders) < len(self.names)), None)
        if index is None:
            if len(self._arenas) >= self.max_arenas:
                raise WorldFull(f"all {len(self._arenas)} arenas of {self.module} hold {len(self.names)} agents each")
            index = self._open()
        arena = self._arenas[index]
        name = next(n for n in self.names if n not in arena.holders)
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = len(self._arena_of)
            self._arena_of.append(0)
            self._name_of.append("")
            self._reward.append(0.0)
        self._arena_of[slot], self._name_of[slot], self._reward[slot] = index, name, 0.0
        arena.holders[name] = slot
        self._slot[agent_id] = slot
        return slot

    def remove(self, agent_id: str) -> None:
        slot = self._slot.pop(agent_id, None)
        if slot is None:
            return
        arena = self._arenas[self._arena_of[slot]]
        arena.holders.pop(self._name_of[slot], None)
        arena.pending.pop(self._name_of[slot], None)
        self._free_slots.append(slot)

    def _open(self) -> int:
        index = len(self._arenas)
        arena = _Arena(make_parallel_env(self.module, self.env_args), np.random.default_rng([self.seed, index]))
        self._arenas.append(arena)
        self._reset(arena, index)
        return index

    def _reset(self, arena: _Arena, index: int) -> None:
        arena.obs, _ = arena.env.reset(seed=(self.seed * 1_000_003 + index * 10_007 + arena.episode) % 2**31)
        arena.pending.clear()

    def arenas_of(self, slots) -> np.ndarray:
        return np.array([self._arena_of[s] for s in np.asarray(slots).tolist()], dtype=np.int64)

    def arena_of(self, slot: int) -> int:
        return self._arena_of[slot]

    # --- observation and dynamics -----------------------------------------------

    def spaces(self) -> tuple[Space, Space]:
        return self._obs_space, self._act_space

    def _value(self, slot: int):
        """The agent's current observation as it travels (see bus.spaces)."""
        value = self._arenas[self._arena_of[slot]].obs.get(self._name_of[slot])
        space = self._obs_space
        if isinstance(space, Discrete):
            return [int(value)]
        if isinstance(space, MultiDiscrete):
            return [int(v) for v in np.asarray(value).ravel()]
        return np.asarray(value, dtype=space.dtype).reshape(space.shape)

    def observe(self, slot: int):
        return self._value(slot)

    def observe_many(self, slots) -> np.ndarray:
        values = [self._value(s) for s in np.asarray(slots).tolist()]
        if isinstance(self._obs_space, Array):
            return np.stack(values) if values else np.zeros((0, *self._obs_space.shape), self._obs_space.dtype)
        return np.array(values, dtype=np.uint32).reshape(len(values), self._obs_space.size)

    def info(self, slot: int) -> dict:
        reward, self._reward[slot] = self._reward[slot], 0.0
        return {"reward": reward, "episode": self._arenas[self._arena_of[slot]].episode}

    def info_many(self, slots) -> dict:
        slots = np.asarray(slots).tolist()
        rewards = np.array([self._reward[s] for s in slots], dtype=np.float64)
        for s in slots:
            self._reward[s] = 0.0
        return {"reward": rewards,
                "episode": np.array([self._arenas[self._arena_of[s]].episode for s in slots], dtype=np.uint32)}

    def move(self, slot: int, action) -> None:
        """Async: the arena steps once every bus agent in it has acted since its last step."""
        index = self._arena_of[slot]
        arena = self._arenas[index]
        arena.pending[self._name_of[slot]] = action
        live = [n for n in arena.holders if n in arena.env.agents]
        if all(n in arena.pending for n in live):
            self._step(index, dict(arena.pending))

    def move_many(self, slots, actions) -> None:
        by_arena: dict[int, dict] = {}
        for slot, action in zip(np.asarray(slots).tolist(), list(actions)):
            by_arena.setdefault(self._arena_of[slot], {})[self._name_of[slot]] = action
        for index, chosen in sorted(by_arena.items()):
            self._step(index, chosen)

    def _step(self, index: int, chosen: dict) -> None:
        arena = self._arenas[index]
        env = arena.env
        actions = {}
        for name in env.agents:
            if name in chosen and self._act_space.contains(chosen[name]):
                a = chosen[name]
                actions[name] = int(a) if isinstance(self._act_space, Discrete) else np.asarray(a)
            else:  # no bus agent holds it, it did not answer in time, or its action was out of the space
                actions[name] = self._default(arena)
        obs, rewards, _terminations, _truncations, _infos = env.step(actions)
        arena.obs.update(obs)
        arena.pending.clear()
        for name, reward in rewards.items():
            slot = arena.holders.get(name)
            if slot is not None:
                self._reward[slot] += float(reward)
                self.reward += float(reward)
        if not env.agents:  # every agent done: the next episode
            arena.episode += 1
            self.episodes += 1
            self._reset(arena, index)

    def reset_arena(self, arena: int) -> None:
        """A new episode in ``arena`` (its bus agents keep their environment agents)."""
        a = self._arenas[arena]
        a.episode += 1
        self.episodes += 1
        self._reset(a, arena)

    def default_action(self, slot: int):
        return self._default(self._arenas[self._arena_of[slot]])

    def _default(self, arena: _Arena):
        value = self._act_space.sample(arena.rng)
        return int(value) if isinstance(self._act_space, Discrete) else np.asarray(value)

    # --- description --------------------------------------------------------------

    def params(self) -> dict:
        observation, action = self.spaces()
        return {"kind": self.kind, "env": self.module, "spaces": {"observation": observation.to_wire(),
                                                                  "action": action.to_wire()},
                "agents_per_arena": len(self.names), "agent_names": list(self.names), "seed": self.seed}

    def figures(self) -> dict:
        return {"episodes": self.episodes, "reward": self.reward}

    def state_hash(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        for arena in self._arenas:
            h.update(str(arena.episode).encode())
            for name in sorted(arena.obs):
                h.update(name.encode())
                h.update(np.ascontiguousarray(np.asarray(arena.obs[name], dtype=np.float64)).tobytes())
        return h.hexdigest()
