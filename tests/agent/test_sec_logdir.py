"""The log directory is the agent's own (issue 20, finding 4): one another user could
change is refused at startup, with the fix; everything the agent makes in it is 0700
(directories) or 0600 (files), whatever the umask; the output files are never reached
through a symbolic link nor waited on as a FIFO. And the ranks never see the service
manager's variables meant for the agent (CREDENTIALS_DIRECTORY, finding 7), nor a
RANKD_* variable but the guardian's marker RANKD_ATTEMPT (docs/security.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.agents import AGENT_BIN, Agent, start_agent
from helpers.core import PYTHON, open_core
from helpers.wait import wait_until, wait_until_async

from rankd.agent import spares
from rankd.agent.errors import SpecError
from rankd.agent.logdir import LogDirError, check_log_dir
from rankd.agent.supervisor import Supervisor
from rankd.testing import start_agent as start_local_agent
from rankd.v1 import agent_pb2 as pb

pytestmark = pytest.mark.timeout(90)

NOBODY = 65534
WORKER = "import sys\nprint('out line')\nprint('err line', file=sys.stderr)\n"
PRINT_ENV = "import json, os\nprint(json.dumps(dict(os.environ)))\n"
AGENT_ONLY = {
    "CREDENTIALS_DIRECTORY": "/run/credentials/rankd-agent.service",
    "NOTIFY_SOCKET": "/run/systemd/notify",
    "WATCHDOG_USEC": "30000000",
    "WATCHDOG_PID": "1",
    "LISTEN_FDS": "1",
    "LISTEN_FDNAMES": "grpc",
    "LISTEN_PID": "1",
}


def _refusal(log_dir: Path) -> str:
    """Run the agent on `log_dir`; it must exit 2 with one line and no traceback."""
    result = subprocess.run(
        [AGENT_BIN, "--port", "0", "--log-dir", str(log_dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    return line


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can hand a directory to nobody")
def test_a_log_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    line = _refusal(theirs)
    assert line == (
        f"rankd-agent: error: log dir '{theirs}' is owned by uid {NOBODY}, not this agent's "
        "user (uid 0): use a directory of your own, e.g. `mktemp -d`"
    )
    assert list(theirs.iterdir()) == []
    # below a directory of theirs (the predictable /tmp/rankd-$SLURM_JOB_ID made first by
    # someone else): they could swap the log dir, so it is not even made
    line = _refusal(theirs / "node01")
    assert f"{theirs} above it is owned by uid {NOBODY}" in line and "mktemp -d" in line
    assert list(theirs.iterdir()) == []


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o720])
def test_a_log_dir_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    line = _refusal(shared)
    assert line == (
        f"rankd-agent: error: log dir '{shared}' is writable by group or others "
        f"(mode {mode:o}): chmod 700 {shared}"
    )
    assert list(shared.iterdir()) == []
    shared.chmod(0o700)  # the fix works
    assert check_log_dir(str(shared)) == str(shared)


def test_a_parent_anyone_can_write_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    line = _refusal(parent / "logs")
    assert f"{parent} above it is writable by anyone without the sticky bit (mode 777)" in line
    assert f"chmod o-w {parent}" in line
    assert list(parent.iterdir()) == []
    parent.chmod(0o1777)  # as /tmp: nobody can rename what is not theirs
    assert check_log_dir(str(parent / "logs")) == str(parent / "logs")


def test_a_group_writable_parent_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parent = tmp_path / "project"
    parent.mkdir()
    parent.chmod(0o770)
    with caplog.at_level(logging.WARNING, logger="rankd.agent.logdir"):
        check_log_dir(str(parent / "logs"))
    (record,) = caplog.records
    assert f"{parent} above it is writable by group" in record.getMessage()
    assert "chmod g-w" in record.getMessage()


def test_the_log_dir_is_kept_by_its_real_path(tmp_path: Path) -> None:
    # a link that could be re-pointed later is resolved once, at startup
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert check_log_dir(str(tmp_path / "link" / "logs")) == str(tmp_path / "real" / "logs")


def test_a_log_dir_that_is_a_file_is_refused_as_before(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(LogDirError, match=r"log dir '.*/file' exists and is not a directory"):
        check_log_dir(str(tmp_path / "file"))
    with pytest.raises(SpecError, match=r"log dir '.*/file/logs': .*/file is not a directory"):
        check_log_dir(str(tmp_path / "file" / "logs"))


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Umask 0 for what this test starts (the agent inherits it): no mode may depend on
    a umask that clears the group's and others' bits."""
    before = os.umask(0)
    try:
        yield
    finally:
        os.umask(before)


def _succeeded(agent: Agent, job_id: str, restart: int = 0) -> None:
    def done() -> bool:
        job = agent.stub.Poll(pb.PollRequest(job_id=job_id), timeout=5).job
        return job.restart_count == restart and job.state == pb.SUCCEEDED

    wait_until(done, 30, f"{job_id} attempt {restart} to succeed")


def _start(agent: Agent, job_id: str, script: str, nprocs: int, restart: int = 0) -> None:
    spec = pb.JobSpec(
        job_id=job_id,
        nprocs=nprocs,
        entrypoint=PYTHON,
        args=[script],
        tee="3",
        restart_count=restart,
        # the mirrors' filtered_stdout.log and filtered_stderr.log are made too
        duplicate_stdout_filters=["out"],
        duplicate_stderr_filters=["err"],
    )
    agent.stub.Start(pb.StartRequest(spec=spec), timeout=20)
    _succeeded(agent, job_id, restart)


def _complete_spare(log_dir: Path, nprocs: int) -> bool:
    found = [p for p in log_dir.iterdir() if p.name.startswith(spares.PREFIX)]
    if len(found) != 1 or not (found[0] / "job.json").exists():
        return False
    ranks = found[0] / "attempt_0"
    return all((ranks / str(r) / "stderr.log").exists() for r in range(nprocs))


def test_everything_the_agent_makes_is_0700_or_0600(tmp_path: Path, permissive_umask: None) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    made = tmp_path / "made"  # missing: the agent makes it, and the log dir in it
    log_dir = made / "logs"
    agent = start_agent(log_dir)
    try:
        os.umask(0o022)  # the agent has its umask; what this test writes is not checked
        _start(agent, "first", str(script), 2)  # directories made by the Start
        _start(agent, "second", str(script), 2)  # a spare's, made in its thread
        _start(agent, "first", str(script), 3, restart=1)  # a new attempt, its own size
        wait_until(lambda: _complete_spare(log_dir, 3), 20, "a spare of 3 ranks")
        paths = [made, log_dir, *log_dir.rglob("*")]  # before the stop removes the spare
        seen = {"dirs": 0, "files": 0}
        bad = []
        for path in paths:
            info = path.lstat()
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISDIR(info.st_mode):
                seen["dirs"] += 1
                bad += [] if mode == 0o700 else [f"{path}: {mode:o}"]
            else:
                assert stat.S_ISREG(info.st_mode), path
                seen["files"] += 1
                bad += [] if mode == 0o600 else [f"{path}: {mode:o}"]
    finally:
        agent.stop()
    assert bad == []
    # 2 made + 3 run dirs (one a spare) + 4 attempts + 2+2+3+3 rank dirs;
    # 3 job.json + 2*(2+2+3+3) logs + 2 filtered logs in each of the 3 started attempts
    assert seen == {"dirs": 2 + 3 + 4 + 10, "files": 3 + 20 + 2 * 3}, seen
    attempt = next(log_dir.glob("first_*")) / "attempt_1"
    assert (attempt / "2" / "stdout.log").read_text() == "out line\n"
    filtered = (attempt / "filtered_stderr.log").read_text().splitlines()
    assert sorted(filtered) == [f"[default{r}]:err line" for r in range(3)]


async def test_run_dirs_of_earlier_agents_are_made_private(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    old = log_dir / "old-job_1234abcd"
    (old / "attempt_0" / "0").mkdir(parents=True)
    log_dir.chmod(0o755)  # readable by others is the operator's choice: kept
    old.chmod(0o755)
    (log_dir / "not-a-dir").write_text("")
    await Supervisor(str(log_dir)).close()
    assert stat.S_IMODE(old.stat().st_mode) == 0o700
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o755


@pytest.mark.parametrize("plant", ["fifo", "symlink"])
async def test_a_planted_output_file_is_refused_not_followed(tmp_path: Path, plant: str) -> None:
    # A rank (the agent's user) replaces a stdout.log of the spare the next Start takes:
    # the Start fails at once, naming it; the agent neither blocks on a FIFO nor writes
    # through a link.
    target = tmp_path / "target"
    target.write_text("untouched\n")
    async with open_core(tmp_path) as core:
        script = core.script("worker.py", WORKER)
        await core.run(core.spec("first", script))

        def ready() -> bool:
            return _complete_spare(core.log_dir, 1)

        await wait_until_async(ready, 10, "a spare of 1 rank")
        (spare,) = (p for p in core.log_dir.iterdir() if p.name.startswith(spares.PREFIX))
        planted = spare / "attempt_0" / "0" / "stdout.log"
        planted.unlink()
        if plant == "fifo":
            os.mkfifo(planted, 0o600)
            message = r"is not a regular file"
        else:
            planted.symlink_to(target)
            message = r"is a symbolic link: not followed"
        with pytest.raises(SpecError, match=rf"cannot start .*stdout\.log {message}"):
            await asyncio.wait_for(core.sup.start(core.spec("second", script)), 10)
        assert [j.job_id for j in core.sup.jobs()] == ["first"]
        assert target.read_text() == "untouched\n"
        await core.run(core.spec("third", script))  # the next Start makes its own


def test_ranks_never_see_the_agents_service_manager_variables(tmp_path: Path) -> None:
    script = tmp_path / "env.py"
    script.write_text(PRINT_ENV)
    env = {**os.environ, **AGENT_ONLY, "PASSED_ON": "yes", "RANKD_SOMETHING": "the agent's"}
    agent = Agent.adopt(start_local_agent(tmp_path / "logs", env=env))
    try:
        spec = pb.JobSpec(
            job_id="env",
            nprocs=1,
            entrypoint=sys.executable,
            args=[str(script)],
            env={"NOTIFY_SOCKET": "/the/job/asked/for/it"},  # a Start may set any
        )
        agent.stub.Start(pb.StartRequest(spec=spec), timeout=20)
        _succeeded(agent, "env")
        poll = agent.stub.Poll(pb.PollRequest(job_id="env"), timeout=5)
        seen = json.loads(Path(poll.job.ranks[0].stdout_path).read_text())
    finally:
        agent.stop()
    assert seen["PASSED_ON"] == "yes"
    assert seen["NOTIFY_SOCKET"] == "/the/job/asked/for/it"
    assert sorted(set(AGENT_ONLY) & set(seen)) == ["NOTIFY_SOCKET"]
    # one rankd variable, as docs/security.md says: the guardian's marker of the attempt
    assert [k for k in seen if k.startswith("RANKD_")] == ["RANKD_ATTEMPT"]
    assert seen["RANKD_ATTEMPT"].endswith("/env/0"), seen["RANKD_ATTEMPT"]
