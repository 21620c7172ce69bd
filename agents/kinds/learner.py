"""``learner``: a pymdp agent that learns a discrete world it has no model for.

It knows only the world's spaces (WELCOME's ``spaces``): a multi-discrete (or discrete)
observation and a discrete action.  It takes the first modality for its state (the
grid's cell, say; observed exactly), and learns the rest with pymdp's Dirichlet
parameter learning: the other modalities' likelihoods (A, ``update_A``) and the
transitions under each action (B, ``update_B``), both from flat priors of concentration
``concentration``; it picks moves by expected free energy with the parameters'
information gain (curious about the moves it has not tried).  What it prefers it learns
from the world's rewards (``info``): each outcome's mean reward, and from those each
state's worth by backward induction on the learnt B (:meth:`Learner._value`), which
becomes its preference (C) over the state modality: a plan one move long then heads for
a goal many moves away.  A world without rewards gives it no preferences, and it
explores.

Measured in the grid as a PettingZoo environment with one layout for every episode
(one agent an arena, a reward for each step on a goal, 40-step episodes, seeds 1-4), four
learners together: 4 rewards in the first episode, 124 an episode over episodes 11-15, where random agents
earned 11 and the learner with its learning frozen 9 (tests/test_worlds.py); with a new
layout every episode, 463 over 15 episodes against 184 for random agents.  0.6 ms a
step (25 states, five actions, policy length 1).
"""

from __future__ import annotations

import zlib

from agentbus_zmq.agents.sdk import Agent, BadObservation, BadWelcome, spaces_of
from agentbus_zmq.bus.protocol import Welcome
from agentbus_zmq.bus.spaces import Discrete, MultiDiscrete

__all__ = ["Learner"]

#: the largest state space it models (B is S x S x actions)
MAX_STATES = 1024
#: preference scale: C[m][o] = SCALE x the mean reward outcome o came with
SCALE = 4.0
#: rewards count within +-MAX_REWARD (a finite -1e308 would overflow the values it sums)
MAX_REWARD = 1e6
#: backward induction: the discount of a state's worth per move, the sweeps at most, and
#: the change in worth below which a sweep ends it
GAMMA = 0.9
DEPTH = 30
TOLERANCE = 1e-3


class Learner(Agent):
    kind = "learner"
    OPTIONS = ("seed", "policy_len", "max_model_mb")

    def __init__(self, seed: int = 0, concentration: float = 0.1, policy_len: int = 1, max_model_mb: int = 1024):
        self.seed = seed
        #: what its tables and planning may take, estimated from WELCOME before allocating
        self.max_bytes = max_model_mb << 20
        self.concentration = concentration
        self.policy_len = policy_len
        self._agent = None
        self._reward = 0.0

    def prepare(self) -> None:
        from agentbus_zmq.agents.kinds._pymdp import legacy_agent_class

        legacy_agent_class()

    def on_start(self, welcome: Welcome) -> None:
        import numpy as np
        from pymdp.legacy import utils

        from agentbus_zmq.agents.kinds._pymdp import legacy_agent_class

        obs_space, act_space = spaces_of(welcome)
        if not isinstance(act_space, Discrete):
            raise BadWelcome(f"the learner acts in discrete action spaces, not {act_space}")
        nvec = list(obs_space.nvec) if isinstance(obs_space, MultiDiscrete) else \
            [obs_space.n] if isinstance(obs_space, Discrete) else None
        if nvec is None or nvec[0] > MAX_STATES:
            raise BadWelcome(f"the learner models discrete observations of at most {MAX_STATES} states in their "
                             f"first modality, not {obs_space}")
        self.nvec, S, conc = nvec, nvec[0], self.concentration
        self._check_size(nvec, act_space.n)
        np.random.seed((zlib.crc32(welcome.agent_id.encode()) ^ self.seed) % 2**32)
        A, pA = utils.obj_array(len(nvec)), utils.obj_array(len(nvec))
        A[0] = np.eye(S)
        pA[0] = np.eye(S)
        for m in range(1, len(nvec)):
            pA[m] = np.full((nvec[m], S), conc)
            A[m] = pA[m] / pA[m].sum(axis=0)
        pB, B = utils.obj_array(1), utils.obj_array(1)
        pB[0] = np.full((S, S, act_space.n), conc)
        B[0] = pB[0] / pB[0].sum(axis=0)
        C, D = utils.obj_array(len(nvec)), utils.obj_array(1)
        for m, n in enumerate(nvec):
            C[m] = np.zeros(n)
        D[0] = np.full(S, 1.0 / S)
        self._sum = [np.zeros(n) for n in nvec]
        self._count = [np.zeros(n) for n in nvec]
        self._v = np.zeros(S)
        self._agent = legacy_agent_class()(
            A=A, B=B, C=C, D=D, pA=pA, pB=pB, lr_pA=1.0, lr_pB=1.0, modalities_to_learn=list(range(1, len(nvec))),
            factors_to_learn=[0], policy_len=self.policy_len, gamma=8.0, alpha=8.0, use_states_info_gain=False,
            use_param_info_gain=True, action_selection="stochastic", inference_algo="VANILLA")
        self._utils, self._np = utils, np
        self._prev = None

    def _check_size(self, nvec: list[int], actions: int) -> None:
        """BadWelcome when its tables would take more than ``max_bytes``: B and its
        Dirichlet counts (S x S x actions, and a copy while planning), the other
        modalities' A and counts, and the policies (estimated before anything exists)."""
        from agentbus_zmq.agents.model import policy_bytes

        S = nvec[0]
        tables = 8 * (3 * S * S * actions + 3 * S * sum(nvec[1:]) + 4 * sum(nvec))
        policies, planning = policy_bytes([actions], self.policy_len, [S], nvec)
        if tables + planning > self.max_bytes:
            raise BadWelcome(f"a learner of {S} states, {len(nvec)} modalities {nvec} and {actions:,} actions "
                             f"({policies:,} policies) needs about {(tables + planning) / 2**20:,.0f} MB, more "
                             f"than the {self.max_bytes / 2**20:,.0f} MB it allows (--max-model-mb)")

    def on_reward(self, reward: float) -> None:
        self._reward = min(max(reward, -MAX_REWARD), MAX_REWARD)

    def on_episode(self, episode: int, reward: float) -> None:
        self._prev = None  # the next move starts a new episode: no transition to learn from

    def _value(self):
        """Each state's worth under the model learnt so far: the reward expected there
        (its own outcome's, and through ``A`` the other modalities'), plus, discounted by
        ``GAMMA``, the best next state's worth under ``B`` -- backward induction on the
        learnt model (value iteration, warm-started from the last step's, at most
        ``DEPTH`` sweeps).  It becomes the preference over the state modality, so a plan
        one move long heads for a goal many moves away, along transitions it has learnt."""
        np, agent = self._np, self._agent
        paid = [self._sum[m] / np.maximum(self._count[m], 1) for m in range(len(self.nvec))]
        worth = paid[0].copy()
        for m in range(1, len(self.nvec)):
            worth += paid[m] @ agent.A[m]
        B, v = agent.B[0], self._v
        for _ in range(DEPTH):
            nxt = worth + GAMMA * np.einsum("tsa,t->sa", B, v).max(axis=1)
            done = np.abs(nxt - v).max() < TOLERANCE
            v = nxt
            if done:
                break
        self._v = v
        return v

    def step(self, obs):
        np, agent = self._np, self._agent
        if type(obs) is not list or len(obs) != len(self.nvec) or not all(0 <= o < n for o, n in zip(obs, self.nvec)):
            raise BadObservation(f"learner observations are one outcome per modality, below {self.nvec}")
        agent.infer_states(obs)
        if self._prev is not None:
            agent.update_B(self._prev)
        agent.update_A(obs)
        reward, self._reward = self._reward, 0.0
        for m, o in enumerate(obs):  # the mean reward each outcome came with
            self._sum[m][o] += reward
            self._count[m][o] += 1
        agent.C[0] = SCALE * self._value()
        prev = self._utils.obj_array(len(agent.qs))
        for i, q in enumerate(agent.qs):
            prev[i] = q.copy()
        self._prev = prev
        agent.infer_policies()
        action = agent.sample_action()
        if agent.prev_actions is not None and len(agent.prev_actions) > 1:
            del agent.prev_actions[:-1]
        return int(action[0])
