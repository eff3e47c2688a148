"""Who may talk to an agent: bearer token, TLS / mutual TLS, and the bind policy.

An agent runs commands on request: unauthenticated on a public interface it is a remote
shell. So it binds loopback by default, and refuses any other address without both a
token and TLS unless the operator says `--insecure`.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from rankd.agent.errors import RankdError

__all__ = [
    "OPEN_METHOD_PREFIXES",
    "TokenInterceptor",
    "check_bind_policy",
    "is_loopback",
    "load_token",
    "server_credentials",
]

# Health checks stay open so load balancers and probes work without the token.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
_MAX_TOKEN_BYTES = 4096


class SecurityError(RankdError):
    """The agent's security settings are unsafe or unusable; it will not start."""


def load_token(path: str) -> str:
    """Read a bearer token from a file that is not readable by others."""
    try:
        info = os.stat(path)
        with open(path, "rb") as f:
            raw = f.read(_MAX_TOKEN_BYTES + 1)
    except OSError as err:
        raise SecurityError(f"cannot read token file {path}: {err.strerror}") from None
    if info.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise SecurityError(
            f"token file {path} is readable or writable by others "
            f"(mode {stat.S_IMODE(info.st_mode):o}); run: chmod 600 {path}"
        )
    if len(raw) > _MAX_TOKEN_BYTES:
        raise SecurityError(f"token file {path} is larger than {_MAX_TOKEN_BYTES} bytes")
    token = raw.decode(errors="strict").strip()
    if len(token) < 16 or any(c.isspace() for c in token):
        raise SecurityError(
            f"token in {path} must be at least 16 characters without whitespace "
            "(e.g. `openssl rand -hex 32 > token`)"
        )
    return token


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
    """Every call but health checks must carry `authorization: Bearer <token>`;
    compared in constant time. Missing or wrong -> UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        given = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                break
        handler = await continuation(handler_call_details)
        if handler is None or hmac.compare_digest(given, self._expected):
            return handler
        message = (
            "missing bearer token: pass the agent's token (--token-file or RANKD_TOKEN_FILE)"
            if not given
            else "wrong bearer token"
        )
        return _denying(handler, message)


def _denying(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
