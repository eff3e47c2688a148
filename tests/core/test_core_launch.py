"""A launch's plan (agent.launch.plan_ranks): every rank's argv, environment and paths,
computed from the spec alone, checked without starting a process."""

from __future__ import annotations

from pathlib import Path

import pytest

from rankd.agent.launch import RankPlan, plan_ranks
from rankd.agent.logs import AttemptLogs
from rankd.agent.specs import JobSpec

pytestmark = pytest.mark.timeout(30)


def _env(plan: RankPlan) -> dict[str, str]:
    """The plan's environment as exec would pass it, decoded; a key given twice fails."""
    pairs = [item.decode().split("=", 1) for item in plan.env]
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), keys
    return dict(pairs)


def _logs(tmp_path: Path, nprocs: int) -> AttemptLogs:
    return AttemptLogs(str(tmp_path / "job_1234" / "attempt_2"), nprocs, [""] * nprocs)


def test_each_rank_gets_its_argv_paths_and_torch_variables(tmp_path: Path) -> None:
    spec = JobSpec(
        job_id="job",
        nprocs=3,
        entrypoint="/usr/bin/python3",
        args=("-u", "train.py"),
        rank_args={1: ("--extra", "a b")},
        cwd="/srv",
        restart_count=2,
    )
    logs = _logs(tmp_path, 3)
    plans = plan_ranks(spec, logs, base_env={}, marker="tag/job/2")
    attempt_dir = tmp_path / "job_1234" / "attempt_2"
    assert [p.local_rank for p in plans] == [0, 1, 2]
    assert [p.argv for p in plans] == [
        ["/usr/bin/python3", "-u", "train.py"],
        ["/usr/bin/python3", "-u", "train.py", "--extra", "a b"],
        ["/usr/bin/python3", "-u", "train.py"],
    ]
    for plan in plans:
        rank_dir = attempt_dir / str(plan.local_rank)
        assert plan.cwd == "/srv"
        assert plan.stdout_path == str(rank_dir / "stdout.log")
        assert plan.stderr_path == str(rank_dir / "stderr.log")
        assert plan.error_file == str(rank_dir / "error.json")
        assert _env(plan) == {
            "LOCAL_RANK": str(plan.local_rank),
            "TORCHELASTIC_ERROR_FILE": plan.error_file,
            "RANKD_ATTEMPT": "tag/job/2",
        }
    assert not attempt_dir.exists()  # a plan makes nothing


def test_the_environment_layers_and_what_the_agent_sets_last(tmp_path: Path) -> None:
    # default_env < the agent's environment < env < rank_env < the agent's own variables
    spec = JobSpec(
        job_id="job",
        nprocs=2,
        entrypoint="/bin/true",
        default_env={"A": "default", "B": "default", "C": "default", "D": "default"},
        env={"C": "env", "D": "env", "E": "env"},
        rank_env={1: {"D": "rank 1", "F": "rank 1", "LOCAL_RANK": "mine", "RANKD_ATTEMPT": "x"}},
    )
    base = {"B": "agent", "C": "agent", "PATH": "/bin", "UNICODE": "é ü"}
    plans = plan_ranks(spec, _logs(tmp_path, 2), base_env=base, marker="m")
    zero, one = (_env(p) for p in plans)
    shared = {"A": "default", "B": "agent", "C": "env", "E": "env", "PATH": "/bin"}
    assert zero == {
        **shared,
        "D": "env",
        "UNICODE": "é ü",
        "LOCAL_RANK": "0",
        "TORCHELASTIC_ERROR_FILE": plans[0].error_file,
        "RANKD_ATTEMPT": "m",
    }
    assert one == {
        **shared,
        "D": "rank 1",
        "F": "rank 1",
        "UNICODE": "é ü",
        "LOCAL_RANK": "1",  # never what the spec says: the agent's
        "TORCHELASTIC_ERROR_FILE": plans[1].error_file,
        "RANKD_ATTEMPT": "m",
    }
    assert "é ü".encode() in {item.split(b"=", 1)[1] for item in plans[0].env}  # UTF-8


def test_the_plan_does_not_change_what_it_was_given(tmp_path: Path) -> None:
    base = {"KEEP": "1"}
    spec = JobSpec(job_id="job", nprocs=1, entrypoint="/bin/true", env={"X": "1"})
    first = plan_ranks(spec, _logs(tmp_path, 1), base_env=base, marker="m")
    again = plan_ranks(spec, _logs(tmp_path, 1), base_env=base, marker="m")
    assert first == again
    assert base == {"KEEP": "1"} and dict(spec.env) == {"X": "1"}
