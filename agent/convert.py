"""Protobuf <-> the supervisor's plain objects. The only place that knows both."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from rankd.agent.failures import Failure
from rankd.agent.logs import STDERR, STDOUT
from rankd.agent.model import Attempt, Job, JobState, Rank, RankState
from rankd.agent.procs import Usage
from rankd.agent.specs import DEFAULT_KILL_TIMEOUT, JobSpec
from rankd.agent.stacks import RankStacks
from rankd.agent.topology import TopologySource
from rankd.v1 import agent_pb2 as pb

__all__ = [
    "cache_ended_rank",
    "job_status",
    "spec_from_pb",
    "spec_to_pb",
    "stacks_response",
    "topology_to_pb",
]

logger = logging.getLogger(__name__)

_JOB_STATE = {
    JobState.RUNNING: pb.RUNNING,
    JobState.SUCCEEDED: pb.SUCCEEDED,
    JobState.FAILED: pb.FAILED,
    JobState.KILLED: pb.KILLED,
}
_RANK_STATE = {
    RankState.RUNNING: pb.RANK_RUNNING,
    RankState.SUCCEEDED: pb.RANK_SUCCEEDED,
    RankState.FAILED: pb.RANK_FAILED,
    RankState.TERMINATED: pb.RANK_TERMINATED,
}


def spec_from_pb(msg: pb.JobSpec) -> JobSpec:
    return JobSpec(
        job_id=msg.job_id,
        nprocs=msg.nprocs,
        entrypoint=msg.entrypoint,
        args=tuple(msg.args),
        rank_args={r: tuple(a.args) for r, a in msg.rank_args.items()},
        env=dict(msg.env),
        rank_env={r: dict(e.env) for r, e in msg.rank_env.items()},
        cwd=msg.cwd,
        role_name=msg.role_name or "default",
        restart_count=msg.restart_count,
        redirects=msg.redirects or "0",
        tee=msg.tee or "0",
        local_ranks_filter=frozenset(msg.local_ranks_filter),
        log_line_prefix_template=msg.log_line_prefix_template,
        duplicate_stdout_filters=tuple(msg.duplicate_stdout_filters),
        duplicate_stderr_filters=tuple(msg.duplicate_stderr_filters),
        rank_offset=msg.rank_offset,
        kill_timeout=msg.kill_timeout if msg.HasField("kill_timeout") else DEFAULT_KILL_TIMEOUT,
        default_env=dict(msg.default_env),
        lease=msg.lease,
        numa_binding=msg.numa_binding,
        cpu_bind=msg.cpu_bind,
    )


def spec_to_pb(spec: JobSpec) -> pb.JobSpec:
    msg = pb.JobSpec(
        job_id=spec.job_id,
        nprocs=spec.nprocs,
        entrypoint=spec.entrypoint,
        args=list(spec.args),
        env=dict(spec.env),
        cwd=spec.cwd,
        role_name=spec.role_name,
        restart_count=spec.restart_count,
        redirects=spec.redirects,
        tee=spec.tee,
        local_ranks_filter=sorted(spec.local_ranks_filter),
        log_line_prefix_template=spec.log_line_prefix_template,
        duplicate_stdout_filters=list(spec.duplicate_stdout_filters),
        duplicate_stderr_filters=list(spec.duplicate_stderr_filters),
        rank_offset=spec.rank_offset,
        kill_timeout=spec.kill_timeout,
        default_env=dict(spec.default_env),
        lease=spec.lease,
        numa_binding=spec.numa_binding,
        cpu_bind=spec.cpu_bind,
    )
    for rank, args in spec.rank_args.items():
        msg.rank_args[rank].args.extend(args)
    for rank, env in spec.rank_env.items():
        msg.rank_env[rank].env.update(env)
    return msg


def failure_to_pb(failure: Failure) -> pb.Failure:
    # the fields a killed rank leaves empty are not passed: half the cost of the
    # message, which is built for every rank of a Kill while the others die
    msg = pb.Failure(
        local_rank=failure.local_rank,
        pid=failure.pid,
        exit_code=failure.exit_code,
        signal_name=failure.signal_name,
        message=failure.message,
        error_file=failure.error_file,
        timestamp=failure.timestamp,
        terminated_by_agent=failure.terminated_by_agent,
    )
    if failure.error_file_data:
        msg.error_file_data = failure.error_file_data
    if failure.traceback:
        msg.traceback = failure.traceback
    if failure.stderr_tail:
        msg.stderr_tail.extend(failure.stderr_tail)
    if failure.error_file_problem:
        msg.error_file_problem = failure.error_file_problem
    return msg


def _rank_to_pb(
    rank: Rank, attempt: Attempt, usage: dict[int, Usage], failure: pb.Failure | None
) -> pb.RankStatus:
    msg = pb.RankStatus(
        local_rank=rank.local_rank,
        pid=rank.pid,
        state=_RANK_STATE[rank.state],
        signal_name=rank.failure.signal_name if rank.failure else "",
        start_time=rank.start_time,
        end_time=rank.end_time,
        stdout_path=rank.stdout_path,
        stderr_path=rank.stderr_path,
        error_file=rank.error_file,
        last_output_time=attempt.logs.output_time(rank.local_rank),
    )
    if rank.exit_code is not None and rank.stdout_bytes >= 0:  # taken at the exit
        out, err = rank.stdout_bytes, rank.stderr_bytes
    else:  # as of the last write inotify reported
        out, err = (
            attempt.logs.size(rank.local_rank, STDOUT),
            attempt.logs.size(rank.local_rank, STDERR),
        )
    msg.stdout_bytes, msg.stderr_bytes = max(out, 0), max(err, 0)
    if rank.exit_code is not None:
        msg.exit_code = rank.exit_code
    else:
        use = usage.get(rank.pid)
        if use is not None:
            msg.rss_bytes = use.rss
            msg.cpu_seconds = use.cpu_seconds
            msg.cpu_percent = use.cpu_percent
    if failure is not None:
        msg.failure.CopyFrom(failure)
    if attempt.logs.problems:
        msg.file_problems.extend(attempt.logs.file_problems(rank.local_rank))
    if rank.cpus:
        msg.cpus.extend(rank.cpus)
    return msg


def cache_ended_rank(attempt: Attempt, rank: Rank) -> None:
    """Build and keep the wire form of a rank that has just exited (a Supervisor exit
    hook, run while the other ranks may still be dying). It no longer changes, but for
    output that descendants may still append, which its byte counts (taken at the exit)
    leave out."""
    if rank.exit_code is not None:
        attempt.wire.ranks[rank.local_rank] = _rank_to_pb(
            rank, attempt, {}, _failure(attempt, rank)
        )


def _failure(attempt: Attempt, rank: Rank) -> pb.Failure | None:
    """A rank's failure, set once at its exit, in wire form (built once)."""
    if rank.failure is None:
        return None
    cache = attempt.wire.failures
    cached = cache.get(rank.local_rank)
    if cached is None:
        cached = cache[rank.local_rank] = failure_to_pb(rank.failure)
    return cached


def job_status(
    job: Job, attempt: Attempt | None = None, usage: dict[int, Usage] | None = None
) -> pb.JobStatus:
    """The wire form of a job's attempt (the current one by default). What no longer
    changes is built once and kept in `attempt.wire`: the spec, failures, and ranks that
    have exited (see cache_ended_rank)."""
    attempt = attempt or job.current
    usage = usage or {}
    cache = attempt.wire
    spec = cache.spec
    if spec is None:
        spec = cache.spec = spec_to_pb(attempt.spec)
    last_output = attempt.logs.output_times()
    ended = cache.ranks
    ranks = []
    for rank in attempt.ranks:
        msg = ended.get(rank.local_rank)
        if msg is None:
            msg = _rank_to_pb(rank, attempt, usage, _failure(attempt, rank))
        else:  # the agent may read a rank's last lines after it saw the exit
            msg.last_output_time = last_output.get(rank.local_rank, 0.0)
            if attempt.logs.problems:  # (a Stream may meet a replaced file after it)
                msg.file_problems[:] = attempt.logs.file_problems(rank.local_rank)
        ranks.append(msg)
    failures = []  # root cause first, as Attempt.failures orders them
    for failure in attempt.failures():
        msg_failure = _failure(attempt, attempt.ranks[failure.local_rank])
        if msg_failure is not None:
            failures.append(msg_failure)
    return pb.JobStatus(
        job_id=job.job_id,
        state=_JOB_STATE[attempt.state],
        restart_count=attempt.restart_count,
        nprocs=attempt.spec.nprocs,
        run_dir=job.run_dir,
        attempt_dir=attempt.logs.attempt_dir,
        ranks=ranks,
        failures=failures,
        start_time=attempt.start_time,
        end_time=attempt.end_time,
        reason=attempt.reason,
        spec=spec,
    )


def stacks_response(
    attempt: Attempt, ranks: Sequence[Rank], answers: Sequence[RankStacks], hostname: str
) -> pb.StacksResponse:
    """The Stacks answer for `ranks`: the sampled live ones (`answers`, in order) and,
    for those that had exited, why they were not sampled."""
    by_rank = {a.local_rank: a for a in answers}
    offset = attempt.spec.rank_offset
    out = pb.StacksResponse(
        job_id=attempt.spec.job_id, restart_count=attempt.restart_count, hostname=hostname
    )
    for rank in ranks:
        msg = out.ranks.add(
            local_rank=rank.local_rank, global_rank=offset + rank.local_rank, pid=rank.pid
        )
        answer = by_rank.get(rank.local_rank)
        if answer is None:
            msg.error = f"the rank had exited ({_exit_words(rank)}): nothing to sample"
            msg.silent_for, msg.cpu_percent = -1.0, -1.0
            continue
        msg.pid, msg.error, msg.last_line = answer.pid, answer.error, answer.last_line
        msg.silent_for, msg.cpu_percent = answer.silent_for, answer.cpu_percent
        for thread in answer.threads:
            t = msg.threads.add(
                name=thread.name,
                thread_id=thread.thread_id,
                active=thread.active,
                owns_gil=thread.owns_gil,
            )
            for frame in thread.frames:
                t.frames.add(function=frame.function, filename=frame.filename, line=frame.line)
    return out


def _exit_words(rank: Rank) -> str:
    code = rank.exit_code
    if code is None:
        return "state unknown"
    return f"exit code {code}" if code >= 0 else f"signal {-code}"


def topology_to_pb(source: TopologySource) -> pb.Topology:
    """The node's topology for Info; empty (logged) when it cannot be read, so that Info
    still answers."""
    try:
        topo = source.read()
    except (OSError, ValueError) as err:
        logger.warning("cannot read the CPU topology under %s: %s", source.root, err)
        return pb.Topology()
    msg = pb.Topology(
        cpus=sorted(topo.cpus),
        numa_nodes=_sets(topo.numa_nodes),
        sockets=_sets(topo.sockets),
        l3_groups=_sets(topo.l3_groups),
    )
    for gpu in topo.gpus:
        msg.gpus.add(index=gpu.index, numa_node=gpu.numa_node, pci_address=gpu.pci_address)
    return msg


def _sets(groups: Mapping[int, frozenset[int]]) -> list[pb.CpuSet]:
    return [pb.CpuSet(id=key, cpus=sorted(cpus)) for key, cpus in sorted(groups.items())]
