"""Failures as data, and the one report a failed job gets.

In the spirit of torch's ``ChildFailedError``: a title, the root cause on top
with everything known about it (host, global and local rank, exit code, signal,
pid, error file, the traceback from the error file or the stderr tail), then
the other failures. It stays short for a thousand ranks: identical failures
fold into one entry (``global ranks 4-127 (host03, host04): Signal 15 (SIGTERM)``).

Rules, stated once:

- Timestamps are corrected onto the client's clock with each agent's estimated
  offset (:mod:`rankd.client.clock`), so failures order across nodes.
- Root cause = the earliest corrected failure among ranks that failed on their
  own (not ``terminated_by_agent``), or a lost node (:class:`NodeLost`) when it
  went silent before that failure (or no rank failed on its own); the other
  lost nodes are listed. When every rank was terminated and no node was lost,
  the earliest of all.
- A job stopped by a Kill the launch did not send is KILLED: the report names
  who killed it and lists the terminated ranks, and shows no root cause.
- When the next own failure on another node is closer to the root cause than
  the two clocks' combined uncertainty, the report says so.
- Fold key: terminated or not, exit code, signal, and the message with its
  numbers (pids, ranks) masked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rankd.client.clock import ClockSample
from rankd.client.membership import Membership, format_history

__all__ = [
    "FailureGroup",
    "FailureReport",
    "NodeLost",
    "NodeView",
    "RankFailure",
    "build_report",
    "fold",
    "format_ranks",
]

_WIDTH = 60
_MAX_GROUPS = 12
_MAX_RANGES = 8
_MAX_HOSTS = 4
_MAX_TRACE_LINES = 40
_INDENT = " " * 14
# The agent's own wording when there is no error file: says nothing the cause doesn't.
_GENERIC_MESSAGE = re.compile(r"^(Signal \d+|Process \d+ exited with code|exited with code)")


@dataclass(frozen=True)
class NodeView:
    """What the report knows about one node: name, place in the job, clock."""

    address: str
    name: str
    node_rank: int
    rank_offset: int
    clock: ClockSample | None = None


@dataclass(frozen=True)
class NodeLost:
    """A node the client gave up on (see :mod:`rankd.client.liveness`): which node, its
    global ranks (their fate unknown), why, and when.

    ``since`` is when it went silent or its connection broke, ``detected`` when the
    client declared it lost (wall-clock seconds on the client's clock)."""

    node: str
    address: str
    node_rank: int
    global_ranks: tuple[int, ...]
    why: str
    since: float
    detected: float

    def line(self) -> str:
        """``node host02 (node rank 1, global ranks 2-3) lost: no answer for 10 s``."""
        ranks = f", global ranks {format_ranks(self.global_ranks)}" if self.global_ranks else ""
        return f"node {self.node} (node rank {self.node_rank}{ranks}) lost: {self.why}"


@dataclass(frozen=True)
class RankFailure:
    """One rank's failure, placed in the job (global rank) and in time."""

    node: str
    address: str
    node_rank: int
    global_rank: int
    local_rank: int
    pid: int
    exit_code: int
    signal_name: str
    message: str
    error_file: str
    traceback: str
    stderr_tail: tuple[str, ...]
    timestamp: float
    """Failure time on the agent's clock (seconds since the epoch)."""
    time: float
    """Failure time corrected onto the client's clock."""
    clock: ClockSample | None
    terminated: bool
    error_file_problem: str = ""

    @classmethod
    def from_proto(cls, failure: Any, node: NodeView) -> RankFailure:
        """Build from a ``Failure`` message of ``node``."""
        clock = node.clock
        return cls(
            node=node.name,
            address=node.address,
            node_rank=node.node_rank,
            global_rank=node.rank_offset + failure.local_rank,
            local_rank=failure.local_rank,
            pid=failure.pid,
            exit_code=failure.exit_code,
            signal_name=failure.signal_name,
            message=failure.message,
            error_file=failure.error_file or "<N/A>",
            traceback=failure.traceback,
            stderr_tail=tuple(failure.stderr_tail),
            timestamp=failure.timestamp,
            time=clock.to_client_time(failure.timestamp) if clock else failure.timestamp,
            clock=clock,
            terminated=failure.terminated_by_agent,
            error_file_problem=failure.error_file_problem,
        )

    @property
    def uncertainty(self) -> float:
        return self.clock.uncertainty if self.clock else 0.0

    def cause(self) -> str:
        """``Signal 15 (SIGTERM)`` or ``exit code 1``."""
        if self.exit_code < 0:
            return f"Signal {-self.exit_code} ({self.signal_name or 'unknown signal'})"
        return f"exit code {self.exit_code}"

    def summary(self) -> str:
        """One line: the cause, and the error message when there is one."""
        msg = self.message.strip().splitlines()[-1] if self.message.strip() else ""
        generic = _GENERIC_MESSAGE.match(msg) is not None
        return f"{self.cause()}: {msg}" if msg and not generic else self.cause()

    def fold_key(self) -> tuple[bool, int, str, str]:
        masked = re.sub(r"0x[0-9a-fA-F]+|\d+", "N", self.message.strip())
        return (self.terminated, self.exit_code, self.signal_name, masked)


def format_ranks(ranks: Iterable[int], *, limit: int | None = None) -> str:
    """``[0, 1, 2, 3, 8, 9]`` -> ``"0-3,8-9"``; at most ``limit`` ranges shown."""
    ordered = sorted(set(ranks))
    ranges: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        ranges.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    if limit is not None and len(ranges) > limit:
        return ",".join(ranges[:limit]) + f",... ({len(ranges) - limit} more ranges)"
    return ",".join(ranges)


def ranks_on_nodes(ranks: Sequence[int], nodes: Sequence[str]) -> str:
    """``global ranks 4-127 (host03, host04, +2 more nodes)``: short at any size."""
    shown = ", ".join(nodes[:_MAX_HOSTS])
    if len(nodes) > _MAX_HOSTS:
        shown += f", +{len(nodes) - _MAX_HOSTS} more nodes"
    return f"global ranks {format_ranks(ranks, limit=_MAX_RANGES)} ({shown})"


@dataclass(frozen=True)
class FailureGroup:
    """Identical failures (same fold key) of one or more ranks."""

    failures: tuple[RankFailure, ...]

    @property
    def first(self) -> RankFailure:
        return self.failures[0]

    @property
    def ranks(self) -> list[int]:
        return sorted(f.global_rank for f in self.failures)

    @property
    def nodes(self) -> list[str]:
        """The nodes of the group by node rank: one pass, whatever the number of ranks."""
        first: dict[str, int] = {}
        for f in self.failures:
            if f.node_rank < first.get(f.node, f.node_rank + 1):
                first[f.node] = f.node_rank
        return sorted(first, key=first.__getitem__)

    def line(self) -> str:
        """``global ranks 4-127 (host03, host04): Signal 15 (SIGTERM)``."""
        first = self.first
        if len(self.failures) == 1:
            where = f"global rank {first.global_rank} ({first.node}, local_rank "
            where += f"{first.local_rank}, pid {first.pid})"
        else:
            nodes = self.nodes
            where = ranks_on_nodes(self.ranks, nodes)
        return f"{where}: {first.summary()}"


def fold(failures: Iterable[RankFailure]) -> list[FailureGroup]:
    """Group identical failures; groups ordered by their earliest failure."""
    groups: dict[tuple[bool, int, str, str], list[RankFailure]] = {}
    for failure in failures:
        groups.setdefault(failure.fold_key(), []).append(failure)
    folded = [FailureGroup(tuple(sorted(g, key=lambda f: f.time))) for g in groups.values()]
    return sorted(folded, key=lambda g: (g.first.time, g.first.global_rank))


@dataclass(frozen=True)
class FailureReport:
    """Every failure of one attempt of a job, root cause first."""

    job_id: str
    restart_count: int
    world_size: int
    nnodes: int
    failures: tuple[RankFailure, ...]
    """Root cause first, then in corrected-time order."""
    root_cause: RankFailure | None
    close_call: RankFailure | None = None
    """An own failure on another node within the clocks' uncertainty of the root cause."""
    node_errors: tuple[tuple[str, str], ...] = ()
    """(node, error) for nodes that could not be reached or answered wrongly."""
    reason: str = ""
    notes: tuple[str, ...] = field(default=())
    state: str = "FAILED"
    """``"FAILED"``, ``"KILLED"`` or ``"HUNG"`` (a failure: no output for the hang
    timeout); a lost node fails the job: FAILED, see ``root_node``."""
    lost_nodes: tuple[NodeLost, ...] = ()
    """Every node the client gave up on, in the order they went silent."""
    root_node: NodeLost | None = None
    """The root cause when it is a lost node (``root_cause`` is then None)."""
    killed_by: str = ""
    """KILLED: the killed job's reason, e.g. ``killed by Kill(SIGTERM) from alice``."""
    killed_at: float = 0.0
    """KILLED: when the first rank was terminated (client clock)."""
    hang_title: str = ""
    """HUNG: ``job X HUNG: no output from any rank for S s`` (see :mod:`rankd.client.hang`)."""
    hang_lines: tuple[str, ...] = ()
    """HUNG: the folded stacks of the ranks when the hang was declared, as text."""
    history: tuple[Membership, ...] = ()
    """Every attempt of the launch with its members and outcome, this one last."""

    @property
    def own_failures(self) -> list[RankFailure]:
        """Failures other than the root cause, of ranks that failed on their own."""
        return [f for f in self.failures if not f.terminated and f is not self.root_cause]

    @property
    def terminated(self) -> list[RankFailure]:
        """Ranks rankd stopped (because of the root cause, or a Kill)."""
        return [f for f in self.failures if f.terminated and f is not self.root_cause]

    def title(self) -> str:
        ranks = f"{self.world_size} ranks on {self.nnodes} node{'s' * (self.nnodes != 1)}"
        if self.hang_title:
            return f"rankd {self.hang_title} (attempt {self.restart_count}, {ranks})"
        title = f"rankd job {self.job_id} {self.state} (attempt {self.restart_count}, {ranks})"
        if self.root_node is not None:
            title += f": node {self.root_node.node} lost"
        return title

    def format(self) -> str:
        """The report as text: short, whatever the number of ranks."""
        if self.state == "KILLED":
            return self._format_killed()
        out = ["=" * _WIDTH, self.title()]
        if (
            self.reason
            and self.root_cause is None
            and self.root_node is None
            and not self.hang_title
        ):
            out.append(f"reason: {self.reason}")
        if self.hang_lines:
            out += ["-" * _WIDTH, *self.hang_lines]
        if self.root_node is not None:
            out += ["-" * _WIDTH, "Root Cause (first observed failure): a lost node"]
            out += _format_lost(self.root_node)
        elif self.root_cause is not None:
            out += ["-" * _WIDTH, "Root Cause (first observed failure):"]
            out += _format_root(self.root_cause)
        others = [n for n in self.lost_nodes if n is not self.root_node]
        if others:
            out += ["-" * _WIDTH, "Lost nodes:"]
            out += [f"  {n.line()} (last heard from at {_iso(n.since)})" for n in others]
        if self.node_errors:
            out += ["-" * _WIDTH, "Unreachable or failed nodes:"]
            out += [f"  {node}: {err}" for node, err in self.node_errors]
        out += ["-" * _WIDTH, "Other Failures:"]
        out += _format_groups(fold(self.own_failures), start=1) or ["  <NO_OTHER_FAILURES>"]
        terminated = fold(self.terminated)
        if terminated:
            out += ["-" * _WIDTH, "Terminated by rankd (did not fail on their own):"]
            out += _format_groups(terminated, start=1)
        notes = list(self.notes)
        if self.close_call is not None and self.root_cause is not None:
            notes.append(_close_call_note(self.root_cause, self.close_call))
        if notes:
            out += ["-" * _WIDTH, *(f"Note: {n}" for n in notes)]
        if len(self.history) > 1:
            out += ["-" * _WIDTH, "Attempts:", *format_history(self.history)]
        out.append("=" * _WIDTH)
        return "\n".join(out)

    def _format_killed(self) -> str:
        out = ["=" * _WIDTH, self.title()]
        out.append(f"reason: {self.killed_by or self.reason or 'killed'}")
        if self.killed_at:
            out.append(f"time  : {_iso(self.killed_at)}")
        out += ["-" * _WIDTH, "Terminated ranks (stopped by the kill, did not fail):"]
        out += _format_groups(fold(self.failures), start=1) or ["  <NONE>"]
        if self.notes:
            out += ["-" * _WIDTH, *(f"Note: {n}" for n in self.notes)]
        out.append("=" * _WIDTH)
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts).isoformat(sep="_") if ts > 0 else "<N/A>"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _format_root(f: RankFailure) -> list[str]:
    time_line = f"  time      : {_iso(f.time)}"
    if f.clock is not None:
        time_line += f" (node clock offset {f.clock.offset * 1000:+.1f} ms ±{_ms(f.uncertainty)})"
    signal = f" ({f.signal_name})" if f.signal_name else ""
    lines = [
        "[0]:",
        time_line,
        f"  host      : {f.node} (node rank {f.node_rank})",
        f"  rank      : {f.global_rank} (local_rank: {f.local_rank})",
        f"  exitcode  : {f.exit_code} (pid: {f.pid}){signal}",
        f"  error_file: {f.error_file}",
    ]
    if f.error_file_problem:
        lines.append(f"  problem   : {f.error_file_problem}")
    # torch shows the error file's py_callstack; without one, the stderr tail.
    if f.traceback.strip():
        body = f.traceback.rstrip().splitlines()
    elif f.stderr_tail:
        body = [f.message.strip(), "stderr (last lines):", *f.stderr_tail]
    else:
        body = [f.message.strip() or f.cause()]
    if len(body) > _MAX_TRACE_LINES:
        cut = len(body) - _MAX_TRACE_LINES
        body = [f"... ({cut} lines cut)", *body[-_MAX_TRACE_LINES:]]
    lines.append(f"  traceback : {body[0]}")
    lines += [f"{_INDENT}{line}" for line in body[1:]]
    return lines


def _format_lost(n: NodeLost) -> list[str]:
    ranks = format_ranks(n.global_ranks) if n.global_ranks else "<unknown>"
    waited = max(n.detected - n.since, 0.0)
    return [
        "[0]:",
        f"  time      : {_iso(n.since)} (last heard from; declared lost {waited:.1f} s later)",
        f"  host      : {n.node} (node rank {n.node_rank})",
        f"  ranks     : {ranks} (global; their state is unknown)",
        f"  lost      : {n.why}",
    ]


def _format_groups(groups: Sequence[FailureGroup], *, start: int) -> list[str]:
    lines = [f"[{start + i}]: {g.line()}" for i, g in enumerate(groups[:_MAX_GROUPS])]
    rest = groups[_MAX_GROUPS:]
    if rest:
        count = sum(len(g.failures) for g in rest)
        lines.append(f"... and {len(rest)} more kinds of failure on {count} ranks")
    return lines


def _close_call_note(root: RankFailure, other: RankFailure) -> str:
    gap = abs(other.time - root.time)
    bound = root.uncertainty + other.uncertainty
    return (
        f"global rank {other.global_rank} ({other.node}) failed {_ms(gap)} from the root "
        f"cause, within the clocks' uncertainty (±{_ms(bound)}): either may have failed first."
    )


def build_report(
    job_id: str,
    outcomes: Sequence[tuple[NodeView, Any]],
    *,
    world_size: int,
    restart_count: int,
    node_errors: Sequence[tuple[str, str]] = (),
    reason: str = "",
    notes: Sequence[str] = (),
    lost: Sequence[NodeLost] = (),
    killed_by: str = "",
) -> FailureReport:
    """The report of one attempt from each node's final ``JobStatus`` (or None).

    ``lost``: the nodes given up on. ``killed_by``: the job was stopped by a Kill the
    caller did not send (its reason); unless a rank failed on its own or a node was
    lost, the report is then KILLED, without a root cause."""
    failures = _failures_of(outcomes)
    own = [f for f in failures if not f.terminated]
    lost_nodes = tuple(sorted(lost, key=lambda n: (n.since, n.node_rank)))
    common = {
        "job_id": job_id,
        "restart_count": restart_count,
        "world_size": world_size,
        "nnodes": len(outcomes),
        "node_errors": tuple(node_errors),
        "reason": reason,
        "notes": tuple(notes),
        "lost_nodes": lost_nodes,
    }
    if killed_by and not own and not lost_nodes:
        killed_at = failures[0].time if failures else 0.0
        return FailureReport(
            failures=tuple(failures),
            root_cause=None,
            state="KILLED",
            killed_by=killed_by,
            killed_at=killed_at,
            **common,  # type: ignore[arg-type]
        )
    root_node, root = _root_cause(own, failures, lost_nodes)
    close_call = None
    if root is not None:
        failures.remove(root)
        failures.insert(0, root)
        close_call = _close_call(root, own[1:])
    return FailureReport(
        failures=tuple(failures),
        root_cause=root,
        close_call=close_call,
        root_node=root_node,
        **common,  # type: ignore[arg-type]
    )


def _failures_of(outcomes: Sequence[tuple[NodeView, Any]]) -> list[RankFailure]:
    """Every node's rank failures, earliest first (ties: lower global rank first)."""
    failures = [
        RankFailure.from_proto(failure, node)
        for node, status in outcomes
        if status is not None
        for failure in status.failures
    ]
    failures.sort(key=lambda f: (f.time, f.global_rank))
    return failures


def _root_cause(
    own: Sequence[RankFailure],
    failures: Sequence[RankFailure],
    lost_nodes: Sequence[NodeLost],
) -> tuple[NodeLost | None, RankFailure | None]:
    """``(root_node, root)``, at most one of them set. The first lost node is the root
    cause unless a rank failed on its own before that node went silent; else the
    earliest own failure, else the earliest failure (a rank that was terminated)."""
    first_lost = lost_nodes[0] if lost_nodes else None
    if first_lost is not None and (not own or first_lost.since < own[0].time):
        return first_lost, None
    return None, next(iter(own or failures), None)


def _close_call(root: RankFailure, others: Sequence[RankFailure]) -> RankFailure | None:
    """The first own failure on another node within the clocks' uncertainty of the root
    cause, if the next failure elsewhere is that close: the order might be the other."""
    for other in others:
        if other.node_rank == root.node_rank:
            continue
        if abs(other.time - root.time) <= root.uncertainty + other.uncertainty:
            return other
        return None
    return None
