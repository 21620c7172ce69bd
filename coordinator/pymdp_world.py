"""pymdp's own environments as worlds: ``--world pymdp:tmaze``.

Each agent acts in its own copy of the environment (its own arena): pymdp's
environments are single-agent.  WELCOME carries the environment's generative model
(``world.model``: A, B, C, D as arrays, and the factors the agent controls), so an
explorer builds its model from the environment itself rather than from a grid.

``tmaze`` is pymdp's T-maze (``pymdp.legacy.envs.TMazeEnv``): hidden states are the
location (centre, left arm, right arm, cue) and the reward condition (which arm pays);
observations are the location, the reward outcome (none, reward, loss) and the cue
(which arm); an action moves to one of the four locations.  An episode is
``episode_len`` moves (3: a move to the cue, one to an arm, one more), then the maze is
reset with a new reward condition; each observation's ``info`` carries the reward (+1 for
a reward, -1 for a loss) and the episode.  pymdp samples from numpy's global generator:
each agent's environment keeps its own generator state, swapped in around its calls, so
a run repeats under its seed.
"""

from __future__ import annotations

import hashlib

import numpy as np

from agentbus_zmq.bus.spaces import Discrete, MultiDiscrete, Space
from agentbus_zmq.coordinator.world import World, WorldFull

__all__ = ["PymdpWorld", "ENVS"]

#: reward outcome -> reward
_REWARD = (0.0, 1.0, -1.0)


def _tmaze(reward_probs=None):
    from pymdp.legacy.envs import TMazeEnv

    env = TMazeEnv(reward_probs=reward_probs)
    A = [np.asarray(a, dtype=np.float64) for a in env.get_likelihood_dist()]
    B = [np.asarray(b, dtype=np.float64) for b in env.get_transition_dist()]
    C = [np.zeros(A[0].shape[0]), np.array([0.0, 3.0, -3.0]), np.zeros(A[2].shape[0])]
    D = [np.eye(B[0].shape[0])[0], np.full(B[1].shape[0], 1.0 / B[1].shape[0])]
    model = {"A": A, "B": B, "C": C, "D": D, "control_factors": [0]}
    spaces = (MultiDiscrete(tuple(a.shape[0] for a in A), ("location", "reward", "cue")),
              Discrete(B[0].shape[2], ("centre", "left", "right", "cue")))
    return env, model, spaces


#: environment name -> factory of (a fresh environment, its generative model, its spaces)
ENVS = {"tmaze": _tmaze}


class PymdpWorld(World):
    kind = "pymdp"
    has_info = True

    def __init__(self, env: str = "tmaze", seed: int = 0, max_arenas: int = 100_000, episode_len: int = 3,
                 reward_probs: list | None = None):
        if env not in ENVS:
            raise ValueError(f"pymdp has no environment {env!r} here; known: {', '.join(ENVS)}")
        for name, value, hi in (("episode_len", episode_len, 10_000), ("max_arenas", max_arenas, 1_000_000),
                                ("seed", seed, 2**32 - 1)):
            lo = 0 if name == "seed" else 1
            if type(value) is not int or not lo <= value <= hi:
                raise ValueError(f"world argument {name} must be an integer in [{lo}, {hi:,}], got {value!r:.40}")
        if reward_probs is not None and not (
                type(reward_probs) is list and len(reward_probs) == 2
                and all(type(p) in (int, float) and 0 <= p <= 1 for p in reward_probs)
                and abs(sum(reward_probs) - 1) < 1e-9):
            raise ValueError(f"world argument reward_probs must be two probabilities that sum to 1, got "
                             f"{reward_probs!r:.60}")
        self.env_name, self.seed, self.max_arenas, self.episode_len = env, seed, max_arenas, episode_len
        self._make = lambda: ENVS[env](reward_probs)
        _, self._model, self._spaces = self._make()
        self._slot: dict[str, int] = {}
        self._free: list[int] = []
        self._envs: list = []
        self._rng: list = []
        self._obs: list = []
        self._t: list[int] = []
        self._episode: list[int] = []
        self._reward: list[float] = []
        self.episodes = 0
        #: rewards earned in all, by every agent (stats' world figures)
        self.reward = 0.0

    @property
    def capacity(self) -> int:
        return self.max_arenas

    @property
    def arenas(self) -> int:
        return len(self._slot)

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, agent_id: str) -> bool:
        return agent_id in self._slot

    def place(self, agent_id: str) -> int:
        slot = self._slot.get(agent_id)
        if slot is not None:
            return slot
        if len(self._slot) >= self.max_arenas:
            raise WorldFull(f"all {self.max_arenas} copies of pymdp's {self.env_name} are taken")
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self._envs)
            for column in (self._envs, self._rng, self._obs, self._t, self._episode, self._reward):
                column.append(None)
        self._envs[slot] = self._make()[0]
        self._rng[slot] = np.random.RandomState([self.seed, slot]).get_state()
        self._episode[slot], self._reward[slot] = 0, 0.0
        self._reset(slot)
        self._slot[agent_id] = slot
        return slot

    def remove(self, agent_id: str) -> None:
        slot = self._slot.pop(agent_id, None)
        if slot is not None:
            self._envs[slot] = None
            self._free.append(slot)

    def _call(self, slot: int, fn, *args):
        """``fn(*args)`` with this agent's own numpy generator in place of the global one."""
        saved = np.random.get_state()
        np.random.set_state(self._rng[slot])
        try:
            return fn(*args)
        finally:
            self._rng[slot] = np.random.get_state()
            np.random.set_state(saved)

    def _reset(self, slot: int) -> None:
        self._obs[slot] = [int(o) for o in self._call(slot, self._envs[slot].reset)]
        self._t[slot] = 0

    def reset_arena(self, arena: int) -> None:
        """A new episode in the agent's own maze (an arena is one agent's slot)."""
        if self._envs[arena] is not None:
            self._episode[arena] += 1
            self.episodes += 1
            self._reset(arena)

    def arenas_of(self, slots) -> np.ndarray:
        return np.asarray(slots, dtype=np.int64).copy()

    def arena_of(self, slot: int) -> int:
        return slot

    def spaces(self) -> tuple[Space, Space]:
        return self._spaces

    def observe(self, slot: int) -> list[int]:
        return list(self._obs[slot])

    def observe_many(self, slots) -> np.ndarray:
        return np.array([self._obs[s] for s in np.asarray(slots).tolist()], dtype=np.uint32).reshape(
            -1, self._spaces[0].size)

    def info(self, slot: int) -> dict:
        reward, self._reward[slot] = self._reward[slot], 0.0
        return {"reward": reward, "episode": self._episode[slot]}

    def info_many(self, slots) -> dict:
        slots = np.asarray(slots).tolist()
        out = {"reward": np.array([self._reward[s] for s in slots], dtype=np.float64),
               "episode": np.array([self._episode[s] for s in slots], dtype=np.uint32)}
        for s in slots:
            self._reward[s] = 0.0
        return out

    def move(self, slot: int, action) -> None:
        a = int(action) if self._spaces[1].contains(action) else 0   # out of the space: stay at the centre
        obs = self._call(slot, self._envs[slot].step, [a, 0])
        self._obs[slot] = [int(o) for o in obs]
        self._reward[slot] += _REWARD[self._obs[slot][1]]
        self.reward += _REWARD[self._obs[slot][1]]
        self._t[slot] += 1
        if self._t[slot] >= self.episode_len:
            self._episode[slot] += 1
            self.episodes += 1
            self._reset(slot)

    def move_many(self, slots, actions) -> None:
        for slot, action in zip(np.asarray(slots).tolist(), list(actions)):
            self.move(slot, action)

    def params(self) -> dict:
        observation, action = self._spaces
        return {"kind": self.kind, "env": self.env_name,
                "spaces": {"observation": observation.to_wire(), "action": action.to_wire()},
                "model": self._model, "episode_len": self.episode_len, "seed": self.seed}

    def figures(self) -> dict:
        return {"episodes": self.episodes, "reward": self.reward}

    def state_hash(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        for agent_id in sorted(self._slot):
            slot = self._slot[agent_id]
            h.update(f"{agent_id}:{self._obs[slot]}:{self._t[slot]}:{self._episode[slot]}".encode())
            for factor in self._envs[slot]._state:
                h.update(np.asarray(factor, dtype=np.float64).tobytes())
        return h.hexdigest()
