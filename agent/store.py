"""Jobs on disk: each run directory holds `job.json`, written atomically (temp file +
rename) when an attempt starts and when it ends, so an agent restarted on the same
`--log-dir` still answers Poll and Stream for past jobs. This module alone knows the
file's format: every to- and from-dict is here.

A rank can write in its run directory, so a record read back is data, never trusted:
it is opened without following links and must be a regular file (else it is skipped
with a warning), its job id must own the run directory it lies in, and every path is
derived again from the log directory, the run directory and the attempt number (the
paths in the file are ignored)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import signal
import stat
import threading
from dataclasses import fields
from typing import Any

from rankd.agent import resources
from rankd.agent.failures import NOT_AVAILABLE, Failure, stderr_tail
from rankd.agent.logs import STDERR, STDOUT, AttemptLogs
from rankd.agent.model import Attempt, Job, JobState, Rank, RankState
from rankd.agent.rankfiles import JOB_DEPTH, NotRegularFile, kind, open_regular
from rankd.agent.specs import JobSpec, validate_job_id

__all__ = ["JOB_FILE", "LOST", "JobStore", "job_from_dict", "job_to_dict"]

logger = logging.getLogger(__name__)

JOB_FILE = "job.json"
FORMAT = 1
#: A record larger than this is not read back (a valid one holds a few specs of at most
#: a Start request each; a rank could write gigabytes there).
MAX_RECORD_BYTES = 64 * 1024 * 1024
#: How a restored attempt that was running when its agent died explains its end.
LOST = "the agent stopped while this attempt ran"
_MAX_CPU = 1 << 16  # CPU numbers (and how many a rank is pinned to) in a record


class JobStore:
    """The job.json of every job under `log_dir`. `save_now` writes on the caller's
    thread; `save_later` in one io thread, in submission order, so that an older state
    never overwrites a newer one.

    A failure to write (a full disk) is never raised: the job runs on, held in memory,
    only its record after a restart is at stake. It is logged once per job, with the
    reason, and the record is written again with the next one written (of any job), and
    at `close`, until it lands."""

    def __init__(self, log_dir: str) -> None:
        self._log_dir = log_dir
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rankd-io")
        self._lock = threading.Lock()  # the io thread and the loop's both write
        self._failing: dict[str, Job] = {}  # jobs whose last record was not written

    def save_now(self, job: Job, *, fresh: bool = False) -> None:
        """Write the job's record now (and the failing ones again). `fresh`: its first
        record, written in place (over the empty file of a spare run directory, see
        agent.spares): there is no earlier record that a torn write could spoil."""
        self._wrote(job, _write(job.run_dir, job_to_dict(job), fresh=fresh))
        if self._failing:
            self._write_all(self._failing_records(job))

    def save_later(self, job: Job) -> concurrent.futures.Future[None]:
        """Write the job's record, as it is now, in the io thread (after `close`: here);
        the failing ones again after it."""
        # the snapshots: the loop changes the jobs meanwhile
        records = [(job, job_to_dict(job))]
        if self._failing:
            records += self._failing_records(job)
        try:
            return self._io.submit(self._write_all, records)
        except RuntimeError:  # after close(): a straggler's exit
            self._write_all(records)
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            done.set_result(None)
            return done

    def _failing_records(self, but: Job) -> list[tuple[Job, dict[str, Any]]]:
        with self._lock:
            failing = [job for job in self._failing.values() if job is not but]
        return [(job, job_to_dict(job)) for job in failing]

    def _write_all(self, records: list[tuple[Job, dict[str, Any]]]) -> None:
        for job, data in records:
            self._wrote(job, _write(job.run_dir, data))

    def _wrote(self, job: Job, err: OSError | None) -> None:
        """Keep the job to write again when `err`, logging the first failure only."""
        with self._lock:
            failed_before = self._failing.get(job.job_id) is job
            if err is None:
                if failed_before:
                    del self._failing[job.job_id]
            else:
                self._failing[job.job_id] = job
        if err is not None and not failed_before:
            reason = err.strerror or str(err)
            note = resources.disk_full_note(self._log_dir) if err.errno == errno.ENOSPC else ""
            logger.warning(
                "cannot record job %s in %s: %s%s; the agent holds it on (List, Poll) and "
                "writes the record again at the next change",
                job.job_id,
                os.path.join(job.run_dir, JOB_FILE),
                reason,
                f" ({note})" if note else "",
            )
        elif err is None and failed_before:
            logger.info("job %s is recorded again in %s", job.job_id, job.run_dir)

    def load(self, max_jobs: int) -> list[Job]:
        """The newest `max_jobs` jobs recorded under the log dir, oldest first (older
        records stay on disk, unserved). An attempt that was running when its agent died
        comes back FAILED, never RUNNING, and its record is rewritten so. Unreadable or
        foreign records are skipped with a warning."""
        jobs = []
        for run_dir, data in _read_all(self._log_dir)[-max_jobs:]:
            try:
                job = job_from_dict(data, run_dir)
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
                logger.warning("skipping job record in %s: %s", run_dir, err)
                continue
            if any(a.reason.startswith(LOST) for a in job.attempts):
                self.save_now(job)
            jobs.append(job)
        return jobs

    def close(self) -> None:
        """Wait for the writes under way, and try the failing ones a last time; later
        ones are made by their caller."""
        self._io.shutdown(wait=True)
        with self._lock:
            failing = list(self._failing.values())
        self._write_all([(job, job_to_dict(job)) for job in failing])


# -- to and from dicts -------------------------------------------------------------------

_SPEC_FIELDS = fields(JobSpec)


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    # shallow (asdict's deep copy costs more than the rest of a Start): every field is
    # immutable or replaced below by a copy in JSON's shape
    data = {f.name: getattr(spec, f.name) for f in _SPEC_FIELDS}
    data["args"] = list(spec.args)
    data["duplicate_stdout_filters"] = list(spec.duplicate_stdout_filters)
    data["duplicate_stderr_filters"] = list(spec.duplicate_stderr_filters)
    data["rank_args"] = {str(k): list(v) for k, v in spec.rank_args.items()}
    data["rank_env"] = {str(k): dict(v) for k, v in spec.rank_env.items()}
    data["env"] = dict(spec.env)
    data["default_env"] = dict(spec.default_env)
    data["local_ranks_filter"] = sorted(spec.local_ranks_filter)
    return data


def spec_from_dict(data: dict[str, Any]) -> JobSpec:
    return JobSpec(
        job_id=data["job_id"],
        nprocs=int(data["nprocs"]),
        entrypoint=data["entrypoint"],
        args=tuple(data.get("args", ())),
        rank_args={int(k): tuple(v) for k, v in data.get("rank_args", {}).items()},
        env=dict(data.get("env", {})),
        rank_env={int(k): dict(v) for k, v in data.get("rank_env", {}).items()},
        cwd=data.get("cwd", ""),
        role_name=data.get("role_name", "default"),
        restart_count=int(data.get("restart_count", 0)),
        redirects=data.get("redirects", "0"),
        tee=data.get("tee", "0"),
        local_ranks_filter=frozenset(data.get("local_ranks_filter", ())),
        log_line_prefix_template=data.get("log_line_prefix_template", ""),
        duplicate_stdout_filters=tuple(data.get("duplicate_stdout_filters", ())),
        duplicate_stderr_filters=tuple(data.get("duplicate_stderr_filters", ())),
        rank_offset=int(data.get("rank_offset", 0)),
        kill_timeout=float(data.get("kill_timeout", 30.0)),
        default_env=dict(data.get("default_env", {})),
        numa_binding=str(data.get("numa_binding", "")),
        cpu_bind=str(data.get("cpu_bind", "")),
    )


def job_to_dict(job: Job) -> dict[str, Any]:
    """A snapshot for job.json: nothing in it is changed later by the loop."""
    return {"job_id": job.job_id, "attempts": [_attempt_to_dict(a) for a in job.attempts]}


def job_from_dict(data: dict[str, Any], run_dir: str) -> Job:
    """The job of a record found in `run_dir` (every attempt ended; see `JobStore.load`).
    Raises KeyError, TypeError or ValueError (SpecError) for a malformed record, or one
    whose job id does not own `run_dir` (`<job_id>_<random>`)."""
    job_id = data["job_id"]
    if not isinstance(job_id, str):
        raise TypeError("job_id is not a string")
    validate_job_id(job_id)
    if os.path.basename(run_dir).rpartition("_")[0] != job_id:
        raise ValueError(f"job id {job_id!r} does not own the run directory {run_dir}")
    job = Job(job_id, run_dir)
    job.attempts.extend(_attempt_from_dict(item, job) for item in data["attempts"])
    return job


def _attempt_to_dict(attempt: Attempt) -> dict[str, Any]:
    if attempt.spec_record is None:
        attempt.spec_record = spec_to_dict(attempt.spec)
    return {
        "spec": attempt.spec_record,
        "attempt_dir": attempt.logs.attempt_dir,
        "state": attempt.state.value,
        "reason": attempt.reason,
        "start_time": attempt.start_time,
        "end_time": attempt.end_time,
        "ranks": [
            {
                "local_rank": r.local_rank,
                "pid": r.pid,
                "start_time": r.start_time,
                "end_time": r.end_time,
                "exit_code": r.exit_code,
                "state": r.state.value,
                "terminated_by_agent": r.terminated_by_agent,
                # shallow: a Failure is not changed once made
                "failure": dict(vars(r.failure)) if r.failure else None,
                **({"cpus": list(r.cpus)} if r.cpus else {}),  # pinned: RankStatus.cpus
            }
            for r in attempt.ranks
        ],
    }


def _attempt_from_dict(data: dict[str, Any], job: Job) -> Attempt:
    spec = spec_from_dict(data["spec"])
    if spec.job_id != job.job_id or spec.restart_count < 0:
        raise ValueError(f"attempt of job {spec.job_id!r} number {spec.restart_count}")
    ranks = data["ranks"]
    # (the length first: a record's nprocs may be absurd, its ranks are in the file)
    if len(ranks) != spec.nprocs or any(r["local_rank"] != i for i, r in enumerate(ranks)):
        raise ValueError(f"the ranks do not match nprocs={spec.nprocs}")
    # derived, never the record's own "attempt_dir" (a rank may have written it)
    attempt_dir = os.path.join(job.run_dir, f"attempt_{spec.restart_count}")
    logs = AttemptLogs(attempt_dir, spec.nprocs, [spec.prefix(r) for r in range(spec.nprocs)])
    logs.ended = True
    attempt = Attempt(
        spec=spec,
        logs=logs,
        state=JobState(data["state"]),
        reason=data.get("reason", ""),
        start_time=float(data.get("start_time", 0.0)),
        end_time=float(data.get("end_time", 0.0)),
    )
    attempt.ranks.extend(_rank_from_dict(item, logs) for item in data["ranks"])
    if attempt.state is JobState.RUNNING:  # its agent died
        attempt.state = JobState.FAILED
        attempt.reason = f"{LOST} (it crashed or was killed); its ranks were killed with it"
        attempt.end_time = attempt.end_time or max(
            (r.start_time for r in attempt.ranks), default=attempt.start_time
        )
    attempt.done.set()
    return attempt


def _cpus(value: Any) -> tuple[int, ...]:
    """A rank's recorded CPUs; ValueError (the record is skipped) for anything else."""
    well_formed = isinstance(value, list | tuple) and len(value) <= _MAX_CPU
    if not (well_formed and all(type(c) is int and 0 <= c < _MAX_CPU for c in value)):
        raise ValueError(f"cpus: {value!r:.80}")
    return tuple(value)


def _rank_from_dict(item: dict[str, Any], logs: AttemptLogs) -> Rank:
    local_rank = int(item["local_rank"])
    failure = item.get("failure")
    exit_code = item.get("exit_code")
    rank = Rank(
        local_rank=local_rank,
        pid=int(item["pid"]),
        start_time=float(item["start_time"]),
        stdout_path=logs.path(local_rank, STDOUT),
        stderr_path=logs.path(local_rank, STDERR),
        error_file=logs.error_file(local_rank),
        end_time=float(item.get("end_time", 0.0)),
        exit_code=None if exit_code is None else int(exit_code),
        state=RankState(item["state"]),
        terminated_by_agent=bool(item.get("terminated_by_agent")),
        cpus=_cpus(item.get("cpus", ())),
        failure=(
            _failure_from_dict(failure, local_rank, logs.error_file(local_rank))
            if failure
            else None
        ),
    )
    if not _is_int32(rank.pid) or not (rank.exit_code is None or _is_int32(rank.exit_code)):
        raise ValueError(f"local rank {local_rank}: pid {rank.pid}, exit code {rank.exit_code}")
    if rank.exit_code is None:  # it was running when the agent died
        rank.state = RankState.TERMINATED
        rank.failure = Failure(
            local_rank=rank.local_rank,
            pid=rank.pid,
            exit_code=-signal.SIGKILL,
            signal_name="SIGKILL",
            message=(
                f"{LOST}: the rank (PID {rank.pid}) was killed by the agent's guardian; "
                "its exit status is unknown"
            ),
            terminated_by_agent=True,
            stderr_tail=stderr_tail(rank.stderr_path),
        )
        rank.exit_code = -signal.SIGKILL
    return rank


# JSON's types for Failure's annotations (in JSON an int is also a float)
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "list[str]": (list,),
}
_FAILURE_TYPES = {f.name: _JSON_TYPES[str(f.type)] for f in fields(Failure)}


def _failure_from_dict(data: dict[str, Any], local_rank: int, error_file: str) -> Failure:
    """The recorded Failure of `local_rank`, each field of its type and in range (else
    TypeError or ValueError: Poll would fail on it later), with the path of its error
    file derived again (`error_file`)."""
    for name, value in data.items():
        if not isinstance(value, _FAILURE_TYPES[name]):  # (KeyError: an unknown field)
            raise TypeError(f"failure field {name} is {type(value).__name__}")
    failure = Failure(**data)
    failure.timestamp = float(failure.timestamp)  # (OverflowError: a huge integer)
    if failure.local_rank != local_rank or not all(
        map(_is_int32, (failure.pid, failure.exit_code))
    ):
        raise ValueError(f"failure of local rank {failure.local_rank}, pid {failure.pid}")
    if not all(isinstance(line, str) for line in failure.stderr_tail):
        raise TypeError("failure field stderr_tail holds a non-string")
    if failure.error_file != NOT_AVAILABLE:
        failure.error_file = error_file
    return failure


def _is_int32(value: int) -> bool:
    return -(2**31) <= value < 2**31


# -- the file ------------------------------------------------------------------------------


def _write(run_dir: str, data: dict[str, Any], *, fresh: bool = False) -> OSError | None:
    """Replace `<run_dir>/job.json` atomically (in place if `fresh`); returns the error,
    if any (nothing is left but the earlier record then)."""
    # compact: the C encoder (indent= falls back to the pure-Python one)
    payload = json.dumps({"format": FORMAT, **data}, separators=(",", ":")).encode()
    target = os.path.join(run_dir, JOB_FILE)
    # else one temporary name per writing thread (the loop's, the io thread's)
    path = target if fresh else os.path.join(run_dir, f".job-{threading.get_native_id()}.json")
    try:
        fd = _open_record(path, fresh=fresh)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)  # no fsync: the record must survive the agent, not the kernel
            if not fresh:
                os.replace(path, target)
        except BaseException:
            if not fresh:
                os.unlink(path)
            raise
    except OSError as err:
        return err
    return None


def _open_record(path: str, *, fresh: bool) -> int:
    """A descriptor to write `path`, never through what a rank put there: the empty file
    of a spare when `fresh` (a regular file, not a link: else NotRegularFile, and
    a FIFO never blocks), else a file made anew (whatever stood at the temporary name is
    removed first)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    if not fresh:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return os.open(path, flags | os.O_EXCL, 0o600)
    # O_NONBLOCK: a FIFO without a reader fails (ENXIO) instead of blocking
    fd = os.open(path, flags | os.O_NONBLOCK, 0o600)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{path} is {kind(mode)}, not a regular file")
        os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_all(log_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """(run_dir, data) of every readable job file directly under `log_dir`, oldest first.
    Unreadable or foreign files are skipped with a warning."""
    found: list[tuple[float, str, dict[str, Any]]] = []
    try:
        entries = list(os.scandir(log_dir))
    except OSError:
        return []
    for entry in entries:
        path = os.path.join(entry.path, JOB_FILE)
        if not entry.is_dir(follow_symlinks=False):
            continue
        try:
            with open(open_regular(path, depth=JOB_DEPTH), "rb") as f:
                raw = f.read(MAX_RECORD_BYTES + 1)
            if len(raw) > MAX_RECORD_BYTES:
                raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
            if not raw:  # a spare's placeholder (agent.spares), not written yet
                raise ValueError("empty: the agent stopped while the job was starting")
            data = json.loads(raw)
            if data.get("format") != FORMAT or not data.get("attempts"):
                raise ValueError("unknown format")
            started = float(data["attempts"][0].get("start_time", 0.0))
        except FileNotFoundError:  # a run directory without a record: not a job's
            continue
        except NotRegularFile as err:
            logger.warning("skipping a job record: %s", err)
            continue
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            OverflowError,  # a huge integer as a time
            RecursionError,  # absurdly deep nesting
        ) as err:
            logger.warning("skipping unreadable job record %s: %s", path, err)
            continue
        found.append((started, entry.path, data))
    found.sort(key=lambda item: item[0])
    return [(run_dir, data) for _, run_dir, data in found]
