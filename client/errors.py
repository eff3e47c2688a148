"""The client's one error hierarchy.

Every error the client raises is a :class:`RankdError`. gRPC failures become
:class:`AgentError` subclasses (``raise ... from err``) that name the agent and
the status code, so a caller never has to catch ``grpc.RpcError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from client.report import FailureReport

__all__ = [
    "AgentError",
    "AgentTimeout",
    "AgentUnavailable",
    "AlreadyExists",
    "ClusterError",
    "InvalidArgument",
    "JobFailed",
    "JobNotFound",
    "NodeListError",
    "RankdError",
    "agent_error",
]


class RankdError(Exception):
    """Base of every error raised by the rankd client."""


class NodeListError(RankdError, ValueError):
    """A node list, hostfile or Slurm node-list expression could not be parsed."""


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
        shown = [f"  {err}" for err in list(self.errors.values())[:10]]
        if len(self.errors) > 10:
            shown.append(f"  ... and {len(self.errors) - 10} more")
        head = f"{action}: {len(self.errors)} of {total} nodes failed"
        super().__init__("\n".join([head, *shown]))


class JobFailed(RankdError):
    """A launched job failed (after all its restarts).

    ``report`` is the :class:`client.report.FailureReport`; ``str(err)`` is its
    formatted text, root cause first.
    """

    def __init__(self, report: FailureReport) -> None:
        self.report = report
        super().__init__(report.format())
