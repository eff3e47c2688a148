"""Who may talk to an agent, and how much a peer may hold: bearer token, TLS / mutual
TLS, the bind policy, and the caps on connections, streams and request size.

An agent runs commands on request: unauthenticated on a public interface it is a remote
shell. So it binds loopback by default, and refuses any other address without both a
token and TLS unless the operator says `--insecure`. Whoever can reach the port, token
or not, gets bounded room: a capped number of connections (never more than a quarter of
the agent's descriptors), each with a capped number of open calls, and a short time to
finish its handshake.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import os
import resource
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from rankd.agent.errors import RankdError

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_STREAMS",
    "HANDSHAKE_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_MESSAGE_BYTES",
    "OPEN_METHODS",
    "ConnectionLimits",
    "OpenMethodsOnly",
    "TokenInterceptor",
    "add_connection_flags",
    "check_bind_policy",
    "is_loopback",
    "load_token",
    "server_credentials",
]

#: Methods anyone may call without the token: the health check, for load balancers and
#: probes. Health's Watch is a stream that stays open, so it needs the token: an
#: anonymous caller could otherwise hold connections and streams for as long as it likes.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check"})
_MAX_TOKEN_BYTES = 4096

#: Largest request read (--max-message-bytes). A valid Start at every limit of `Limits`
#: (args, env, ranks) encodes to about 1.2 MiB (tests/agent/test_sec_server.py builds
#: it); every other request is a few KiB. A refused call is never read at all.
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
#: Connections served at once (--max-connections): far above what clients need (each
#: launcher or CLI holds one per agent), and at most a quarter of the open-files limit
#: (`ConnectionLimits.connections`), so that idle sockets cannot take the descriptors
#: that ranks, log files and other clients need. Past it, a new connection is closed.
DEFAULT_MAX_CONNECTIONS = 256
#: Calls open at once on one connection (--max-streams-per-connection; HTTP/2's
#: SETTINGS_MAX_CONCURRENT_STREAMS). A client with more waits for a free one.
DEFAULT_MAX_STREAMS = 256
#: Seconds a new connection has to finish its TLS and HTTP/2 handshake (gRPC's default
#: is 120): a socket that connects and says nothing frees its place after this.
HANDSHAKE_TIMEOUT = 10
#: Seconds a connection may stay without a call before the agent closes it (GOAWAY);
#: the client's next call reconnects. Open streams (Stream, Watch) are calls.
IDLE_TIMEOUT = 60


class SecurityError(RankdError):
    """The agent's security settings are unsafe or unusable; it will not start."""


def load_token(path: str) -> str:
    """The bearer token in `path`, a regular file only the agent's user can read.

    The file is opened once and checked on that descriptor (no swap between check and
    read). It must belong to the agent's user with no access for group or others (0600,
    0400), or to root and be readable at most by its group (0640, 0440): how Kubernetes
    secret volumes (fsGroup) and systemd credentials (an ACL) hand a file to a service,
    as PostgreSQL accepts its key. Raises SecurityError, one line with the fix."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        raise SecurityError(f"cannot read token file {path}: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        _check_secret_file(path, info)
        raw = os.read(fd, _MAX_TOKEN_BYTES + 1)
    except OSError as err:
        raise SecurityError(f"cannot read token file {path}: {err.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > _MAX_TOKEN_BYTES:
        raise SecurityError(f"token file {path} is larger than {_MAX_TOKEN_BYTES} bytes")
    try:
        token = raw.decode().strip()
    except UnicodeDecodeError as err:
        raise SecurityError(
            f"token file {path} is not UTF-8 text (byte {err.start}); "
            "make one with `openssl rand -hex 32`"
        ) from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise SecurityError(
            f"token in {path} must be at least 16 characters without whitespace "
            "(e.g. `openssl rand -hex 32 > token`)"
        )
    return token


def _check_secret_file(path: str, info: os.stat_result) -> None:
    """SecurityError unless `info` is a regular file that no one but the agent's user
    (and root) can read or change; see `load_token`."""
    if not stat.S_ISREG(info.st_mode):
        raise SecurityError(f"token file {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    me = os.geteuid()
    if info.st_uid not in (me, 0):
        raise SecurityError(
            f"token file {path} belongs to uid {info.st_uid}, not to this agent's user "
            f"(uid {me}) or root: whoever owns it can change it; run: chown {me} {path}"
        )
    # Root's file may be shared with the agent through its group (read only); the
    # agent's own file has no reason to be.
    if mode & 0o077 & ~(0o040 if info.st_uid != me else 0):
        raise SecurityError(
            f"token file {path} is readable or writable by "
            f"{'others' if mode & 0o007 else 'its group'} (mode {mode:o}); "
            f"run: chmod 600 {path}"
        )


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise SecurityError(f"cannot read {what} {path}: {err.strerror}") from None


def server_credentials(
    cert: str | None, key: str | None, client_ca: str | None
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files; with `client_ca`, clients must present a
    certificate signed by it (mutual TLS). None when TLS is off."""
    if not cert and not key:
        if client_ca:
            raise SecurityError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise SecurityError("TLS needs both --tls-cert and --tls-key")
    ca = _read(client_ca, "client CA") if client_ca else None
    return grpc.ssl_server_credentials(
        [(_read(key, "TLS key"), _read(cert, "TLS certificate"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """The agent's flags for `ConnectionLimits`."""
    parser.add_argument(
        "--max-message-bytes",
        type=_positive,
        default=MAX_MESSAGE_BYTES,
        metavar="N",
        help="largest request read, in bytes; a Start at every limit takes about 1.2 MiB "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="connections served at once, at most a quarter of the open-files limit; "
        "past it new ones are closed at once. A connection must finish its handshake "
        f"within {HANDSHAKE_TIMEOUT} s and is closed after {IDLE_TIMEOUT} s without a "
        "call (default: %(default)s)",
    )
    parser.add_argument(
        "--max-streams-per-connection",
        type=_positive,
        default=DEFAULT_MAX_STREAMS,
        metavar="N",
        help="calls open at once on one connection; more wait (default: %(default)s)",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return value


@dataclass(frozen=True)
class ConnectionLimits:
    """How much room one server gives its peers (see the defaults above)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_streams: int = DEFAULT_MAX_STREAMS
    max_message_bytes: int = MAX_MESSAGE_BYTES

    def connections(self) -> int:
        """`max_connections`, lowered to a quarter of the open-files soft limit."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(1, min(self.max_connections, soft // 4))

    def options(self) -> list[tuple[str, int]]:
        """The gRPC server options that enforce them."""
        return [
            ("grpc.max_allowed_incoming_connections", self.connections()),
            ("grpc.max_concurrent_streams", self.max_streams),
            ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT * 1000),
            ("grpc.max_connection_idle_ms", IDLE_TIMEOUT * 1000),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]

    def __str__(self) -> str:
        return (
            f"at most {self.connections()} connections, {self.max_streams} calls each, "
            f"requests up to {self.max_message_bytes} bytes"
        )


DEFAULT_LIMITS = ConnectionLimits()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_policy(host: str, *, token: bool, tls: bool, insecure: bool) -> str | None:
    """Refuse (SecurityError) to serve a non-loopback address without token and TLS
    unless `insecure`; returns a warning to print when running insecurely."""
    if is_loopback(host) or (token and tls):
        return None
    missing = " and ".join(
        flag for flag, ok in (("--token-file", token), ("--tls-cert/--tls-key", tls)) if not ok
    )
    if not insecure:
        raise SecurityError(
            f"refusing to listen on {host} without {missing}: anyone who reaches this port "
            "could run commands here. Give both, bind 127.0.0.1, or pass --insecure "
            "if the network is trusted"
        )
    return (
        f"WARNING: listening on {host} without {missing} (--insecure): anyone who can reach "
        "this port can run commands as this user"
    )


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Every call but a health Check must carry `authorization: Bearer <token>`, compared
    in constant time. Missing or wrong -> UNAUTHENTICATED, for unknown methods too.

    A refused call is answered from its headers alone: its handler is a stream handler
    without a deserializer that never reads the request, so a refused request costs no
    more than the transport's flow-control window, whatever its size."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()
        self._missing = _denying(
            "missing bearer token: pass the agent's token (--token-file or RANKD_TOKEN_FILE)"
        )
        self._wrong = _denying("wrong bearer token")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method in OPEN_METHODS:
            return await continuation(handler_call_details)
        given = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                break
        if hmac.compare_digest(given, self._expected):
            return await continuation(handler_call_details)
        return self._wrong if given else self._missing


class OpenMethodsOnly(grpc.aio.ServerInterceptor):
    """OPEN_METHODS and nothing else (UNIMPLEMENTED): for the plaintext health port."""

    def __init__(self) -> None:
        self._refused = _denying(
            "only the health check is served here", grpc.StatusCode.UNIMPLEMENTED
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method in OPEN_METHODS:
            return await continuation(handler_call_details)
        return self._refused


def _denying(
    message: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED
) -> grpc.RpcMethodHandler:
    """A handler that ends any call (unary or streaming, known or not) with `code`
    before reading its request."""

    async def deny(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    # No (de)serializer: nothing is parsed, and the handler never iterates `requests`.
    return grpc.stream_stream_rpc_method_handler(deny)
