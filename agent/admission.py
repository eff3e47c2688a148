"""What a Start must pass before anything is made: a valid spec with an allowed
entrypoint, then room on the node (running ranks, descriptors, log disk space)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from rankd.agent import resources
from rankd.agent.errors import LimitExceeded, PermissionDenied
from rankd.agent.specs import JobSpec, Limits, validate_job_id

__all__ = ["Admission"]


class Admission:
    """The agent's limits and policy. `allowed_entrypoints` (None: any) are compared by
    real path; `min_free_space` (bytes, 0: none) is what the log directory's file system
    must have free for a Start."""

    def __init__(
        self,
        log_dir: str,
        *,
        limits: Limits | None = None,
        max_running_ranks: int = 4096,
        allowed_entrypoints: Iterable[str] | None = None,
        min_free_space: int = 0,
    ) -> None:
        self.log_dir = log_dir
        self.limits = limits or Limits()
        self.max_running_ranks = max_running_ranks
        self.min_free_space = min_free_space
        self._allowed = (
            None
            if allowed_entrypoints is None
            else frozenset(os.path.realpath(p) for p in allowed_entrypoints)
        )

    def spec(self, spec: JobSpec) -> JobSpec:
        """The validated spec. Raises SpecError or PermissionDenied; changes nothing."""
        validate_job_id(spec.job_id)
        spec = spec.validate(self.limits)
        if self._allowed is not None and os.path.realpath(spec.entrypoint) not in self._allowed:
            raise PermissionDenied(
                f"entrypoint {spec.entrypoint} is not allowed on this agent "
                f"(allowed: {', '.join(sorted(self._allowed))}; see --allow-entrypoint)"
            )
        return spec

    def room(self, spec: JobSpec, running: int) -> None:
        """Raises LimitExceeded, with the arithmetic, when the node has no room for the
        spec's ranks beside the `running` ones: the running-ranks limit, file
        descriptors, free space on the log disk."""
        if running + spec.nprocs > self.max_running_ranks:
            raise LimitExceeded(
                f"starting {spec.nprocs} ranks would exceed this agent's limit of "
                f"{self.max_running_ranks} running ranks ({running} running)"
            )
        resources.check_fds(spec.nprocs)
        resources.check_free_space(self.log_dir, self.min_free_space)

    def free_space(self) -> int:
        """Bytes free on the log directory's file system (-1: unknown)."""
        try:
            return resources.free_bytes(self.log_dir)
        except OSError:
            return -1
