"""CURVE: the ZAP policy without sockets, then a live coordinator that serves an allowed
agent and refuses everyone else."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import zmq
from zmq.utils import z85

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus import sockets
from agentbus_zmq.bus.client import BusUnavailable, ControlClient
from agentbus_zmq.bus.security import ClientKeys, ServerKeys, generate, load_allow_list, zap_verdict
from tests.conftest import cli_env, wait_until


def _request(key: bytes, mechanism: bytes = b"CURVE") -> list[bytes]:
    return [b"1.0", b"7", b"agentbus", b"127.0.0.1", b"", mechanism, key]


@pytest.mark.unit
def test_zap_policy_allows_listed_keys_only(tmp_path):
    public, _ = generate(tmp_path / "allowed", "friend")
    allowed = load_allow_list(tmp_path / "allowed")
    friend = z85.decode(next(iter(allowed)))
    reply, ok, who = zap_verdict(_request(friend), allowed)
    assert ok and reply[2] == b"200" and reply[1] == b"7" and reply[4] == z85.encode(friend)
    reply, ok, who = zap_verdict(_request(b"\x01" * 32), allowed)
    assert not ok and reply[2] == b"400" and "127.0.0.1 key" in who
    reply, ok, _ = zap_verdict(_request(b"", mechanism=b"NULL")[:6], allowed)
    assert not ok and reply[3] == b"CURVE required"
    reply, ok, _ = zap_verdict([b"1.0"], allowed)
    assert not ok and reply[2] == b"400"
    reply, ok, _ = zap_verdict([b"9.9", *_request(friend)[1:]], allowed)
    assert not ok


@pytest.mark.unit
def test_keys_are_written_private_and_checked_on_load(tmp_path):
    public, secret = generate(tmp_path, "c")
    assert secret.stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError, match="no secret key"):
        ServerKeys.load(public, tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        ServerKeys.load(secret, tmp_path / "nowhere")


@pytest.fixture
def curve_bus(bus, tmp_path):
    server_pub, server_secret = generate(tmp_path / "server", "coordinator")
    _, agent_secret = generate(tmp_path / "allowed", "agents")
    _, admin_secret = generate(tmp_path / "allowed", "admin")
    _, stranger_secret = generate(tmp_path / "strangers", "stranger")
    _, bus.host1_secret = generate(tmp_path / "allowed", "host1", agents=["host1-*"])
    path = tmp_path / "endpoint"
    bus.start("coordinator", "agentbus_zmq.coordinator", "--bind", "tcp://127.0.0.1:*", "--endpoint-file", str(path),
              "--curve-secret", str(server_secret), "--curve-clients", str(tmp_path / "allowed"))
    bus.endpoint = wait_until(lambda: path.exists() and path.read_text().strip(), 20, "the coordinator to bind")
    bus._client = ControlClient(bus.endpoint, curve=ClientKeys.load(server_pub, admin_secret))
    bus.client.wait_ready(10)
    return bus, server_pub, agent_secret, stranger_secret


def test_an_allowed_agent_is_served_over_curve(curve_bus):
    bus, server_pub, agent_secret, _ = curve_bus
    bus.agents(2, "--kind", "null", "--curve-server-key", str(server_pub), "--curve-key", str(agent_secret))
    r = bus.client.request("measure", {"agents": 2, "warmup_steps": 10, "steps": 200}, timeout=60)
    assert r["steps"] == 200 and r["window"]["missing"] == 0


def test_a_client_not_on_the_list_gets_nothing_and_is_logged(curve_bus):
    bus, server_pub, _, stranger_secret = curve_bus
    with ControlClient(bus.endpoint, curve=ClientKeys.load(server_pub, stranger_secret)) as stranger:
        # A refused handshake ends the request at once (a retry is refused alike), however
        # long the timeout and however slow a loaded machine is to answer it.
        with pytest.raises(BusUnavailable, match=r"tcp://127\.0\.0\.1:\d+.*refused this client's CURVE handshake: is this client's key on its allow-list") as info:
            stranger.request("stats", timeout=600)
        assert info.value.final
    stats = wait_until(lambda: (s := bus.stats())["ledger"]["errors"].get("unauthorized") and s, 10, "the refusal")
    assert stats["ledger"]["errors"]["unauthorized"] >= 1
    log = bus.children[0].log_path.read_text()
    assert "CURVE: refused 127.0.0.1 key" in log


def test_a_plain_client_cannot_talk_to_a_curve_coordinator(curve_bus):
    bus, *_ = curve_bus
    plain = sockets.dealer(bus.endpoint)
    try:
        try:  # the handshake fails: the request is either never queued or never answered
            plain.send(P.encode(P.Control(1, "ping", {})), zmq.NOBLOCK)
        except zmq.Again:
            pass
        assert plain.poll(1500, zmq.POLLIN) == 0
    finally:
        plain.close(linger=0)
    assert bus.stats()["agents"] == 0


def test_an_agent_with_a_stranger_key_never_registers(curve_bus):
    bus, server_pub, _, stranger_secret = curve_bus
    agent = bus.agents(1, "--kind", "null", "--curve-server-key", str(server_pub), "--curve-key", str(stranger_secret))
    wait_until(lambda: bus.stats()["ledger"]["errors"].get("unauthorized", 0) >= 2, 10, "repeated refusals")
    assert bus.stats()["agents"] == 0 and agent.proc.poll() is None  # it keeps trying, with backoff


def test_a_key_is_bound_to_its_id_patterns_and_cannot_take_another_keys_agents(curve_bus):
    bus, server_pub, agent_secret, _ = curve_bus
    keys = ["--curve-server-key", str(server_pub), "--curve-key", str(bus.host1_secret)]
    bus.agents(2, "--kind", "null", *keys, agent_id="host1")
    bus.wait_agents(2)                                     # host1-1, host1-2: within its patterns

    def hello(secret, agent_id):
        sock = sockets.dealer(bus.endpoint, curve=ClientKeys.load(server_pub, secret))
        try:
            sock.send(P.encode(P.Hello(agent_id, "null", 0)))
            assert sock.poll(5000), "no answer"
            return P.decode(sock.recv())
        finally:
            sock.close(linger=0)

    assert hello(bus.host1_secret, "host2-1").code == P.ErrorCode.NOT_ALLOWED   # outside its patterns
    assert hello(agent_secret, "host1-1").code == P.ErrorCode.ID_TAKEN          # another key, a live agent
    stats = bus.stats()
    assert sorted(stats["agent_ids"]) == ["host1-1", "host1-2"] and stats["ledger"]["errors"]["id_not_allowed"] == 1


@pytest.mark.unit
def test_an_agent_whose_key_may_not_use_its_id_stops_for_good_and_says_why(curve_bus):
    """NOT_ALLOWED is permanent: the agent used to repeat HELLO every 0.5 s for ever, a
    WARNING on both sides, looking healthy to systemd.  Now it exits 5, and its launcher,
    even with --restart, does not start it again and exits 5 itself (the status the
    systemd unit is told not to restart)."""
    bus, server_pub, *_ = curve_bus
    launcher = bus.agents(1, "--kind", "null", "--restart", "--restart-backoff", "0.05", "--curve-server-key",
                          str(server_pub), "--curve-key", str(bus.host1_secret), agent_id="not-host1")
    assert launcher.proc.wait(30) == 5
    log = launcher.log_path.read_text()
    assert "stopping (exit status 5)" in log and "does not allow this id for its CURVE key; not restarted" in log
    assert log.count("registered with coordinator") == 0 and bus.stats()["agents"] == 0


def test_bus_keys_writes_id_patterns_the_allow_list_reads(tmp_path):
    from click.testing import CliRunner

    from agentbus_zmq.bus.keys import cli
    from agentbus_zmq.bus.security import id_allowed

    r = CliRunner().invoke(cli, ["--agents", "a-*", "--agents", "b?", str(tmp_path), "k"])
    assert r.exit_code == 0, r.output
    generate(tmp_path, "any")
    allowed = load_allow_list(tmp_path)
    assert sorted(allowed.values(), key=str) == [("a-*", "b?"), None]
    patterns = next(v for v in allowed.values() if v)
    assert id_allowed(patterns, "a-7") and id_allowed(patterns, "b1") and not id_allowed(patterns, "c-1")
    ClientKeys.load(tmp_path / "k.key", tmp_path / "k.key_secret")   # still a valid certificate for libzmq
    r = CliRunner().invoke(cli, ["--agents", "bad pattern;", str(tmp_path), "x"])
    assert r.exit_code == 2 and "agent id pattern" in r.output


def test_binding_beyond_loopback_without_curve_warns(bus, tmp_path):
    path = tmp_path / "endpoint"
    child = bus.start("coordinator", "agentbus_zmq.coordinator", "--bind", "tcp://0.0.0.0:*", "--endpoint-file", str(path))
    wait_until(lambda: path.exists() and path.read_text().strip(), 20, "the coordinator to bind")
    wait_until(lambda: "beyond loopback without CURVE" in child.log_path.read_text(), 10, "the warning")



#: Run inside the namespace: 300 connections opened at once from one address, then a
#: client from another; prints what got through, as JSON.
_FLOOD = """
import json, select, socket, time
from agentbus_zmq.bus.client import ControlClient

socks = []
for _ in range(300):
    s = socket.socket()
    s.bind(("127.0.0.2", 0))
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", 5555))
    socks.append(s)
end = time.monotonic() + 0.5           # an answered SYN connects in microseconds; a dropped one waits 1 s
while time.monotonic() < end:
    select.select([], socks, [], 0.05)
opened = 0
for s in socks:
    try:
        s.getpeername()
        opened += 1
    except OSError:
        pass
with ControlClient("tcp://127.0.0.1:5555") as client:    # another address, meanwhile
    pong = client.request("ping", timeout=10)
print(json.dumps({"opened": opened, "pong": pong}))
"""


def test_the_firewall_table_bounds_new_connections_per_address_and_lets_others_in(tmp_path):
    """A CURVE handshake flood from strangers (900 connections a second cut the step rate to
    26 %) is bounded before the coordinator sees it: deploy/firewall/agentbus.nft, loaded in a
    network namespace around a real coordinator, lets one address open about its burst (40)
    and keeps serving a client from another address."""
    rules = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy/firewall/agentbus.nft")
    # not skipped: where it cannot run, it fails saying what it needs
    assert os.geteuid() == 0, "needs root, for a network namespace and nftables (CI runs as root: sudo pytest)"
    for tool in ("ip", "nft"):
        assert shutil.which(tool), f"{tool} is needed (.ci/run installs iproute2 and nftables)"
    ns = f"agentbus-{uuid.uuid4().hex[:8]}"
    inside = ["ip", "netns", "exec", ns]
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    coordinator = None
    try:
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True, timeout=30)
        subprocess.run([*inside, "nft", "-f", rules], check=True, timeout=30)
        coordinator = subprocess.Popen([*inside, sys.executable, "-m", "agentbus_zmq.coordinator", "--bind",
                                        "tcp://127.0.0.1:5555", "--endpoint-file", str(tmp_path / "endpoint")],
                                       env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=open(tmp_path / "coordinator.log", "w"))
        wait_until(lambda: (tmp_path / "endpoint").exists(), 30, "the coordinator to bind in the namespace")
        r = subprocess.run([*inside, sys.executable, "-c", _FLOOD], capture_output=True, text=True, env=cli_env(),
                           timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        assert 20 <= result["opened"] <= 80, result      # the burst (40), and what 0.5 s refills
        assert result["pong"]["session"], result         # served at once, beside the flood
    finally:
        if coordinator is not None:
            coordinator.terminate()
            coordinator.wait(30)
        subprocess.run(["ip", "netns", "del", ns], timeout=30)
