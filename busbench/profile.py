"""``busbench --profile DIR``: sampling profiles of the coordinator and of one agent (or
host) process during the measured window, with py-spy.

For each process it writes the collapsed stacks (``NAME.txt``, flamegraph.pl's input), a
flame graph (``NAME.svg``, drawn here from those stacks) and a per-layer summary
(``summary.md``, ``summary.json``): where the samples' innermost frames were -- our
Python, pyzmq/libzmq, msgpack, pymdp/numpy/JAX, the kernel (system calls), other Python,
or idle (waiting in poll, select or sleep).

py-spy attaches with ptrace.  Where that is not permitted (no CAP_SYS_PTRACE in a
container, ``kernel.yama.ptrace_scope`` >= 2, py-spy not installed) the profile says why
and the benchmark measures anyway.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

__all__ = ["LAYERS", "Profiler", "classify", "flamegraph_svg", "summarise"]

#: Layers, in the order the summary lists them.
LAYERS = ("ours", "pyzmq/libzmq", "msgpack", "pymdp/numpy/jax", "kernel", "other Python", "idle")
#: Samples per second py-spy takes.
RATE_HZ = 100
_OURS = re.compile(r"(^|[/( ])(agentbus_zmq|coordinator|agents|bus|busbench)/[\w/]+\.py")
_WAITING = re.compile(r"\b(zmq_poll|Poller\.poll|poll \(zmq|select|epoll_wait|sleep|_wait_for_tstate_lock)\b")
_NATIVE_C = re.compile(r"\((libc\.so|libpthread|ld-linux|\[vdso\]|linux-vdso)")


def _layer_of(frame: str) -> str | None:
    """The layer one frame belongs to (None: cannot tell from this frame)."""
    if "msgpack" in frame:
        return "msgpack"
    if "zmq" in frame:
        return "pyzmq/libzmq"
    if any(k in frame for k in ("pymdp", "numpy", "jax", "jaxlib", "scipy", "equinox", "libopenblas", "libblas")):
        return "pymdp/numpy/jax"
    if _OURS.search(frame):
        return "ours"
    if _NATIVE_C.search(frame):
        return "kernel"
    return None


def classify(stack: list[str]) -> str:
    """The layer of one sample: idle if it waits (poll, select, sleep), else the layer of
    its innermost frame that says one.  libc frames belong to their caller, except under
    libzmq, whose libc calls are its system calls: the kernel's.  A Python frame of the
    standard library is other Python."""
    if any(_WAITING.search(f) for f in stack[-8:]):
        return "idle"
    in_libc = False
    for frame in reversed(stack):
        layer = _layer_of(frame)
        if layer == "kernel":          # libc: whose call is it? a system call of libzmq's is the kernel's
            in_libc = True
            continue
        if layer is not None:
            return "kernel" if in_libc and layer == "pyzmq/libzmq" else layer
        if "(" in frame and ".py:" in frame:
            return "other Python"
    return "kernel" if in_libc else "other Python"


def parse_collapsed(text: str) -> Counter:
    """``frame;frame;... count`` lines -> Counter of stacks (tuples)."""
    stacks: Counter = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def summarise(stacks: Counter) -> dict:
    """Share of samples per layer."""
    per = Counter()
    for stack, n in stacks.items():
        per[classify(list(stack))] += n
    total = sum(per.values())
    return {"samples": total, "layers": {layer: per[layer] / total if total else 0.0 for layer in LAYERS}}


def flamegraph_svg(stacks: Counter, title: str, width: int = 1200, row: int = 16) -> str:
    """A flame graph (root at the bottom; width = share of samples) as standalone SVG."""
    tree: dict = {}
    for stack, n in stacks.items():
        node = tree
        for frame in stack:
            child = node.setdefault(frame, {"n": 0, "kids": {}})
            child["n"] += n
            node = child["kids"]
    total = sum(stacks.values()) or 1

    def depth(node: dict) -> int:
        return 1 + max((depth(c["kids"]) for c in node.values()), default=0)

    rows = depth(tree)
    height = (rows + 2) * row
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" '
           f'font-size="11">', '<rect width="100%" height="100%" fill="#fff"/>',
           f'<text x="6" y="13">{html.escape(title)} ({total} samples)</text>']

    def draw(node: dict, x0: float, level: int) -> None:
        x = x0
        for frame, child in sorted(node.items()):
            w = child["n"] / total * width
            if w >= 0.5:
                y = height - (level + 1) * row
                layer = classify([frame])
                colour = {"ours": "#e8743b", "pyzmq/libzmq": "#5b9bd5", "msgpack": "#a5a5a5",
                          "pymdp/numpy/jax": "#70ad47", "kernel": "#c00000", "idle": "#dddddd"}.get(layer, "#ffc000")
                label = html.escape(frame)
                out.append(f'<g><title>{label} ({child["n"]} samples, {child["n"] / total:.1%})</title>'
                           f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" fill="{colour}"/>')
                chars = int(w / 7)
                if chars >= 3:
                    text = frame if len(frame) <= chars else frame[:chars - 1] + "…"
                    out.append(f'<text x="{x + 2:.1f}" y="{y + row - 4}">{html.escape(text)}</text>')
                out.append("</g>")
                draw(child["kids"], x, level + 1)
            x += w

    draw(tree, 0.0, 0)
    out.append("</svg>")
    return "\n".join(out)


@dataclasses.dataclass
class _Target:
    name: str
    pid: int
    proc: subprocess.Popen | None = None
    error: str | None = None


class Profiler:
    """py-spy on a few processes at once, for ``duration`` seconds, into ``directory``."""

    def __init__(self, directory: str | os.PathLike, duration: float):
        self.dir = Path(directory)
        self.duration = max(1.0, duration)
        self.targets: list[_Target] = []
        self.error: str | None = None
        self.py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not os.path.exists(self.py_spy):
            self.error = "py-spy is not installed (pip install 'agentbus-zmq[bench]')"

    def start(self, targets: dict[str, int]) -> None:
        """Start sampling ``{name: pid}``; returns at once."""
        if self.error:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, pid in targets.items():
            t = _Target(name, pid)
            try:
                t.proc = subprocess.Popen(
                    [self.py_spy, "record", "--pid", str(pid), "--duration", str(int(round(self.duration))),
                     "--rate", str(RATE_HZ), "--native", "--idle", "--format", "raw",
                     "--output", str(self.dir / f"{name}.txt")],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            except OSError as exc:
                t.error = f"cannot run py-spy: {exc}"
            self.targets.append(t)

    def finish(self, timeout: float = 30.0) -> dict:
        """Wait (bounded) for the samplers, write the flame graphs and the summary; the
        report's ``profile`` entry."""
        if self.error:
            return {"error": self.error}
        deadline = time.monotonic() + timeout
        result: dict = {"dir": str(self.dir), "files": [], "processes": {}}
        for t in self.targets:
            output = ""
            if t.proc is not None:
                try:
                    output, _ = t.proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    t.proc.kill()
                    output, _ = t.proc.communicate()
                    t.error = "py-spy did not finish in time"
                if t.proc.returncode != 0 and t.error is None:
                    t.error = _why(output)
            raw = self.dir / f"{t.name}.txt"
            if t.error is None and raw.exists():
                stacks = parse_collapsed(raw.read_text())
                svg = self.dir / f"{t.name}.svg"
                svg.write_text(flamegraph_svg(stacks, f"{t.name} (pid {t.pid})"))
                result["processes"][t.name] = {"pid": t.pid, **summarise(stacks), "flamegraph": str(svg),
                                               "stacks": str(raw)}
                result["files"] += [str(svg), str(raw)]
            else:
                result["processes"][t.name] = {"pid": t.pid, "error": t.error or "py-spy wrote nothing"}
        (self.dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        (self.dir / "summary.md").write_text(summary_markdown(result))
        result["files"] += [str(self.dir / "summary.md"), str(self.dir / "summary.json")]
        return result


def _why(output: str) -> str:
    text = " ".join(output.split())[-300:]
    if "ermission" in output or "ptrace" in output.lower() or "Operation not permitted" in output:
        return ("profiling is not permitted here (py-spy needs ptrace: run as root, grant CAP_SYS_PTRACE, or set "
                f"kernel.yama.ptrace_scope to 0 or 1): {text}")
    return f"py-spy failed: {text}"


def summary_markdown(result: dict) -> str:
    lines = ["# busbench profile", "", "Share of samples by layer (innermost frame; idle = waiting in poll, "
             "select or sleep):", "", "| process | samples | " + " | ".join(LAYERS) + " |",
             "|---|---:|" + "---:|" * len(LAYERS)]
    for name, p in result["processes"].items():
        if "error" in p:
            lines.append(f"| {name} (pid {p['pid']}) | - | {p['error']} |")
            continue
        lines.append(f"| {name} (pid {p['pid']}) | {p['samples']} | "
                     + " | ".join(f"{p['layers'][layer]:.0%}" for layer in LAYERS) + " |")
    lines += ["", "Flame graphs: " + ", ".join(f"`{Path(p['flamegraph']).name}`" for p in result["processes"].values()
                                              if "flamegraph" in p)]
    return "\n".join(lines) + "\n"
