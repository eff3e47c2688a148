"""The stacks of a job's ranks on every node, taken at (nearly) the same moment and folded.

Each node is asked first for the job's status (its rank offset and rank count, to turn
global ranks into its local ones), then every node with ranks to sample is asked for
their stacks at once. A node that cannot answer is named with its reason; it never
holds up the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from typing import Protocol

import rankd.client.rpc as rpc
from rankd.client.agent_client import AsyncAgentClient
from rankd.client.errors import RankdError
from rankd.client.stackfold import FoldedStacks, RankSample, fold_stacks
from rankd.v1 import agent_pb2

__all__ = ["Agents", "gather_stacks", "samples_of"]


class Agents(Protocol):
    """The agents to ask (an ``AsyncCluster``, or a launch's fleet)."""

    @property
    def names(self) -> Sequence[str]: ...

    @property
    def clients(self) -> Sequence[AsyncAgentClient]: ...


async def gather_stacks(
    cluster: Agents,
    job_id: str,
    *,
    ranks: Collection[int] | None = None,
    native: bool = False,
    timeout: float = 0.0,
    skip: Collection[int] = (),
) -> FoldedStacks:
    """The folded stacks of the job's live ranks (``ranks``: global ranks; None: all) on
    every node of ``cluster`` but the node ranks in ``skip``; nodes that could not answer
    are in ``node_errors``."""
    asked = [i for i in range(len(cluster.clients)) if i not in skip]
    polls = await asyncio.gather(
        *(cluster.clients[i].call(rpc.poll(job_id)) for i in asked), return_exceptions=True
    )
    node_errors: list[tuple[str, Exception | str]] = []
    asks: list[tuple[int, list[int]]] = []
    for node_rank, poll in zip(asked, polls, strict=True):
        name = cluster.names[node_rank]
        if isinstance(poll, RankdError):
            node_errors.append((name, poll))
            continue
        if isinstance(poll, BaseException):
            raise poll
        status = poll.job
        offset = status.spec.rank_offset
        local = [r for r in range(status.nprocs) if ranks is None or offset + r in ranks]
        if local:
            asks.append((node_rank, [] if ranks is None else local))

    async def one(node_rank: int, local: list[int]) -> list[RankSample]:
        client = cluster.clients[node_rank]
        resp = await client.call(rpc.stacks(job_id, local, native=native, timeout=timeout))
        return samples_of(resp, cluster.names[node_rank])

    answers = await asyncio.gather(*(one(i, local) for i, local in asks), return_exceptions=True)
    samples: list[RankSample] = []
    for (node_rank, _), answer in zip(asks, answers, strict=True):
        if isinstance(answer, RankdError):
            node_errors.append((cluster.names[node_rank], answer))
        elif isinstance(answer, BaseException):
            raise answer
        else:
            samples.extend(answer)
    folded = fold_stacks(samples)
    folded.node_errors = node_errors
    return folded


def samples_of(resp: agent_pb2.StacksResponse, node: str) -> list[RankSample]:
    """One node's Stacks answer as fold input."""
    return [
        RankSample(
            global_rank=r.global_rank,
            node=node,
            local_rank=r.local_rank,
            pid=r.pid,
            threads=tuple(
                (t.name, tuple((f.function, f.filename, f.line) for f in t.frames))
                for t in r.threads
            ),
            error=r.error,
            silent_for=r.silent_for,
            last_line=r.last_line,
            cpu_percent=r.cpu_percent,
        )
        for r in resp.ranks
    ]
