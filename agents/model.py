"""The explorer's generative model, built from the world the coordinator describes.

Hidden state: the agent's cell (``width * height`` states).  Controls: the world's five
actions.  Two observation modalities, matching what the coordinator sends:

* location -- the cell index, observed exactly (A[0] is the identity);
* found -- ``empty / obstacle / goal / agent / wall``.  A[1] knows the map: goal cells
  yield ``goal``; a cell next to the border, an obstacle or (anywhere) another agent may
  yield a bump of that kind, because a blocked move leaves the agent where it was.

B moves the agent with probability 0.9 and leaves it in place with 0.1 (another agent
may block it); moves into walls and obstacles always fail.  C prefers goals and
dislikes bumps (the peer system's preferences, ``[2, -4, 8, 0, -4]``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["Model", "build_model"]

EMPTY, OBSTACLE, GOAL, AGENT, WALL = range(5)
MOVES = ((0, -1), (0, 1), (-1, 0), (1, 0), (0, 0))
PREFERENCES = np.array([2.0, -4.0, 8.0, 0.0, -4.0])
P_MOVE = 0.9
#: weight of each possible bump outcome relative to the cell's own outcome
P_BUMP = 0.1


class Model:
    """A, B, C, D as lists of float64 arrays (one entry per modality / factor)."""

    def __init__(self, A: list, B: list, C: list, D: list):
        self.A, self.B, self.C, self.D = A, B, C, D

    @property
    def num_states(self) -> int:
        return self.B[0].shape[0]


def build_model(world: dict) -> Model:
    width, height = int(world["width"]), int(world["height"])
    obstacles, goals = set(world["obstacles"]), set(world["goals"])
    n_obs, n_actions = len(world["outcomes"]), len(world["actions"])
    if n_obs != 5 or n_actions != len(MOVES):
        raise ValueError(f"explorer models 5 outcomes and 5 actions, the world has {n_obs} and {n_actions}")
    S = width * height

    def target(cell: int, action: int) -> int | None:
        dx, dy = MOVES[action]
        x, y = cell % width + dx, cell // width + dy
        return y * width + x if 0 <= x < width and 0 <= y < height else None

    found = np.zeros((n_obs, S))
    B = np.zeros((S, S, n_actions))
    for s in range(S):
        found[GOAL if s in goals else (OBSTACLE if s in obstacles else EMPTY), s] = 1.0
        found[AGENT, s] += P_BUMP
        for a in range(n_actions):
            t = target(s, a)
            if t is None:
                found[WALL, s] += P_BUMP / 4
                B[s, s, a] = 1.0
            elif t in obstacles:
                found[OBSTACLE, s] += P_BUMP / 4
                B[s, s, a] = 1.0
            elif t == s:
                B[s, s, a] = 1.0
            else:
                B[t, s, a] = P_MOVE
                B[s, s, a] = 1.0 - P_MOVE
    found /= found.sum(axis=0, keepdims=True)
    D = np.array([0.0 if s in obstacles else 1.0 for s in range(S)])
    return Model(
        A=[np.eye(S), found],
        B=[B],
        C=[np.zeros(S), PREFERENCES.copy()],
        D=[D / D.sum()],
    )
