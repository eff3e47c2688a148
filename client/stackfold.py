"""Fold the Python stacks of many ranks into a few groups, the odd ones out first.

A hung job of 1,024 ranks usually shows two or three distinct stacks: most ranks wait
in a collective, one (or a few) sit somewhere else. Each thread stack is folded by its
frames across every rank of every node; groups are printed smallest first, so the rank
that holds everyone up leads. Ranks that could not be sampled are folded by reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rankd.client.report import ranks_on_nodes

__all__ = ["FoldedStacks", "RankSample", "StackGroup", "fold_stacks"]

Frame = tuple[str, str, int]  # function, file, line


@dataclass(frozen=True, slots=True)
class RankSample:
    """One rank's answer: its threads' stacks (outermost frame first) or why none."""

    global_rank: int
    node: str
    local_rank: int
    pid: int
    threads: tuple[tuple[str, tuple[Frame, ...]], ...] = ()  # (thread name, frames)
    error: str = ""
    silent_for: float = -1.0
    last_line: str = ""
    cpu_percent: float = -1.0


@dataclass(slots=True)
class StackGroup:
    frames: tuple[Frame, ...]
    threads: set[str] = field(default_factory=set)
    ranks: list[int] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  # in order of first appearance
    samples: list[RankSample] = field(default_factory=list)  # one per rank, as ranks

    def header(self) -> str:
        return _where(self.ranks, self.nodes) + f": {_count(len(self.ranks), 'rank')}"

    def thread_note(self) -> str:
        names = sorted(self.threads)
        shown = ", ".join(names[:3]) + (f", +{len(names) - 3} more" if len(names) > 3 else "")
        return f"  thread {shown}" if len(names) == 1 else f"  threads {shown}"


@dataclass(slots=True)
class FoldedStacks:
    groups: list[StackGroup]
    unsampled: list[tuple[str, list[int], list[str]]]  # (reason, ranks, nodes)
    samples: int
    # (node, its error) for nodes that could not be asked: a client error or a message
    node_errors: list[tuple[str, Exception | str]] = field(default_factory=list)

    def lines(self, *, rank_details: int = 0) -> list[str]:
        """The text `rankd stacks` prints: each group's header, its thread names and
        frames (innermost last), a blank line between groups; then what was not sampled.
        `rank_details`: under each group, that many of its ranks with their silence,
        CPU use and last output line (a hang report's)."""
        out: list[str] = []
        for group in self.groups:
            if out:
                out.append("")
            out.append(group.header())
            out.append(group.thread_note())
            out.extend(f"    {fn} ({path}:{line})" for fn, path, line in group.frames)
            out.extend(_details(group.samples, rank_details))
        for reason, ranks, nodes in self.unsampled:
            if out:
                out.append("")
            out.append(f"{_where(ranks, nodes)}: not sampled: {reason}")
        for node, why in self.node_errors:
            if out:
                out.append("")
            out.append(f"node {node}: not sampled: {why}")
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "groups": [
                {
                    "ranks": sorted(g.ranks),
                    "nodes": g.nodes,
                    "threads": sorted(g.threads),
                    "frames": [
                        {"function": fn, "file": path, "line": line} for fn, path, line in g.frames
                    ],
                }
                for g in self.groups
            ],
            "unsampled": [
                {"reason": reason, "ranks": sorted(ranks), "nodes": nodes}
                for reason, ranks, nodes in self.unsampled
            ],
            "node_errors": [{"node": node, "error": str(why)} for node, why in self.node_errors],
        }


def fold_stacks(samples: Iterable[RankSample]) -> FoldedStacks:
    """Group identical thread stacks across ranks; a rank with several threads is in
    several groups. Groups sort by size, smallest first, then by their lowest rank."""
    groups: dict[tuple[Frame, ...], StackGroup] = {}
    failed: dict[str, tuple[list[int], list[str]]] = {}
    count = 0
    for sample in samples:
        count += 1
        if sample.error or not sample.threads:
            ranks, nodes = failed.setdefault(sample.error or "no Python threads", ([], []))
            _add(ranks, nodes, sample)
            continue
        seen: set[tuple[Frame, ...]] = set()
        for name, frames in sample.threads:
            group = groups.get(frames)
            if group is None:
                group = groups[frames] = StackGroup(frames)
            group.threads.add(name)
            if frames not in seen:  # two threads of one rank in one place count once
                seen.add(frames)
                _add(group.ranks, group.nodes, sample)
                group.samples.append(sample)
    # odd ones out first; among equals, main threads (where programs hang) first
    ordered = sorted(
        groups.values(), key=lambda g: (len(g.ranks), "MainThread" not in g.threads, min(g.ranks))
    )
    unsampled = [(reason, r, n) for reason, (r, n) in sorted(failed.items())]
    return FoldedStacks(ordered, unsampled, count)


def _add(ranks: list[int], nodes: list[str], sample: RankSample) -> None:
    ranks.append(sample.global_rank)
    if not nodes or (nodes[-1] != sample.node and sample.node not in nodes):
        nodes.append(sample.node)


def _details(samples: Sequence[RankSample], limit: int) -> list[str]:
    out = []
    for sample in samples[:limit]:
        silent = "never wrote" if sample.silent_for < 0 else f"silent {sample.silent_for:.1f} s"
        cpu = "" if sample.cpu_percent < 0 else f", cpu {sample.cpu_percent:.0f}%"
        last = f", last line: {sample.last_line[:120]!r}" if sample.last_line else ""
        out.append(f"  rank {sample.global_rank} ({sample.node}): {silent}{cpu}{last}")
    if len(samples) > limit > 0:
        out.append(f"  ... and {len(samples) - limit} more ranks")
    return out


def _where(ranks: Sequence[int], nodes: Sequence[str]) -> str:
    if len(ranks) == 1:
        return f"global rank {ranks[0]} ({', '.join(nodes)})"
    return ranks_on_nodes(ranks, nodes)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
