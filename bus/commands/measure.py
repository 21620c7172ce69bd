"""``measure``: a measured window, opened and closed by the coordinator (busbench's)."""

from __future__ import annotations

import dataclasses
import math

from agentbus_zmq.bus.commands import Call, Command, CommandError, Server, command
from agentbus_zmq.bus.protocol import ErrorCode

__all__ = ["LIMITS", "MeasureRequest", "MeasureCommand"]

#: Largest values ``measure`` accepts (docs/protocol.md).
LIMITS = {"agents": 1_000_000, "warmup_steps": 10**9, "steps": 10**12, "duration_s": 86_400.0,
          "timeout_s": 7 * 86_400.0}


@dataclasses.dataclass(frozen=True)
class MeasureRequest:
    """The arguments of CONTROL ``measure``, validated."""

    agents: int = 1
    warmup_steps: int = 0
    steps: int = 0
    duration_s: float = 0.0
    timeout_s: float = 60.0

    @classmethod
    def parse(cls, args: dict) -> MeasureRequest:
        unknown = set(args) - set(LIMITS)
        if unknown:
            raise CommandError(ErrorCode.BAD_FIELD, f"measure takes no argument {sorted(unknown)[0]!r}; "
                                                    f"it takes {', '.join(LIMITS)}")
        values = {}
        for field in dataclasses.fields(cls):
            if field.name not in args:
                continue
            v = args[field.name]
            integral = field.type == "int"
            if type(v) not in ((int,) if integral else (int, float)) or not math.isfinite(v) \
                    or not 0 <= v <= LIMITS[field.name]:
                kind = "an integer" if integral else "a finite number"
                raise CommandError(ErrorCode.BAD_FIELD, f"measure's {field.name} must be {kind} in "
                                                        f"[0, {LIMITS[field.name]:g}], got {v!r:.40}")
            values[field.name] = v
        req = cls(**values)
        if req.agents < 1 or (req.steps <= 0 and req.duration_s <= 0) or req.timeout_s <= 0:
            raise CommandError(ErrorCode.BAD_FIELD, "measure needs agents >= 1, steps or duration_s > 0, "
                                                    "and timeout_s > 0")
        return req


@command
class MeasureCommand(Command):
    """Measure a window: wait for N agents, warm up, count steps for a duration."""

    name = "measure"
    args_doc = "`agents, warmup_steps, steps` or `duration_s`, `timeout_s`"
    result_doc = "the measured window (below)"

    def parse(self, args: dict) -> MeasureRequest:
        return MeasureRequest.parse(args)

    def execute(self, server: Server, call: Call, parsed: MeasureRequest) -> None:
        server.measure(call, parsed)
        return None
