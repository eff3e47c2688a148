"""deploy/slurm/rankd.sbatch, submitted with sbatch to a real Slurm, as the docs say.

The tests marked `slurm` (`make test-slurm`; `make test` leaves them out) start a real
Slurm on this host (tests/helpers/slurm.py: munged, slurmctld, and one slurmd for each of the nodes
127.0.0.1 and 127.0.0.2, of 2 and 1 CPUs) and skip, saying why, without Debian's
slurm-wlm and munge or without root. Jobs run as the docs say: `sbatch --nodes=N
deploy/slurm/rankd.sbatch python3 job.py` with the venv's bin first on PATH (the venv
"active when you submit"), so each node's srun task finds `.venv/bin/rankd-agent`. Each
agent binds its node's address on the same port, with the job's token and TLS
certificate: the whole path, end to end. No fake srun: it once forwarded the SIGTERM
that real srun turns into SIGKILL, and hid that the agents never stopped cleanly.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from helpers.slurm import SlurmCluster, describe, skip_reason
from helpers.wait import wait_until

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "slurm" / "rankd.sbatch"
VENV_BIN = str(Path(sys.executable).parent)
NODES = ("127.0.0.1", "127.0.0.2")
RUN_TIMEOUT = 90.0
#: Slurm checks time limits every 30 s or so: a 1-minute limit strikes within 60-95 s.
TIME_LIMIT_TIMEOUT = 150.0

# Each rank reports its torchrun environment and the token file's mode, which it can only
# see while the job runs (the script removes the token at the end). MODE: a rank number to
# fail, -1 for none, or "sleep" (each rank leaves ready-<job>-<rank> beside this file).
JOB = """\
import os, pathlib, stat, sys, time
here = pathlib.Path(sys.argv[0]).parent
token = pathlib.Path(os.environ["HOME"], ".rankd", os.environ["SLURM_JOB_ID"], "token")
mode = stat.S_IMODE(token.stat().st_mode)
print(f"RANK={os.environ['RANK']} WORLD_SIZE={os.environ['WORLD_SIZE']} "
      f"LOCAL_RANK={os.environ['LOCAL_RANK']} TOKEN_MODE={mode:o}", flush=True)
if sys.argv[1] == "sleep":
    (here / f"ready-{os.environ['SLURM_JOB_ID']}-{os.environ['RANK']}").touch()
    time.sleep(300)
if os.environ["RANK"] == sys.argv[1]:
    print(f"rank {sys.argv[1]} fails on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
"""

slurm = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with SlurmCluster.start(tmp_path_factory.mktemp("slurm")) as started:
        yield started


@dataclass
class Finished:
    """A job that has ended: Slurm's fields and what the script left."""

    job: int
    fields: dict[str, str]
    out: str  # the job's output file, rankd-<job>.out (stdout and stderr)
    rankd_dir: Path

    @property
    def agents_log(self) -> str:
        return (self.rankd_dir / "agents.log").read_text()

    def last_line(self) -> str:
        return self.out.rstrip("\n").rsplit("\n", 1)[-1]


@dataclass
class Submitter:
    """Submits rankd.sbatch from a directory of its own; `finish` waits for the end."""

    cluster: SlurmCluster
    tmp: Path
    env: dict[str, str]
    job_script: Path
    jobs: list[int] = field(default_factory=list)

    def sbatch(self, *options: str, mode: str = "-1", **settings: str) -> int:
        """`sbatch OPTIONS rankd.sbatch python3 job.py MODE` with `settings` (PORT=...)
        in the environment sbatch exports; returns the job id."""
        argv = [*options, str(SCRIPT), "python3", str(self.job_script), mode]
        env = {**self.env, **settings}
        result = self.cluster.command("sbatch", "--parsable", *argv, cwd=self.tmp, env=env)
        job = int(result.stdout.split(";")[0])
        self.jobs.append(job)
        return job

    def finish(self, job: int, timeout: float = RUN_TIMEOUT) -> Finished:
        """Wait until Slurm says the job ended, then until no process of it is left."""
        fields = self.cluster.wait_job(job, timeout)
        self.wait_gone(job)
        out = self.tmp / f"rankd-{job}.out"  # none for a job that never started
        text = out.read_text() if out.exists() else ""
        return Finished(job, fields, text, Path(self.env["HOME"], ".rankd", str(job)))

    def wait_gone(self, job: int) -> None:
        try:
            wait_until(lambda: not self.cluster.processes(job), 15.0, f"job {job}'s processes")
        except AssertionError as err:
            raise AssertionError(f"{err}: {describe(self.cluster.processes(job))}") from None

    def ready(self, job: int) -> int:
        return len(list(self.tmp.glob(f"ready-{job}-*")))


@pytest.fixture
def submit(cluster: SlurmCluster, tmp_path: Path) -> Iterator[Submitter]:
    job_script = tmp_path / "job.py"
    job_script.write_text(JOB)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "RANKD", "GRPC_"))}
    env.update(
        cluster.env,
        # The venv active when submitting, as the docs ask: sbatch exports PATH.
        PATH=os.pathsep.join([VENV_BIN, env.get("PATH", "/usr/bin:/bin")]),
        HOME=str(tmp_path / "home"),
    )
    submitter = Submitter(cluster, tmp_path, env, job_script)
    yield submitter
    # A test that failed half-way leaves its job: cancel it; then nothing may be left.
    for job in submitter.jobs:
        if cluster.job(job).get("JobState") in ("PENDING", "RUNNING"):
            cluster.command("scancel", str(job), check=False)
        cluster.wait_job(job, 60.0)
        submitter.wait_gone(job)


def _ranks(text: str) -> dict[int, dict[str, str]]:
    found: dict[int, dict[str, str]] = {}
    for line in text.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        if "RANK" in fields:
            found[int(fields["RANK"])] = fields
    return found


def _got_sigterm(agents_log: str, tasks: int) -> None:
    """Every agent (srun task) got SIGTERM: each logged that it is stopping on it."""
    for task in range(tasks):
        assert re.search(rf"^{task}: .* stopping on SIGTERM", agents_log, re.M), agents_log


def _stopped_by_sigterm(agents_log: str, tasks: int) -> None:
    """Every agent got SIGTERM and stopped on it; srun SIGKILLed none ("forcing job
    termination" is what real srun does with a SIGTERM of its own)."""
    _got_sigterm(agents_log, tasks)
    for task in range(tasks):
        assert re.search(rf"^{task}: .* stopped on SIGTERM", agents_log, re.M), agents_log
    assert "forcing job termination" not in agents_log
    assert not re.search(r"task \d+: Killed", agents_log), agents_log


def _no_spares_left(finished: Finished) -> None:
    # An agent stopped by SIGKILL leaves its spare run directory (.spare-*) behind.
    assert list((finished.rankd_dir / "logs").glob("*/.spare-*")) == []


def _port_free_on_every_node(port: int) -> None:
    for host in NODES:
        with socket.create_server((host, port)):
            pass


@contextlib.contextmanager
def _another_service(host: str) -> Iterator[int]:
    """A TCP service on `host` (an HTTP-like answer to anything), on a port also free on
    the other nodes; yields the port."""
    for _ in range(50):
        server = socket.create_server((host, 0))
        port = int(server.getsockname()[1])
        try:
            for other in NODES:
                if other != host:
                    socket.create_server((other, port)).close()
        except OSError:
            server.close()
            continue
        break
    else:
        raise AssertionError(f"no port free on every node but {host}")
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(2)
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(5)
        server.close()


# -- a real Slurm ---------------------------------------------------------------------------


@slurm
def test_two_nodes_that_differ_run_over_token_and_tls(submit: Submitter) -> None:
    # The nodes have 2 and 1 CPUs: one --cpus-per-task for every node could not fit both.
    job = submit.sbatch("--nodes=2", NPROC_PER_NODE="2")
    done = submit.finish(job)
    assert done.fields["JobState"] == "COMPLETED", done.out
    assert done.fields["ExitCode"] == "0:0"

    ranks = _ranks(done.out)
    assert sorted(ranks) == [0, 1, 2, 3], done.out
    for rank, fields in ranks.items():
        assert fields["WORLD_SIZE"] == "4"
        assert fields["LOCAL_RANK"] == str(rank % 2)
        assert fields["TOKEN_MODE"] == "600"
    for line in done.out.splitlines():  # merged output, prefixed with the global rank
        if "RANK=" in line:
            assert line.startswith(f"[default{_ranks(line).popitem()[0]}]:"), line
    assert done.last_line() == (
        f"rankd.sbatch: run slurm-{job}-0 exited with 0; "
        f"logs in {done.rankd_dir}/logs/<node> on each node"
    )

    # Each node's agent listened on its own address, on the documented default port.
    port = 29601 + job % 1000
    for task, node in enumerate(NODES):
        assert f"{task}: listening on {node}:{port}" in done.agents_log
        assert list((done.rankd_dir / "logs" / node).glob(f"slurm-{job}-0_*"))
    # At the end the agents got SIGTERM (not srun's SIGKILL) and stopped cleanly.
    _stopped_by_sigterm(done.agents_log, tasks=2)
    _no_spares_left(done)

    # The certificate names every node by IP; the secrets are gone after the job.
    cert = x509.load_pem_x509_certificate((done.rankd_dir / "tls.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)) == list(NODES)
    assert not (done.rankd_dir / "token").exists()
    assert not (done.rankd_dir / "tls.key").exists()
    assert done.rankd_dir.stat().st_mode & 0o077 == 0
    _port_free_on_every_node(port)


@slurm
def test_failing_rank_on_a_one_node_partition(submit: Submitter) -> None:
    # --nodes=1 on the command line, as the docs show for a one-node cluster.
    job = submit.sbatch("--partition=one", "--nodes=1", mode="1", NPROC_PER_NODE="2")
    done = submit.finish(job)
    assert done.fields["JobState"] == "FAILED", done.out
    assert done.fields["ExitCode"] == "1:0"
    assert "rank 1 fails on purpose" in done.out
    assert re.search(r"global rank 1 on 127\.0\.0\.1 failed: exit code 3", done.out), done.out
    assert re.search(r"exitcode\s*: 3", done.out)  # the report, with its root cause
    assert done.last_line().startswith(f"rankd.sbatch: run slurm-{job}-0 exited with 1;")
    assert "Traceback" not in done.out
    _stopped_by_sigterm(done.agents_log, tasks=1)
    _no_spares_left(done)


@slurm
def test_header_nodes_2_pends_on_a_one_node_partition(
    submit: Submitter, cluster: SlurmCluster
) -> None:
    # What the docs warn about: without --nodes, the header's --nodes=2 never fits.
    job = submit.sbatch("--partition=one")

    def reason() -> str:
        return cluster.command("squeue", "-h", "-j", str(job), "-o", "%T %r").stdout.strip()

    wait_until(lambda: reason() == "PENDING PartitionNodeLimit", 30.0, "PartitionNodeLimit")
    cluster.command("scancel", str(job))
    assert submit.finish(job).fields["JobState"] == "CANCELLED"


@slurm
def test_scancel_stops_ranks_then_agents_and_says_so(
    submit: Submitter, cluster: SlurmCluster
) -> None:
    job = submit.sbatch("--nodes=2", mode="sleep", NPROC_PER_NODE="2")
    wait_until(lambda: submit.ready(job) == 4, 60.0, "4 ranks ready")
    cluster.command("scancel", str(job))
    done = submit.finish(job)  # nothing of the job is left: ranks, agents, srun, script
    assert done.fields["JobState"] == "CANCELLED", done.out
    assert done.last_line().startswith(
        f"rankd.sbatch: run slurm-{job}-0 KILLED by Slurm: job {job} was cancelled (scancel);"
    ), done.out
    assert done.last_line().endswith("exit 143")
    assert "Traceback" not in done.out
    # Slurm signals every process at once: the agents got SIGTERM first. srun got one too
    # and then SIGKILLs its step ("forcing job termination"), by when they have stopped or
    # nearly: that part is a race, not asserted.
    _got_sigterm(done.agents_log, tasks=2)
    assert not (done.rankd_dir / "token").exists()


@slurm
def test_scancel_while_the_agents_start_says_so(submit: Submitter, cluster: SlurmCluster) -> None:
    # Agents that never come up (a stand-in that only sleeps): scancel during the wait for
    # them ends the script at once with its closing line, not a start failure.
    agent = submit.tmp / "agent-that-hangs"
    agent.write_text(f'#!/bin/sh\ntouch "{submit.tmp}/agent-$SLURMD_NODENAME"\nexec sleep 300\n')
    agent.chmod(0o755)
    job = submit.sbatch("--nodes=2", RANKD_AGENT=str(agent))
    wait_until(lambda: len(list(submit.tmp.glob("agent-1*"))) == 2, 60.0, "2 agents started")
    cluster.command("scancel", str(job))
    done = submit.finish(job)
    assert done.fields["JobState"] == "CANCELLED", done.out
    assert done.last_line().startswith(
        f"rankd.sbatch: run slurm-{job}-0 KILLED by Slurm: job {job} was cancelled (scancel);"
    ), done.out
    assert "rankd.sbatch: error" not in done.out
    assert not (done.rankd_dir / "token").exists()


@slurm
@pytest.mark.timeout(TIME_LIMIT_TIMEOUT + 60)
def test_time_limit_stops_ranks_then_agents_and_says_so(submit: Submitter) -> None:
    job = submit.sbatch("--nodes=1", "--time=1", mode="sleep")
    done = submit.finish(job, timeout=TIME_LIMIT_TIMEOUT)
    assert done.fields["JobState"] == "TIMEOUT", done.out
    assert submit.ready(job) == 1
    assert done.last_line().startswith(
        f"rankd.sbatch: run slurm-{job}-0 KILLED by Slurm: job {job} reached its time limit"
    ), done.out
    _got_sigterm(done.agents_log, tasks=1)
    assert not (done.rankd_dir / "token").exists()


@slurm
def test_port_taken_by_another_service_is_named_exit_2(submit: Submitter) -> None:
    # Another service listens on the port on the second node. It answers `rankd status`
    # before that node's agent even tried to bind: not a refused token (exit 3), but the
    # agent's own "cannot listen" and the port, exit 2; the first node's agent is stopped
    # (before it listens if it is slower to start than the other's failure).
    with _another_service(NODES[1]) as port:
        started = time.monotonic()
        job = submit.sbatch("--nodes=2", PORT=str(port))
        done = submit.finish(job)
        elapsed = time.monotonic() - started
    assert done.fields["ExitCode"] == "2:0", done.out
    assert f"1: rankd-agent: error: cannot listen on {NODES[1]}:{port}" in done.out
    assert f"rankd.sbatch: error: port {port} is taken on {NODES[1]} " in done.out
    assert "refused this job's token" not in done.out
    assert "RANK=" not in done.out
    assert elapsed < 45, elapsed
    if f"0: listening on {NODES[0]}:{port}" in done.agents_log:  # else SIGTERM came first
        assert re.search(r"^0: .* stopped on SIGTERM", done.agents_log, re.M), done.agents_log


@slurm
def test_refused_token_fails_fast_with_exit_3(submit: Submitter) -> None:
    # A client whose token the agents refuse (here: `rankd` forced to another token)
    # cannot get in by waiting: once every agent listens, the script stops and exits 3.
    wrong = submit.tmp / "wrong-token"
    wrong.write_text("not-this-jobs-token-0123456789\n")
    wrong.chmod(0o600)
    wrapper = submit.tmp / "rankd-wrong-token"
    wrapper.write_text(f'#!/usr/bin/env bash\nexec rankd "$@" --token-file "{wrong}"\n')
    wrapper.chmod(0o755)
    started = time.monotonic()
    job = submit.sbatch("--nodes=2", RANKD=str(wrapper))
    done = submit.finish(job)
    assert done.fields["ExitCode"] == "3:0", done.out
    assert time.monotonic() - started < 45
    assert re.search(r"node 127\.0\.0\.[12]:\d+ refused the token", done.out), done.out
    assert "rankd.sbatch: error: an agent refused this job's token or TLS settings" in done.out
    assert "RANK=" not in done.out
    assert not (done.rankd_dir / "token").exists()
    _stopped_by_sigterm(done.agents_log, tasks=2)


# -- without Slurm --------------------------------------------------------------------------


def test_refuses_to_run_outside_slurm_or_without_a_command(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(HOME=str(tmp_path), PATH=os.pathsep.join([VENV_BIN, env.get("PATH", "")]))
    result = subprocess.run(
        ["bash", str(SCRIPT), "true"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "not inside a Slurm job" in result.stderr
    env.update(SLURM_JOB_ID="1", SLURM_JOB_NODELIST="127.0.0.1")
    result = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "no command" in result.stderr
    assert not (tmp_path / ".rankd").exists()


def test_sbatch_header() -> None:
    text = SCRIPT.read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    assert {"--nodes=2", "--ntasks-per-node=1"} <= set(directives)
    assert any(d.startswith("--time=") for d in directives)
    # sbatch reads #SBATCH lines only before the first command
    first_command = next(
        i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#")
    )
    last_directive = max(
        i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH")
    )
    assert last_directive < first_command


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="no shellcheck here")
def test_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
