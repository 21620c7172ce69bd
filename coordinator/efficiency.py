"""Live coordination efficiency and its alert, sans-IO.

The coordinator cannot know r1 (an agent's rate alone), but every ACTION carries the CPU
time its step took.  Over a sliding window::

    efficiency = agent CPU inside steps / (window x min(N, C))

with N the agents ready and C the cores the agents can use.  It is busbench's E(N) =
R(N) / (min(N, C) x r1) whenever a step costs in the bus what it costs alone (R x 1/r1 is
the CPU the steps took), and it needs no benchmark: it is what an operator watches.

:class:`LiveEfficiency` keeps cumulative counters sampled at each timer tick and
differences them over the window; :meth:`LiveEfficiency.update` runs the alert's state
machine::

    OK --below the threshold for `hold` seconds--> ALERT   (one WARNING, the gauge, the hook)
    ALERT --at or above the threshold--> OK                (one INFO, gauge cleared, the hook)

An alert needs the threshold missed continuously for ``hold`` seconds, so it is raised at
most once per ``hold`` however efficiency flaps.  Time is passed in; tests use a fake clock.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math

__all__ = ["AlertEvent", "LiveEfficiency", "Sample", "explain", "cpu_bound", "SLOWEST_NAMED", "CPU_BOUND_FACTOR"]

log = logging.getLogger(__name__)

#: Units named as the slowest in an efficiency alert.
SLOWEST_NAMED = 3
#: A step's CPU claim counts for at most this many times the median unit's step, of at
#: least CPU_BOUND_FLOOR_US; units sampled for the median, at most; and the fewest that
#: say what a step costs.
CPU_BOUND_FACTOR = 16
CPU_BOUND_FLOOR_US = 100
CPU_BOUND_SAMPLE = 64
CPU_BOUND_MIN_UNITS = 3
#: What no claim can move: the step rate per agent, against the best full window of the
#: last RATE_HISTORY windows; below 1/RATE_FALL of it for the hold time, the alert is
#: raised whatever the efficiency (which rests on what agents claim in cpu_us) says.
RATE_FALL = 10
RATE_HISTORY = 30


def cpu_bound(units) -> float:
    """The most CPU one agent-step's claim may count for: CPU_BOUND_FACTOR x the median,
    over (at most CPU_BOUND_SAMPLE) units, of each unit's median reported step time.  One
    agent that reports its wait as work (0.7 s a step where the others take 1 ms) moves a
    median of many not at all; inf until CPU_BOUND_MIN_UNITS units have stepped."""
    medians = []
    for unit in itertools.islice(units, CPU_BOUND_SAMPLE):
        n = min(unit.times_n, len(unit.times))
        if n:
            times = sorted(unit.times[:n])
            medians.append(times[n // 2])
    if len(medians) < CPU_BOUND_MIN_UNITS:
        return math.inf
    medians.sort()
    return CPU_BOUND_FACTOR * max(medians[len(medians) // 2], CPU_BOUND_FLOOR_US)


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """Cumulative counters at time ``t``."""

    t: float
    agent_cpu_us: int
    steps: int
    lost: int
    coordinator_cpu_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class AlertEvent:
    """The alert was raised (``raised``) or cleared; the figures behind it."""

    raised: bool
    efficiency: float
    threshold: float
    cause: str
    figures: dict


class LiveEfficiency:
    def __init__(self, window: float = 10.0, cores: int = 1, threshold: float = 0.5, hold: float = 30.0):
        if not (window > 0 and cores >= 1 and 0 <= threshold <= 1 and hold >= 0):
            raise ValueError("efficiency window must be positive, cores at least 1, threshold in [0, 1], hold >= 0")
        self.window = window
        self.cores = cores
        self.threshold = threshold
        self.hold = hold
        self._samples: collections.deque[Sample] = collections.deque()
        self.agents = 0
        self.alerting = False
        self._below_since: float | None = None
        self.last_cause = ""
        #: step rate per agent of recent full windows (one a window), for RATE_FALL
        self._history: collections.deque[float] = collections.deque(maxlen=RATE_HISTORY)
        self._recorded_at = -math.inf

    def sample(self, s: Sample, agents: int) -> None:
        """Record the counters now; samples older than the window (but one) are dropped."""
        self._samples.append(s)
        self.agents = agents
        while len(self._samples) > 2 and s.t - self._samples[1].t >= self.window:
            self._samples.popleft()

    @property
    def span(self) -> float:
        """Seconds the samples cover (up to the window)."""
        return self._samples[-1].t - self._samples[0].t if len(self._samples) > 1 else 0.0

    def figures(self) -> dict:
        """Efficiency and its parts over the window (None before a full window or with no agents)."""
        span = self.span
        if span <= 0:
            return {"efficiency": None, "rate": None, "window_s": 0.0, "cores": self.cores, "agents": self.agents,
                    "lost": 0, "coordinator_cpu": None, "threshold": self.threshold, "alert": self.alerting}
        first, last = self._samples[0], self._samples[-1]
        parallel = min(self.agents, self.cores)
        cpu_s = (last.agent_cpu_us - first.agent_cpu_us) / 1e6
        full = span >= self.window * 0.9
        return {
            "efficiency": cpu_s / (span * parallel) if parallel and full else None,
            "rate": (last.steps - first.steps) / span,
            "window_s": span,
            "cores": self.cores,
            "agents": self.agents,
            "agent_cpu_s": cpu_s,
            "lost": last.lost - first.lost,
            "coordinator_cpu": (last.coordinator_cpu_s - first.coordinator_cpu_s) / span,
            "threshold": self.threshold,
            "alert": self.alerting,
        }

    def update(self, now: float) -> AlertEvent | None:
        """Advance the alert.  A raised alert's ``cause`` is empty: the caller, who can see
        the units, names it (:func:`explain`) and gives it back with :meth:`raised`."""
        f = self.figures()
        eff = f["efficiency"]
        fell = self._rate_fell(f, now)
        if fell is not None:
            f["rate_fell"] = fell
        if eff is None and fell is None:
            self._below_since = None
            if self.alerting and not self.agents:
                self.alerting = False
                return AlertEvent(False, 0.0, self.threshold, "no agents are stepping", f)
            return None
        if fell is not None or eff < self.threshold:
            if self._below_since is None:
                self._below_since = now
            if not self.alerting and now - self._below_since >= self.hold:
                self.alerting = True
                f["alert"] = True
                return AlertEvent(True, eff if eff is not None else 0.0, self.threshold, "", f)
            return None
        self._below_since = None
        if self.alerting:
            self.alerting = False
            f["alert"] = False
            return AlertEvent(False, eff, self.threshold, "efficiency recovered", f)
        return None

    def _rate_fell(self, f: dict, now: float) -> tuple[float, float] | None:
        """``(recent best, now)`` in steps per second per agent when the rate fell below
        1/RATE_FALL of the best full window of the last RATE_HISTORY; records one a window."""
        if f["rate"] is None or not self.agents or f["window_s"] < self.window * 0.9:
            return None
        per_agent = f["rate"] / self.agents
        best = max(self._history, default=None)
        if now - self._recorded_at >= self.window:
            self._history.append(per_agent)
            self._recorded_at = now
        if best is not None and per_agent * RATE_FALL < best:
            return best, per_agent
        return None

    def raised(self, event: AlertEvent, cause: str) -> AlertEvent:
        """The raised ``event`` with its cause named (kept as ``last_cause``)."""
        self.last_cause = cause
        return dataclasses.replace(event, cause=cause)

    def watch(self, s: Sample, agents: int, now: float, why) -> AlertEvent | None:
        """Sample, then raise or clear the alert (logged): the event, or None.  ``why``
        explains a raised alert from its figures."""
        self.sample(s, agents)
        event = self.update(now)
        if event is None:
            return None
        if event.raised:
            fell = event.figures.get("rate_fell")
            if event.figures["efficiency"] is not None and event.figures["efficiency"] < self.threshold:
                fell = None  # the efficiency says it: the rate is named only when it alone raised the alert
            cause = why(event.figures)
            if fell is not None:
                best, per_agent = fell
                cause = (f"the step rate fell to {per_agent:.3g}/s per agent from its recent {best:.3g} "
                         f"({best / max(per_agent, 1e-9):,.0f}x less), whatever the agents claim of their CPU; {cause}")
            event = self.raised(event, cause)
            if fell is None:
                log.warning("efficiency %.0f%% below the %.0f%% threshold for %.0f s: %s", event.efficiency * 100,
                            event.threshold * 100, self.hold, event.cause)
            else:
                log.warning("step rate fallen for %.0f s (efficiency %.0f%%, threshold %.0f%%): %s", self.hold,
                            event.efficiency * 100, event.threshold * 100, event.cause)
        else:
            log.info("efficiency alert cleared (%s): %s", f"{event.efficiency:.0%}" if event.efficiency else "-",
                     event.cause)
        return event


def explain(f: dict, stragglers: dict, slowest: list[tuple[str, float]], load: float) -> str:
    """What the coordinator can see behind a low efficiency, most telling first:
    ``f`` the figures, ``stragglers`` the straggler table, ``slowest`` the units with the
    longest median step (name, us), ``load`` the machine's load average."""
    causes = []
    if f["lost"]:
        causes.append(f"{f['lost']} steps lost (missed or late) in the last {f['window_s']:.0f} s")
        missing = [(name, c) for name, c in stragglers.items() if c["in_a_row"] or c["missed"]]
        if missing:
            causes.append("missing their deadlines: " + ", ".join(
                f"{name} ({c['missed']} missed, {c['late']} late)" for name, c in missing[:SLOWEST_NAMED]))
    if slowest:
        causes.append("slowest: " + ", ".join(f"{name} ({p50 / 1000:.1f} ms a step)" for name, p50 in slowest))
    if f["coordinator_cpu"] is not None and f["coordinator_cpu"] >= 0.85:
        causes.append(f"the coordinator uses {f['coordinator_cpu']:.0%} of a core: it is the bottleneck "
                      f"(hosts or async mode send fewer messages a step)")
    if load > f["cores"]:
        causes.append(f"the machine is overloaded: load {load:.1f} on {f['cores']} cores")
    if f["agents"] < f["cores"]:
        causes.append(f"only {f['agents']} agents for {f['cores']} cores")
    return "; ".join(causes) or "no cause visible from the coordinator (agents waiting on something else?)"
