"""A hollow agent: ``rankd.v1.NodeAgent`` for many virtual nodes, no processes.

Kubernetes measures its control plane with hollow nodes (kubemark, kwok); this is
the same for rankd's client. One process serves ``count`` virtual nodes, **one
loopback port each** (a ``grpc.aio`` server per node, all on one event loop). Why not
one port for all: a request names only a job id, and the servicer cannot learn which
address the client dialled (gRPC's Python server exposes neither the local address nor
``:authority``), so nodes behind one port could not be told apart without a change in
the client. Many ports keep the client unchanged: one channel, one connection, one
Watch and one Stream per node, exactly as with real agents: the honest measure of the
client.

Ranks are simulated, driven by the job's command (``Cluster.launch(["hollow",
"run=inf", "fail=5"])``), ``key=value`` words after the entrypoint:

- ``run=S``: each rank runs S seconds (``inf``: until killed); default 0
- ``exit=C`` / ``signal=NAME``: how a rank ends when its run is over (default 0)
- ``lines=N``: each rank "prints" N stdout lines at its start (packed Stream blocks)
- ``fail=G``, ``fail_after=S`` (default 0.2), ``fail_exit=C`` (default 1): global rank
  G fails on its own S seconds after its start; the node then terminates its other
  ranks and the job is FAILED (all-or-nothing, as the real agent)

The wire contract is kept where the client looks: Start (idempotent on job id and
attempt), Poll, Watch (a message per change, heartbeats, ``until_ended``), Stream
(packed blocks, ``follow`` ending with the final status), Kill, Renew, List, Info.

Run: ``python -m bench.hollow --nodes N`` prints one JSON line ``{"ports": [...]}``
on stdout, then takes commands on stdin, one a line, each answered by a JSON line:
``stats JOB`` (when Starts and Kills arrived, the first failure) and ``quit``.
:class:`HollowFleet` starts several such processes (the client's measurements are
then the client's own CPU, not the servers').
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import IO, Any

import grpc
import grpc.aio

from rankd.v1 import agent_pb2 as pb
from rankd.v1 import agent_pb2_grpc as pb_grpc

__all__ = ["HollowFleet", "Plan", "serve"]

REPO = Path(__file__).resolve().parents[1]
_BLOCK = 256 * 1024  # bytes of lines per LogBlock
FREE_PORT = 29500


@dataclass(frozen=True)
class Plan:
    """What every simulated rank of a job does (parsed from the job's args)."""

    run: float = 0.0
    exit: int = 0
    signal: str = ""
    lines: int = 0
    fail: int = -1
    fail_after: float = 0.2
    fail_exit: int = 1

    @classmethod
    def parse(cls, args: Sequence[str]) -> Plan:
        """``key=value`` words; ValueError names a bad one (-> INVALID_ARGUMENT)."""
        kinds = {"run": float, "exit": int, "signal": str, "lines": int}
        kinds |= {"fail": int, "fail_after": float, "fail_exit": int}
        values: dict[str, Any] = {}
        for word in args:
            key, sep, value = word.partition("=")
            if not sep or key not in kinds:
                raise ValueError(f"hollow: unknown word {word!r} (want key=value of {kinds})")
            values[key] = kinds[key](value)
        return cls(**values)


def _signum(name: str) -> int:
    return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])


@dataclass
class _Job:
    """One virtual node's job: its status, kept current, and who waits on it."""

    spec: pb.JobSpec
    plan: Plan
    status: pb.JobStatus
    data: dict[int, bytes]
    version: int = 1
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    timers: list[asyncio.TimerHandle] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.status.state != pb.RUNNING

    def bump(self) -> None:
        self.version += 1
        event, self.changed = self.changed, asyncio.Event()
        event.set()


class _Events:
    """Times (this host's wall clock) the bench asks for, by job id."""

    def __init__(self) -> None:
        self.starts: dict[str, list[float]] = {}
        self.kills: dict[str, list[float]] = {}
        self.fails: dict[str, float] = {}

    def report(self, job_id: str) -> dict[str, Any]:
        starts, kills = self.starts.get(job_id, []), self.kills.get(job_id, [])
        return {
            "starts": len(starts),
            "first_start": min(starts, default=0.0),
            "last_start": max(starts, default=0.0),
            "kills": len(kills),
            "last_kill": max(kills, default=0.0),
            "fail": self.fails.get(job_id, 0.0),
        }


class HollowNode(pb_grpc.NodeAgentServicer):
    """One virtual node: the servicer of one port."""

    def __init__(self, index: int, events: _Events, refresh: float = 0.0) -> None:
        self.index = index
        self.refresh = refresh
        self.events = events
        self.jobs: dict[str, _Job] = {}

    # -- the simulation --------------------------------------------------------

    def _new(self, spec: pb.JobSpec, plan: Plan) -> _Job:
        now = time.time()
        attempt = f"/hollow/{self.index}/{spec.job_id}/attempt_{spec.restart_count}"
        status = pb.JobStatus(
            job_id=spec.job_id,
            state=pb.RUNNING,
            restart_count=spec.restart_count,
            nprocs=spec.nprocs,
            run_dir=f"/hollow/{self.index}/{spec.job_id}",
            attempt_dir=attempt,
            start_time=now,
            spec=spec,
        )
        for r in range(spec.nprocs):
            status.ranks.add(
                local_rank=r,
                pid=100000 + self.index * 64 + r,
                state=pb.RANK_RUNNING,
                start_time=now,
                stdout_path=f"{attempt}/{r}/stdout.log",
                stderr_path=f"{attempt}/{r}/stderr.log",
                error_file=f"{attempt}/{r}/error.json",
            )
        data = {}
        if plan.lines:
            for r in range(spec.nprocs):
                g = spec.rank_offset + r
                data[r] = b"".join(b"hollow rank %d line %d\n" % (g, i) for i in range(plan.lines))
                status.ranks[r].stdout_bytes = len(data[r])
                status.ranks[r].last_output_time = now
        job = _Job(spec, plan, status, data)
        loop = asyncio.get_running_loop()
        if math.isfinite(plan.run):
            code = -_signum(plan.signal) if plan.signal else plan.exit
            job.timers.append(loop.call_later(plan.run, self._end_all, job, code))
        local = plan.fail - spec.rank_offset
        if plan.fail >= 0 and 0 <= local < spec.nprocs:
            job.timers.append(loop.call_later(plan.fail_after, self._fail, job, local))
        return job

    def _exit(self, job: _Job, r: int, code: int, *, by_agent: bool, now: float) -> None:
        rank = job.status.ranks[r]
        rank.exit_code, rank.end_time = code, now
        if code < 0:
            rank.signal_name = signal.Signals(-code).name
        if code == 0 and not by_agent:
            rank.state = pb.RANK_SUCCEEDED
            return
        rank.state = pb.RANK_TERMINATED if by_agent else pb.RANK_FAILED
        message = (
            f"Signal {-code} ({rank.signal_name}) received by PID {rank.pid}"
            if code < 0
            else f"Process {rank.pid} exited with code {code}"
        )
        rank.failure.CopyFrom(
            pb.Failure(
                local_rank=r,
                pid=rank.pid,
                exit_code=code,
                signal_name=rank.signal_name,
                message=message,
                error_file="<N/A>",
                timestamp=now,
                terminated_by_agent=by_agent,
            )
        )

    def _finish(self, job: _Job, state: int, reason: str, now: float) -> None:
        for timer in job.timers:
            timer.cancel()
        status = job.status
        status.state, status.reason, status.end_time = state, reason, now  # type: ignore[assignment]
        fails = [r.failure for r in status.ranks if r.HasField("failure")]
        fails.sort(key=lambda f: (f.terminated_by_agent, f.timestamp))
        status.ClearField("failures")
        status.failures.extend(fails)
        job.bump()

    def _end_all(self, job: _Job, code: int) -> None:
        if job.ended:
            return
        now = time.time()
        for r in range(job.spec.nprocs):
            self._exit(job, r, code, by_agent=False, now=now)
        if code == 0:
            self._finish(job, pb.SUCCEEDED, "", now)
        else:
            self._record_fail(job, now)
            self._finish(job, pb.FAILED, "local rank 0 failed", now)

    def _fail(self, job: _Job, local: int) -> None:
        if job.ended:
            return
        now = time.time()
        self._record_fail(job, now)
        self._exit(job, local, job.plan.fail_exit, by_agent=False, now=now)
        for r in range(job.spec.nprocs):
            if r != local:
                self._exit(job, r, -signal.SIGTERM, by_agent=True, now=now)
        self._finish(job, pb.FAILED, f"local rank {local} failed", now)

    def _record_fail(self, job: _Job, now: float) -> None:
        old = self.events.fails.get(job.spec.job_id)
        self.events.fails[job.spec.job_id] = now if old is None else min(old, now)

    def _job(self, job_id: str) -> _Job | None:
        return self.jobs.get(job_id)

    async def _missing(self, context: grpc.aio.ServicerContext, job_id: str) -> None:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id!r} on this agent")

    # -- the service ----------------------------------------------------------

    async def Start(self, request: pb.StartRequest, context: Any) -> pb.StartResponse:
        spec = request.spec
        self.events.starts.setdefault(spec.job_id, []).append(time.time())
        try:
            plan = Plan.parse(spec.args)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if spec.nprocs < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "nprocs must be >= 1")
        job = self._job(spec.job_id)
        if job is not None and not (job.ended and spec.restart_count > job.spec.restart_count):
            return pb.StartResponse(job=job.status, created=False, agent_time=time.time())
        new = self._new(spec, plan)
        if job is not None:  # the next attempt: watchers of the old one see it
            new.version = job.version + 1
            job.bump()
        self.jobs[spec.job_id] = new
        return pb.StartResponse(job=new.status, created=True, agent_time=time.time())

    async def Poll(self, request: pb.PollRequest, context: Any) -> pb.PollResponse:
        job = self._job(request.job_id)
        if job is None:
            await self._missing(context, request.job_id)
            raise AssertionError  # abort raises
        return pb.PollResponse(job=job.status, agent_time=time.time(), version=job.version)

    async def Watch(
        self, request: pb.WatchRequest, context: Any
    ) -> AsyncIterator[pb.WatchResponse]:
        job = self._job(request.job_id)
        if job is None:
            await self._missing(context, request.job_id)
            return
        beat = request.heartbeat or math.inf
        while True:
            job = self.jobs[request.job_id]
            changed = job.changed
            yield pb.WatchResponse(
                version=job.version, job=job.status, ended=job.ended, agent_time=time.time()
            )
            if job.ended and request.until_ended:
                return
            # the real agent resends a running job's status (fresh RSS, CPU) once a
            # second: with --refresh, so does this one; else heartbeats only
            refresh = self.refresh if self.refresh > 0 and not job.ended else math.inf
            wait = min(beat, refresh)
            while True:
                try:
                    async with asyncio.timeout(None if math.isinf(wait) else wait):
                        await changed.wait()
                    break
                except TimeoutError:
                    job_now = job.status if wait == refresh else None
                    yield pb.WatchResponse(version=job.version, job=job_now, agent_time=time.time())

    async def Stream(
        self, request: pb.StreamRequest, context: Any
    ) -> AsyncIterator[pb.StreamResponse]:
        job = self._job(request.job_id)
        if job is None:
            await self._missing(context, request.job_id)
            return
        resume = {(c.local_rank, c.stream): c.offset for c in request.resume}
        ranks = list(request.ranks) or list(job.spec.local_ranks_filter) or range(job.spec.nprocs)
        if not request.streams or pb.STDOUT in request.streams:
            for r in ranks:
                data = job.data.get(r, b"")
                start = resume.get((r, pb.STDOUT), 0)
                prefix = _prefix(job.spec, r)
                while start < len(data):
                    cut = data.rfind(b"\n", start, start + _BLOCK) + 1 or len(data)
                    chunk = data[start:cut]
                    yield pb.StreamResponse(
                        blocks=[
                            pb.LogBlock(
                                local_rank=r,
                                stream=pb.STDOUT,
                                offset=start,
                                data=chunk,
                                count=chunk.count(b"\n"),
                                prefix=prefix,
                            )
                        ],
                        restart_count=job.spec.restart_count,
                    )
                    start = cut
        if not request.follow:
            return
        beat = request.heartbeat or None
        while not job.ended:
            try:
                async with asyncio.timeout(beat):
                    await job.changed.wait()
            except TimeoutError:  # a heartbeat, as the real agent sends
                yield pb.StreamResponse(restart_count=job.spec.restart_count)
        yield pb.StreamResponse(end=True, job=job.status, restart_count=job.spec.restart_count)

    async def Kill(self, request: pb.KillRequest, context: Any) -> pb.KillResponse:
        self.events.kills.setdefault(request.job_id, []).append(time.time())
        job = self._job(request.job_id)
        if job is None:
            await self._missing(context, request.job_id)
            raise AssertionError
        if not job.ended:
            now = time.time()
            for r in range(job.spec.nprocs):
                if not job.status.ranks[r].HasField("exit_code"):
                    self._exit(job, r, -signal.SIGTERM, by_agent=True, now=now)
            who = request.requester or context.peer()
            self._finish(job, pb.KILLED, f"killed by Kill(SIGTERM) from {who}", now)
        return pb.KillResponse(job=job.status, version=job.version, agent_time=time.time())

    async def Renew(self, request: pb.RenewRequest, context: Any) -> pb.RenewResponse:
        job = self._job(request.job_id)
        if job is None:
            await self._missing(context, request.job_id)
            raise AssertionError
        left = 0.0 if job.ended else job.spec.lease
        return pb.RenewResponse(remaining=left, agent_time=time.time())

    async def List(self, request: pb.ListRequest, context: Any) -> pb.ListResponse:
        return pb.ListResponse(jobs=[j.status for j in self.jobs.values()])

    async def Info(self, request: pb.InfoRequest, context: Any) -> pb.InfoResponse:
        return pb.InfoResponse(
            hostname=f"hollow{self.index}",
            version="hollow",
            agent_time=time.time(),
            pid=os.getpid(),
            log_dir=f"/hollow/{self.index}",
            free_port=FREE_PORT,
            log_follow="inotify",
        )


def _prefix(spec: pb.JobSpec, local_rank: int) -> str:
    if not spec.log_line_prefix_template:
        return f"[{spec.role_name or 'default'}{local_rank}]:"
    return Template(spec.log_line_prefix_template).safe_substitute(
        role_name=spec.role_name, rank=spec.rank_offset + local_rank, local_rank=local_rank
    )


async def serve(
    count: int, first: int, out: IO[str], commands: IO[str], *, refresh: float = 0.0
) -> None:
    """Serve `count` virtual nodes (indices from `first`), print their ports, answer
    the commands read from `commands` until ``quit`` or its end."""
    events = _Events()
    servers = []
    ports = []
    for i in range(first, first + count):
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_NodeAgentServicer_to_server(HollowNode(i, events, refresh), server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
    out.write(json.dumps({"ports": ports}) + "\n")
    out.flush()
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, commands.readline)
            words = line.split()
            if not words or words[0] == "quit":
                return
            if words[0] == "stats" and len(words) == 2:
                answer: dict[str, Any] = events.report(words[1])
            else:
                answer = {"error": f"unknown command {line.strip()!r}"}
            out.write(json.dumps(answer) + "\n")
            out.flush()
    finally:
        await asyncio.gather(*(s.stop(None) for s in servers))


class HollowFleet:
    """``nodes`` virtual nodes in ``procs`` hollow-agent processes. ``close()``
    is idempotent; ``addresses`` in node order."""

    def __init__(self, nodes: int, procs: int = 2, *, refresh: float = 0.0) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.addresses: list[str] = []
        per = -(-nodes // procs)
        try:
            for first in range(0, nodes, per):
                count = min(per, nodes - first)
                cmd = [sys.executable, "-m", "bench.hollow", "--nodes", str(count)]
                cmd += ["--first", str(first), "--refresh", str(refresh)]
                self.procs.append(
                    subprocess.Popen(
                        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
                    )
                )
            for proc in self.procs:  # they bind their ports side by side
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"hollow agent {proc.pid} exited: {proc.wait()}")
                self.addresses += [f"127.0.0.1:{p}" for p in json.loads(line)["ports"]]
        except BaseException:
            self.close()
            raise

    def stats(self, job_id: str) -> dict[str, Any]:
        """Start/Kill arrival times and the first failure, over every process."""
        got = []
        for proc in self.procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"stats {job_id}\n")
            proc.stdin.flush()
            got.append(json.loads(proc.stdout.readline()))
        fails = [g["fail"] for g in got if g["fail"]]
        return {
            "starts": sum(g["starts"] for g in got),
            "first_start": min(g["first_start"] for g in got),
            "last_start": max(g["last_start"] for g in got),
            "kills": sum(g["kills"] for g in got),
            "last_kill": max(g["last_kill"] for g in got),
            "fail": min(fails, default=0.0),
        }

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.write("quit\n")
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hollow", description=__doc__)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="index of the first node")
    parser.add_argument(
        "--refresh",
        type=float,
        default=0.0,
        help="seconds between resends of a running job's status on a Watch, as the real "
        "agent does once a second (default 0: only changes and heartbeats)",
    )
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be >= 1")
    # a port and a connection per node, plus the loop's own
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve(args.nodes, args.first, sys.stdout, sys.stdin, refresh=args.refresh))
    return 0


if __name__ == "__main__":
    sys.exit(main())
