"""``explorer``: a pymdp active-inference agent whose model matches the coordinator's world.

Each step is state inference, policy inference (expected free energy with state
information gain) and action sampling -- the peer system's "op" -- on the model built by
:func:`agents.model.build_model` from WELCOME's world description.

Backends:

* ``numpy`` -- ``pymdp.legacy.Agent``.  Cheap to start (0.3 s), about 0.3 ms a step at
  25 states, policy length 1.  Forks well: busbench imports it once and forks agents.
* ``jax`` -- ``pymdp.agent.Agent`` with the whole step under ``equinox.filter_jit``
  (an unjitted JAX step is ~3,000x slower).  Faster per step once compiled, but each
  process starts XLA's thread pools and compiles for ~1 s; it cannot be forked after
  JAX initialises, so each agent process imports it itself.
"""

from __future__ import annotations

import zlib

from agentbus_zmq.agents.sdk import Agent, BadObservation
from agentbus_zmq.bus.protocol import Welcome

__all__ = ["Explorer", "BACKENDS"]

BACKENDS = ("numpy", "jax")
GAMMA = ALPHA = 8.0
#: outcomes of the second modality (empty, obstacle, goal, agent, wall)
N_FOUND = 5


class Explorer(Agent):
    kind = "explorer"
    OPTIONS = ("backend", "policy_len", "seed", "model", "max_model_mb")

    def __init__(self, backend: str = BACKENDS[0], policy_len: int = 1, seed: int = 0, model: str | None = None,
                 max_model_mb: int = 1024):
        """``model``: an .npz of A, B, C, D (and E) to use instead of the one built from
        the world (agents.model.load_model); checked against each WELCOME's world.
        ``max_model_mb``: what its model and planning may take, estimated from WELCOME
        before anything is allocated (more is BadWelcome)."""
        if backend not in BACKENDS:
            raise ValueError(f"explorer backend must be one of {BACKENDS}, got {backend!r}")
        if policy_len < 1:
            raise ValueError("policy_len must be at least 1")
        self.backend = backend
        self.policy_len = policy_len
        self.seed = seed
        self.model_path = model
        self.max_bytes = max_model_mb << 20
        self._own_model = None
        if model is not None:
            from agentbus_zmq.agents.model import load_model

            self._own_model = load_model(model)  # ModelError (a ValueError) now, not at WELCOME
        self._impl = None
        #: outcomes of each modality it models (an observation must be within them)
        self._outcomes: tuple[int, ...] = ()

    @property
    def forkable(self) -> bool:
        """Whether :meth:`prepare` may run before a fork (not with JAX's threads)."""
        return self.backend == "numpy"

    def prepare(self) -> None:
        if self.backend == "numpy":
            from agentbus_zmq.agents.kinds._pymdp import legacy_agent_class

            legacy_agent_class()
        else:
            from agentbus_zmq.agents.kinds._pymdp import jax_agent_class

            jax_agent_class()

    def configure(self, world: dict, agent_id: str = "") -> None:
        """Build (or check) the model for ``world`` (WELCOME's ``params["world"]``)."""
        from agentbus_zmq.agents.model import check_policies

        seed = zlib.crc32(agent_id.encode()) ^ self.seed
        model = self._model_for(world)
        check_policies(model, self.policy_len, self.max_bytes)
        self._outcomes = model.num_outcomes
        self._impl = (_NumpyImpl if self.backend == "numpy" else _JaxImpl)(model, self.policy_len, seed)

    def _model_for(self, world: dict):
        """The model file's (checked against ``world``), the world's own generative model
        (``world.model``: pymdp's environments send theirs), or one built from the grid;
        either way the world is validated first (BadWelcome)."""
        from agentbus_zmq.agents.model import build_model, check_model, model_from_world  # numpy: not at import

        if self._own_model is None and isinstance(world, dict) and "model" in world:
            model = model_from_world(world, self.max_bytes)
            if self.backend != "numpy" and (len(model.B) > 1 or model.control_factors):
                raise BadWelcome("the jax explorer models single-factor worlds (the grid); use --backend numpy "
                                 "for this world's model")
            return model
        if self._own_model is None:
            return build_model(world, self.max_bytes)
        check_model(self._own_model, world, self.policy_len)
        return self._own_model

    def on_start(self, welcome: Welcome) -> None:
        self.configure(welcome.params["world"], welcome.agent_id)

    def step(self, obs: list[int]) -> int:
        outcomes = self._outcomes
        if type(obs) is not list or len(obs) != len(outcomes) or not all(0 <= o < n for o, n in zip(obs, outcomes)):
            raise BadObservation(f"explorer observations are one outcome per modality, below {list(outcomes)}, "
                                 f"got {obs!r:.60}")
        return self._impl.step(obs)

    def on_episode(self, episode: int, reward: float) -> None:
        """A new episode: beliefs start again from the prior (D)."""
        if self._impl is not None and hasattr(self._impl, "reset"):
            self._impl.reset()

    # --- in an agent host -------------------------------------------------------------

    @classmethod
    def start_batch(cls, agents: list[Explorer], welcomes: list[Welcome]) -> None:
        """Build the model once for the host (every arena has the same layout).  With
        JAX, one batched agent steps them all: one compile per host, one call a tick."""
        model = agents[0]._model_for(welcomes[0].params["world"])
        for agent in agents:
            agent._outcomes = model.num_outcomes
        seeds = [zlib.crc32(w.agent_id.encode()) ^ a.seed for a, w in zip(agents, welcomes)]
        if agents[0].backend == "jax" and len(agents) > 1:
            batch = _JaxBatch(model, agents[0].policy_len, seeds)
            for row, agent in enumerate(agents):
                agent._impl, agent._row, agent.batched = batch, row, True
        else:
            for agent, seed in zip(agents, seeds):
                agent._impl = (_NumpyImpl if agent.backend == "numpy" else _JaxImpl)(model, agent.policy_len, seed)

    @classmethod
    def step_batch(cls, agents: list[Explorer], obs) -> object:
        outcomes = agents[0]._outcomes
        if obs.ndim != 2 or obs.shape[1] != len(outcomes) or (len(obs) and (
                obs.min() < 0 or any(obs[:, m].max() >= n for m, n in enumerate(outcomes)))):
            raise BadObservation(f"explorer observations are rows of one outcome per modality, below {list(outcomes)}")
        return agents[0]._impl.step_rows([a._row for a in agents], obs)


class _NumpyImpl:
    def __init__(self, model, policy_len: int, seed: int):
        import numpy as np

        from agentbus_zmq.agents.kinds._pymdp import legacy_agent_class

        LegacyAgent = legacy_agent_class()
        # legacy pymdp samples from numpy's global generator; an agent owns its process.
        np.random.seed(seed)
        self.agent = LegacyAgent(
            A=_obj_array(model.A), B=_obj_array(model.B), C=_obj_array(model.C), D=_obj_array(model.D),
            **({"E": model.E} if model.E is not None else {}),
            **({"control_fac_idx": list(model.control_factors)} if model.control_factors else {}),
            policy_len=policy_len, gamma=GAMMA, alpha=ALPHA, use_states_info_gain=True,
            use_param_info_gain=False, action_selection="stochastic", inference_algo="VANILLA",
        )
        #: the factor whose action travels (the world's one controllable factor)
        self._control = model.control_factors[0] if model.control_factors else 0

    def reset(self) -> None:
        self.agent.reset()

    def step(self, obs: list[int]) -> int:
        agent = self.agent
        agent.infer_states(obs)
        agent.infer_policies()
        action = agent.sample_action()
        # legacy Agent.step_time() appends every action to prev_actions; VANILLA inference
        # never reads it back, so keep only the last one (flat memory over long runs).
        if agent.prev_actions is not None and len(agent.prev_actions) > 1:
            del agent.prev_actions[:-1]
        return int(action[self._control])


def _obj_array(arrays: list):
    import numpy as np

    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


class _JaxImpl:
    def __init__(self, model, policy_len: int, seed: int):
        import jax
        import jax.numpy as jnp
        import jax.random as jr
        import numpy as np
        from agentbus_zmq.agents.kinds._pymdp import jax_agent_class

        JaxAgent = jax_agent_class()

        def batch(arrays):
            return [jnp.asarray(a)[None] for a in arrays]

        agent = JaxAgent(
            A=batch(model.A), B=batch(model.B), C=batch(model.C), D=batch(model.D),
            **({"E": jnp.asarray(model.E)[None]} if model.E is not None else {}),
            policy_len=policy_len, gamma=GAMMA, alpha=ALPHA, use_states_info_gain=True,
            use_param_info_gain=False, action_selection="stochastic", sampling_mode="marginal",
        )

        # The agent is closed over, so its arrays are compile-time constants: measured
        # 215 us a step against 450 us when passing it through equinox.filter_jit.
        @jax.jit
        def step(prior, obs, key):
            key, k_act = jr.split(key)
            qs = agent.infer_states([obs[m][None, None] for m in range(len(model.A))], prior)
            q_pi, _ = agent.infer_policies(qs)
            action = agent.sample_action(q_pi, rng_key=k_act[None])
            return action, agent.update_empirical_prior(action, qs), key

        self.agent = agent
        self._step = step
        self._np = np
        self._prior = agent.D
        self._key = jr.PRNGKey(seed)
        # Compile now, not on the first real observation.
        self.step([0] * len(model.A))
        self._prior = agent.D

    def step(self, obs: list[int]) -> int:
        action, self._prior, self._key = self._step(self._prior, self._np.asarray(obs, dtype=self._np.int32), self._key)
        return int(action[0, 0])


class _JaxBatch:
    """K explorers as one pymdp agent of batch size K, the whole step one jitted call.

    Members that are not stepped in a call (they left, or were not listed) keep their
    beliefs and keys: the call computes all K rows at a fixed shape (no recompiling) and
    keeps only the stepped rows' new state."""

    def __init__(self, model, policy_len: int, seeds: list[int]):
        import jax
        import jax.numpy as jnp
        import jax.random as jr
        import numpy as np

        from agentbus_zmq.agents.kinds._pymdp import jax_agent_class

        JaxAgent = jax_agent_class()
        k, modalities = len(seeds), len(model.A)

        def one(arrays):
            return [jnp.asarray(a)[None] for a in arrays]

        agent = JaxAgent(
            A=one(model.A), B=one(model.B), C=one(model.C), D=one(model.D), batch_size=k,
            **({"E": jnp.asarray(model.E)[None]} if model.E is not None else {}),
            policy_len=policy_len, gamma=GAMMA, alpha=ALPHA, use_states_info_gain=True,
            use_param_info_gain=False, action_selection="stochastic", sampling_mode="marginal",
        )

        @jax.jit
        def step(prior, obs, keys, mask):
            split = jax.vmap(lambda key: jr.split(key))(keys)
            keys_next, k_act = split[:, 0], split[:, 1]
            qs = agent.infer_states([obs[:, m][:, None] for m in range(modalities)], prior)
            q_pi, _ = agent.infer_policies(qs)
            action = agent.sample_action(q_pi, rng_key=k_act)
            new_prior = agent.update_empirical_prior(action, qs)
            keep = mask[:, None]
            prior = [jnp.where(keep, new, old) for new, old in zip(new_prior, prior)]
            return action[:, 0], prior, jnp.where(keep, keys_next, keys)

        self._np = np
        self._step = step
        self.k, self.modalities = k, modalities
        self._prior = agent.D
        self._keys = jax.vmap(jr.PRNGKey)(jnp.asarray(np.array(seeds, dtype=np.uint32)))
        # Compile now, not on the first real observation.
        self.step_rows(list(range(k)), np.zeros((k, modalities), dtype=np.int32))
        self._prior = agent.D

    def step_rows(self, rows: list[int], obs) -> object:
        np = self._np
        full = np.zeros((self.k, self.modalities), dtype=np.int32)
        full[rows] = obs
        mask = np.zeros(self.k, dtype=bool)
        mask[rows] = True
        actions, self._prior, self._keys = self._step(self._prior, full, self._keys, mask)
        return np.asarray(actions)[rows]
