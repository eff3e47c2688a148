"""Which nodes take part in each attempt of a launch, in which order, with which ranks.

An attempt's :class:`Membership` is the one place a job's layout comes from: its
members in group-rank order (``GROUP_RANK`` = position), each with its count of local
ranks and the global rank of its first one (``rank_offset``); ``WORLD_SIZE`` is their
sum and ``MASTER_ADDR`` the first member's host unless the caller fixed it. A launch
lays out every attempt afresh, as torchrun does after a re-rendezvous.

Elastic rule (:func:`choose_members`), for ``nnodes = (MIN, MAX)``: an attempt runs on
the members of the previous one that still answer, in their order, then on the other
nodes of the cluster that answer (spares, in node-list order) until there are MAX; it
runs only when there are at least MIN. Pure data and functions: no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cached_property

__all__ = [
    "Member",
    "Membership",
    "MembershipChange",
    "choose_members",
    "format_history",
    "layout",
    "parse_nnodes",
]

#: Past this many members of different sizes, the launch line gives their range.
_SPELLED_OUT = 8


def parse_nnodes(value: str | int | tuple[int, int]) -> tuple[int, int]:
    """torchrun's ``--nnodes``: ``"3"`` or ``3`` -> (3, 3), ``"2:3"`` or ``(2, 3)`` ->
    (2, 3). ValueError unless 1 <= MIN <= MAX."""
    if isinstance(value, tuple):
        low, high = value
    elif isinstance(value, int):
        low = high = value
    else:
        text = value.strip()
        lo, sep, hi = text.partition(":")
        try:
            low, high = (int(lo), int(hi)) if sep else (int(text), int(text))
        except ValueError:
            raise ValueError(f"nnodes must be N or MIN:MAX, like 4 or 2:4, not {value!r}") from None
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
        raise ValueError(f"nnodes needs 1 <= MIN <= MAX, not {low}:{high}")
    return low, high


@dataclass(frozen=True)
class Member:
    """One node of an attempt: ``index`` in the cluster's node list, its place in the
    job (``group_rank``), its local ranks and the global rank of the first one."""

    index: int
    name: str
    address: str
    host: str
    group_rank: int
    nproc: int
    rank_offset: int

    @property
    def global_ranks(self) -> range:
        return range(self.rank_offset, self.rank_offset + self.nproc)


@dataclass(frozen=True)
class Membership:
    """The layout of one attempt; ``outcome`` is filled in when it has ended
    (``succeeded``, or why it failed)."""

    restart_count: int
    members: tuple[Member, ...]
    master_addr: str
    master_port: int
    outcome: str = ""

    @cached_property
    def max_nproc(self) -> int:
        """The most local ranks of any member."""
        return max((m.nproc for m in self.members), default=0)

    def counts(self) -> str:
        """``4 per node``; when members differ ``4+4+2 per node``, or past
        :data:`_SPELLED_OUT` members ``2 to 8 per node``."""
        nprocs = [m.nproc for m in self.members]
        if len(set(nprocs)) <= 1:
            return f"{nprocs[0] if nprocs else 0} per node"
        if len(nprocs) > _SPELLED_OUT:
            return f"{min(nprocs)} to {max(nprocs)} per node"
        return "+".join(map(str, nprocs)) + " per node"

    @cached_property
    def world_size(self) -> int:
        return sum(m.nproc for m in self.members)

    @property
    def nnodes(self) -> int:
        return len(self.members)

    @property
    def indices(self) -> list[int]:
        return [m.index for m in self.members]

    def master(self) -> str:
        return f"MASTER_ADDR={self.master_addr} MASTER_PORT={self.master_port}"

    def line(self) -> str:
        """``attempt 1: world size 3 on a, b, c (MASTER_ADDR=a:1234): succeeded``."""
        names = ", ".join(m.name for m in self.members)
        text = (
            f"attempt {self.restart_count}: world size {self.world_size} on {names} "
            f"(MASTER_ADDR={self.master_addr}:{self.master_port})"
        )
        return f"{text}: {self.outcome}" if self.outcome else text


def layout(
    restart_count: int,
    members: Sequence[tuple[int, str, str, str]],
    *,
    nproc_per_node: int | Sequence[int],
    master_addr: str | None,
    master_port: int,
) -> Membership:
    """The membership of ``members`` = (cluster index, name, address, host) in group-rank
    order; global ranks member by member. ``nproc_per_node``: every member's count, or
    one per member (nodes resolved by their own topology may differ). ``master_addr``
    None: the first member's host."""
    counts = [nproc_per_node] * len(members) if isinstance(nproc_per_node, int) else nproc_per_node
    placed: list[Member] = []
    offset = 0
    for group_rank, ((index, name, address, host), nproc) in enumerate(
        zip(members, counts, strict=True)
    ):
        placed.append(Member(index, name, address, host, group_rank, nproc, offset))
        offset += nproc
    first = placed[0].host if placed else ""
    return Membership(restart_count, tuple(placed), master_addr or first, master_port)


def choose_members(
    current: Sequence[int], answering: Collection[int], order: Sequence[int], *, maximum: int
) -> list[int]:
    """The next attempt's members (cluster indices): those of ``current`` that are in
    ``answering``, in their order, then the other answering nodes in ``order`` (the
    cluster's) until there are ``maximum``."""
    chosen = [i for i in current if i in answering][:maximum]
    for i in order:
        if len(chosen) >= maximum:
            break
        if i in answering and i not in chosen:
            chosen.append(i)
    return chosen


@dataclass(frozen=True)
class MembershipChange:
    """How the next attempt's membership differs from the last one's: the nodes that
    left (name, why), the spares that joined, and the new size."""

    restart_count: int
    left: tuple[tuple[str, str], ...]
    joined: tuple[str, ...]
    nnodes: int
    world_size: int
    previous_world_size: int

    def line(self) -> str:
        """``attempt 1: node b left (lost: ...); spare d joined; world size 3 -> 3 on 3 nodes``."""
        parts = [f"node {name} left ({why})" for name, why in self.left]
        parts += [f"spare {name} joined" for name in self.joined]
        size = f"world size {self.previous_world_size} -> {self.world_size}"
        nodes = f"{self.nnodes} node{'s' * (self.nnodes != 1)}"
        return f"attempt {self.restart_count}: {'; '.join(parts)}; {size} on {nodes}"


def format_history(history: Sequence[Membership]) -> list[str]:
    """The attempts of a launch, one line each (for the failure report)."""
    return [f"  {m.line()}" for m in history]
