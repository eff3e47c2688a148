"""The hang watchdog of a launch: no output from any rank for ``hang_timeout`` seconds.

What counts is output, not CPU: a rank that spins in a collective or a busy-wait burns
a core while it waits for a peer just as surely as an idle one, so CPU use cannot tell a
hang from work. A long silent phase (a checkpoint, a compile) needs a timeout above it,
or a line of progress now and then. The report shows each rank's CPU use, so a busy
silent rank is easy to tell from a sleeping one.

The watchdog is driven by the lines the launch receives: each line re-arms it, so a
talkative job costs one clock read per line. When the launch has seen nothing for the
timeout (it may follow only some ranks' output), every node is asked when its ranks
last wrote; only when none did for the timeout is the job hung. Then the stacks of
every rank are taken and folded before the job is stopped, so the report shows where
each rank was stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import rankd.client.rpc as rpc
from rankd.client.errors import RankdError
from rankd.client.stackfold import FoldedStacks
from rankd.client.stacks import Agents, gather_stacks
from rankd.v1 import agent_pb2

__all__ = ["Hang", "HangWatch"]

#: Seconds each agent may take to sample its ranks' stacks for a hang report.
SAMPLE_TIMEOUT = 10.0
#: Ranks shown under each stack group of a hang report.
RANK_DETAILS = 4


@dataclass(frozen=True)
class Hang:
    """What the watchdog found: the job's silence and where its ranks were."""

    job_id: str
    timeout: float
    silent_for: float  # seconds, the shortest silence of any rank when it was declared
    stacks: FoldedStacks

    def title(self) -> str:
        return f"job {self.job_id} HUNG: no output from any rank for {self.timeout:g} s"

    def lines(self) -> list[str]:
        out = [f"Stacks of every rank (folded, the odd ones out first; {_sampled(self)}):"]
        out += [
            "  " + line if line else "" for line in self.stacks.lines(rank_details=RANK_DETAILS)
        ]
        return out


def _sampled(hang: Hang) -> str:
    folded = hang.stacks
    unsampled = sum(len(ranks) for _, ranks, _ in folded.unsampled)
    return f"{folded.samples - unsampled} of {folded.samples} ranks sampled"


class HangWatch:
    """Watches one attempt: call :meth:`saw_output` for every line; :meth:`run` returns
    a :class:`Hang` when the job went silent for ``timeout`` seconds (never, else)."""

    def __init__(self, agents: Agents, job_id: str, timeout: float) -> None:
        self.agents = agents
        self.job_id = job_id
        self.timeout = timeout
        self.last = time.monotonic()

    def saw_output(self) -> None:
        self.last = time.monotonic()

    async def run(self, skip: Collection[int] = ()) -> Hang:
        """Wait for a hang; ``skip`` (a live set, read on each check) holds the node
        ranks not to ask (lost nodes)."""
        while True:
            wait = self.last + self.timeout - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            silent = await self.silence(skip)
            if silent is None or silent < self.timeout:
                # someone wrote what this launch does not follow: wait the rest from then
                self.last = time.monotonic() - (silent or 0.0)
                continue
            stacks = await gather_stacks(
                self.agents, self.job_id, timeout=SAMPLE_TIMEOUT, skip=set(skip)
            )
            return Hang(self.job_id, self.timeout, silent, stacks)

    async def silence(self, skip: Collection[int]) -> float | None:
        """Seconds since any rank of the job wrote (or started, if none wrote), by the
        agents' own clocks; None when no node could say."""
        asked = [i for i in range(len(self.agents.clients)) if i not in skip]

        async def one(i: int) -> float | None:
            with contextlib.suppress(RankdError):  # liveness judges the node, not this
                resp = await self.agents.clients[i].call(rpc.poll(self.job_id))
                return _silence(resp.job.ranks, resp.agent_time)
            return None

        known = [s for s in await asyncio.gather(*(one(i) for i in asked)) if s is not None]
        return min(known) if known else None


def _silence(ranks: Sequence[agent_pb2.RankStatus], now: float) -> float | None:
    newest = [max(r.last_output_time, r.start_time) for r in ranks if not r.HasField("exit_code")]
    if not newest:
        return None  # no live rank here: the job's end is news the launch hears anyway
    return max(0.0, now - max(newest))
