"""A throwaway Slurm cluster on this host: munged, slurmctld and one slurmd per node.

Everything lives in one directory: a generated slurm.conf, a fresh munge key and socket,
state, spool, pid and log files. The daemons run as root in the foreground (children of
this process, in their own sessions) on free ports. Several slurmd share this host, one
per node name, each on its own port (Debian's slurmd allows it); a node's name is a
loopback address (127.0.0.1, 127.0.0.2, ...), so that what runs "on" a node can bind
its own address with the same port as the other nodes.

`SlurmCluster.start` is a context manager: on leaving it cancels every job, stops the
daemons, and fails if any process of the cluster (a daemon, a slurmstepd, a job's
process) had to be killed. Nothing is installed: `skip_reason` says what is missing.

    (cd tests && python -m helpers.slurm DIR)    # up until Ctrl-C; prints SLURM_CONF to export
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from helpers.wait import wait_until

__all__ = [
    "MARKER",
    "Node",
    "SlurmCluster",
    "skip_reason",
    "wait_until",
]

#: What the tests run: the daemons and the commands rankd.sbatch and its docs use.
COMMANDS = (
    *("munged", "slurmctld", "slurmd"),
    *("sbatch", "srun", "squeue", "scancel", "sinfo", "scontrol"),
)
# Debian puts the daemons in /usr/sbin, which a non-login shell's PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])
#: Set to the cluster's directory in the daemons' environment and in jobs submitted with
#: `SlurmCluster.env`: what finds the processes this cluster left (`processes`).
MARKER = "TEST_SLURM_ROOT"
START_TIMEOUT = 60.0
#: Cancelled jobs end within Slurm's KillWait (30 s by default): the stop waits longer.
STOP_TIMEOUT = 60.0
DAEMON_STOP_TIMEOUT = 15.0
#: A job in none of these states has ended (scontrol shows COMPLETING until it has).
ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}
    | {"SIGNALING", "STAGE_OUT", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
)


def which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def skip_reason() -> str | None:
    """Why a cluster cannot start here, or None when it can."""
    missing = [name for name in COMMANDS if which(name) is None]
    if missing:
        return (
            f"no real Slurm here ({', '.join(missing)} not found): Debian's packages "
            "bring it: apt-get install slurm-wlm munge"
        )
    if os.geteuid() != 0:
        return "the test Slurm runs its daemons as root (SlurmUser=root): run as root"
    return None


def free_port() -> int:
    """A TCP port free on every address of this host now (the daemons bind 0.0.0.0)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Node:
    """A Slurm node of the cluster: its name is a loopback address, its slurmd's own."""

    name: str
    cpus: int


#: Two nodes that differ, as on real clusters: a job's nodes need not match its batch node.
DEFAULT_NODES = (Node("127.0.0.1", cpus=2), Node("127.0.0.2", cpus=1))


class SlurmCluster:
    """The daemons of one cluster and the Slurm commands to drive it.

    Partitions: `all` (the default, every node) and `one` (the first node alone).
    """

    def __init__(self, root: Path, nodes: Sequence[Node] = DEFAULT_NODES) -> None:
        if not nodes:
            raise ValueError("a cluster needs at least one node")
        self.root = root
        self.nodes = tuple(nodes)
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        #: What every Slurm command of this cluster needs; add it to a job's environment
        #: (sbatch exports it), so that the job's processes carry MARKER.
        self.env = {"SLURM_CONF": str(self.conf), MARKER: str(root)}
        self._daemons: list[tuple[str, subprocess.Popen[bytes]]] = []

    # -- life ------------------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def start(cls, root: Path, nodes: Sequence[Node] = DEFAULT_NODES) -> Iterator[SlurmCluster]:
        """Start the daemons, wait until every node is idle; stop everything on exit."""
        cluster = cls(root, nodes)
        try:
            cluster._start()
            yield cluster
        finally:
            cluster.stop()

    def _start(self) -> None:
        for sub in ("state", "munge", *(f"spool/{node.name}" for node in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (self.root / "plugstack.conf").write_text("")  # not /etc/slurm's
        self.conf.write_text(self._config())

        munge = self.root / "munge"
        self._daemon(
            "munged",
            [
                *("-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}"),
                *(f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log"),
                f"--seed-file={munge}/munged.seed",
            ],
        )
        self._wait_for(self.munge_socket.exists, "munged's socket")
        self._daemon("slurmctld", ["-D", "-f", str(self.conf)])
        for node in self.nodes:
            self._daemon(f"slurmd-{node.name}", ["-D", "-N", node.name, "-f", str(self.conf)])
        self._wait_for(self._all_idle, "every node idle in sinfo")

    def _config(self) -> str:
        host = socket.gethostname()
        root = self.root
        lines = [
            "ClusterName=rankdtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool/%n",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd-%n.pid",
            f"SlurmctldLogFile={root}/slurmctld.log",
            f"SlurmdLogFile={root}/slurmd-%n.log",
            f"PlugStackConfig={root}/plugstack.conf",
            # No cgroups needed: what worked by hand on Debian's Slurm 22.05.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # node CPUs as written, not this host's
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MailProg=/bin/true",
        ]
        for node in self.nodes:
            lines.append(
                f"NodeName={node.name} NodeHostname={host} NodeAddr=127.0.0.1 "
                f"Port={free_port()} CPUs={node.cpus} RealMemory=1000 State=UNKNOWN"
            )
        lines.append("PartitionName=all Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        lines.append(f"PartitionName=one Nodes={self.nodes[0].name} MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _daemon(self, name: str, args: list[str]) -> None:
        command = which(name.split("-", 1)[0])
        assert command is not None, skip_reason()
        with open(self.root / f"{name}.out", "wb") as out:
            proc = subprocess.Popen(
                [command, *args],
                cwd=self.root,  # a slurmstepd keeps slurmd's: `processes` finds it by it
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._daemons.append((name, proc))

    def _wait_for(self, predicate: Callable[[], object], what: str) -> None:
        def ready() -> object:
            for name, proc in self._daemons:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                        + self.tail(f"{name}.out")
                    )
            return predicate()

        wait_until(ready, START_TIMEOUT, what)

    def _all_idle(self) -> bool:
        result = self.command("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
        return all(states.get(node.name) == "idle" for node in self.nodes)

    def stop(self) -> None:
        """Cancel every job, stop the daemons (SIGTERM, SIGKILL after a deadline), then
        make sure no process of the cluster is left. Idempotent. Raises AssertionError,
        once everything is stopped, if some process had to be killed."""
        problems: list[str] = []
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self._daemons):
            try:
                self.cancel_all()
            except (AssertionError, subprocess.SubprocessError) as err:
                problems.append(f"jobs still there at the stop: {err}")
        for name, proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(DAEMON_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    problems.append(f"{name} ignored SIGTERM for {DAEMON_STOP_TIMEOUT:g} s")
                    proc.kill()
                    proc.wait()
        self._daemons.clear()
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not self.processes(), 10.0, "the cluster's processes to end")
        left = self.processes()
        for leftover in left:
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        if left:
            problems.append(f"left behind, killed: {describe(left)}")
        if problems:
            raise AssertionError("Slurm cluster stop: " + "; ".join(problems))

    def cancel_all(self) -> None:
        """Cancel every job; returns once squeue lists none (within STOP_TIMEOUT)."""
        ids = self.command("squeue", "-h", "-o", "%i").stdout.split()
        if ids:
            self.command("scancel", *ids, check=False)
        wait_until(
            lambda: not self.command("squeue", "-h", "-o", "%i").stdout.strip(),
            STOP_TIMEOUT,
            f"jobs {ids} to end",
        )

    # -- commands and jobs ---------------------------------------------------------------------

    def command(
        self,
        name: str,
        *args: str,
        check: bool = True,
        timeout: float = 30.0,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command of this cluster, in `env` (default: this process's) plus
        `self.env`; with `check`, fail with its stderr."""
        command = which(name)
        assert command is not None, skip_reason()
        result = subprocess.run(
            [command, *args],
            cwd=cwd,
            env={**(os.environ if env is None else env), **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{name} {' '.join(args)}: exit {result.returncode}\n{result.stderr}"
            )
        return result

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as fields: JobState, Reason, ExitCode, NodeList, ..."""
        text = self.command("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_job(self, job_id: int, timeout: float) -> dict[str, str]:
        """The job's fields once it has ended (no longer pending, running or completing)."""
        fields: dict[str, str] = {}

        def ended() -> bool:
            fields.update(self.job(job_id))
            return fields.get("JobState") not in ACTIVE_STATES

        try:
            wait_until(ended, timeout, f"Slurm job {job_id} to end")
        except AssertionError as err:
            raise AssertionError(f"{err}: {fields}") from None
        return fields

    def processes(self, job_id: int | None = None) -> list[psutil.Process]:
        """Live processes of this cluster: its daemons and slurmstepds (their working
        directory is the cluster's) and its jobs' (MARKER in their environment); only
        job `job_id`'s (SLURM_JOB_ID) when given."""
        root = str(self.root)
        found = []
        for proc in psutil.process_iter():
            if proc.pid == os.getpid():
                continue
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                env = proc.environ()
                if job_id is not None:
                    if env.get(MARKER) == root and env.get("SLURM_JOB_ID") == str(job_id):
                        found.append(proc)
                elif env.get(MARKER) == root or _under(proc.cwd(), root):
                    found.append(proc)
            except psutil.Error:
                continue  # gone meanwhile, or a kernel thread
        return found

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.root / name
        if not path.exists():
            return f"({path} does not exist)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def describe(procs: Sequence[psutil.Process]) -> str:
    """pid and command line of each process, for failure messages."""
    out = []
    for proc in procs:
        try:
            out.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.Error:
            out.append(f"{proc.pid} (gone)")
    return "; ".join(out) or "none"


def main(argv: Sequence[str]) -> int:
    """Keep a cluster up in DIR until SIGINT or SIGTERM, for trying things by hand."""
    if len(argv) != 1:
        print("usage: (cd tests && python -m helpers.slurm DIR)", file=sys.stderr)
        return 2
    reason = skip_reason()
    if reason:
        print(f"cluster.py: {reason}", file=sys.stderr)
        return 2
    root = Path(argv[0]).resolve()
    root.mkdir(parents=True, exist_ok=True)
    stop = {signal.SIGINT, signal.SIGTERM}
    with SlurmCluster.start(root) as cluster:
        # Blocked only now: the daemons would inherit the mask and ignore their SIGTERM.
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        # Not MARKER: a shell that exports it would have its own processes killed at the stop.
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        print(cluster.command("sinfo").stdout, end="", flush=True)
        signal.sigwait(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
