"""Protobuf <-> the supervisor's plain objects. The only place that knows both."""

from __future__ import annotations

import os

from agent.failures import Failure
from agent.procs import Usage
from agent.specs import DEFAULT_KILL_TIMEOUT, JobSpec
from agent.supervisor import Attempt, Job, JobState, Rank, RankState
from protos.rankd.v1 import agent_pb2 as pb

__all__ = ["job_status", "spec_from_pb", "spec_to_pb"]

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
    )
    for rank, args in spec.rank_args.items():
        msg.rank_args[rank].args.extend(args)
    for rank, env in spec.rank_env.items():
        msg.rank_env[rank].env.update(env)
    return msg


def failure_to_pb(failure: Failure) -> pb.Failure:
    return pb.Failure(
        local_rank=failure.local_rank,
        pid=failure.pid,
        exit_code=failure.exit_code,
        signal_name=failure.signal_name,
        message=failure.message,
        error_file=failure.error_file,
        error_file_data=failure.error_file_data,
        traceback=failure.traceback,
        timestamp=failure.timestamp,
        stderr_tail=failure.stderr_tail,
        terminated_by_agent=failure.terminated_by_agent,
        error_file_problem=failure.error_file_problem,
    )


def _rank_to_pb(rank: Rank, attempt: Attempt, usage: dict[int, Usage]) -> pb.RankStatus:
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
        last_output_time=attempt.logs.last_output.get(rank.local_rank, 0.0),
    )
    for stream, path in ((1, rank.stdout_path), (2, rank.stderr_path)):
        try:
            size = os.stat(path).st_size
        except OSError:
            continue
        if stream == 1:
            msg.stdout_bytes = size
        else:
            msg.stderr_bytes = size
    if rank.exit_code is not None:
        msg.exit_code = rank.exit_code
    else:
        use = usage.get(rank.pid)
        if use is not None:
            msg.rss_bytes = use.rss
            msg.cpu_seconds = use.cpu_seconds
            msg.cpu_percent = use.cpu_percent
    if rank.failure is not None:
        msg.failure.CopyFrom(failure_to_pb(rank.failure))
    return msg


def job_status(
    job: Job, attempt: Attempt | None = None, usage: dict[int, Usage] | None = None
) -> pb.JobStatus:
    """The wire form of a job's attempt (the current one by default)."""
    attempt = attempt or job.current
    usage = usage or {}
    return pb.JobStatus(
        job_id=job.job_id,
        state=_JOB_STATE[attempt.state],
        restart_count=attempt.restart_count,
        nprocs=attempt.spec.nprocs,
        run_dir=job.run_dir,
        attempt_dir=attempt.logs.attempt_dir,
        ranks=[_rank_to_pb(r, attempt, usage) for r in attempt.ranks],
        failures=[failure_to_pb(f) for f in attempt.failures()],
        start_time=attempt.start_time,
        end_time=attempt.end_time,
        reason=attempt.reason,
        spec=spec_to_pb(attempt.spec),
    )
