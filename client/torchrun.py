"""The torchrun side of a launch: its settings, its environment, its Std values.

:class:`LaunchConfig` holds what ``torchrun`` takes as flags; :class:`LaunchHooks`
where the launch's output goes; :class:`LaunchOptions` is both, as the keyword
arguments of ``launch``; :func:`torchrun_env` is the environment torchrun gives
every worker; :func:`parse_std` reads torch's ``Std`` syntax for redirects and tee.
Pure data and functions: no I/O.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from string import Template
from typing import IO, TYPE_CHECKING, Any, TypedDict

from rankd.client.membership import Membership, MembershipChange, parse_nnodes
from rankd.client.topology import parse_cpu_bind, parse_nproc, parse_numa_binding

if TYPE_CHECKING:
    from rankd.v1 import agent_pb2

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_PREFIX_TEMPLATE",
    "LaunchConfig",
    "LaunchHooks",
    "LaunchOptions",
    "LaunchResult",
    "OutputLine",
    "Progress",
    "launch_settings",
    "new_run_id",
    "parse_std",
    "torchrun_defaults",
    "torchrun_env",
]

#: Seconds a launch's lease lasts without renewal (``rankd launch --lease``).
DEFAULT_LEASE = 30.0
#: Longest lease an agent accepts, seconds.
MAX_LEASE = 86400.0

#: torch's TailLog header, but with the global rank: ``[default5]:``.
DEFAULT_PREFIX_TEMPLATE = "[${role_name}${rank}]:"


def parse_std(value: str, what: str = "redirects") -> Callable[[int], int]:
    """torch's ``Std`` syntax -> local rank -> bit mask (1 stdout, 2 stderr).

    ``"0"`` none, ``"1"`` stdout, ``"2"`` stderr, ``"3"`` both, for every rank;
    or a map ``"0:3,1:1"`` (ranks not named get 0).
    """
    text = value.strip() or "0"

    def level(item: str) -> int:
        if item not in {"0", "1", "2", "3"}:
            raise ValueError(f"bad {what} value {item!r}: use 0-3 or a map like 0:3,1:0")
        return int(item)

    if ":" not in text:
        bits = level(text)
        return lambda _rank: bits
    table: dict[int, int] = {}
    for pair in text.split(","):
        rank, sep, item = pair.strip().partition(":")
        if not sep or not rank.strip().isdigit():
            raise ValueError(f"bad {what} map entry {pair!r}: expected LOCAL_RANK:0-3")
        table[int(rank)] = level(item.strip())
    return lambda rank: table.get(rank, 0)


_TEMPLATE_FIELDS = {"role_name", "rank", "local_rank", "host"}


def _check_template(template: str | None) -> None:
    if not template:
        return
    names = {
        m.group("named") or m.group("braced")
        for m in Template.pattern.finditer(template)
        if m.group("named") or m.group("braced")
    }
    if names - _TEMPLATE_FIELDS:
        raise ValueError(
            f"log_line_prefix_template: unknown placeholder(s) {sorted(names - _TEMPLATE_FIELDS)};"
            " use ${role_name}, ${rank}, ${local_rank}, ${host}"
        )


@dataclass(frozen=True)
class LaunchConfig:
    """Everything ``launch`` needs besides the nodes. ``cmd[0]`` is the executable
    (absolute path or a name on the agent's PATH, e.g. ``python3``), the rest
    its arguments.

    ``lease`` (seconds, 0 = none): the launch renews the job's lease on every node
    while it runs; an agent that hears no renewal for that long stops its ranks (a
    launcher that died or was cut off takes its job down). ``detach``: start the
    job without a lease and return at once (``LaunchResult.detached``); no restarts.
    ``hang_timeout`` (seconds, 0 = off): when no rank wrote a line for that long, the
    job is hung: every rank's stack is taken, the job is stopped and the attempt fails
    with a HUNG report (see :mod:`rankd.client.hang`); it counts against
    ``max_restarts``.
    ``nnodes`` (MIN, MAX), or N for (N, N): elastic membership (see
    :mod:`rankd.client.membership`); nodes beyond MAX are spares. None: every node.
    """

    cmd: tuple[str, ...]
    nproc_per_node: int | str = 1
    run_id: str | None = None
    max_restarts: int = 0
    redirects: str = "0"
    tee: str = "0"
    local_ranks_filter: Sequence[int] = ()
    log_line_prefix_template: str | None = None
    master_addr: str | None = None
    master_port: int | None = None
    role_name: str = "default"
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = ""
    kill_timeout: float = 30.0
    lease: float = DEFAULT_LEASE
    detach: bool = False
    hang_timeout: float = 0.0
    nnodes: tuple[int, int] | int | None = None
    numa_binding: str = ""
    cpu_bind: str = ""

    def __post_init__(self) -> None:
        if not self.cmd or not self.cmd[0]:
            raise ValueError("no command to launch")
        object.__setattr__(self, "nproc_per_node", parse_nproc(self.nproc_per_node))
        if self.numa_binding:
            parse_numa_binding(self.numa_binding)
        if self.cpu_bind:
            parse_cpu_bind(self.cpu_bind)
        if self.numa_binding and self.cpu_bind:
            raise ValueError("give numa_binding or cpu_bind, not both")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, not {self.max_restarts}")
        if self.kill_timeout < 0:
            raise ValueError(f"kill_timeout must be >= 0, not {self.kill_timeout}")
        if not (math.isfinite(self.lease) and 0 <= self.lease <= MAX_LEASE):
            raise ValueError(f"lease must be 0 (none) or up to {MAX_LEASE:g} s, not {self.lease}")
        if not (math.isfinite(self.hang_timeout) and self.hang_timeout >= 0):
            raise ValueError(
                f"hang_timeout must be 0 (off) or seconds > 0, not {self.hang_timeout}"
            )
        if self.detach and self.hang_timeout:
            raise ValueError("a detached job has no hang watchdog: nobody is left to watch it")
        if self.detach and self.max_restarts:
            raise ValueError("a detached job cannot restart: nobody is left to restart it")
        known = self.nproc_per_node if isinstance(self.nproc_per_node, int) else None
        if any(r < 0 or (known is not None and r >= known) for r in self.local_ranks_filter):
            raise ValueError(
                f"local_ranks_filter {list(self.local_ranks_filter)} names ranks outside "
                f"0-{(known or 1) - 1}"
            )
        _check_template(self.log_line_prefix_template)
        parse_std(self.redirects, "redirects")
        parse_std(self.tee, "tee")
        object.__setattr__(self, "cmd", tuple(self.cmd))
        object.__setattr__(self, "local_ranks_filter", tuple(self.local_ranks_filter))
        object.__setattr__(self, "env", dict(self.env))
        if self.nnodes is not None:
            object.__setattr__(self, "nnodes", parse_nnodes(self.nnodes))


@dataclass(frozen=True)
class OutputLine:
    """One line of one rank, as ``launch`` hands it to ``on_line``."""

    host: str
    node_rank: int
    global_rank: int
    local_rank: int
    stream: str
    """``"stdout"`` or ``"stderr"``."""
    text: str
    prefix: str
    partial: bool
    restart_count: int


@dataclass(frozen=True)
class Progress:
    """Counts of ranks by state across the cluster, for a live status line."""

    restart_count: int
    world_size: int
    running: int
    succeeded: int
    failed: int
    terminated: int
    unreachable_nodes: int

    def line(self) -> str:
        text = (
            f"attempt {self.restart_count}: {self.world_size} ranks: {self.running} running, "
            f"{self.succeeded} done, {self.failed} failed"
        )
        if self.terminated:
            text += f", {self.terminated} terminated"
        if self.unreachable_nodes:
            text += f", {self.unreachable_nodes} nodes not answering"
        return text


@dataclass(frozen=True)
class LaunchResult:
    """A job that succeeded: its id, the attempt that did, each member's final status
    (in group-rank order). Detached (``detached``): the job just started; ``statuses``
    are Start's answers. ``memberships``: every attempt's layout, the last one's first
    member is group rank 0 of the attempt that succeeded."""

    job_id: str
    restart_count: int
    world_size: int
    statuses: tuple[agent_pb2.JobStatus, ...]
    detached: bool = False
    memberships: tuple[Membership, ...] = ()


@dataclass(frozen=True)
class LaunchHooks:
    """Where a launch's output goes.

    ``on_line`` gets every terminal-visible :class:`OutputLine` (default: write
    ``prefix + text`` to ``stdout``/``stderr``, the process's own by default);
    ``on_text``, used only without ``on_line``, gets the same lines already rendered,
    a batch of one rank's stream at a time: ``(stream, text)``, ``text`` being
    ``prefix + line + "\n"`` per line (the fast way to pass output on: no object per
    line);
    ``on_event`` one-line notices (attempt started, failure, restart; default: the
    launch module's logger); ``on_progress`` a :class:`Progress` every
    ``progress_interval`` seconds; ``on_membership`` a
    :class:`~rankd.client.membership.MembershipChange` before an attempt that runs on
    other nodes than the last one (its ``line()`` also goes to ``on_event``).
    """

    on_line: Callable[[OutputLine], None] | None = None
    on_text: Callable[[str, str], None] | None = None
    on_event: Callable[[str], None] | None = None
    on_membership: Callable[[MembershipChange], None] | None = None
    on_progress: Callable[[Progress], None] | None = None
    progress_interval: float = 1.0
    stdout: IO[str] | None = None
    stderr: IO[str] | None = None


class LaunchOptions(TypedDict, total=False):
    """The keyword arguments of ``launch``: the fields of :class:`LaunchConfig`
    (but ``cmd``) and of :class:`LaunchHooks`; defaults are theirs."""

    nproc_per_node: int | str
    run_id: str | None
    max_restarts: int
    redirects: str
    tee: str
    local_ranks_filter: Sequence[int]
    log_line_prefix_template: str | None
    master_addr: str | None
    master_port: int | None
    role_name: str
    env: Mapping[str, str]
    cwd: str
    kill_timeout: float
    lease: float
    detach: bool
    hang_timeout: float
    nnodes: tuple[int, int] | int | None
    numa_binding: str
    cpu_bind: str
    on_line: Callable[[OutputLine], None] | None
    on_text: Callable[[str, str], None] | None
    on_event: Callable[[str], None] | None
    on_membership: Callable[[MembershipChange], None] | None
    on_progress: Callable[[Progress], None] | None
    progress_interval: float
    stdout: IO[str] | None
    stderr: IO[str] | None


_HOOK_FIELDS = frozenset(f.name for f in dataclasses.fields(LaunchHooks))


def launch_settings(cmd: Sequence[str], options: LaunchOptions) -> tuple[LaunchConfig, LaunchHooks]:
    """``launch``'s arguments as the job's config and the caller's hooks. A name that
    is neither is a ``TypeError``, as for any unexpected keyword argument; a bad value
    a ``ValueError`` (see :class:`LaunchConfig`)."""
    given: dict[str, Any] = dict(options)
    hooks = LaunchHooks(**{name: given.pop(name) for name in _HOOK_FIELDS & given.keys()})
    return LaunchConfig(cmd=tuple(cmd), **given), hooks


def torchrun_env(
    *,
    node_rank: int,
    nnodes: int,
    nproc_per_node: int,
    master_addr: str,
    master_port: int,
    run_id: str,
    restart_count: int,
    max_restarts: int,
    role_name: str = "default",
    env: Mapping[str, str] | None = None,
    rank_offset: int | None = None,
    world_size: int | None = None,
) -> tuple[dict[str, str], dict[int, dict[str, str]]]:
    """The environment torchrun gives its workers: (common env, env per local rank).

    ``node_rank`` is the group rank; ``rank_offset`` the global rank of its local
    rank 0 and ``world_size`` the job's (defaults: every node has ``nproc_per_node``).
    ``env`` is the user's; torchrun's variables win over it. torchrun's defaults that
    yield to the node's own environment are in :func:`torchrun_defaults`.
    """
    if world_size is None:
        world_size = nnodes * nproc_per_node
    if rank_offset is None:
        rank_offset = node_rank * nproc_per_node
    common = dict(env or {})
    common.update(
        {
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(nproc_per_node),
            "GROUP_RANK": str(node_rank),
            "GROUP_WORLD_SIZE": str(nnodes),
            "ROLE_NAME": role_name,
            "ROLE_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
            "TORCHELASTIC_RUN_ID": run_id,
            "TORCHELASTIC_RESTART_COUNT": str(restart_count),
            "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
            # rank 0 hosts the TCPStore itself: there is no torchelastic agent store.
            "TORCHELASTIC_USE_AGENT_STORE": "False",
        }
    )
    per_rank = {}
    for local_rank in range(nproc_per_node):
        rank = str(rank_offset + local_rank)
        per_rank[local_rank] = {"RANK": rank, "ROLE_RANK": rank, "LOCAL_RANK": str(local_rank)}
    return common, per_rank


def torchrun_defaults(nproc_per_node: int) -> dict[str, str]:
    """Variables torchrun sets only when its own environment lacks them; sent as the
    spec's ``default_env`` so that each node's agent environment decides, as it would
    for torchrun running there."""
    defaults = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    if nproc_per_node > 1:
        defaults["OMP_NUM_THREADS"] = "1"
    return defaults


def new_run_id() -> str:
    return f"rankd-{secrets.token_hex(4)}"
