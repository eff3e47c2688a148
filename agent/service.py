"""The gRPC servicer: a thin adapter from `rankd.v1.NodeAgent` to the `Supervisor`.

Every error becomes a status code with a message a person can act on, in one place
(`_status_of`); nothing reaches a client as UNKNOWN with a traceback.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import resource
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from rankd.agent import __version__, resources
from rankd.agent.convert import (
    cache_ended_rank,
    job_status,
    spec_from_pb,
    stacks_response,
    topology_to_pb,
)
from rankd.agent.errors import (
    AlreadyExists,
    FailedPrecondition,
    JobNotFound,
    LimitExceeded,
    PermissionDenied,
    RankdError,
    SpecError,
)
from rankd.agent.filters import LineFilter, filtered, stream_filter
from rankd.agent.guardian import GuardianError
from rankd.agent.logs import STDERR, STDOUT, Chunk, LogReader, Notice
from rankd.agent.metrics import StreamStats
from rankd.agent.model import Attempt
from rankd.agent.specs import check_counts, check_requester, parse_signal, validate_job_id
from rankd.agent.stacks import Sampler, StackTarget, find_sampler
from rankd.agent.supervisor import Supervisor
from rankd.agent.topology import agent_source
from rankd.agent.watch import Update, check_heartbeat, job_updates
from rankd.agent.wire import notice_response, packed_response
from rankd.v1 import agent_pb2 as pb
from rankd.v1 import agent_pb2_grpc as pb_grpc

__all__ = ["NodeAgentService"]

logger = logging.getLogger(__name__)

#: Seconds an Info reuses the topology it read (the affinity and GPUs can change).
TOPOLOGY_TTL = 1.0

_MAX_KILL_TIMEOUT = 3600.0
_MAX_STACKS_TIMEOUT = 300.0

_CODES: list[tuple[type[RankdError], grpc.StatusCode]] = [
    (SpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (JobNotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (GuardianError, grpc.StatusCode.UNAVAILABLE),
]

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _status_of(err: BaseException, what: str, log_dir: str) -> tuple[grpc.StatusCode, str]:
    """The status of an error raised while doing `what` ("answering Poll"): its class's
    code, RESOURCE_EXHAUSTED for an OSError that says descriptors or the disk of
    `log_dir` ran out (with the same message as Start's up-front checks), else INTERNAL
    (logged with its traceback)."""
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code, str(err)
    limit = resources.exhausted(err, what, log_dir=log_dir)
    if limit is not None:
        logger.warning("%s", limit)
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(limit)
    logger.exception("internal error", exc_info=err)
    return grpc.StatusCode.INTERNAL, f"internal agent error ({type(err).__name__}); see agent log"


def _unary(
    method: Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await method(self, request, context)
        except Exception as err:
            code, message = self._status_of(err, f"answering {method.__name__}")
            await context.abort(code, message)
            raise  # unreachable: abort raises

    return wrapper


class NodeAgentService(pb_grpc.NodeAgentServicer):
    def __init__(
        self,
        supervisor: Supervisor,
        stats: StreamStats | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        self._sup = supervisor
        self.stats = stats or StreamStats()
        self.sampler = sampler or Sampler(find_sampler(), children=supervisor.children)
        supervisor.exit_hooks.append(cache_ended_rank)
        self._topology: tuple[float, pb.Topology] | None = None  # (read at, topology)

    def _status_of(self, err: BaseException, what: str) -> tuple[grpc.StatusCode, str]:
        return _status_of(err, what, self._sup.log_dir)

    def _job(self, job_id: str) -> Any:
        validate_job_id(job_id)
        return self._sup.job(job_id)

    @_unary
    async def Start(
        self, request: pb.StartRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartResponse:
        if not request.HasField("spec"):
            raise SpecError("StartRequest.spec is missing")
        # before a million entries are copied out of the message
        check_counts(request.spec, self._sup.limits)
        job, created = await self._sup.start(spec_from_pb(request.spec))
        return pb.StartResponse(job=job_status(job), created=created, agent_time=time.time())

    @_unary
    async def Poll(
        self, request: pb.PollRequest, context: grpc.aio.ServicerContext
    ) -> pb.PollResponse:
        job = self._job(request.job_id)
        attempt = job.current
        usage = self._sup.usage.usage(r.pid for r in attempt.ranks if r.alive)
        return pb.PollResponse(
            job=job_status(job, attempt, usage), agent_time=time.time(), version=job.version
        )

    @_unary
    async def List(
        self, request: pb.ListRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListResponse:
        return pb.ListResponse(jobs=[job_status(job) for job in self._sup.jobs()])

    @_unary
    async def Info(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.InfoResponse:
        sup = self._sup
        open_fds, soft = resources.fd_usage()
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        return pb.InfoResponse(
            hostname=socket.gethostname(),
            version=__version__,
            agent_time=time.time(),
            pid=os.getpid(),
            log_dir=self._sup.log_dir,
            free_port=_free_port(),
            log_follow=sup.follow_mode,
            polled_attempts=sup.polled_attempts,
            log_dir_free_bytes=sup.free_space(),
            min_free_bytes=sup.min_free_space,
            open_fds=open_fds,
            fd_soft_limit=soft,
            fd_hard_limit=hard,
            guardian_pid=sup.guardian_pid,
            guardian_restarts=sup.guardian_restarts,
            topology=self._topology_now(),
        )

    def _topology_now(self) -> pb.Topology:
        """The node's topology, read again at most once per TOPOLOGY_TTL: a launch on
        many nodes asks every agent at once, and reading /sys is most of an Info."""
        now = time.monotonic()
        if self._topology is None or now - self._topology[0] >= TOPOLOGY_TTL:
            self._topology = (now, topology_to_pb(agent_source()))
        return self._topology[1]

    @_unary
    async def Kill(
        self, request: pb.KillRequest, context: grpc.aio.ServicerContext
    ) -> pb.KillResponse:
        job = self._job(request.job_id)
        sig = parse_signal(request.signal)
        timeout = request.timeout if request.HasField("timeout") else 30.0
        if not (math.isfinite(timeout) and 0 <= timeout <= _MAX_KILL_TIMEOUT):
            raise SpecError(f"timeout must be between 0 and {_MAX_KILL_TIMEOUT:g} seconds")
        # who asked, as the reason will say: the name given, else the peer's address
        requester = check_requester(request.requester) or context.peer() or ""
        attempt = await self._sup.kill(
            request.job_id, sig, timeout, escalate=not request.no_escalate, requester=requester
        )
        # a version names the current attempt's state; a newer attempt may have started
        version = job.version if attempt is job.current else 0
        return pb.KillResponse(
            job=job_status(job, attempt), version=version, agent_time=time.time()
        )

    @_unary
    async def Renew(
        self, request: pb.RenewRequest, context: grpc.aio.ServicerContext
    ) -> pb.RenewResponse:
        validate_job_id(request.job_id)
        return pb.RenewResponse(remaining=self._sup.renew(request.job_id), agent_time=time.time())

    @_unary
    async def Stacks(
        self, request: pb.StacksRequest, context: grpc.aio.ServicerContext
    ) -> pb.StacksResponse:
        attempt = self._job(request.job_id).current
        timeout = request.timeout or self.sampler.timeout
        if not (math.isfinite(timeout) and 0 < timeout <= _MAX_STACKS_TIMEOUT):
            raise SpecError(f"timeout must be between 0 and {_MAX_STACKS_TIMEOUT:g} seconds")
        wanted = set(request.local_ranks)
        bad = sorted(r for r in wanted if not 0 <= r < attempt.spec.nprocs)
        if bad:
            raise SpecError(f"no local rank {bad[0]}: the job has {attempt.spec.nprocs} ranks")
        ranks = [r for r in attempt.ranks if not wanted or r.local_rank in wanted]
        live = [r for r in ranks if r.alive]
        answers = await self.sampler.sample(
            [StackTarget(r.local_rank, r.pid, r.stdout_path, r.stderr_path) for r in live],
            native=request.native,
            timeout=timeout,
        )
        return stacks_response(attempt, ranks, answers, socket.gethostname())

    async def Stream(
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        try:
            attempt, reader, line_filter = self._open_stream(request)
        except Exception as err:
            code, message = self._status_of(err, "opening a log stream")
            await context.abort(code, message)
            return
        prefixes = attempt.logs.prefixes
        count = attempt.restart_count
        stats = self.stats
        stats.active += 1
        try:
            async for blocks in filtered(reader.blocks(), line_filter):
                if not blocks:  # nothing for the heartbeat's time
                    yield pb.StreamResponse(restart_count=count)
                    continue
                if isinstance(blocks[0], Notice):  # a file not read (see agent.logs)
                    yield notice_response(blocks, prefixes, count)
                    continue
                if reader.packed:  # encoded here; see agent.wire
                    _count_packed(blocks, stats)
                    yield packed_response(blocks, prefixes, count)  # type: ignore[misc]
                    continue
                response = pb.StreamResponse(restart_count=count)
                add = response.lines.add
                for rank, stream, texts, offsets, partial in blocks:
                    # Filling copies of one template is faster than keyword
                    # construction: this loop is the agent's hot path under log floods.
                    template = pb.LogLine(
                        local_rank=rank,
                        stream=stream,
                        prefix=prefixes[rank],
                        partial=partial,
                    )
                    for text, offset in zip(texts, offsets, strict=True):
                        line = add()
                        line.CopyFrom(template)
                        line.offset = offset
                        line.text = text
                    stats.lines += len(texts)
                    stats.bytes += sum(map(len, texts))
                yield response
            if attempt.ended:
                job = self._sup.job(request.job_id)
                yield pb.StreamResponse(end=True, job=job_status(job, attempt), restart_count=count)
        except Exception as err:  # e.g. no descriptor for the next file: a status, no trace
            code, message = self._status_of(err, "streaming logs")
            await context.abort(code, message)
        finally:
            stats.active -= 1

    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchResponse]:
        try:
            self._job(request.job_id)  # NOT_FOUND before the stream starts
            updates = job_updates(
                self._sup,
                request.job_id,
                until_ended=request.until_ended,
                heartbeat=check_heartbeat(request.heartbeat),
            )
        except Exception as err:
            code, message = self._status_of(err, "watching a job")
            await context.abort(code, message)
            return
        stats = self.stats
        stats.watches += 1
        try:
            async for update in updates:
                yield self._watch_response(update)
                stats.watch_messages += 1
        except Exception as err:  # the job was forgotten while watched (--max-jobs)
            code, message = self._status_of(err, "watching a job")
            await context.abort(code, message)
        finally:
            stats.watches -= 1
            await updates.aclose()

    def _watch_response(self, update: Update) -> pb.WatchResponse:
        if update.job is None or update.attempt is None:  # a heartbeat
            return pb.WatchResponse(version=update.version, agent_time=time.time())
        attempt = update.attempt
        usage = self._sup.usage.usage(r.pid for r in attempt.ranks if r.alive)
        return pb.WatchResponse(
            version=update.version,
            job=job_status(update.job, attempt, usage),
            ended=update.ended,
            agent_time=time.time(),
        )

    def _open_stream(
        self, request: pb.StreamRequest
    ) -> tuple[Attempt, LogReader, LineFilter | None]:
        job = self._job(request.job_id)
        attempt = job.attempt(request.restart_count if request.HasField("restart_count") else None)
        nprocs = attempt.spec.nprocs
        ranks = (
            list(request.ranks) or sorted(attempt.spec.local_ranks_filter) or list(range(nprocs))
        )
        bad = sorted({r for r in ranks if not 0 <= r < nprocs})
        if bad:
            raise SpecError(f"ranks {bad} out of range: the job has local ranks 0-{nprocs - 1}")
        streams: list[int] = list(request.streams) or [STDOUT, STDERR]
        if any(s not in (STDOUT, STDERR) for s in streams):
            raise SpecError("streams must be STDOUT or STDERR")
        cursors: dict[tuple[int, int], int] = {}
        for cursor in request.resume:
            if not 0 <= cursor.local_rank < nprocs or cursor.stream not in (STDOUT, STDERR):
                raise SpecError(
                    f"resume cursor for rank {cursor.local_rank} stream {cursor.stream} "
                    "does not name a file of this job"
                )
            if cursor.offset < 0:
                raise SpecError(f"resume offset must be >= 0, got {cursor.offset}")
            cursors[(cursor.local_rank, cursor.stream)] = cursor.offset
        line_filter = stream_filter(request.contains, request.regex)  # run off the loop
        keys = [(r, s) for r in dict.fromkeys(ranks) for s in dict.fromkeys(streams)]
        reader = LogReader(
            attempt.logs,
            keys,
            cursors=cursors,
            follow=request.follow,
            packed=request.packed and line_filter is None,
            notices=True,
            heartbeat=check_heartbeat(request.heartbeat) if request.follow else 0.0,
        )
        return attempt, reader, line_filter


def _count_packed(chunks: list[Chunk], stats: StreamStats) -> None:
    stats.lines += sum(c.nlines for c in chunks)
    # as for lines: the text, without newlines
    stats.bytes += sum(len(c.data) - (0 if c.partial else c.nlines) for c in chunks)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port: int = s.getsockname()[1]
        return port
