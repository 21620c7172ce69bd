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

import math
import re

import numpy as np

from agentbus_zmq.agents.sdk import BadWelcome

__all__ = ["MAX_MODEL_BYTES", "MAX_SIDE", "Model", "ModelError", "build_model", "check_model", "check_world",
           "check_policies", "load_model", "model_bytes", "model_from_world", "policy_bytes", "save_model"]

EMPTY, OBSTACLE, GOAL, AGENT, WALL = range(5)
MOVES = ((0, -1), (0, 1), (-1, 0), (1, 0), (0, 0))
PREFERENCES = np.array([2.0, -4.0, 8.0, 0.0, -4.0])
P_MOVE = 0.9
#: weight of each possible bump outcome relative to the cell's own outcome
P_BUMP = 0.1


class Model:
    """A, B, C, D as lists of float64 arrays (one entry per modality / factor), E, an
    optional prior over policies, and the factors the agent controls (None: all)."""

    def __init__(self, A: list, B: list, C: list, D: list, E=None, control_factors: list | None = None):
        self.A, self.B, self.C, self.D, self.E = A, B, C, D, E
        self.control_factors = control_factors

    @property
    def num_states(self) -> int:
        return self.B[0].shape[0]

    @property
    def num_outcomes(self) -> tuple[int, ...]:
        return tuple(a.shape[0] for a in self.A)


#: Longest side of a world the explorer accepts.
MAX_SIDE = 4096
#: Memory the explorer's model may take (estimated before anything is allocated): B is
#: ``S x S x 5`` float64 for S cells, and pymdp holds about three copies while it builds.
MAX_MODEL_BYTES = 1 << 30


def model_bytes(width: int, height: int) -> int:
    """Estimated peak bytes of the model (and pymdp's copies) for a world this size."""
    S = width * height
    return 3 * 8 * S * S * (len(MOVES) + 1)


#: What one numpy array costs beside its values (header and object), in bytes.
_ARRAY_OVERHEAD = 112


def policy_bytes(controls: list[int], policy_len: int, states: list[int], outcomes: list[int]) -> tuple[int, int]:
    """``(policies, bytes)``: how many policies pymdp enumerates for factors with
    ``controls`` actions each (1 for a factor the agent does not control) over
    ``policy_len`` moves, and an estimate of what they take while it plans: each policy's
    array, and the states and outcomes it predicts at every move (Python integers: the
    product is never computed in a fixed width, so a huge one cannot wrap round)."""
    policies = math.prod(controls) ** policy_len
    per_move = sum(_ARRAY_OVERHEAD + 8 * s for s in states) + sum(_ARRAY_OVERHEAD + 8 * o for o in outcomes)
    return policies, policies * (_ARRAY_OVERHEAD + 8 * policy_len * len(controls) + policy_len * per_move)


def check_policies(model: Model, policy_len: int, max_bytes: int = MAX_MODEL_BYTES) -> None:
    """:class:`BadWelcome` when planning over ``model``'s policies would take more than
    ``max_bytes`` (checked before pymdp enumerates them)."""
    states = [b.shape[0] for b in model.B]
    control = model.control_factors
    controls = [b.shape[2] if control is None or f in control else 1 for f, b in enumerate(model.B)]
    policies, need = policy_bytes(controls, policy_len, states, list(model.num_outcomes))
    if need > max_bytes:
        raise BadWelcome(f"the world's model has {policies:,} policies of {policy_len} moves ({' x '.join(map(str, controls))}"
                         f" actions per move), about {need / 2**20:,.0f} MB to plan over, more than the "
                         f"{max_bytes / 2**20:,.0f} MB this agent allows (--max-model-mb)")


def check_world(world: object, max_bytes: int = MAX_MODEL_BYTES) -> tuple[int, int, set, set]:
    """Validate WELCOME's ``world`` before building anything from it: ``(width, height,
    obstacles, goals)``, or :class:`BadWelcome` naming the field and what was expected."""
    if not isinstance(world, dict):
        raise BadWelcome(f"WELCOME params 'world' must be a map, got {type(world).__name__}")
    missing = [k for k in ("width", "height", "obstacles", "goals", "outcomes", "actions") if k not in world]
    if missing:
        raise BadWelcome(f"WELCOME params 'world' lacks {', '.join(missing)}")
    width, height = world["width"], world["height"]
    for name, v in (("width", width), ("height", height)):
        if type(v) is not int or not 1 <= v <= MAX_SIDE:
            raise BadWelcome(f"world {name} must be an integer in [1, {MAX_SIDE}], got {v!r:.40}")
    if model_bytes(width, height) > max_bytes:
        raise BadWelcome(f"a {width}x{height} world needs about {model_bytes(width, height) / 2**20:,.0f} MB for the "
                         f"explorer's model, over the {max_bytes / 2**20:,.0f} MB it allows: use a smaller world (or "
                         f"arenas: --arena-agents) for explorers")
    S = width * height
    cells = {}
    for name in ("obstacles", "goals"):
        v = world[name]
        if not isinstance(v, list) or len(v) > S or not all(type(c) is int and 0 <= c < S for c in v):
            raise BadWelcome(f"world {name} must be a list of cell indices in [0, {S}), at most {S} of them")
        cells[name] = set(v)
    for name in ("outcomes", "actions"):
        if not isinstance(world[name], list) or len(world[name]) != 5:
            raise BadWelcome(f"the explorer models 5 {name}, the world has {world[name]!r:.60}")
    return width, height, cells["obstacles"], cells["goals"]


def build_model(world: dict, max_bytes: int = MAX_MODEL_BYTES) -> Model:
    width, height, obstacles, goals = check_world(world, max_bytes)
    n_obs, n_actions = len(world["outcomes"]), len(world["actions"])
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


# --- bring your own model (explorer --model FILE.npz) -----------------------------------


class ModelError(BadWelcome):
    """A model file that cannot be used: the message names the array, the axis and what
    was expected."""


#: outcomes of the second modality, actions: what the coordinator's world has
N_FOUND = N_ACTIONS = 5
_TOL = 1e-6


def save_model(path, model: Model) -> None:
    """Write ``model`` as the .npz ``load_model`` reads: A0, A1, B0, C0, C1, D0 (and E)."""
    arrays = {f"{name}{i}": a for name in "ABCD" for i, a in enumerate(getattr(model, name))}
    if model.E is not None:
        arrays["E"] = model.E
    np.savez(path, **arrays)


#: the arrays a model file may hold
_MODEL_ARRAY = re.compile(r"[ABCD]\d{1,3}|E\Z")


def _array_headers(path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's name, shape and dtype from the .npz's own headers, read before any
    array is: what loading them would allocate is known, and refused, first."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ModelError(f"the model file {path} is not an .npz (numpy.savez writes one; a plain .npy holds one "
                         f"array, a model needs A0, A1, B0, C0, C1, D0)")
    headers = {}
    with zipfile.ZipFile(path) as z:
        members = z.infolist()
        if len(members) > 64:
            raise ModelError(f"the model file {path} holds {len(members)} entries; a model has at most a few")
        for info in members:
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if not _MODEL_ARRAY.fullmatch(name):
                raise ModelError(f"the model file {path} holds {info.filename[:40]!r}; a model holds only A0.., B0.., "
                                 f"C0.., D0.. and E")
            with z.open(info) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    read = {(1, 0): np.lib.format.read_array_header_1_0,
                            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read is None:
                        raise ValueError(f"array format {version[0]}.{version[1]}, not 1.0 or 2.0")
                    shape, _fortran, dtype = read(f, max_header_size=4096)
                except (ValueError, OSError, SyntaxError) as exc:
                    raise ModelError(f"the model file {path}: {name} is not a numpy array ({exc})") from None
            if dtype.kind not in "biuf" or dtype.fields is not None:
                raise ModelError(f"the model file {path}: {name} holds {dtype} values; a model's arrays hold real "
                                 f"numbers (float or int)")
            if len(shape) > 3:
                raise ModelError(f"the model file {path}: {name} has {len(shape)} axes; a model's arrays have 1 to 3")
            headers[name] = (tuple(shape), dtype)
    size = sum(8 * math.prod(shape) for shape, _ in headers.values())  # as float64, which the model uses
    if size > MAX_MODEL_BYTES:
        raise ModelError(f"the model file {path} declares {size / 2**30:.1f} GiB of arrays (as float64); at most "
                         f"{MAX_MODEL_BYTES / 2**30:.0f} GiB")
    return headers


def load_model(path) -> Model:
    """A model from an .npz file with arrays ``A0 .. A{m}``, ``B0 .. B{f}``, ``C0 ..``,
    ``D0 ..`` (one per observation modality / hidden-state factor, in pymdp's
    conventions: ``A[m]`` is ``(outcomes, states)``, ``B[f]`` is ``(states, states,
    actions)`` with ``B[f][next, previous, action]``) and optionally ``E`` (a prior over
    policies).  No pickles: object arrays are refused.  Names, dtypes, shapes and the
    total size are checked from the file's headers before any array is read."""
    try:
        headers = _array_headers(path)
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: np.asarray(f[k], dtype=np.float64) for k in f.files}
    except ModelError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise ModelError(f"cannot read the model file {path}: {exc} (an .npz of A0, A1, B0, C0, C1, D0 and "
                         f"optionally E: numpy.savez)") from None
    if {k: a.shape for k, a in arrays.items()} != {k: shape for k, (shape, _) in headers.items()}:
        raise ModelError(f"the model file {path} changed while it was read")
    parts = {}
    for name in "ABCD":
        keys = sorted((k for k in arrays if k[:1] == name and k[1:].isdigit()), key=lambda k: int(k[1:]))
        if not keys:
            raise ModelError(f"the model file {path} has no {name}0 (it holds {', '.join(sorted(arrays)) or 'nothing'})")
        if [int(k[1:]) for k in keys] != list(range(len(keys))):
            raise ModelError(f"the model file {path}: {name} arrays must be numbered from 0 without gaps, got "
                             f"{', '.join(keys)}")
        parts[name] = [arrays[k] for k in keys]
    return Model(parts["A"], parts["B"], parts["C"], parts["D"], arrays.get("E"))


def check_model(model: Model, world: dict, policy_len: int = 1) -> None:
    """Does ``model`` fit the world in WELCOME (the explorer's two modalities, one factor,
    five actions)?  :class:`ModelError` names the first array that does not."""
    width, height, _, _ = check_world(world)
    S = width * height
    expect = {"A": [(S, S), (N_FOUND, S)], "B": [(S, S, N_ACTIONS)], "C": [(S,), (N_FOUND,)], "D": [(S,)]}
    what = {"A": ["location", "found"], "B": ["location"], "C": ["location", "found"], "D": ["location"]}
    for name, shapes in expect.items():
        arrays = getattr(model, name)
        if len(arrays) != len(shapes):
            raise ModelError(f"{name} has {len(arrays)} arrays; the world has {len(shapes)} "
                             f"{'modalities' if name in 'AC' else 'factor'} ({', '.join(what[name])})")
        for i, (a, shape) in enumerate(zip(arrays, shapes)):
            if a.ndim != len(shape):
                raise ModelError(f"{name}{i} has {a.ndim} axes; expected {len(shape)}, shape {shape}")
            for axis, (got, want) in enumerate(zip(a.shape, shape)):
                if got != want:
                    raise ModelError(f"{name}{i} has {got} entries on axis {axis}; the {width}x{height} world "
                                     f"needs {want} ({_axis_meaning(name, axis, i)})")
            if not np.all(np.isfinite(a)):
                raise ModelError(f"{name}{i} holds values that are not finite")
    for name in ("A", "B"):
        for i, a in enumerate(getattr(model, name)):
            if (a < 0).any():
                raise ModelError(f"{name}{i} has negative probabilities")
            sums = a.sum(axis=0)
            bad = np.argwhere(np.abs(sums - 1) > _TOL)
            if len(bad):
                where = tuple(int(x) for x in bad[0])
                raise ModelError(f"{name}{i}[:, {', '.join(map(str, where))}] sums to {sums[where]:.6g} over axis 0; "
                                 f"every column must be a distribution (sum to 1)")
    d = model.D[0]
    if (d < 0).any() or abs(d.sum() - 1) > _TOL:
        raise ModelError(f"D0 must be a distribution over the {S} cells (non-negative, sum 1); it sums to "
                         f"{d.sum():.6g}")
    if model.E is not None:
        policies = N_ACTIONS ** policy_len
        if model.E.shape != (policies,) or (model.E < 0).any() or abs(model.E.sum() - 1) > _TOL:
            raise ModelError(f"E must be a distribution over the {policies} policies of length {policy_len} "
                             f"(shape ({policies},), sum 1); got shape {model.E.shape}")


def _axis_meaning(name: str, axis: int, i: int) -> str:
    if name == "A":
        return ["outcomes of the " + ("location" if i == 0 else "found") + " modality", "cells"][axis]
    if name == "B":
        return ["next cell", "previous cell", "actions"][axis]
    if name == "C":
        return "outcomes of the " + ("location" if i == 0 else "found") + " modality"
    return "cells"


def model_from_world(world: dict, max_bytes: int = MAX_MODEL_BYTES) -> Model:
    """The generative model a world sends in WELCOME (``world.model``: A, B, C, D as
    lists of arrays in pymdp's conventions, ``control_factors``), checked before pymdp
    sees it: shapes that agree with each other, distributions that sum to 1, a size
    under ``max_bytes``.  :class:`BadWelcome` names the first array that does not."""
    m = world.get("model")
    if not isinstance(m, dict) or not all(isinstance(m.get(k), list) and m[k] for k in "ABCD"):
        raise BadWelcome("WELCOME's world model must be a map with non-empty lists A, B, C and D")
    parts = {}
    total = 0
    for name, ndims in (("A", None), ("B", 3), ("C", 1), ("D", 1)):
        arrays = []
        for i, a in enumerate(m[name]):
            if not isinstance(a, np.ndarray) or a.dtype.kind not in "iuf" or (ndims and a.ndim != ndims) \
                    or a.ndim < 1 or not np.all(np.isfinite(a)):
                raise BadWelcome(f"world model {name}{i} must be a finite numeric array"
                                 f"{f' of {ndims} axes' if ndims else ''}")
            total += a.size * 8
            arrays.append(np.array(a, dtype=np.float64))  # a copy: what arrived is read-only
        parts[name] = arrays
    if total * 3 > max_bytes:
        raise BadWelcome(f"the world's model needs about {total * 3 / 2**20:,.0f} MB, over {max_bytes / 2**20:,.0f} MB")
    states = [b.shape[0] for b in parts["B"]]
    for f, (b, d) in enumerate(zip(parts["B"], parts["D"])):
        if b.shape[1] != b.shape[0] or d.shape != (b.shape[0],):
            raise BadWelcome(f"world model B{f} must be (states, states, actions) and D{f} (states,); got "
                             f"{b.shape} and {d.shape}")
    if len(parts["D"]) != len(states) or len(parts["C"]) != len(parts["A"]):
        raise BadWelcome("world model: one D per factor (B) and one C per modality (A)")
    for i, (a, c) in enumerate(zip(parts["A"], parts["C"])):
        if list(a.shape[1:]) != states or c.shape != (a.shape[0],):
            raise BadWelcome(f"world model A{i} must be (outcomes, {', '.join(map(str, states))}) and C{i} "
                             f"(outcomes,); got {a.shape} and {c.shape}")
    for name in ("A", "B", "D"):
        for i, a in enumerate(parts[name]):
            if (a < 0).any() or np.abs(a.sum(axis=0) - 1).max() > _TOL:
                raise BadWelcome(f"world model {name}{i}: every column must be a distribution (sum to 1)")
    control = m.get("control_factors")
    if control is not None and (not isinstance(control, list) or not control
                                or not all(type(f) is int and 0 <= f < len(states) for f in control)):
        raise BadWelcome(f"world model control_factors must list factors in [0, {len(states)})")
    return Model(parts["A"], parts["B"], parts["C"], parts["D"], control_factors=control)
