"""deploy/slurm/rankd.sbatch, run for real by bash against a fake Slurm.

The fake `srun` starts one task per node of SLURM_JOB_NODELIST with SLURMD_NODENAME
set, forwards SIGTERM/SIGINT to its tasks and exits when they have; the fake
`scontrol show hostnames` expands the node list with `client.nodes.expand_hostlist`.
With SLURM_JOB_NODELIST=127.0.0.[1-2] the script starts two real agents, on
127.0.0.1 and 127.0.0.2 (all of 127/8 is loopback) with the same port, serving the
script's per-job token and TLS certificate: the whole token + TLS path, end to end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from cryptography import x509

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "slurm" / "rankd.sbatch"
VENV_BIN = str(Path(sys.executable).parent)
NODES = ("127.0.0.1", "127.0.0.2")
JOB_ID = "4242"
RUN_TIMEOUT = 100.0

FAKE_SRUN = """\
#!{python}
\"\"\"Fake srun: a task per node of SLURM_JOB_NODELIST; signals go to the tasks.\"\"\"
import json, os, signal, subprocess, sys
from rankd.client.nodes import expand_hostlist

args = sys.argv[1:]
options = []
while args and args[0].startswith("-"):
    if "=" not in args[0]:
        sys.exit(f"fake srun: write options as --name=value, not {{args[0]!r}}")
    options.append(args.pop(0))
nodes = expand_hostlist(os.environ["SLURM_JOB_NODELIST"])
with open(os.environ["FAKE_SRUN_LOG"], "a") as log:
    log.write(json.dumps({{"options": options, "command": args}}) + "\\n")
tasks = []
for node_id, node in enumerate(nodes):
    env = dict(os.environ, SLURMD_NODENAME=node, SLURM_NODEID=str(node_id),
               SLURM_PROCID=str(node_id), SLURM_LOCALID="0", SLURM_STEP_ID="0")
    tasks.append(subprocess.Popen(args, env=env))

def forward(signum, frame):
    for task in tasks:
        if task.poll() is None:
            task.send_signal(signum)

signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
worst = 0
running = {{task.pid: task for task in tasks}}
while running:
    pid, status = os.wait()
    task = running.pop(pid, None)
    if task is None:
        continue
    code = os.waitstatus_to_exitcode(status)
    task.returncode = code
    if code != 0:
        worst = worst or (code if code > 0 else 128 - code)
        if "--kill-on-bad-exit=1" in options:
            forward(signal.SIGKILL, None)
sys.exit(worst)
"""

FAKE_SCONTROL = """\
#!{python}
\"\"\"Fake scontrol: only `scontrol show hostnames [LIST]`.\"\"\"
import os, sys
from rankd.client.nodes import expand_hostlist

if sys.argv[1:3] != ["show", "hostnames"]:
    sys.exit(f"fake scontrol: unsupported {{sys.argv[1:]}}")
expr = sys.argv[3] if len(sys.argv) > 3 else os.environ["SLURM_JOB_NODELIST"]
print("\\n".join(expand_hostlist(expr)))
"""

# Each rank reports its torchrun environment and the token file's mode, which it can
# only see while the job runs (the script removes the token at the end).
JOB = """\
import os, pathlib, stat, sys, time
mode = stat.S_IMODE(os.stat(sys.argv[1]).st_mode)
print(f"RANK={os.environ['RANK']} WORLD_SIZE={os.environ['WORLD_SIZE']} "
      f"LOCAL_RANK={os.environ['LOCAL_RANK']} TOKEN_MODE={mode:o}", flush=True)
if sys.argv[2] == "sleep":
    (pathlib.Path(sys.argv[1]).parent.parent / f"ready-{os.environ['RANK']}").touch()
    time.sleep(300)
if os.environ["RANK"] == sys.argv[2]:
    print(f"rank {sys.argv[2]} fails on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
"""


@dataclass
class Slurm:
    """A fake Slurm allocation of the two loopback nodes."""

    tmp: Path
    env: dict[str, str]
    rankd_dir: Path
    port: int
    job: Path

    def start(self, *cmd: str) -> subprocess.Popen[str]:
        """The batch script in its own session, like the batch step of a job."""
        return subprocess.Popen(
            ["bash", str(SCRIPT), *cmd],
            env=self.env,
            cwd=self.tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def run(self, *cmd: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return self.finish(self.start(*cmd), timeout)

    def finish(
        self, proc: subprocess.Popen[str], timeout: float = RUN_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"rankd.sbatch hung for {timeout}s:\n{out}\n{err}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def srun_calls(self) -> list[dict[str, list[str]]]:
        log = self.tmp / "srun.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def leftovers(self) -> list[psutil.Process]:
        """Live processes started for this allocation (agents, fake srun, ranks)."""
        marker = str(self.tmp)
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(marker in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        return found


def _port_free_on_every_node() -> int:
    """A port free on 127.0.0.1 and on 127.0.0.2."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((NODES[0], 0))
            port = int(first.getsockname()[1])
            try:
                with socket.socket() as second:
                    second.bind((NODES[1], port))
            except OSError:
                continue
        return port
    raise AssertionError("no port free on both loopback addresses")


def _write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def slurm(tmp_path: Path) -> Iterator[Slurm]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_executable(bin_dir / "srun", FAKE_SRUN.format(python=sys.executable))
    _write_executable(bin_dir / "scontrol", FAKE_SCONTROL.format(python=sys.executable))
    job = tmp_path / "job.py"
    job.write_text(JOB)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "RANKD", "GRPC_"))}
    port = _port_free_on_every_node()
    rankd_dir = tmp_path / "rankd"
    env.update(
        PATH=os.pathsep.join([str(bin_dir), VENV_BIN, env.get("PATH", "/usr/bin:/bin")]),
        HOME=str(tmp_path / "home"),
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NODELIST="127.0.0.[1-2]",
        PORT=str(port),
        NPROC_PER_NODE="2",
        RANKD_DIR=str(rankd_dir),
        START_TIMEOUT="60",
        STOP_TIMEOUT="20",
        FAKE_SRUN_LOG=str(tmp_path / "srun.log"),
    )
    handle = Slurm(tmp_path, env, rankd_dir, port, job)
    try:
        yield handle
    finally:
        for proc in handle.leftovers():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def _ranks(stdout: str) -> dict[int, dict[str, str]]:
    found: dict[int, dict[str, str]] = {}
    for line in stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        if "RANK" in fields:
            found[int(fields["RANK"])] = fields
    return found


def _agents_are_gone(slurm: Slurm) -> None:
    assert slurm.leftovers() == []
    for host in NODES:  # the port is free again on both nodes
        with socket.create_server((host, slurm.port)):
            pass


def test_job_runs_on_every_node_over_token_and_tls(slurm: Slurm) -> None:
    started = time.monotonic()
    result = slurm.run(sys.executable, str(slurm.job), str(slurm.rankd_dir / "token"), "-1")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < RUN_TIMEOUT

    ranks = _ranks(result.stdout)
    assert sorted(ranks) == [0, 1, 2, 3], result.stdout
    for rank, fields in ranks.items():
        assert fields["WORLD_SIZE"] == "4"
        assert fields["LOCAL_RANK"] == str(rank % 2)
        assert fields["TOKEN_MODE"] == "600"
    for line in result.stdout.splitlines():  # merged output, prefixed with the global rank
        if "RANK=" in line:
            rank = _ranks(line).popitem()[0]
            assert line.startswith(f"[default{rank}]:"), line
    assert f"launching run slurm-{JOB_ID}-0" in result.stderr

    # One srun step: a task per node, each an agent on its node's address with token + TLS.
    (call,) = slurm.srun_calls()
    assert "--ntasks-per-node=1" in call["options"]
    assert "--kill-on-bad-exit=1" in call["options"]
    agent_argv = call["command"]
    for flag in ("--token-file", "--tls-cert", "--tls-key"):
        assert flag in agent_argv
    assert "SLURMD_NODENAME" in " ".join(agent_argv)
    for node in NODES:  # each node's agent kept its logs in its own directory
        assert list((slurm.rankd_dir / "logs" / node).glob(f"slurm-{JOB_ID}-0_*"))

    # The certificate names every node by IP; the secrets are gone after the job.
    cert = x509.load_pem_x509_certificate((slurm.rankd_dir / "tls.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)) == list(NODES)
    assert not (slurm.rankd_dir / "token").exists()
    assert not (slurm.rankd_dir / "tls.key").exists()
    assert slurm.rankd_dir.stat().st_mode & 0o077 == 0
    _agents_are_gone(slurm)


def test_failing_job_fails_the_script(slurm: Slurm) -> None:
    result = slurm.run(sys.executable, str(slurm.job), str(slurm.rankd_dir / "token"), "2")
    assert result.returncode == 1, result.stderr
    assert "rank 2 fails on purpose" in result.stderr
    assert "exited with 1" in result.stderr
    assert "Traceback" not in result.stderr
    _agents_are_gone(slurm)


def test_refused_credentials_fail_fast_with_exit_3(slurm: Slurm) -> None:
    # A client whose token the agents refuse (here: `rankd` forced to another token) cannot
    # get in by waiting: the script stops at once, names the node, and exits 3.
    wrong = slurm.tmp / "wrong-token"
    wrong.write_text("not-this-jobs-token-0123456789\n")
    wrong.chmod(0o600)
    wrapper = slurm.tmp / "bin" / "rankd-wrong-token"
    _write_executable(wrapper, f'#!/usr/bin/env bash\nexec rankd "$@" --token-file "{wrong}"\n')
    slurm.env.update(RANKD=str(wrapper), START_TIMEOUT="60")
    started = time.monotonic()
    result = slurm.run(sys.executable, str(slurm.job), str(slurm.rankd_dir / "token"), "-1")
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - started < 30
    assert re.search(r"node 127\.0\.0\.[12]:\d+ refused the token", result.stderr), result.stderr
    assert "refused this job's token or TLS settings" in result.stderr
    assert "RANK=" not in result.stdout
    assert not (slurm.rankd_dir / "token").exists()
    _agents_are_gone(slurm)


def test_scancel_stops_ranks_and_agents(slurm: Slurm) -> None:
    # scancel / the time limit: Slurm sends SIGTERM to every process of the job's steps.
    proc = slurm.start(sys.executable, str(slurm.job), str(slurm.rankd_dir / "token"), "sleep")
    deadline = time.monotonic() + 60
    while len(list(slurm.tmp.glob("ready-*"))) < 4:
        assert proc.poll() is None, slurm.finish(proc).stderr
        assert time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    result = slurm.finish(proc, timeout=60)
    assert result.returncode == 143, result.stderr
    assert "Traceback" not in result.stderr
    assert not (slurm.rankd_dir / "token").exists()
    _agents_are_gone(slurm)


def test_agent_that_cannot_start_fails_fast(slurm: Slurm) -> None:
    # Node 2's port is taken (bound, not listening: connections are refused at once): its
    # agent exits, srun ends the step, the script reports it.
    with socket.socket() as taken:
        taken.bind((NODES[1], slurm.port))
        started = time.monotonic()
        result = slurm.run(sys.executable, str(slurm.job), "unused", "-1", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "srun step ended before every agent answered" in result.stderr
    assert "cannot listen on 127.0.0.2" in result.stderr  # the agent's own message
    assert time.monotonic() - started < 30
    assert "RANK=" not in result.stdout
    _agents_are_gone(slurm)


def test_refuses_to_run_outside_slurm_or_without_a_command(slurm: Slurm) -> None:
    env = {k: v for k, v in slurm.env.items() if k != "SLURM_JOB_ID"}
    result = subprocess.run(
        ["bash", str(SCRIPT), "true"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "not inside a Slurm job" in result.stderr
    result = subprocess.run(
        ["bash", str(SCRIPT)], env=slurm.env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "no command" in result.stderr
    assert slurm.srun_calls() == []


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
