"""Job specs: what one attempt of a job on this node runs, validated before anything starts.

`Std` and its parsing follow torch's `torch.distributed.elastic.multiprocessing.api.Std`
(same accepted strings, same error for anything else).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntFlag
from typing import Any

from rankd.agent.binding import check_binding
from rankd.agent.errors import SpecError

__all__ = [
    "DEFAULT_KILL_TIMEOUT",
    "MAX_DUPLICATE_FILTERS",
    "MAX_DUPLICATE_FILTER_BYTES",
    "MAX_LEASE",
    "MAX_REQUESTER",
    "RESERVED_JOB_PREFIX",
    "JobSpec",
    "Limits",
    "Std",
    "check_counts",
    "check_filters",
    "check_requester",
    "parse_signal",
    "parse_std",
    "render_prefix",
    "to_map",
    "validate_job_id",
]

DEFAULT_KILL_TIMEOUT = 30.0
#: Longest lease a spec may ask for, seconds.
MAX_LEASE = 86400.0
#: Longest requester a Kill may name, characters.
MAX_REQUESTER = 256
#: Most duplicate filters per stream (stdout, stderr) of a spec: torch's users give a few.
MAX_DUPLICATE_FILTERS = 64
#: Most bytes (UTF-8) of a stream's duplicate filters together; with the count, what keeps
#: their matcher's compile near 1 ms on the agent's loop (agent.filters).
MAX_DUPLICATE_FILTER_BYTES = 4096
#: Job ids may not start with it: the agent's own names in the log dir do (spare run
#: directories are `.spare-*`, and a run directory starts with its job id).
RESERVED_JOB_PREFIX = "."
_JOB_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_ROLE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_VALUE_REGEX = r"^[0123]$"
_MAPPING_REGEX = r"^(\d:[0123],)*(\d:[0123])$"
_TEMPLATE_FIELDS = frozenset({"role_name", "rank", "local_rank"})


class Std(IntFlag):
    """Which of a rank's streams a setting applies to (torch's values)."""

    NONE = 0
    OUT = 1
    ERR = 2
    ALL = OUT | ERR


def parse_std(value: str) -> Std | dict[int, Std]:
    """Parse "0".."3" or a map like "0:3,1:0" as torch's `Std.from_str` does; "" means "0"."""
    if value == "":
        return Std.NONE
    if re.match(_VALUE_REGEX, value):
        return Std(int(value))
    if re.match(_MAPPING_REGEX, value):
        result: dict[int, Std] = {}
        for item in value.split(","):
            rank, std = item.split(":")
            result[int(rank)] = Std(int(std))
        return result
    raise ValueError(f"{value} does not match: <{_VALUE_REGEX}> or <{_MAPPING_REGEX}>")


def to_map(value: Std | Mapping[int, Std], nprocs: int) -> dict[int, Std]:
    """One `Std` per local rank; ranks missing from a map get `Std.NONE` (torch's `to_map`)."""
    if isinstance(value, Std):
        return dict.fromkeys(range(nprocs), value)
    return {rank: value.get(rank, Std.NONE) for rank in range(nprocs)}


def parse_signal(value: str | int) -> signal.Signals:
    """A signal from a name ("SIGTERM", "term", "TERM") or a number ("15", 15)."""
    text = str(value).strip()
    if text == "":
        return signal.SIGTERM
    try:
        if text.lstrip("-").isdigit():
            return signal.Signals(int(text))
        name = text.upper()
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        raise SpecError(
            f"unknown signal {text!r}: use a name like SIGTERM, SIGKILL, SIGUSR1 or a number"
        ) from None


def check_requester(requester: str) -> str:
    """A Kill's requester as recorded (stripped); raises SpecError when it is too long or
    holds control characters."""
    text = requester.strip()
    if len(text) > MAX_REQUESTER:
        raise SpecError(f"requester is longer than {MAX_REQUESTER} characters")
    if any(ord(c) < 32 for c in text):
        raise SpecError("requester must be one line without control characters")
    return text


def validate_job_id(job_id: str) -> None:
    """Raises SpecError unless `job_id` can name a run directory: 1-128 letters, digits,
    '.', '_', '-', without '..', not starting with '.' (the agent's own names)."""
    if not _JOB_ID.fullmatch(job_id) or ".." in job_id:
        raise SpecError(
            f"invalid job id {job_id!r}: use 1-128 characters of letters, digits, '.', '_', '-', "
            "without '..'"
        )
    if job_id.startswith(RESERVED_JOB_PREFIX):
        raise SpecError(
            f"invalid job id {job_id!r}: ids starting with {RESERVED_JOB_PREFIX!r} are reserved "
            "for the agent's own names in its log dir (such as its '.spare-*' directories)"
        )


def render_prefix(template: str | None, role_name: str, rank: int, local_rank: int) -> str:
    """The log-line prefix of a rank: torch's TailLog header or the job's template."""
    if not template:
        return f"[{role_name}{local_rank}]:"
    return string.Template(template).safe_substitute(
        role_name=role_name, rank=str(rank), local_rank=str(local_rank)
    )


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask of an agent."""

    max_nprocs: int = 1024
    max_args: int = 4096
    max_arg_bytes: int = 128 * 1024
    max_env_vars: int = 4096
    max_env_bytes: int = 1024 * 1024
    max_kill_timeout: float = 3600.0


@dataclass(frozen=True)
class JobSpec:
    """One attempt of a job on this node; compare with `==` for Start's idempotency."""

    job_id: str
    nprocs: int
    entrypoint: str
    args: tuple[str, ...] = ()
    rank_args: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    rank_env: Mapping[int, Mapping[str, str]] = field(default_factory=dict)
    cwd: str = ""
    role_name: str = "default"
    restart_count: int = 0
    redirects: str = "0"
    tee: str = "0"
    local_ranks_filter: frozenset[int] = frozenset()
    log_line_prefix_template: str = ""
    duplicate_stdout_filters: tuple[str, ...] = ()
    duplicate_stderr_filters: tuple[str, ...] = ()
    rank_offset: int = 0
    kill_timeout: float = DEFAULT_KILL_TIMEOUT
    default_env: Mapping[str, str] = field(default_factory=dict)
    # seconds without a Renew after which the agent stops the job; 0 = no lease
    lease: float = 0.0
    # pin the ranks: torch's NUMA mode, or srun's --cpu-bind form (agent.binding)
    numa_binding: str = ""
    cpu_bind: str = ""

    def validate(self, limits: Limits | None = None) -> JobSpec:
        """Check every field; raise `SpecError` naming the field. Returns the spec with
        `entrypoint` resolved to an absolute path."""
        limits = limits or Limits()
        validate_job_id(self.job_id)
        if not 1 <= self.nprocs <= limits.max_nprocs:
            raise SpecError(f"nprocs must be between 1 and {limits.max_nprocs}, got {self.nprocs}")
        if self.restart_count < 0:
            raise SpecError(f"restart_count must be >= 0, got {self.restart_count}")
        if self.rank_offset < 0:
            raise SpecError(f"rank_offset must be >= 0, got {self.rank_offset}")
        if not _ROLE.fullmatch(self.role_name):
            raise SpecError(
                f"invalid role_name {self.role_name!r}: 1-64 letters, digits, '.', '_', '-'"
            )
        if not (
            math.isfinite(self.kill_timeout) and 0 <= self.kill_timeout <= limits.max_kill_timeout
        ):
            raise SpecError(
                f"kill_timeout must be between 0 and {limits.max_kill_timeout:g} seconds, "
                f"got {self.kill_timeout}"
            )
        if not (math.isfinite(self.lease) and 0 <= self.lease <= MAX_LEASE):
            raise SpecError(
                f"lease must be 0 (none) or up to {MAX_LEASE:g} seconds, got {self.lease}"
            )
        self._check_args(limits)
        self._check_env(limits)
        for what, value in (("redirects", self.redirects), ("tee", self.tee)):
            try:
                parse_std(value)
            except ValueError as err:
                raise SpecError(f"{what}: {err}") from None
        check_binding(self.numa_binding, self.cpu_bind)
        self._check_ranks("local_ranks_filter", self.local_ranks_filter)
        self._check_template()
        check_filters("duplicate_stdout_filters", self.duplicate_stdout_filters)
        check_filters("duplicate_stderr_filters", self.duplicate_stderr_filters)
        cwd = self.cwd
        if cwd:
            _no_nul("cwd", cwd)
            if not os.path.isabs(cwd):
                raise SpecError(f"cwd must be an absolute path, got {cwd!r}")
            if not os.path.isdir(cwd):
                raise SpecError(f"cwd {cwd!r} does not exist or is not a directory")
        return _replace_entrypoint(self, self._resolve_entrypoint())

    def _resolve_entrypoint(self) -> str:
        entry = self.entrypoint
        if not entry:
            raise SpecError("entrypoint is empty: give the path of an executable")
        _no_nul("entrypoint", entry)
        if "/" not in entry:
            path = self.env.get("PATH") or os.environ.get("PATH", os.defpath)
            found = shutil.which(entry, path=path)
            if found is None:
                raise SpecError(f"entrypoint {entry!r} was not found on PATH")
            entry = os.path.abspath(found)
        elif not os.path.isabs(entry):
            entry = os.path.join(self.cwd or os.getcwd(), entry)
        if not os.path.isfile(entry):
            raise SpecError(f"entrypoint {entry!r} does not exist or is not a file")
        if not os.access(entry, os.X_OK):
            raise SpecError(f"entrypoint {entry!r} is not executable (chmod +x it?)")
        return entry

    def _check_ranks(self, what: str, ranks: Sequence[int] | frozenset[int]) -> None:
        bad = sorted(r for r in ranks if not 0 <= r < self.nprocs)
        if bad:
            raise SpecError(
                f"{what}: local ranks {bad} are out of range for nprocs={self.nprocs} "
                f"(valid: 0-{self.nprocs - 1})"
            )

    def _check_args(self, limits: Limits) -> None:
        self._check_ranks("rank_args", list(self.rank_args))
        all_args = list(self.args)
        for extra in self.rank_args.values():
            all_args.extend(extra)
        if len(all_args) > limits.max_args:
            raise SpecError(f"too many arguments ({len(all_args)} > {limits.max_args})")
        for arg in all_args:
            _no_nul("args", arg)
        size = sum(len(a.encode()) for a in all_args)
        if size > limits.max_arg_bytes:
            raise SpecError(f"arguments too large ({size} bytes > {limits.max_arg_bytes})")

    def _check_env(self, limits: Limits) -> None:
        self._check_ranks("rank_env", list(self.rank_env))
        envs = [self.env, self.default_env, *self.rank_env.values()]
        count = sum(len(e) for e in envs)
        if count > limits.max_env_vars:
            raise SpecError(f"too many environment variables ({count} > {limits.max_env_vars})")
        size = 0
        for env in envs:
            for key, value in env.items():
                if not key or "=" in key or "\0" in key:
                    raise SpecError(
                        f"invalid environment variable name {key!r}: non-empty, no '=' or NUL"
                    )
                _no_nul(f"env[{key}]", value)
                size += len(key.encode()) + len(value.encode())
        if size > limits.max_env_bytes:
            raise SpecError(f"environment too large ({size} bytes > {limits.max_env_bytes})")

    def _check_template(self) -> None:
        template = self.log_line_prefix_template
        if not template:
            return
        _no_nul("log_line_prefix_template", template)
        if len(template) > 256:
            raise SpecError("log_line_prefix_template is longer than 256 characters")
        try:
            names = {
                m.group("named") or m.group("braced")
                for m in string.Template.pattern.finditer(template)
                if m.group("invalid") is None and (m.group("named") or m.group("braced"))
            }
        except re.error:  # pragma: no cover - the pattern is fixed
            names = set()
        unknown = names - _TEMPLATE_FIELDS
        if unknown:
            raise SpecError(
                f"log_line_prefix_template: unknown placeholder(s) {sorted(unknown)}; "
                "use ${role_name}, ${rank}, ${local_rank}"
            )

    # -- what a rank gets ------------------------------------------------------

    def argv(self, local_rank: int) -> list[str]:
        return [self.entrypoint, *self.args, *self.rank_args.get(local_rank, ())]

    def prefix(self, local_rank: int) -> str:
        return render_prefix(
            self.log_line_prefix_template,
            self.role_name,
            self.rank_offset + local_rank,
            local_rank,
        )

    def redirect_map(self) -> dict[int, Std]:
        return to_map(parse_std(self.redirects), self.nprocs)

    def tee_map(self) -> dict[int, Std]:
        return to_map(parse_std(self.tee), self.nprocs)

    def same_job_as(self, other: JobSpec) -> bool:
        return _comparable(self) == _comparable(other)


def check_counts(msg: Any, limits: Limits) -> None:
    """Raises SpecError when the JobSpec message `msg` holds more entries in a repeated
    field or map than any valid spec may, before any is copied out of it: a request
    within the receive limit holds up to a million of them, and copying them (as
    `JobSpec.validate` then would) held the event loop for 100-200 ms. `len` of a
    repeated field or a map costs nothing; the other checks are `validate`'s."""
    check_filters("duplicate_stdout_filters", msg.duplicate_stdout_filters)
    check_filters("duplicate_stderr_filters", msg.duplicate_stderr_filters)
    for what in ("rank_args", "rank_env", "local_ranks_filter"):
        count = len(getattr(msg, what))
        if count > limits.max_nprocs:
            raise SpecError(f"{what}: {count} entries, over the limit of {limits.max_nprocs} ranks")
    args = len(msg.args) + sum(len(a.args) for a in msg.rank_args.values())
    if args > limits.max_args:
        raise SpecError(f"too many arguments ({args} > {limits.max_args})")
    env = len(msg.env) + len(msg.default_env) + sum(len(e.env) for e in msg.rank_env.values())
    if env > limits.max_env_vars:
        raise SpecError(f"too many environment variables ({env} > {limits.max_env_vars})")


def check_filters(what: str, needles: Sequence[str]) -> None:
    """Raises SpecError, naming `what` and the limit, unless `needles` (a spec's duplicate
    filters for one stream) are few and short enough, non-empty and without NUL."""
    if len(needles) > MAX_DUPLICATE_FILTERS:
        raise SpecError(
            f"{what}: {len(needles)} filters, over the limit of {MAX_DUPLICATE_FILTERS}"
        )
    if any(n == "" or "\0" in n for n in needles):
        raise SpecError(f"{what}: filters must be non-empty strings without NUL bytes")
    size = sum(len(n.encode()) for n in needles)
    if size > MAX_DUPLICATE_FILTER_BYTES:
        raise SpecError(
            f"{what}: {size} bytes together, over the limit of {MAX_DUPLICATE_FILTER_BYTES}"
        )


def _no_nul(what: str, value: str) -> None:
    if "\0" in value:
        raise SpecError(f"{what} contains a NUL byte")


def _replace_entrypoint(spec: JobSpec, entrypoint: str) -> JobSpec:
    return replace(spec, entrypoint=entrypoint)


def _comparable(spec: JobSpec) -> dict[str, Any]:
    return {
        "job_id": spec.job_id,
        "nprocs": spec.nprocs,
        "entrypoint": spec.entrypoint,
        "args": tuple(spec.args),
        "rank_args": {k: tuple(v) for k, v in spec.rank_args.items() if v},
        "env": dict(spec.env),
        "rank_env": {k: dict(v) for k, v in spec.rank_env.items() if v},
        "cwd": spec.cwd,
        "role_name": spec.role_name,
        "restart_count": spec.restart_count,
        "redirects": spec.redirects or "0",
        "tee": spec.tee or "0",
        "local_ranks_filter": frozenset(spec.local_ranks_filter),
        "template": spec.log_line_prefix_template,
        "dup_out": tuple(spec.duplicate_stdout_filters),
        "dup_err": tuple(spec.duplicate_stderr_filters),
        "rank_offset": spec.rank_offset,
        "kill_timeout": spec.kill_timeout,
        "default_env": dict(spec.default_env),
        "lease": spec.lease,
        "numa_binding": spec.numa_binding,
        "cpu_bind": spec.cpu_bind if spec.cpu_bind != "none" else "",
    }
