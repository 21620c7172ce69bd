"""A control client: ask a running coordinator for ``ping``, ``stats`` or ``measure``.

Every call is bounded by a timeout and a failure names the endpoint it tried.
"""

from __future__ import annotations

import time
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from agentbus_zmq.bus import protocol as P
from agentbus_zmq.bus import sockets
from agentbus_zmq.bus.security import ClientKeys

__all__ = ["ControlClient", "BusUnavailable", "ControlFailed"]


class BusUnavailable(TimeoutError):
    """No answer from the coordinator in time.

    ``final`` is True when waiting longer would not help: the coordinator refused this
    client's handshake, or (for a client made with ``refused_is_final``) nothing listens
    at the endpoint.
    """

    def __init__(self, message: str, final: bool = False):
        super().__init__(message)
        self.final = final


class ControlFailed(RuntimeError):
    """The coordinator answered, refusing the request; ``code`` is the ErrorCode it gave."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


#: What the client's own socket monitor tells a failure's message.
_WATCHED = (zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_HANDSHAKE_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                     zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}


class ControlClient:
    """``refused_is_final``: a request fails at once when the connection is refused
    (busctl: nobody is there now, so say so), rather than waiting its timeout for a
    coordinator that may still be starting (busbench, tests: they wait for it)."""

    def __init__(self, endpoint: str, curve: ClientKeys | None = None, refused_is_final: bool = False):
        self.endpoint = endpoint
        self._sock = sockets.dealer(endpoint, curve=curve, immediate=True, connect=False)
        # The monitor listens before the connect starts: no transport event is missed.
        self._monitor = self._sock.get_monitor_socket(_WATCHED)
        self._sock.connect(endpoint)
        #: transport events seen so far (a failure says which: nobody there, refused, silent)
        self._seen: set[int] = set()
        self._curve = curve is not None
        self._refused_is_final = refused_is_final
        self._issued = 0
        #: requests sent and not yet answered or given up on; only their replies are kept
        self._awaited: set[int] = set()
        #: replies that arrived while another request was being waited for
        self._early: dict[int, P.Reply] = {}
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLOUT)
        self._poller.register(self._monitor, zmq.POLLIN)

    def close(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, command: str, args: dict | None = None, timeout: float = 5.0) -> int:
        """Send one CONTROL request; returns its id for :meth:`wait`.

        A DEALER with no completed connection (the coordinator is not up yet, or refused
        this client's CURVE key and is being retried) has nowhere to queue: the send waits
        at most ``timeout`` s for one, then raises :class:`BusUnavailable`.
        """
        self._issued += 1
        request_id = self._issued
        frame = P.encode(P.Control(request_id, command, args or {}))
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock.send(frame, zmq.NOBLOCK)
                break
            except zmq.Again:
                self._read_monitor()
                final = self._hopeless()
                left = deadline - time.monotonic()
                if final or left <= 0:
                    raise BusUnavailable(self._unavailable(
                        f"no connection to the coordinator at {self.endpoint} to send {command!r}",
                        None if final else timeout), final) from None
                self._poller.poll(left * 1000)  # a connection, or a transport event
        self._awaited.add(request_id)
        return request_id

    def wait(self, request_id: int, timeout: float, idle: Callable[[], None] | None = None,
             command: str = "request") -> dict:
        """Wait up to ``timeout`` s for the REPLY to ``request_id``.

        ``idle`` is called about every 0.1 s while waiting; it may raise to abort (busbench
        uses it to notice a dead child process at once).
        """
        deadline = time.monotonic() + timeout
        while request_id not in self._early:
            left = deadline - time.monotonic()
            if left <= 0:
                # Given up: a reply that comes later is dropped, not kept for ever.
                self._awaited.discard(request_id)
                raise BusUnavailable(self._unavailable(f"no reply to {command!r} from the coordinator at {self.endpoint}", timeout))
            if self._sock.poll(min(left, 0.1) * 1000, zmq.POLLIN):
                try:
                    msg = P.decode(self._sock.recv(zmq.NOBLOCK))
                except (P.ProtocolError, zmq.Again):
                    continue
                if type(msg) is P.Reply and msg.request_id in self._awaited:
                    self._early[msg.request_id] = msg  # this request's, or one still awaited
            elif idle is not None:
                idle()
        msg = self._early.pop(request_id)
        self._awaited.discard(request_id)
        if not msg.ok:
            raise ControlFailed(f"coordinator at {self.endpoint} refused {command!r}: "
                                f"{msg.result.get('error', msg.result)}", msg.result.get("code"))
        return msg.result

    def request(self, command: str, args: dict | None = None, timeout: float = 5.0,
                idle: Callable[[], None] | None = None) -> dict:
        """Send one CONTROL request and wait up to ``timeout`` s in all for its REPLY."""
        start = time.monotonic()
        request_id = self.send(command, args, timeout)
        return self.wait(request_id, max(0.0, timeout - (time.monotonic() - start)), idle, command)

    def _unavailable(self, what: str, timeout: float | None) -> str:
        """Why nothing came back, as far as this client's socket can tell."""
        within = "" if timeout is None else f" within {timeout:.1f} s"
        return f"{what}{within}: {self.diagnosis()}"

    def _read_monitor(self) -> None:
        while self._monitor.poll(0):
            try:
                self._seen.add(recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"])
            except zmq.Again:
                break

    def _hopeless(self) -> bool:
        """Whether waiting longer cannot help: the handshake was refused (a retry is
        refused alike) and never succeeded, or the connection was refused and this
        client was told not to wait for a coordinator to come."""
        seen = self._seen
        if zmq.EVENT_HANDSHAKE_SUCCEEDED in seen:
            return False
        if seen & _HANDSHAKE_FAILED:
            return True
        return (self._refused_is_final and zmq.EVENT_CONNECT_RETRIED in seen
                and zmq.EVENT_CONNECTED not in seen)

    def diagnosis(self) -> str:
        """What the transport saw: nobody there, a refused handshake, or a silent peer."""
        self._read_monitor()
        seen = self._seen
        if zmq.EVENT_HANDSHAKE_FAILED_AUTH in seen:
            return ("the coordinator refused this client's CURVE handshake: is this client's key on its allow-list, "
                    "and is the server key the coordinator's?")
        if seen & {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}:
            return ("the handshake with the coordinator failed: "
                    + ("does it run without CURVE? (drop --curve-server-key)" if self._curve else
                       "does it require CURVE? (pass --curve-server-key and --curve-key; is this client's CURVE key "
                       "on its allow-list?)"))
        if zmq.EVENT_CONNECTED in seen or zmq.EVENT_HANDSHAKE_SUCCEEDED in seen:
            return "connected, but the coordinator did not answer: is it overloaded or stopped?"
        if zmq.EVENT_CONNECT_RETRIED in seen:
            return "nothing listens there (connection refused): is bus-coordinator running and bound there?"
        return ("nothing answered there: is bus-coordinator running and bound there"
                + (", and is this client's CURVE key on its allow-list?" if self._curve else "?"))

    def wait_ready(self, timeout: float = 10.0) -> dict:
        """Ping until the coordinator answers (it may still be starting)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.request("ping", timeout=min(0.5, max(0.05, deadline - time.monotonic())))
            except BusUnavailable as exc:
                if exc.final:
                    raise
                if time.monotonic() >= deadline:
                    raise BusUnavailable(f"the coordinator at {self.endpoint} did not answer within {timeout:.1f} s")
