"""Socket factories: every agentbus socket is made here, with its options set deliberately.

One ZeroMQ context per process, created lazily *inside* that process
(:func:`context`).  A forked child must never reuse its parent's context; the
``pid`` check below makes that mistake impossible rather than merely documented.
"""

from __future__ import annotations

import os

import zmq

from agentbus_zmq.bus.protocol import MAX_MESSAGE_BYTES
from agentbus_zmq.bus.security import ClientKeys, ServerKeys

__all__ = ["context", "term", "router", "dealer", "endpoint_is_public", "check_endpoint"]

#: Send/receive high-water marks, in messages.  A coordinator with N agents has at
#: most one outstanding OBSERVATION and a heartbeat per agent, so 1000 is ample
#: headroom; past it ROUTER_MANDATORY makes sends fail loudly (EAGAIN) instead of
#: dropping silently.
DEFAULT_HWM = 1000
#: The coordinator's queues per peer, in messages.  An agent or host never has more than
#: an OBSERVATION, a heartbeat and an ERROR or two in flight, so 64 is ample; what it
#: bounds is what a peer that never reads can park in the coordinator (64 messages of at
#: most MAX_MESSAGE_BYTES, against 1000 before) and what one that floods can queue
#: inbound before libzmq stops reading its connection.
ROUTER_HWM = 64

_ctx: zmq.Context | None = None
_ctx_pid: int | None = None


def context() -> zmq.Context:
    """This process's ZeroMQ context, created on first use in this process."""
    global _ctx, _ctx_pid
    if _ctx is None or _ctx_pid != os.getpid():
        _ctx = zmq.Context()
        _ctx_pid = os.getpid()
    return _ctx


#: milliseconds :func:`term` lets a socket still open deliver what it holds
TERM_LINGER_MS = 200


def term() -> None:
    """End this process's context before the process ends: what closed sockets still
    queue (a BYE, closed with a linger) goes out first.  A process that leaves with
    ``os._exit`` (a forked agent) must call it, or its last messages are lost.  Bounded:
    a socket still open gets TERM_LINGER_MS."""
    global _ctx
    if _ctx is not None and _ctx_pid == os.getpid():
        _ctx.destroy(linger=TERM_LINGER_MS)
        _ctx = None


def _common(sock: zmq.Socket, hwm: int, max_bytes: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    # libzmq drops the connection of a peer that sends a bigger message, before it
    # costs us memory; the protocol layer checks again (and can answer) below that.
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes + 1024)


def router(endpoint: str, hwm: int = ROUTER_HWM, max_bytes: int = MAX_MESSAGE_BYTES,
           curve: ServerKeys | None = None) -> zmq.Socket:
    """The coordinator's ROUTER, bound to ``endpoint`` (encrypted and authenticated with
    ``curve``; a ZAP handler must be bound first, see ``coordinator.driver``)."""
    sock = context().socket(zmq.ROUTER)
    _common(sock, hwm, max_bytes)
    if curve is not None:
        curve.apply(sock)
    # A message to a peer that is gone, or whose queue is full, raises instead of
    # vanishing: the coordinator counts every one.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # No ROUTER_HANDOVER: with it, a peer that sets another connection's routing id
    # (libzmq's are a predictable counter) would take that connection's place.  Without
    # it, a second connection claiming a routing id in use is ignored.
    sock.bind(endpoint)
    return sock


def dealer(endpoint: str, identity: bytes | None = None, hwm: int = DEFAULT_HWM,
           max_bytes: int = MAX_MESSAGE_BYTES, curve: ClientKeys | None = None,
           immediate: bool = False, connect: bool = True) -> zmq.Socket:
    """An agent's (or a client's) DEALER, connected to ``endpoint``.

    ``immediate`` queues messages only on a completed connection (a sender then sees at
    once that nobody is there, rather than filling a queue for a peer that may never come).
    ``connect=False`` leaves the connecting to the caller (one that must first attach a
    monitor, so that no transport event happens before it listens).
    """
    sock = context().socket(zmq.DEALER)
    _common(sock, hwm, max_bytes)
    if immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if curve is not None:
        curve.apply(sock)
    if identity:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if connect:
        sock.connect(endpoint)
    return sock


def endpoint_is_public(endpoint: str) -> bool:
    """True for a TCP endpoint bound beyond loopback (``*``, ``0.0.0.0``, a real address)."""
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return not (host.startswith("127.") or host in ("localhost", "::1"))


def check_endpoint(endpoint: str) -> str:
    """``endpoint`` if it is one agentbus can use, else a ValueError that says what is."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "ipc") or not rest:
        raise ValueError(f"{endpoint!r} is not an endpoint agentbus can use: give tcp://HOST:PORT "
                         "(e.g. tcp://127.0.0.1:5555) or ipc:///PATH")
    return endpoint
