"""bus-conformance (issue #13): our own agents and the page's minimal agent pass it, and an
agent that breaks one rule fails exactly that check."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentbus_zmq.busbench.conformance import CHECKS, HOST_CHECKS
from tests.conftest import cli_env
from tests.test_spec import _minimal_agent


#: the checks of a host, in the order the kit plays them
HOST_ORDER = ["single_frame", "hello_repeated", "ready_heartbeat", "one_action_per_observation", "host_member_moved",
              "heartbeat_when_idle", "stale_tick_tolerated", "host_reconnects_with_token", "rehello_after_restart",
              "bye_on_sigterm", "host_bye_names_its_members"]


def _conformance(*command: str, world: tuple[str, ...] = (), host: bool = False) -> dict:
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.busbench.conformance", "--format", "json", *world, "--",
                        *command],
                       capture_output=True, text=True, env=cli_env(), timeout=180, stdin=subprocess.DEVNULL)
    assert r.stdout.strip(), f"bus-conformance printed no report (exit {r.returncode}): {r.stderr[-3000:]}"
    report = json.loads(r.stdout)
    assert r.returncode == (0 if report["passed"] else 1)
    assert [c["name"] for c in report["checks"]] == (HOST_ORDER if host else list(CHECKS))
    return report


def _failed(report: dict) -> list[str]:
    return [c["name"] for c in report["checks"] if not c["passed"]]


@pytest.mark.parametrize("kind", ["null", "explorer"])
def test_our_agent_kinds_pass(kind):
    report = _conformance(sys.executable, "-m", "agentbus_zmq.agents", "--kind", kind, "--log-level", "ERROR")
    assert _failed(report) == [], report


def test_an_agent_passes_in_a_world_of_arrays_too():
    report = _conformance(sys.executable, "-m", "agentbus_zmq.agents", "--kind", "random", "--log-level", "ERROR",
                          world=("--world", "pettingzoo:mpe2.simple_spread_v3", "--world-arg", "N=2"))
    assert _failed(report) == [], report


def test_an_agent_that_answers_twice_fails_exactly_that_check(tmp_path):
    code = _minimal_agent()
    twice = "send(ACTION, msg[2], 4, 0); send(ACTION, msg[2], 4, 0)"
    assert "send(ACTION, msg[2], 4, 0)" in code
    script = tmp_path / "twice.py"
    script.write_text(code.replace("send(ACTION, msg[2], 4, 0)", twice, 1))
    report = _conformance(sys.executable, str(script))
    assert _failed(report) == ["one_action_per_observation"]
    (check,) = [c for c in report["checks"] if c["name"] == "one_action_per_observation"]
    assert "twice" in check["detail"]


def test_the_pages_minimal_agent_passes_one_line_per_check(tmp_path):
    script = tmp_path / "minimal.py"
    script.write_text(_minimal_agent())
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.busbench.conformance", "--", sys.executable, str(script)],
                       capture_output=True, text=True, env=cli_env(), timeout=180, stdin=subprocess.DEVNULL)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == len(CHECKS) + 1 and all(line.startswith("PASS") for line in lines[:-1])
    assert lines[-1] == f"{len(CHECKS)}/{len(CHECKS)} checks passed"


def test_an_agent_that_exits_fails_every_check_and_says_so():
    report = _conformance(sys.executable, "-c", "raise SystemExit(5)")
    assert _failed(report) == list(CHECKS)
    assert any("exited (status 5)" in c["detail"] for c in report["checks"])


def test_our_agent_host_passes_the_host_checks_too():
    assert sorted(HOST_ORDER) == sorted([*CHECKS, *HOST_CHECKS])
    report = _conformance(sys.executable, "-m", "agentbus_zmq.agents", "--kind", "null", "--replicas", "3",
                          "--per-host", "3", "--log-level", "ERROR", host=True)
    assert _failed(report) == [], report


#: A host written against the page alone, right in every respect but one: it answers every
#: frame with an action for each member it registered, whoever the frame lists.
_FIXED_COUNT_HOST = """
import os, signal, time
import numpy as np, zmq
from agentbus_zmq.bus import protocol as P

COUNT, stop = 3, []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
ctx = zmq.Context()


def connect():
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 500)
    s.connect(os.environ["BUS_ENDPOINT"])
    return s


def register(s, token=None):
    while not stop:
        s.send(P.encode(P.HostHello("fixed", "fixed", os.getpid(), "f", 0, COUNT, token)))
        if s.poll(500):
            msg = P.decode(s.recv())
            if type(msg) is P.HostWelcome:
                s.send(P.encode(P.Heartbeat()))
                return msg.params.get("token")


sock = connect()
token = register(sock)
heard = beat = time.monotonic()
while not stop:
    if sock.poll(100):
        heard, msg = time.monotonic(), P.decode(sock.recv())
        if type(msg) is P.HostObservation:
            sock.send(P.encode(P.HostAction(msg.tick, np.zeros(COUNT, np.uint8), 10)))
        elif type(msg) is P.Error and msg.code == P.ErrorCode.NOT_REGISTERED:
            token = register(sock)
    if time.monotonic() - heard > 1.5:        # the coordinator went quiet: a fresh socket, with the token
        sock.close(0)
        sock = connect()
        token, heard = register(sock, token), time.monotonic()
    if time.monotonic() - beat > 0.5:
        sock.send(P.encode(P.Heartbeat()))
        beat = time.monotonic()
sock.send(P.encode(P.Bye("sigterm")))
sock.close()
"""


def test_a_host_that_answers_for_members_it_no_longer_has_fails_exactly_that_check(tmp_path):
    script = tmp_path / "fixed.py"
    script.write_text(_FIXED_COUNT_HOST)
    report = _conformance(sys.executable, str(script), host=True)
    assert _failed(report) == ["host_member_moved"], report
    (check,) = [c for c in report["checks"] if c["name"] == "host_member_moved"]
    assert "0 with an action count" not in check["detail"], check
