"""The agent's error hierarchy; the gRPC layer maps each class to one status code."""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "FailedPrecondition",
    "JobNotFound",
    "LimitExceeded",
    "PermissionDenied",
    "RankdError",
    "SpecError",
]


class RankdError(Exception):
    """Base of every error the agent raises on purpose."""


class SpecError(RankdError, ValueError):
    """A job spec or request is invalid; nothing was started or changed."""


class JobNotFound(RankdError, KeyError):
    """No job with this id is held by the agent."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "job not found"


class AlreadyExists(RankdError):
    """The job id is in use by a different spec (or attempt)."""


class FailedPrecondition(RankdError):
    """The request is valid but the job is not in a state that allows it."""


class LimitExceeded(RankdError):
    """A configured limit (jobs, ranks, sizes) would be exceeded."""


class PermissionDenied(RankdError):
    """The agent's policy forbids the request (e.g. an entrypoint not allowed)."""
