"""CURVE encryption and authentication for TCP endpoints.

The coordinator holds a server key pair and an allow-list: a directory of client public
keys (``*.key`` files as ``bus-keys`` writes them).  Agents and clients hold the
server's public key and a key pair of their own.  libzmq encrypts every connection
and asks the coordinator, over ZAP (ZeroMQ RFC 27), whether a client key may connect;
:func:`zap_verdict` is that policy, a pure function, and the coordinator's poll loop
answers ZAP requests with it -- no authentication thread.

A client whose key is not on the list gets nothing: libzmq drops the handshake, the
coordinator logs the refusal with the key, and the client's own waits time out naming
the endpoint.  See docs/security.md.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

__all__ = ["ZAP_ENDPOINT", "ClientKeys", "ServerKeys", "generate", "id_allowed", "load_allow_list", "zap_verdict"]

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_ZAP_VERSION = b"1.0"


@dataclasses.dataclass(frozen=True)
class ServerKeys:
    """The coordinator's side: its key pair and the allowed client public keys (Z85),
    each with the agent id patterns it may register (None: any id)."""

    public: bytes
    secret: bytes
    allowed: Mapping[bytes, tuple[str, ...] | None]
    allow_dir: str

    @classmethod
    def load(cls, secret_file: str | os.PathLike, allow_dir: str | os.PathLike) -> ServerKeys:
        public, secret = _load_pair(secret_file)
        return cls(public, secret, load_allow_list(allow_dir), str(allow_dir))

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, b"agentbus")


@dataclasses.dataclass(frozen=True)
class ClientKeys:
    """An agent's or client's side: the server's public key and its own key pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key_file: str | os.PathLike, secret_file: str | os.PathLike) -> ClientKeys:
        server_public, _ = _load_public(server_key_file)
        public, secret = _load_pair(secret_file)
        return cls(server_public, public, secret)

    @classmethod
    def from_options(cls, server_key_file: str | None, secret_file: str | None) -> ClientKeys | None:
        """Keys from a command's two CURVE options, or None when neither is given."""
        if not (server_key_file or secret_file):
            return None
        if not (server_key_file and secret_file):
            raise ValueError("CURVE needs both --curve-server-key and --curve-key")
        return cls.load(server_key_file, secret_file)

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


def _load_public(path: str | os.PathLike) -> tuple[bytes, None]:
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read a CURVE public key from {path}: {exc}") from None
    return public, None


def _load_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read a CURVE key pair from {path}: {exc}") from None
    if not secret:
        raise ValueError(f"{path} holds no secret key: pass the .key_secret file that bus-keys wrote")
    return public, secret


#: Characters an id pattern may hold: an agent id's (docs/protocol.md) and fnmatch's.
_PATTERN_RE = re.compile(r"[A-Za-z0-9._:@/+*?\[\]!-]{1,128}\Z")
_AGENTS_LINE = re.compile(r'^\s+agents\s*=\s*"([^"]*)"\s*$')


def generate(directory: str | os.PathLike, name: str, agents: Iterable[str] | None = None) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, to share) and ``NAME.key_secret`` (keep private).

    ``agents``: id patterns (``fnmatch``: ``host1-*``) this key may register; they are
    written in the certificate's metadata section, which the coordinator reads from its
    allow-list.  Without them the key may register any id.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    if agents:
        patterns = [_check_pattern(p) for p in agents]
        for path in (public, secret):
            text = Path(path).read_text()
            Path(path).write_text(text.replace("\nmetadata\n", f'\nmetadata\n    agents = "{" ".join(patterns)}"\n', 1))
    return Path(public), Path(secret)


def _check_pattern(pattern: str) -> str:
    if not _PATTERN_RE.match(pattern):
        raise ValueError(f"agent id pattern {pattern!r}: use the characters of agent ids and * ? [ ] (fnmatch)")
    return pattern


def load_allow_list(directory: str | os.PathLike) -> dict[bytes, tuple[str, ...] | None]:
    """Every ``*.key`` file in ``directory``: its Z85 public key -> the agent id patterns
    its metadata allows (``agents = "a-* b-*"``), or None when it names none (any id)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"the CURVE allow-list {directory} is not a directory of client .key files")
    keys: dict[bytes, tuple[str, ...] | None] = {}
    for path in sorted(directory.glob("*.key")):
        public, _ = _load_public(path)
        keys[public] = _patterns(path)
    return keys


def _patterns(path: Path) -> tuple[str, ...] | None:
    section = None
    for line in path.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            section = line.strip()
        elif section == "metadata" and (m := _AGENTS_LINE.match(line)):
            try:
                return tuple(_check_pattern(p) for p in m.group(1).split())
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
    return None


def id_allowed(patterns: tuple[str, ...] | None, agent_id: str) -> bool:
    """Whether a key with these patterns (None: any) may register ``agent_id``."""
    return patterns is None or any(fnmatch.fnmatchcase(agent_id, p) for p in patterns)


def zap_verdict(request: list[bytes], allowed: Mapping[bytes, object] | frozenset[bytes]) -> tuple[list[bytes], bool, str]:
    """Answer one ZAP request: ``(reply frames, allowed?, client description)``.

    Only CURVE with a key on the allow-list is accepted; anything else (NULL or PLAIN
    mechanisms, a malformed request) is refused.
    """
    if len(request) < 6:
        request_id = request[1] if len(request) > 1 else b""
        return [_ZAP_VERSION, request_id, b"400", b"malformed ZAP request", b"", b""], False, "malformed request"
    version, request_id, _domain, address, _identity, mechanism = request[:6]
    peer = address.decode("utf-8", "replace") or "unknown address"
    if version != _ZAP_VERSION:
        return [_ZAP_VERSION, request_id, b"400", b"unsupported ZAP version", b"", b""], False, peer
    if mechanism != b"CURVE" or len(request) < 7 or len(request[6]) != 32:
        return [version, request_id, b"400", b"CURVE required", b"", b""], False, f"{peer} ({mechanism.decode()})"
    key = z85.encode(request[6])
    who = f"{peer} key {key.decode()}"
    if key in allowed:
        # The key is the connection's User-Id: the coordinator reads it from every message
        # and so knows which key registered which agent.
        return [version, request_id, b"200", b"OK", key, b""], True, who
    return [version, request_id, b"400", b"key not on the allow-list", b"", b""], False, who
