"""Peers that follow the protocol with bad intent, and a hostile coordinator (issue #11).

Each test plays one finding of docs/security.md's threat model as an attacker would, with
only the documented protocol, over real sockets against real processes, in bounded time,
and checks that the bus held.  Rules that live in the coordinator's core alone (measure
arguments, the log's rate limit, slow and mute stragglers) are tested there, with a fake
clock (test_core.py), not again here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import zmq

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus import sockets
from agentbus_zmq.agents.runtime import EXIT_REPLACED
from agentbus_zmq.bus.client import ControlClient
from agentbus_zmq.busbench.procs import Child
from tests.conftest import cli_env, wait_until

WORLD = {"width": 5, "height": 5, "obstacles": [], "goals": [], "outcomes": ["e"] * 5, "actions": ["a"] * 5}


def _recv(sock: zmq.Socket, timeout_ms: int = 3000):
    assert sock.poll(timeout_ms), "no answer in time"
    return P.decode(sock.recv())


def _next(sock: zmq.Socket, mtype: type, timeout: float = 5.0):
    """The next message of ``mtype`` (heartbeats and the rest skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.poll(100):
            msg = P.decode(sock.recv())
            if type(msg) is mtype:
                return msg
    pytest.fail(f"no {mtype.__name__} within {timeout} s")


def _drain(sock: zmq.Socket) -> list:
    out = []
    while sock.poll(0):
        out.append(P.decode(sock.recv()))
    return out


# --- identity ----------------------------------------------------------------------------


def test_a_hello_flood_with_a_live_agents_id_never_takes_it(bus):
    bus.coordinator()
    bus.agents(1, "--kind", "null", agent_id="victim")
    stats = bus.wait_agents(1)
    victim_pid = stats["agent_pids"]["victim"]
    thief = sockets.dealer(bus.endpoint)
    try:
        got = []
        steps_before = bus.stats()["ledger"]["received"]
        for _ in range(100):                               # HELLO every 10 ms for a second
            thief.send(P.encode(P.Hello("victim", "null", os.getpid())))
            time.sleep(0.01)
            got += _drain(thief)
        got += _drain(thief) if thief.poll(500) else []
        assert got and all(type(m) is P.Error and m.code == P.ErrorCode.ID_TAKEN for m in got)
        stats = bus.stats()
        assert stats["agent_pids"]["victim"] == victim_pid and stats["restarts"] == {}
        assert stats["ledger"]["received"] > steps_before + 100  # the victim stepped on throughout
    finally:
        thief.close(linger=0)


def test_an_agent_building_its_model_keeps_its_id_against_a_hello_flood(bus):
    """An agent silent for 2.5 s in on_start (past liveness, 1.5 s; inside the setup grace)
    used to be taken over by any tokenless HELLO; now it gets ready under its id."""
    bus.coordinator()
    bus.agents(1, "--kind", "tests.kinds_demo:SlowStart", agent_id="builder")
    thief = sockets.dealer(bus.endpoint)
    try:
        wait_until(lambda: "builder" in bus.stats()["agent_ids"], 20, "the agent's HELLO")
        answers, start = [], time.monotonic()
        while time.monotonic() - start < 4.0:
            thief.send(P.encode(P.Hello("builder", "thief", os.getpid())))
            time.sleep(0.05)
            answers += _drain(thief)
        stats = bus.wait_agents(1, timeout=20)
        assert answers and all(type(m) is P.Error and m.code == P.ErrorCode.ID_TAKEN for m in answers), answers[:3]
        assert stats["agent_ids"] == ["builder"] and stats["restarts"] == {}
    finally:
        thief.close(linger=0)


def test_a_host_connection_churning_its_members_is_refused_and_keeps_its_first_registration(bus):
    """HOST_HELLO alternating `first` between 0 and 4,096, 30 frames a second, re-placed
    4,096 agents a frame (the issue measured two null agents' lock-step cut to 0.7 %).
    Now the connection keeps the host it registered: a change within liveness gets BUSY
    and costs a comparison, the same HOST_HELLO again costs nothing, and lock-step goes on."""
    bus.coordinator(None, "--max-arenas", "1000")
    bus.agents(2, "--kind", "null")
    bus.wait_agents(2)
    churner = sockets.dealer(bus.endpoint)
    try:
        churner.send(P.encode(P.HostHello("churner", "raw", os.getpid(), "c", 0, 4096)))
        _next(churner, P.HostWelcome)
        churner.send(P.encode(P.Heartbeat()))
        tick, busy, start = bus.stats()["tick"], 0, time.monotonic()
        for frame in range(30):
            churner.send(P.encode(P.HostHello("churner", "raw", os.getpid(), "c", 4096 * ((frame + 1) % 2), 4096)))
            end = time.monotonic() + 1 / 30
            while time.monotonic() < end:
                for msg in _drain(churner):
                    if type(msg) is P.HostObservation:
                        churner.send(P.encode(P.HostAction(msg.tick, np.full(len(msg.members), 4, np.uint8), 0)))
                    elif type(msg) is P.Error and msg.code == P.ErrorCode.BUSY:
                        busy += 1
                time.sleep(0.001)
        elapsed = time.monotonic() - start
        stats = bus.stats()
        assert busy >= 14 and stats["agents"] == 4098 and stats["hosts"] == 1, (busy, stats["agents"])
        assert stats["tick"] - tick > 20 * elapsed and stats["ledger"]["balanced"]   # lock-step went on
    finally:
        churner.close(linger=0)


def test_a_hello_flood_is_not_reflected_onto_the_agent_whose_id_it_names(bus):
    """Each refused HELLO used to probe the holder with a HEARTBEAT, unthrottled: a thief
    could make the bus send its victim tens of thousands a second.  Now at most one probe
    per heartbeat interval (0.5 s) reaches it, whatever the thief sends."""
    bus.coordinator(None, "--mode", "async", "--heartbeat", "0.5")
    victim, thief = sockets.dealer(bus.endpoint), sockets.dealer(bus.endpoint)
    try:
        victim.send(P.encode(P.Hello("victim", "raw", os.getpid())))
        _next(victim, P.Welcome)
        victim.send(P.encode(P.Heartbeat()))                  # ready
        heartbeats = refused = 0
        start = time.monotonic()
        while time.monotonic() - start < 1.0:                 # 1 s of HELLOs, as fast as they go
            for _ in range(50):
                thief.send(P.encode(P.Hello("victim", "raw", os.getpid())))
            for msg in _drain(victim):
                if type(msg) is P.Heartbeat:
                    heartbeats += 1
                elif type(msg) is P.Observation:              # it answers and stays alive
                    victim.send(P.encode(P.Action(msg.tick, 4, 0)))
            refused += sum(type(m) is P.Error and m.code == P.ErrorCode.ID_TAKEN for m in _drain(thief))
            victim.send(P.encode(P.Heartbeat()))
        elapsed = time.monotonic() - start
        assert refused >= 100, refused
        assert heartbeats <= elapsed / 0.5 + 3, (heartbeats, refused)  # probes, plus the regular beat
        assert bus.stats()["agent_ids"] == ["victim"]
    finally:
        victim.close(linger=0)
        thief.close(linger=0)


def test_a_second_connection_with_a_routing_id_in_use_is_ignored(bus):
    bus.coordinator()
    first, second = sockets.dealer(bus.endpoint, identity=b"same"), None
    try:
        first.send(P.encode(P.Hello("first", "null", 0)))
        assert type(_recv(first)) is P.Welcome
        second = sockets.dealer(bus.endpoint, identity=b"same")
        second.send(P.encode(P.Hello("second", "null", 0)))
        assert not second.poll(1000)                      # no handover: never attached
        first.send(P.encode(P.Heartbeat()))               # the first connection is still the one served
        _next(first, P.Observation)
        assert "second" not in bus.stats().get("agent_ids", [])
    finally:
        first.close(linger=0)
        if second is not None:
            second.close(linger=0)


def test_an_agent_restarted_in_a_new_process_gets_its_id_back(bus):
    """The other side of refusing takeovers: a real restart is never locked out."""
    bus.coordinator()
    bus.agents(1, "--kind", "null", "--restart", "--restart-backoff", "0.05")
    old = bus.wait_agents(1)["agent_pids"]["t"]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: (s := bus.stats())["ready"] == 1 and s["agent_pids"].get("t") not in (None, old), 20,
               "the restarted agent to step under its id")


# --- admission ---------------------------------------------------------------------------


def test_squatters_neither_lock_out_agents_nor_hold_cells_once_gone(bus):
    # 5x5, 3 obstacles, one arena: 22 cells; a setup grace long enough that only the closed
    # connections can free them within the test.
    bus.coordinator(None, "--max-arenas", "1", "--obstacles", "3", "--setup-grace", "120")
    squatters = [sockets.dealer(bus.endpoint) for _ in range(23)]
    try:
        for i, s in enumerate(squatters):
            s.send(P.encode(P.Hello(f"squat-{i}", "null", 0)))
        replies = [type(_recv(s)) for s in squatters]
        assert replies.count(P.Welcome) == 22 and replies.count(P.Error) == 1  # the world is full
        assert bus.stats()["pending"] == 22
        for s in squatters:
            s.close(linger=0)
        squatters = []
        wait_until(lambda: bus.stats()["agents"] == 0, 10, "closed connections to free their registrations")
        bus.agents(2, "--kind", "null")
        bus.wait_agents(2, timeout=20)
    finally:
        for s in squatters:
            s.close(linger=0)


def test_a_measurement_whose_client_left_does_not_hold_the_slot(bus):
    bus.coordinator()
    bus.agents(1, "--kind", "null")
    bus.wait_agents(1)
    with ControlClient(bus.endpoint) as gone:
        gone.send("measure", {"agents": 1000, "steps": 10, "timeout_s": 7 * 86_400})
        wait_until(lambda: bus.stats()["measurements"]["running"], 5, "the first measurement to start")
    # its connection is closed: the next client is served, within its own timeout
    r = bus.client.request("measure", {"agents": 1, "steps": 50}, timeout=20)
    assert r["steps"] == 50 and bus.stats()["ledger"]["errors"]["measures_cancelled"] == 1


# --- memory and log amplification ----------------------------------------------------------


def test_clients_that_never_read_cannot_park_unbounded_replies(bus):
    bus.coordinator()
    host = sockets.dealer(bus.endpoint)                   # 1,000 registered agents: big stats pages
    host.send(P.encode(P.HostHello("big", "null", 0, "big-", 0, 1000)))
    assert type(_recv(host)) is P.HostWelcome
    coord = psutil.Process(bus.coordinator_child.pid)
    rss_before = coord.memory_info().rss
    page = bus.client.request("stats", {"page": 0})
    page_bytes = len(P.encode(P.Reply(1, True, page)))
    # Clients that keep one reply at most on their side: the rest stays in the coordinator.
    clients = [sockets.dealer(bus.endpoint, hwm=1) for _ in range(20)]
    try:
        request = P.encode(P.Control(1, "stats", {"page": 0}))
        for c in clients:
            c.setsockopt(zmq.SNDHWM, 1000)
        for _ in range(300):                               # 6,000 pages asked for, none read
            for c in clients:
                try:
                    c.send(request, zmq.NOBLOCK)
                except zmq.Again:
                    pass
        asked = 20 * 300
        wait_until(lambda: bus.stats()["ledger"]["undeliverable"] > asked // 2, 60,
                   "the coordinator to answer, and drop what nobody reads")
        growth = (coord.memory_info().rss - rss_before) / 2**20
        # Parked, a queue of 1,000 a peer would hold 20 x 300 pages (~50 MB of these, and
        # 4x that with the former 512-agent pages); 64 a peer hold ~11 MB.
        assert growth < 40, f"RSS grew {growth:.0f} MB (pages of {page_bytes} B)"
        assert bus.stats()["agents"] == 1000               # and it is still serving
    finally:
        for c in clients:
            c.close(linger=0)
        host.close(linger=0)


def test_a_world_whose_welcome_would_not_fit_is_refused_at_start(tmp_path):
    r = subprocess.run([sys.executable, "-m", "agentbus_zmq.coordinator", "--bind", f"ipc://{tmp_path}/c.ipc",
                        "--width", "300", "--height", "100", "--obstacles", "23000"],
                       capture_output=True, text=True, env=cli_env(), timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "WELCOME would be" in r.stderr and "--obstacles" in r.stderr


def test_running_out_of_file_descriptors_is_counted_and_logged_and_serving_goes_on(tmp_path):
    endpoint_file = tmp_path / "endpoint"
    log_path = tmp_path / "coordinator.log"
    with open(log_path, "wb") as log:
        # a hard limit of 48 descriptors (the coordinator raises only its soft limit)
        coord = subprocess.Popen(["bash", "-c", f"ulimit -n 48 && exec {sys.executable} -m agentbus_zmq.coordinator "
                                  f"--bind tcp://127.0.0.1:* --endpoint-file {endpoint_file}"],
                                 stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=cli_env(), start_new_session=True)
    socks = []
    try:
        endpoint = wait_until(lambda: endpoint_file.exists() and endpoint_file.read_text().strip(), 20, "the bind")
        with ControlClient(endpoint) as client:
            client.wait_ready(10)
            socks = [sockets.dealer(endpoint) for _ in range(60)]   # more than it has descriptors for
            stats = wait_until(lambda: (s := client.request("stats"))["connections"].get("accept_failed") and s, 10,
                               "accept failures to be counted")
            for s in socks:
                s.close(linger=0)
            socks = []
            assert client.request("ping")["session"] == stats["session"]     # still serving
        text = log_path.read_text()
        assert "cannot accept a connection: EMFILE" in text
        assert text.count("cannot accept a connection") <= 21 * 15           # rate-limited, whatever libzmq retries
    finally:
        for s in socks:
            s.close(linger=0)
        os.killpg(coord.pid, signal.SIGKILL)
        coord.wait(10)


# --- busbench kills only what it started ---------------------------------------------------


def test_chaos_never_kills_a_pid_a_peer_claimed():
    from agentbus_zmq.bus.report import Roster
    from agentbus_zmq.busbench.run import Chaos

    bystander = subprocess.Popen(["sleep", "60"])
    ours = subprocess.Popen(["sleep", "60"])
    try:
        chaos = Chaos(rate=1e9)                           # kill at every chance
        claimed = Roster(agent_pids={"liar": bystander.pid, "zero": 0, "self": os.getpid(), "ours": ours.pid},
                         ready_ids=["liar", "zero", "self", "ours"])
        for t in range(20):
            chaos.step(float(t), claimed, {ours.pid})
        assert bystander.poll() is None and chaos.kills == 1
        assert ours.wait(5) == -signal.SIGKILL
    finally:
        for p in (bystander, ours):
            p.kill()
            p.wait()


def test_code_planted_in_the_working_directory_does_not_run_inside_bus_agent(bus, tmp_path):
    """A ``pymdp/`` planted where bus-agent starts is never imported in place of the real
    one, for a built-in kind or for a module:Class kind that lives right there (whose
    directory is searched last, and only because it asked)."""
    bus.coordinator()
    work, marker = tmp_path / "work", tmp_path / "planted-ran"
    (work / "pymdp").mkdir(parents=True)
    (work / "pymdp" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(9)\n")
    (work / "mykind.py").write_text("import pymdp\nfrom agentbus_zmq.agents.kinds.null import NullAgent\n\n\n"
                                    "class Mine(NullAgent):\n    kind = 'mine'\n")
    exe = os.path.join(os.path.dirname(sys.executable), "bus-agent")
    procs = [subprocess.Popen([exe, "--endpoint", bus.endpoint, "--kind", kind, "--id", agent_id, "--log-level",
                               "WARNING"], cwd=work, env=cli_env(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
             for kind, agent_id in (("explorer", "e1"), ("mykind:Mine", "m1"))]
    try:
        stats = bus.wait_agents(2, timeout=60)
        assert sorted(stats["agent_ids"]) == ["e1", "m1"] and not marker.exists()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)


# --- a hostile coordinator -----------------------------------------------------------------


@pytest.fixture
def fake_coordinator(tmp_path):
    endpoint = f"ipc://{tmp_path}/fake.ipc"
    router = sockets.router(endpoint)
    children: list[Child] = []

    def start(*args: str, name: str = "agent") -> Child:
        child = Child(name, "agentbus_zmq.agents", ["--endpoint", endpoint, "--id", "a1", "--log-level", "INFO",
                                                    *args], log_path=str(tmp_path / f"{name}.log"))
        children.append(child)
        return child

    try:
        yield router, start
    finally:
        for c in children:
            c.stop()
        router.close(linger=0)


def _hello(router: zmq.Socket, timeout_ms: int = 30_000) -> bytes:
    deadline = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < deadline:
        if router.poll(200):
            peer, frame = router.recv_multipart()
            if type(P.decode(frame)) is P.Hello:
                return peer
    pytest.fail("no HELLO from the agent")


@pytest.mark.parametrize("world, expect", [
    ({**WORLD, "width": 0}, "width must be an integer"),
    ({**WORLD, "width": -5}, "width must be an integer"),
    ({**WORLD, "width": 10**9}, "width must be an integer"),
    ({**WORLD, "width": 300, "height": 300}, "MB for the explorer's model"),
    ({**WORLD, "obstacles": [10**6]}, "obstacles must be a list of cell indices"),
    ({k: v for k, v in WORLD.items() if k != "goals"}, "lacks goals"),
    ("not a map", "must be a map"),
])
def test_a_crafted_welcome_stops_the_explorer_cleanly(fake_coordinator, world, expect):
    router, start = fake_coordinator
    agent = start("--kind", "explorer")
    peer = _hello(router)
    router.send_multipart([peer, P.encode(P.Welcome("evil", "a1", {"world": world}))])
    proc = psutil.Process(agent.pid)
    peak = 0
    deadline = time.monotonic() + 30
    while agent.proc.poll() is None and time.monotonic() < deadline:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    assert agent.proc.wait(5) == 3                        # EXIT_AGENT_FAILED, not a crash
    assert peak < 1 << 30, f"the agent reached {peak / 2**20:.0f} MB"
    bye = None
    while router.poll(500):
        msg = P.decode(router.recv_multipart()[1])
        bye = msg if type(msg) is P.Bye else bye
    assert bye is not None and expect in bye.reason      # it said why, as it left
    log = open(agent.log_path).read()
    assert expect in log and "Traceback" not in log


def _spaces(obs: dict, act: dict) -> dict:
    return {"kind": "hostile", "spaces": {"observation": obs, "action": act}}


_MODEL_7x64 = {"A": [np.ones((1, 1, 1, 1, 1, 1, 1, 1))], "B": [np.ones((1, 1, 64))] * 7,
               "C": [np.zeros(1)], "D": [np.ones(1)] * 7}


@pytest.mark.parametrize("kind, world, expect", [
    ("learner", _spaces({"type": "multi_discrete", "nvec": [1024, 2**20]}, {"type": "discrete", "n": 1024}), "MB"),
    ("learner", _spaces({"type": "discrete", "n": 1024}, {"type": "discrete", "n": 2**32}), "MB"),
    ("explorer", {"kind": "pymdp", "model": _MODEL_7x64}, "policies"),
    ("explorer", {"kind": "pymdp", "model": {**_MODEL_7x64, "control_factors": [0, 1, 2, 3, 4, 5, 6]}}, "policies"),
], ids=["learner-nvec", "learner-actions", "explorer-64**7-policies", "explorer-controlled"])
def test_a_welcome_within_the_spaces_limits_cannot_exhaust_an_agent(fake_coordinator, kind, world, expect):
    router, start = fake_coordinator
    agent = start("--kind", kind)
    peer = _hello(router)
    proc = psutil.Process(agent.pid)
    base = proc.memory_info().rss
    sent = time.monotonic()
    router.send_multipart([peer, P.encode(P.Welcome("evil", "a1", {"world": world}))])
    bye, peak = None, 0
    while bye is None and time.monotonic() < sent + 30:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
        if router.poll(10):
            msg = P.decode(router.recv_multipart()[1])
            bye = msg if type(msg) is P.Bye else None
    took = time.monotonic() - sent
    assert bye is not None and expect in bye.reason and "--max-model-mb" in bye.reason, bye
    assert agent.proc.wait(10) == 3
    assert took < 5 and peak - base < 200 << 20, f"{took:.2f} s, grew {(peak - base) / 2**20:.0f} MB"


def test_a_reward_that_is_not_finite_is_refused_and_the_agent_steps_on(fake_coordinator):
    router, start = fake_coordinator
    agent = start("--kind", "learner")
    peer = _hello(router)
    world = _spaces({"type": "multi_discrete", "nvec": [4, 2]}, {"type": "discrete", "n": 3})
    router.send_multipart([peer, P.encode(P.Welcome("evil", "a1", {"world": world}))])
    for tick, reward in enumerate((float("nan"), float("inf"), -1e308, 1.0, -float("inf"), 0.5)):
        router.send_multipart([peer, P.encode(P.Observation(tick, [tick % 4, 0], {"reward": reward, "episode": 0}))])
    got, deadline = [], time.monotonic() + 30
    while len([m for m in got if type(m) is P.Action]) < 6 and time.monotonic() < deadline:
        if router.poll(200):
            got.append(P.decode(router.recv_multipart()[1]))
    assert [m.tick for m in got if type(m) is P.Action] == list(range(6))     # every observation answered
    errors = [m for m in got if type(m) is P.Error]
    assert len(errors) == 3 and all(e.code == P.ErrorCode.BAD_FIELD and "not a finite number" in e.reason
                                    for e in errors)
    assert agent.proc.poll() is None


def test_an_out_of_range_observation_is_reported_and_skipped(fake_coordinator):
    router, start = fake_coordinator
    agent = start("--kind", "explorer")
    peer = _hello(router)
    router.send_multipart([peer, P.encode(P.Welcome("evil", "a1", {"world": WORLD}))])
    for tick, obs in enumerate(([25, 0], [0, 9], [2**31, 0], [1], [3, 0])):  # 25 cells: 0..24; 5 outcomes
        router.send_multipart([peer, P.encode(P.Observation(tick, obs))])
    got, deadline = [], time.monotonic() + 30
    while not any(type(m) is P.Action for m in got) and time.monotonic() < deadline:
        if router.poll(200):
            got.append(P.decode(router.recv_multipart()[1]))
    errors = [m for m in got if type(m) is P.Error]
    actions = [m for m in got if type(m) is P.Action]
    assert [a.tick for a in actions] == [4] and len(errors) == 4
    assert all(e.code == P.ErrorCode.BAD_FIELD and "refused" in e.reason for e in errors)
    assert agent.proc.poll() is None


def test_an_agent_that_cannot_start_is_restarted_only_with_back_off(fake_coordinator):
    router, start = fake_coordinator
    start("--kind", "explorer", "--restart", "--max-restarts", "100")
    hellos: list[float] = []
    deadline = time.monotonic() + 30
    while len(hellos) < 3 and time.monotonic() < deadline:
        if router.poll(100):
            peer, frame = router.recv_multipart()
            if type(P.decode(frame)) is P.Hello:
                hellos.append(time.monotonic())
                router.send_multipart([peer, P.encode(P.Welcome("evil", "a1", {"world": "x"}))])  # it exits 3
    assert len(hellos) == 3, "the agent was not restarted"
    gaps = [b - a for a, b in zip(hellos, hellos[1:])]
    assert min(gaps) >= 0.5 and gaps[1] > gaps[0], f"restarts {gaps} s apart: no back-off"


def test_an_address_that_never_gets_ready_cannot_keep_a_real_agent_out(bus):
    """Registrations that never get ready, from new connections with new ids, used to hold
    every pending place (a real agent got BUSY for 19-75 s): one address holds half of
    them, and an agent from another address registers at once."""
    endpoint = bus.coordinator("tcp://127.0.0.1:*", "--max-pending", "64", "--setup-grace", "120")
    squatting = f"tcp://127.0.0.2:0;{endpoint.removeprefix('tcp://')}"   # from another loopback address
    squatters = []
    try:
        codes = []
        for i in range(80):
            s = sockets.dealer(squatting)
            squatters.append(s)
            s.send(P.encode(P.Hello(f"squat-{i}", "null", 0)))
            m = _recv(s)
            codes.append(m.code if type(m) is P.Error else type(m).__name__)
        assert codes.count("Welcome") == 32 and codes.count(P.ErrorCode.BUSY) == 48, codes
        assert bus.stats()["pending"] == 32
        agent = bus.agents(1, "--kind", "null")                    # from 127.0.0.1
        wait_until(lambda: bus.stats()["ready"] == 1, 30, "the agent to step beside 32 squatters")
        assert "BUSY" not in open(agent.log_path).read()          # in at the first HELLO
    finally:
        for s in squatters:
            s.close(linger=0)


def test_squatters_from_eight_addresses_filling_the_pending_places_cannot_keep_a_real_agent_out(bus):
    """Squatters from 127.0.0.2 .. 127.0.0.9 hold all of --max-pending 8 and keep
    registering from new connections with new ids: a real agent from 127.0.0.1 used to get
    BUSY for good.  It displaces the stalest and steps within seconds."""
    endpoint = bus.coordinator("tcp://127.0.0.1:*", "--max-pending", "8", "--setup-grace", "120")
    port = endpoint.rpartition(":")[2]
    squatters: list = []

    def squat(n: int) -> None:
        for i in range(8):
            s = sockets.dealer(f"tcp://127.0.0.{2 + i}:0;127.0.0.1:{port}")
            squatters.append(s)
            s.send(P.encode(P.Hello(f"squat-{n}-{i}", "null", 0)))

    try:
        squat(0)
        wait_until(lambda: bus.stats()["pending"] == 8, 10, "the squatters to hold every pending place")
        agent = bus.agents(1, "--kind", "null")
        started, n = time.monotonic(), 1
        while bus.stats()["ready"] < 1:
            assert time.monotonic() - started < 30, "the real agent never got in"
            squat(n)                                   # renewing from new connections, new ids
            n += 1
            time.sleep(0.3)
        log = open(agent.log_path).read()
        assert log.count("BUSY") <= 12, log            # in within about 5 s of HELLOs (every 0.5 s)
        assert bus.stats()["ledger"]["errors"].get("displaced", 0) >= 1
    finally:
        for s in squatters:
            s.close(linger=0)


def test_a_squatter_holding_an_agents_id_costs_it_retries_never_its_life(bus):
    """Without CURVE, ids are first come: a squatter that registered an agent's id first
    (right after a coordinator restart, say) gets the agent refused ID_TAKEN.  The agent
    keeps asking (it backs off after a minute, docs/protocol.md) and steps once the id is
    free; it used to exit 6 after a minute, and its launcher restarted nothing."""
    bus.coordinator()
    squatter = sockets.dealer(bus.endpoint)
    try:
        squatter.send(P.encode(P.Hello("t", "null", 0)))
        assert type(_recv(squatter)) is P.Welcome
        agent = bus.agents(1, "--kind", "null", "--restart")
        refused, deadline = 0, time.monotonic() + 30
        while refused < 6:                        # the squatter stays alive: refused again and again
            assert time.monotonic() < deadline, "the agent was not refused"
            squatter.send(P.encode(P.Heartbeat()))
            _drain(squatter)
            refused = open(agent.log_path).read().count("its id is held by another live connection")
            time.sleep(0.2)
        assert agent.proc.poll() is None
        squatter.send(P.encode(P.Bye("done squatting")))   # ... then goes: the agent is in
    finally:
        squatter.close(linger=100)
    wait_until(lambda: bus.stats()["ready"] == 1, 30, "the agent to step once its id is free")
    assert agent.proc.poll() is None and "exit status" not in open(agent.log_path).read()


def test_an_agent_whose_id_was_taken_over_stops_and_is_not_restarted(fake_coordinator):
    router, start = fake_coordinator
    launcher = start("--kind", "null", "--restart", "--restart-backoff", "0.05")
    peer = _hello(router)
    router.send_multipart([peer, P.encode(P.Welcome("s", "a1", {"world": WORLD, "token": "t"}))])
    router.send_multipart([peer, P.encode(P.Error(P.ErrorCode.REPLACED, "taken over"))])
    # it reports it and does not fight for the id; its only failure was a refusal for good,
    # so the launcher exits with that status (which systemd is told not to restart)
    assert launcher.proc.wait(20) == EXIT_REPLACED
    log = open(launcher.log_path).read()
    assert "not restarted" in log and "taken over" in log
    hellos = [m for m in _drain(router_frames(router)) if type(m) is P.Hello]
    assert hellos == []


def router_frames(router: zmq.Socket):
    """What the fake coordinator still holds, as a socket-like for _drain."""
    class Frames:
        def poll(self, timeout=0):
            return router.poll(timeout)

        def recv(self):
            return router.recv_multipart()[1]

    return Frames()


def _serve_agents_pages(router: zmq.Socket, proc: subprocess.Popen, pages: int, rows: int) -> list[int]:
    """Answer every ``agents`` request as a hostile coordinator would (claiming ``pages``
    pages of ``rows`` rows each) until busctl exits; the pages it asked for."""
    asked: list[int] = []
    row = {"id": "\x1b[2J[link=http://evil]x[/link]", "pid": 1, "host": "", "kind": "k", "state": "stepping",
           "steps": 1, "late": 0, "missed": 0, "slow": 0, "last_seen_s": 0.0}
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if not router.poll(100):
            continue
        peer, frame = router.recv_multipart()
        msg = P.decode(frame)
        if type(msg) is P.Control and msg.command == "agents":
            asked.append(msg.args.get("page", 0))
            result = {"page": asked[-1], "pages": pages, "agents": [row] * rows}
            router.send_multipart([peer, P.encode(P.Reply(msg.request_id, True, result))])
    return asked


def test_busctl_asks_for_the_pages_it_shows_whatever_a_coordinator_claims(tmp_path):
    """``pages: 10**9`` once made busctl agents ask for ever, and 200 rows a page made each
    page as big as the coordinator liked: --limit 5 now asks for the first page only
    (pages are in id order) and keeps 5 rows."""
    endpoint = f"ipc://{tmp_path}/evil.ipc"
    router = sockets.router(endpoint)
    proc = subprocess.Popen([sys.executable, "-m", "agentbus_zmq.bus.ctl", "--endpoint", endpoint, "agents",
                             "--limit", "5", "--format", "json"], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        asked = _serve_agents_pages(router, proc, 10**9, 200)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        router.close(linger=0)
    assert proc.returncode == 0, err
    assert asked == [0] and len(json.loads(out)) == 5


@pytest.mark.unit
def test_busctl_follows_at_most_max_pages_and_keeps_a_pages_worth_of_each():
    from agentbus_zmq.bus.commands.agents import MAX_PAGES, fetch
    from agentbus_zmq.bus.report import PAGE_SIZE

    class Hostile:
        asked: list[int] = []

        def request(self, command, args):
            self.asked.append(args["page"])
            rows = PAGE_SIZE + 72 if args["page"] < 3 else 1       # oversized pages first, then small ones
            return {"page": args["page"], "pages": 10**9, "agents": [{"id": f"a{args['page']}"}] * rows}

    ctl = Hostile()
    rows, pages = fetch(ctl)
    assert ctl.asked == list(range(MAX_PAGES)) and pages == 10**9 and len(rows) == 3 * PAGE_SIZE + MAX_PAGES - 3
    ctl.asked.clear()
    assert len(fetch(ctl, limit=300)[0]) == 3 * PAGE_SIZE and ctl.asked == [0, 1, 2]


# --- the metrics endpoint ---------------------------------------------------------------------


def _metrics_server(render=lambda: b"agentbus_up 1\n"):
    from agentbus_zmq.coordinator.prometheus import MetricsServer

    server = MetricsServer("127.0.0.1:0", render)
    poller = zmq.Poller()
    server.attach(poller)
    return server, poller


def _pump(server, poller, until, timeout: float = 5.0) -> None:
    """Run the server's part of the coordinator's loop until ``until()`` (bounded)."""
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        server.handle(dict(poller.poll(10)), time.monotonic())


def _open(server, source: str = "127.0.0.1", request: bytes = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"):
    import socket as pysocket

    conn = pysocket.socket()
    conn.bind((source, 0))
    conn.connect(server.address)
    conn.sendall(request)
    return conn


def _answer(server, poller, conn) -> bytes:
    import select

    _pump(server, poller, lambda: select.select([conn], [], [], 0)[0])
    conn.settimeout(2)
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def test_idle_half_requests_cannot_keep_a_scrape_out_of_the_metrics_endpoint():
    """32 connections that send half a request and wait used to fill every slot for 5 s,
    reopened as they closed: legitimate scrapes got 0 of 30.  Now one address holds at
    most 8, and when the server is full the oldest unanswered connection makes way."""
    server, poller = _metrics_server()
    idle = []
    try:
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"):
            for _ in range(10):                                   # 50 half-requests from 5 addresses
                idle.append(_open(server, source, b"GET /metr"))
                _pump(server, poller, lambda: False, timeout=0.005)
        assert len(server._conns) <= server.MAX_CONNS
        assert max(sum(c.peer == s for c in server._conns.values()) for s in ("127.0.0.2", "127.0.0.6")) <= 8
        served = 0
        for _ in range(10):                                        # the scraper, while they stay
            scrape = _open(server)
            served += _answer(server, poller, scrape).startswith(b"HTTP/1.1 200 OK")
            scrape.close()
        assert served == 10
    finally:
        for conn in idle:
            conn.close()
        server.close()


def test_scrapers_cost_the_loop_one_render_a_second_however_many_they_are():
    renders = []
    server, poller = _metrics_server(lambda: renders.append(1) or b"agentbus_up 1\n")
    try:
        start = time.monotonic()
        for i in range(50):                               # from 5 addresses: one's share is 16 a second
            scrape = _open(server, f"127.0.0.{1 + i % 5}")
            assert _answer(server, poller, scrape).endswith(b"agentbus_up 1\n")
            scrape.close()
        assert len(renders) <= 1 + (time.monotonic() - start) / server.RENDER_EVERY_S + 1, len(renders)
    finally:
        server.close()


def test_a_connection_flood_costs_the_loop_a_bounded_number_of_accepts_and_a_scrape_still_gets_in():
    """A flood of connections (a fast scrape loop, garbage, from two addresses) cut the
    step rate to 29-33 %: every connection cost the loop its accept, read and answer.  Now
    the loop takes at most ACCEPTS_PER_S a second, a tenth at a time, serves at most
    PER_PEER_PER_S of one address's, and closes the rest as it takes them; the kernel's
    backlog holds what waits.  A legitimate scrape from another address is served within
    a few tenths of a second all the same."""
    import socket as pysocket

    server, poller = _metrics_server()
    flood: list = []
    try:
        start = time.monotonic()
        served_flood = 0
        while time.monotonic() - start < 1.0:           # one second of flooding, as fast as the kernel takes it
            for source in ("127.0.0.2", "127.0.0.3"):
                for _ in range(20):
                    try:
                        s = pysocket.socket()
                        s.setblocking(False)
                        s.bind((source, 0))
                        s.connect_ex(server.address)
                        flood.append(s)
                    except OSError:
                        pass
            server.handle(dict(poller.poll(1)), time.monotonic())
            while len(flood) > 200:
                flood.pop(0).close()
        taken = server.renders
        assert server.budget_spent > 0                   # it ran into its budget: the flood was real
        legit = pysocket.socket()                        # connected while the loop turns, as in the coordinator
        legit.setblocking(False)
        legit.bind(("127.0.0.1", 0))
        started = time.monotonic()
        legit.connect_ex(server.address)
        import select

        _pump(server, poller, lambda: select.select([], [legit], [], 0)[1], timeout=10)
        legit.setblocking(True)
        legit.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _answer(server, poller, legit)
        assert answer.startswith(b"HTTP/1.1 200") and time.monotonic() - started < 5.0
        assert server.renders <= taken + 1
        legit.close()
        # what the loop took in that second: at most its budget, whatever was offered
        assert server._accepted <= server.ACCEPTS_PER_S // 10 and served_flood == 0
    finally:
        for s in flood:
            s.close()
        server.close()
