"""Jobs on disk: each run directory holds `job.json`, written atomically (temp file +
rename) when an attempt starts and when it ends, so an agent restarted on the same
`--log-dir` still answers Poll and Stream for past jobs."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import fields
from typing import Any

from rankd.agent.failures import Failure
from rankd.agent.specs import JobSpec

__all__ = ["JOB_FILE", "load_job_files", "spec_from_dict", "spec_to_dict", "write_job_file"]

logger = logging.getLogger(__name__)

JOB_FILE = "job.json"
FORMAT = 1


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
    )


def failure_from_dict(data: dict[str, Any]) -> Failure:
    return Failure(**data)


def write_job_file(run_dir: str, data: dict[str, Any], *, fresh: bool = False) -> None:
    """Replace `<run_dir>/job.json` atomically; a failure to write is logged, not raised
    (the job runs on; only its record after a restart is at stake). `fresh`: the job's
    first record, written in place (over the empty file of a spare run directory, see
    agent.spares): there is no earlier record that a torn write could spoil."""
    # compact: the C encoder (indent= falls back to the pure-Python one, 10x slower)
    payload = json.dumps({"format": FORMAT, **data}, separators=(",", ":")).encode()
    target = os.path.join(run_dir, JOB_FILE)
    # else one temporary name per writing thread (the loop's, the io thread's)
    path = target if fresh else os.path.join(run_dir, f".job-{threading.get_native_id()}.json")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)  # no fsync: the record must survive the agent, not the kernel
            if not fresh:
                os.replace(path, target)
        except BaseException:
            if not fresh:
                os.unlink(path)
            raise
    except OSError:
        logger.exception("could not record job state in %s", run_dir)


def load_job_files(log_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """(run_dir, data) of every readable job file directly under `log_dir`, oldest first.
    Unreadable or foreign files are skipped with a warning."""
    found: list[tuple[float, str, dict[str, Any]]] = []
    try:
        entries = list(os.scandir(log_dir))
    except OSError:
        return []
    for entry in entries:
        path = os.path.join(entry.path, JOB_FILE)
        if not entry.is_dir(follow_symlinks=False) or not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as f:
                raw = f.read()
            if not raw:  # a spare's placeholder (agent.spares), not written yet
                raise ValueError("empty: the agent stopped while the job was starting")
            data = json.loads(raw)
            if data.get("format") != FORMAT or not data.get("attempts"):
                raise ValueError("unknown format")
            started = float(data["attempts"][0].get("start_time", 0.0))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            logger.warning("skipping unreadable job record %s: %s", path, err)
            continue
        found.append((started, entry.path, data))
    found.sort(key=lambda item: item[0])
    return [(run_dir, data) for _, run_dir, data in found]
