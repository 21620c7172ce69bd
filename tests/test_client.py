"""The control client against a scripted ROUTER in this process: replies it has given up
on are dropped, never kept, so a long wait still sees its own answer."""

from __future__ import annotations

import pytest
import zmq

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus import sockets
from agentbus_zmq.bus.client import BusUnavailable, ControlClient, ControlFailed


@pytest.fixture
def router(tmp_path):
    sock = sockets.router(f"ipc://{tmp_path}/r.ipc")
    try:
        yield sock
    finally:
        sock.close(linger=0)


def _requests(router: zmq.Socket, n: int) -> list[tuple[bytes, P.Control]]:
    out = []
    while len(out) < n:
        assert router.poll(5000), f"only {len(out)} of {n} requests arrived"
        peer, frame = router.recv_multipart()
        out.append((peer, P.decode(frame)))
    return out


def test_replies_to_abandoned_requests_never_crowd_out_a_live_one(router, tmp_path):
    with ControlClient(f"ipc://{tmp_path}/r.ipc") as client:
        first = client.send("ping", timeout=10)    # waits for the connection
        with pytest.raises(BusUnavailable, match="no reply"):
            client.wait(first, timeout=0.001)
        for _ in range(99):                        # a coordinator that is not answering yet
            with pytest.raises(BusUnavailable, match="no reply"):
                client.request("ping", timeout=0.001)
        old = _requests(router, 100)
        for peer, req in old:                     # ... then answers every one of them late
            router.send_multipart([peer, P.encode(P.Reply(req.request_id, True, {"late": True}))])
        live = client.send("ping")
        ((peer, req),) = _requests(router, 1)
        router.send_multipart([peer, P.encode(P.Reply(req.request_id, True, {"session": "s"}))])
        assert client.wait(live, timeout=10) == {"session": "s"}
        assert client._early == {} and client._awaited == set()


def test_a_refusal_carries_its_code(router, tmp_path):
    with ControlClient(f"ipc://{tmp_path}/r.ipc") as client:
        rid = client.send("measure", {"agents": 1})
        ((peer, req),) = _requests(router, 1)
        refusal = {"error": "no", "code": int(P.ErrorCode.BAD_FIELD)}
        router.send_multipart([peer, P.encode(P.Reply(req.request_id, False, refusal))])
        with pytest.raises(ControlFailed) as info:
            client.wait(rid, timeout=10, command="measure")
        assert info.value.code == P.ErrorCode.BAD_FIELD and str(tmp_path) in str(info.value)


def test_with_nobody_listening_a_request_fails_within_its_timeout(tmp_path):
    # The socket queues only on a completed connection: nothing piles up for a
    # coordinator that is not there, and the send itself is bounded.
    with ControlClient(f"ipc://{tmp_path}/nobody.ipc") as client:
        with pytest.raises(BusUnavailable, match=r"no connection to the coordinator at ipc://.*nobody\.ipc to send 'stats'"):
            client.request("stats", timeout=0.2)
        assert client._awaited == set()


def test_a_client_told_not_to_wait_fails_at_once_when_nobody_listens(tmp_path):
    # busctl's client: a refused connection is the answer (nobody is there now), not a
    # reason to wait out the timeout; the error is final and says what the socket saw.
    with ControlClient(f"ipc://{tmp_path}/nobody.ipc", refused_is_final=True) as client:
        with pytest.raises(BusUnavailable, match=r"nothing listens there \(connection refused\)") as info:
            client.request("stats", timeout=600)   # the test's own timeout ends it, should it wait
        assert info.value.final


def test_a_client_that_waits_still_connects_to_a_coordinator_that_comes_late(tmp_path):
    endpoint = f"ipc://{tmp_path}/late.ipc"
    with ControlClient(endpoint) as client:
        with pytest.raises(BusUnavailable) as info:
            client.request("ping", timeout=0.2)
        assert not info.value.final            # nobody yet: worth asking again
        sock = sockets.router(endpoint)
        try:
            rid = client.send("ping", timeout=30)
            ((peer, req),) = _requests(sock, 1)
            sock.send_multipart([peer, P.encode(P.Reply(req.request_id, True, {"late": True}))])
            assert client.wait(rid, timeout=30) == {"late": True}
        finally:
            sock.close(linger=0)
