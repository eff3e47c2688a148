"""The elastic side of a launch: an attempt's view of the cluster (its members only, in
group-rank order), the check of every node before a restart, and the next membership.

Before every restart the launch asks every node of the cluster for ``Info``, each within
the node timeout: a member that does not answer is lost (the report names it as the
root cause, not the ranks that died of it), a node outside the attempt that answers is a
spare the next attempt may take (:func:`rankd.client.membership.choose_members`); a node
lost earlier that answers again is such a spare. What one node answers never waits on
another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import rankd.client.rpc as rpc
from rankd.client.agent_client import AsyncAgentClient
from rankd.client.attempt import Attempt, Fleet
from rankd.client.errors import RankdError, cluster_error, refusal
from rankd.client.membership import (
    Membership,
    MembershipChange,
    choose_members,
    layout,
    parse_nnodes,
)
from rankd.client.nodes import Node
from rankd.client.report import FailureReport
from rankd.client.results import NodeResult
from rankd.client.topology import TopologyError, resolve_nproc
from rankd.client.torchrun import LaunchConfig
from rankd.client.watches import NodeWatch
from rankd.v1 import agent_pb2

__all__ = ["Elastic", "MemberFleet", "Probe", "change_between", "count", "probe", "root_line"]

#: A node's answer to the check before a restart: its Info, or why it gave none.
Probe = agent_pb2.InfoResponse | RankdError


class MemberFleet:
    """The :class:`~rankd.client.attempt.Fleet` of one attempt: the members of
    ``membership`` among ``fleet``'s nodes, indexed by group rank."""

    def __init__(self, fleet: Fleet, membership: Membership) -> None:
        self._fleet = fleet
        self._indices = membership.indices
        self.nodes: list[Node] = [fleet.nodes[i] for i in self._indices]
        self.names: list[str] = [fleet.names[i] for i in self._indices]
        self.clients: list[AsyncAgentClient] = [fleet.clients[i] for i in self._indices]

    @property
    def timeout(self) -> float:
        return self._fleet.timeout

    @property
    def node_timeout(self) -> float:
        return self._fleet.node_timeout

    async def info(self) -> list[NodeResult[agent_pb2.InfoResponse]]:
        answers = await probe(self._fleet, self._indices)
        return [
            NodeResult(self.nodes[g], g, error=a)
            if isinstance(a, RankdError)
            else NodeResult(self.nodes[g], g, value=a)
            for g, a in enumerate(answers[i] for i in self._indices)
        ]

    def node_watches(self, job_id: str) -> list[NodeWatch]:
        watches = self._fleet.node_watches(job_id)
        return [watches[i] for i in self._indices]

    def watches_of(self, job_id: str) -> list[NodeWatch] | None:
        watches = self._fleet.watches_of(job_id)
        return None if watches is None else [watches[i] for i in self._indices]


async def probe(fleet: Fleet, indices: Sequence[int]) -> dict[int, Probe]:
    """``Info`` from the nodes at ``indices`` of ``fleet``, all at once, each within the
    node timeout (or the RPC timeout, if shorter): index -> answer or error."""
    op = replace(rpc.info(), deadline=min(fleet.timeout, fleet.node_timeout))

    async def one(i: int) -> Probe:
        try:
            return await fleet.clients[i].call(op)
        except RankdError as err:
            return err

    answers = await asyncio.gather(*(one(i) for i in indices))
    return dict(zip(indices, answers, strict=True))


def change_between(
    old: Membership, new: Membership, why: Mapping[int, str]
) -> MembershipChange | None:
    """How ``new`` differs from ``old`` in nodes (None: the same nodes); ``why`` says,
    by cluster index, why a node left."""
    kept = set(new.indices)
    left = tuple(
        (m.name, why.get(m.index, "not chosen")) for m in old.members if m.index not in kept
    )
    before = set(old.indices)
    joined = tuple(m.name for m in new.members if m.index not in before)
    if not left and not joined:
        return None
    return MembershipChange(
        restart_count=new.restart_count,
        left=left,
        joined=joined,
        nnodes=new.nnodes,
        world_size=new.world_size,
        previous_world_size=old.world_size,
    )


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def root_line(report: FailureReport) -> str:
    """The root cause in one line: a lost node, a rank's failure, or the reason."""
    if report.root_node is not None:
        return f"node {report.root_node.node} lost: {report.root_node.why}"
    root = report.root_cause
    if root is None:
        return report.reason or "no failure recorded"
    return f"global rank {root.global_rank} on {root.node}: {root.summary()}"


class Elastic:
    """The membership side of one launch: the layout of each attempt, their history,
    the check of every node after a failed attempt, and the next attempt's members.
    ``event`` takes one-line notices; ``on_membership`` each change. ValueError when
    ``nnodes`` asks for more nodes (MIN) than the cluster lists."""

    def __init__(
        self,
        fleet: Fleet,
        config: LaunchConfig,
        event: Callable[[str], None],
        on_membership: Callable[[MembershipChange], None] | None,
    ) -> None:
        self.fleet = fleet
        self.config = config
        self.event = event
        self.on_membership = on_membership
        total = len(fleet.nodes)
        self.limits = (total, total) if config.nnodes is None else parse_nnodes(config.nnodes)
        if self.limits[0] > total:  # bad input: say so before anything starts
            low, high = self.limits
            raise ValueError(f"--nnodes {low}:{high} needs at least {low} nodes, {total} listed")
        self.membership = Membership(0, (), "", 0)
        self.history: list[Membership] = []
        self.answers: dict[int, Probe] = {}  # the last check of every node, by index

    def use(self, membership: Membership) -> None:
        self.membership = membership
        self.history.append(membership)

    def lay_out(self, restart_count: int, indices: Sequence[int], port: int) -> Membership:
        """The layout over the nodes at ``indices``; ``--nproc-per-node auto|gpu|cpu`` is
        resolved by each node's own topology, from its last Info answer."""
        fleet = self.fleet
        mode = self.config.nproc_per_node
        counts = [mode if isinstance(mode, int) else self.resolve(i, mode) for i in indices]
        return layout(
            restart_count,
            [(i, fleet.names[i], str(fleet.nodes[i]), fleet.nodes[i].host) for i in indices],
            nproc_per_node=counts,
            master_addr=self.config.master_addr,
            master_port=self.config.master_port or port,
        )

    def resolve(self, index: int, mode: str) -> int:
        info = self.answers.get(index)
        if not isinstance(info, agent_pb2.InfoResponse):
            raise TopologyError(
                f"--nproc-per-node {mode}: node {self.fleet.names[index]} gave no Info"
            )
        try:
            return resolve_nproc(mode, info)
        except TopologyError as err:
            raise TopologyError(f"{self.fleet.names[index]}: {err}") from None

    async def first(self) -> Membership:
        """Attempt 0: the first MAX nodes that answer. Raises ``ClusterError`` when a
        node refused this client, or fewer than MIN nodes answer (without ``nnodes``:
        when any node does not)."""
        answers = await self.fleet.info()
        errors = {str(r.node): r.error for r in answers if r.error is not None}
        low, high = self.limits
        refused = any(refusal(err) for err in errors.values())
        elastic = self.config.nnodes is not None
        if errors and (refused or not elastic or len(answers) - len(errors) < low):
            # a refusal (token, TLS) is named as such, not as "cannot reach"
            action = "cannot reach every node"
            if elastic and not refused:
                action = f"cannot reach {low} nodes (--nnodes {low}:{high})"
            raise cluster_error(action, errors, len(answers))
        for r in answers:
            if r.error is not None:
                self.event(
                    f"node {self.fleet.names[r.node_rank]} does not answer, left out: {r.error}"
                )
        ok = [r for r in answers if r.ok][:high]
        self.answers = {r.node_rank: r.unwrap() for r in ok}
        return self.lay_out(0, [r.node_rank for r in ok], ok[0].unwrap().free_port)

    def record(self, outcome: str) -> None:
        """The current attempt ended so."""
        self.history[-1] = replace(self.membership, outcome=outcome)

    def with_history(self, report: FailureReport, note: str = "") -> FailureReport:
        notes = (*report.notes, note) if note else report.notes
        return replace(report, history=tuple(self.history), notes=notes)

    async def check(self, run: Attempt, report: FailureReport) -> FailureReport:
        """After a failed attempt: ask every node (:func:`probe`). A member that does not
        answer is lost in ``run`` (the report, rebuilt, names it); a lost member sits
        out the next attempt and may come back as a spare at a later one."""
        self.answers = await probe(self.fleet, range(len(self.fleet.nodes)))
        for member in self.membership.members:
            answer = self.answers[member.index]
            if isinstance(answer, RankdError) and member.group_rank not in run.lost:
                heard = self.fleet.clients[member.index].liveness.last_heard_wall
                why = f"no answer to the check before a restart: {answer}"
                run.lose(member.group_rank, why, heard)
        for lost in run.lost:
            index = self.membership.members[lost].index
            self.answers[index] = RankdError(f"lost in attempt {self.membership.restart_count}")
        return run.report() if run.lost else report

    def next_membership(self, report: FailureReport) -> Membership | str:
        """The next attempt's layout from the last check of every node, or why there is
        none (fewer than MIN nodes answer). A change is announced."""
        members = self.membership.members
        why = {members[n.node_rank].index: f"lost: {n.why}" for n in report.lost_nodes}
        answering = {i for i, a in self.answers.items() if not isinstance(a, RankdError)}
        low, high = self.limits
        chosen = choose_members(
            self.membership.indices, answering, range(len(self.fleet.nodes)), maximum=high
        )
        if len(chosen) < low:
            rule = f"--nnodes {low}:{high}" if self.config.nnodes else "no --nnodes: every node"
            return (
                f"only {count(len(chosen), 'node')} can run attempt "
                f"{self.membership.restart_count + 1}, fewer than the minimum {low} "
                f"({rule}): giving up"
            )
        first = self.answers[chosen[0]]
        assert not isinstance(first, RankdError)
        nxt = self.lay_out(self.membership.restart_count + 1, chosen, first.free_port)
        change = change_between(self.membership, nxt, why)
        if change is not None:
            self.event(change.line())
            if self.on_membership is not None:
                self.on_membership(change)
        return nxt
