"""The client's one error hierarchy.

Every error the client raises is a :class:`RankdError`. gRPC failures become
:class:`AgentError` subclasses (``raise ... from err``) that name the agent and
the status code, so a caller never has to catch ``grpc.RpcError``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from rankd.client.report import FailureReport, NodeLost

__all__ = [
    "AgentError",
    "AgentTimeout",
    "AgentUnavailable",
    "AlreadyExists",
    "AuthenticationFailed",
    "ClusterError",
    "InvalidArgument",
    "JobFailed",
    "JobKilled",
    "JobNotFound",
    "NodeListError",
    "NodeLostError",
    "PlaintextTokenRefused",
    "RankdError",
    "agent_error",
    "cluster_error",
    "name_nodes",
    "refusal",
]


class RankdError(Exception):
    """Base of every error raised by the rankd client."""


class NodeListError(RankdError, ValueError):
    """A node list, hostfile or Slurm node-list expression could not be parsed."""


def name_nodes(addresses: Sequence[str]) -> str:
    """``a:1``, ``a:1 and b:2``, ``a:1, b:2 and 7 more``: nodes named in one line."""
    if len(addresses) <= 2:
        return " and ".join(addresses)
    return f"{addresses[0]}, {addresses[1]} and {len(addresses) - 2} more"


#: What a Python caller can do about a :class:`PlaintextTokenRefused`.
PLAINTEXT_TOKEN_REMEDY = (
    "give TLS credentials (credentials=grpc.ssl_channel_credentials(...)), "
    "or insecure=True if the network is trusted"
)


class PlaintextTokenRefused(RankdError):
    """The client would not send its bearer token over a plaintext channel to an
    agent off this machine: anyone on the path (or at a mistyped address) could take
    the token, and the token runs commands on every agent.

    Raised when a client or cluster is made, before any connection. ``addresses``
    are the targets that are not loopback (127.0.0.0/8, ::1, ``localhost``) or a
    unix socket. The fix: TLS (``credentials=``; the CLI's ``--tls-ca`` or
    ``RANKD_TLS_CA``), or ``insecure=True`` (``--insecure``) on a trusted network.
    ``remedy`` is the advice at the end of the message.
    """

    def __init__(self, addresses: Sequence[str], remedy: str = PLAINTEXT_TOKEN_REMEDY) -> None:
        self.addresses = tuple(addresses)
        self.remedy = remedy
        super().__init__(
            f"refusing to send the bearer token in plaintext to {name_nodes(self.addresses)}, "
            f"not a loopback address: anyone on the path could take it; {remedy}"
        )


class AgentError(RankdError):
    """An RPC to one agent failed.

    ``code`` is the gRPC status code name (``"NOT_FOUND"``, ``"UNAVAILABLE"``, ...),
    ``details`` the agent's message, ``address`` the agent's ``host:port``.
    """

    def __init__(self, address: str, code: str, details: str) -> None:
        self.address = address
        self.code = code
        self.details = details
        super().__init__(f"{address}: {self._describe()}")

    def _describe(self) -> str:
        return f"{self.code}: {self.details}" if self.details else self.code


class JobNotFound(AgentError):
    """NOT_FOUND: the agent holds no job with that id."""


class InvalidArgument(AgentError):
    """INVALID_ARGUMENT: the agent refused the request (bad spec, signal, ...)."""


class AlreadyExists(AgentError):
    """ALREADY_EXISTS: the job id is used by another spec on that agent."""


class AgentUnavailable(AgentError):
    """UNAVAILABLE: the agent cannot be reached (not running, wrong port, network)."""

    def _describe(self) -> str:
        return f"agent unreachable ({self.details or self.code})"


class AgentTimeout(AgentError, TimeoutError):
    """DEADLINE_EXCEEDED: the agent did not answer within the deadline."""

    def _describe(self) -> str:
        return f"no answer within the deadline ({self.details or self.code})"


class NodeLostError(AgentUnavailable):
    """The client gave up on a node (see :mod:`rankd.client.liveness`): ``loss`` says
    which node, its global ranks when known, why and when."""

    def __init__(self, loss: NodeLost) -> None:
        self.loss = loss
        super().__init__(loss.address, "UNAVAILABLE", loss.why)

    def _describe(self) -> str:
        return f"node lost: {self.details}"


_BY_CODE: dict[grpc.StatusCode, type[AgentError]] = {
    grpc.StatusCode.NOT_FOUND: JobNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAVAILABLE: AgentUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: AgentTimeout,
}


def agent_error(address: str, err: grpc.RpcError) -> AgentError:
    """The typed error for ``err``, a failed RPC to the agent at ``address``."""
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        return AgentError(address, "UNKNOWN", str(err))
    cls = _BY_CODE.get(code, AgentError)
    return cls(address, code.name, str(details or ""))


class ClusterError(RankdError):
    """Some nodes of a cluster failed a request; ``errors`` maps address to error."""

    def __init__(self, action: str, errors: Mapping[str, Exception], total: int) -> None:
        self.action = action
        self.errors = dict(errors)
        self.total = total
        super().__init__(self._format())

    def _format(self) -> str:
        shown = [f"  {err}" for err in list(self.errors.values())[:10]]
        if len(self.errors) > 10:
            shown.append(f"  ... and {len(self.errors) - 10} more")
        head = f"{self.action}: {len(self.errors)} of {self.total} nodes failed"
        return "\n".join([head, *shown])


# gRPC's own words for a failed TLS handshake, and the TLS hints the agent client adds
# to UNAVAILABLE (a plaintext client at a TLS agent only sees "Socket closed").
_TLS_TROUBLE = re.compile(r"tls|ssl|handshake|certificate", re.IGNORECASE)


def refusal(err: BaseException) -> str | None:
    """One line naming the node and why it refused this client, or None when ``err``
    is not a refusal.

    A refusal is what no retry can fix, only other settings: UNAUTHENTICATED (a
    missing or wrong token), PERMISSION_DENIED (the agent's policy, e.g.
    ``--allow-entrypoint``), or a connection that TLS settings broke (wrong CA, a
    certificate naming another host, no client certificate under mutual TLS, or
    plaintext against a TLS agent).
    """
    if not isinstance(err, AgentError):
        return None
    if err.code == "UNAUTHENTICATED":
        return f"node {err.address} refused the token: {err.code}: {err.details}"
    if err.code == "PERMISSION_DENIED":
        return f"node {err.address} refused the request: {err.code}: {err.details}"
    if isinstance(err, AgentUnavailable) and _TLS_TROUBLE.search(err.details):
        return f"TLS connection to node {err.address} failed: {err.details}"
    return None


class AuthenticationFailed(ClusterError):
    """Nodes refused this client: a missing or wrong token, a denied request, or a
    failed TLS handshake (see :func:`refusal`). Retrying cannot help; other
    settings (``--token-file``, ``--tls-*``) can.

    A :class:`ClusterError`: ``errors`` maps every failed node's address to its
    error (the refusals and any other failures). ``str(err)`` is one line per
    failed node, refusals first; a single failed node makes one line in all.
    """

    def _format(self) -> str:
        refused = [line for err in self.errors.values() if (line := refusal(err))]
        others = [str(err) for err in self.errors.values() if refusal(err) is None]
        lines = refused + others
        if len(lines) == 1:
            return lines[0]
        head = f"{self.action}: {len(refused)} of {self.total} nodes refused this client"
        if others:
            head += f" ({len(others)} more failed otherwise)"
        shown = [f"  {line}" for line in lines[:10]]
        if len(lines) > 10:
            shown.append(f"  ... and {len(lines) - 10} more")
        return "\n".join([head, *shown])


def cluster_error(action: str, errors: Mapping[str, Exception], total: int) -> ClusterError:
    """The error for nodes that failed ``action``: :class:`AuthenticationFailed` when
    any of them refused this client, else :class:`ClusterError`."""
    if any(refusal(err) for err in errors.values()):
        return AuthenticationFailed(action, errors, total)
    return ClusterError(action, errors, total)


class JobFailed(RankdError):
    """A launched job failed (after all its restarts).

    ``report`` is the :class:`rankd.client.report.FailureReport`; ``str(err)`` is its
    formatted text, root cause first.
    """

    def __init__(self, report: FailureReport) -> None:
        self.report = report
        super().__init__(report.format())


class JobKilled(RankdError):
    """A launched job was stopped by a Kill it did not send (another client, an
    operator, its lease, the agent shutting down): KILLED, never a failure.

    ``report`` is the :class:`rankd.client.report.FailureReport` with ``state``
    ``"KILLED"``, ``killed_by`` saying who, and no root cause.
    """

    def __init__(self, report: FailureReport) -> None:
        self.report = report
        super().__init__(report.format())
