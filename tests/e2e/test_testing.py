"""rankd.testing: local agents and clusters, their options, their failures, their
cleanup, and the pytest plugin (in process and in a pytest run of its own, including
the example of docs/testing.md)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from rankd.client import AgentClient, AgentError, ClusterError, OutputLine
from rankd.testing import (
    AgentsFactory,
    AgentStartError,
    LeftoverProcessWarning,
    agent_args,
    agent_command,
    local_cluster,
    start_agent,
)
from rankd.v1 import agent_pb2 as pb

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "testing.md"
SHOW_RANK = "import os; print(os.environ['RANK'], os.environ['WORLD_SIZE'])"
SLEEP = "import time; time.sleep(600)"


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _family(pids: list[int]) -> list[psutil.Process]:
    """The processes ``pids`` and all their descendants."""
    procs = [psutil.Process(pid) for pid in pids]
    return procs + [kid for proc in procs for kid in proc.children(recursive=True)]


def _running_with(text: str) -> list[psutil.Process]:
    """Live processes whose command line contains ``text``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if text in " ".join(proc.info["cmdline"] or ()) and not _gone(proc):
            found.append(proc)
    return found


def _start_sleepers(address: str, job_id: str = "sleepers") -> list[int]:
    """Start 2 ranks that sleep 10 minutes on the agent at ``address``; their pids."""
    with AgentClient(address) as client:
        spec = pb.JobSpec(job_id=job_id, nprocs=2, entrypoint=PY, args=["-c", SLEEP])
        job = client.start(spec).job
    pids = [r.pid for r in job.ranks]
    assert all(pids), job
    return pids


@pytest.fixture
def strict_cleanup() -> Iterator[None]:
    """A process of an agent that outlived it fails the test (the sweep would hide it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeftoverProcessWarning)
        yield


@pytest.mark.usefixtures("strict_cleanup")
def test_local_cluster_runs_a_job_and_leaves_no_process() -> None:
    with local_cluster(2) as cluster:
        lines: list[OutputLine] = []
        result = cluster.launch([PY, "-c", SHOW_RANK], nproc_per_node=2, on_line=lines.append)
        assert result.world_size == 4
        seen = sorted((ln.global_rank, ln.text) for ln in lines)
        assert seen == [(r, f"{r} 4") for r in range(4)]

        infos = [r.unwrap() for r in cluster.info()]
        assert len({i.pid for i in infos}) == 2
        log_dirs = [Path(i.log_dir) for i in infos]
        assert [d.name for d in log_dirs] == ["node0", "node1"]
        ranks = [pid for node in cluster.nodes for pid in _start_sleepers(node.address)]
        family = _family([i.pid for i in infos])
        # each agent, its guardian and its 2 sleeping ranks
        assert len(family) >= 8, family
        assert set(ranks) <= {p.pid for p in family}
    assert [p.pid for p in family if not _gone(p)] == []
    assert not log_dirs[0].parent.exists()  # the temporary log directory is removed


def test_agent_options_become_agent_flags(tmp_path: Path) -> None:
    with local_cluster(1, log_dir=tmp_path, max_jobs=2, allow_entrypoint=[PY]) as cluster:
        for i in range(3):
            cluster.launch([PY, "-c", "pass"], run_id=f"job{i}")
        (held,) = [r.unwrap() for r in cluster.list()]
        assert [j.job_id for j in held] == ["job1", "job2"]  # --max-jobs 2 forgot job0
        with pytest.raises(ClusterError, match="/bin/true"):  # --allow-entrypoint PY
            cluster.launch(["/bin/true"], run_id="refused")
        (agent_pid,) = [r.unwrap().pid for r in cluster.info()]
        argv = psutil.Process(agent_pid).cmdline()
    assert argv[-4:] == ["--max-jobs", "2", "--allow-entrypoint", PY]
    assert (tmp_path / "node0").is_dir()  # log_dir given: kept


def test_a_token_file_makes_the_cluster_send_the_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef-local-cluster\n")
    token.chmod(0o600)
    with local_cluster(1, log_dir=tmp_path / "logs", token_file=token) as cluster:
        (info,) = [r.unwrap() for r in cluster.info()]
        with AgentClient(cluster.nodes[0].address) as anonymous, pytest.raises(AgentError):
            anonymous.info()  # the agent does require it
    assert info.pid > 0


def test_agent_args_map_keywords_to_flags() -> None:
    options = {
        "max_jobs": 3,
        "insecure": True,
        "metrics_port": None,
        "allow_entrypoint": ["/a", Path("/b")],
        "log_format": "json",
    }
    assert agent_args(options, agent_command()) == [
        "--max-jobs", "3", "--insecure", "--allow-entrypoint", "/a",
        "--allow-entrypoint", "/b", "--log-format", "json",
    ]  # fmt: skip
    assert agent_args({"insecure": False}, agent_command()) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_jbos": 3}, r"no option 'max_jbos' \(--max-jbos\).*max_jobs"),
        ({"port": 29600}, r"'port' \(--port\) is set by rankd.testing"),
        ({"log_dir": "x", "host": "0.0.0.0"}, r"'host'"),  # log_dir is local_cluster's own
        ({"insecure": "yes"}, r"'insecure' is a switch"),
        ({"max_jobs": True}, r"'max_jobs' needs a value"),
    ],
)
def test_bad_agent_options_are_type_errors_and_start_nothing(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    options = {k: v for k, v in options.items() if k != "log_dir"}
    with pytest.raises(TypeError, match=message), local_cluster(2, log_dir=tmp_path, **options):
        pass
    assert list(tmp_path.iterdir()) == []  # no agent made its log dir


def test_bad_node_count_is_a_value_error(tmp_path: Path) -> None:
    for nodes in (0, -1, True):
        with pytest.raises(ValueError, match="int >= 1"), local_cluster(nodes, log_dir=tmp_path):
            pass
    assert list(tmp_path.iterdir()) == []


def test_failed_start_quotes_stderr_and_stops_the_started_agents(tmp_path: Path) -> None:
    (tmp_path / "node1").write_text("a file where agent 1's log dir should be\n")
    with pytest.raises(AgentStartError) as err, local_cluster(2, log_dir=tmp_path):
        pytest.fail("the cluster must not start")
    assert err.value.returncode == 2
    assert "exited before printing its address" in str(err.value)
    assert "is not a directory" in err.value.stderr
    assert "is not a directory" in str(err.value) and str(tmp_path / "node1") in str(err.value)
    assert (tmp_path / "node0").is_dir()  # agent 0 had started...
    assert _running_with(str(tmp_path / "node0")) == []  # ...and was stopped


def test_start_agent_on_a_busy_port_raises_with_its_stderr(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(AgentStartError, match=f"cannot listen on 127.0.0.1:{port}"):
            start_agent(tmp_path / "logs", "--port", str(port))
    assert _running_with(str(tmp_path / "logs")) == []


def test_a_silent_agent_is_killed_at_the_start_timeout(tmp_path: Path) -> None:
    with pytest.raises(AgentStartError, match="printed no address within") as err:
        start_agent(tmp_path / "logs", timeout=0.01)
    assert err.value.returncode == -signal.SIGKILL
    assert _running_with(str(tmp_path / "logs")) == []


def test_the_agent_runs_as_a_module_too(tmp_path: Path) -> None:
    assert agent_command() == [str(Path(PY).with_name("rankd-agent"))]
    command = agent_command(script=False)
    assert command == [PY, "-P", "-m", "rankd.agent.server"]
    agent = start_agent(tmp_path / "logs", command=command)
    try:
        with AgentClient(agent.address) as client:
            info = client.info()
        assert (info.pid, info.log_dir) == (agent.pid, str(tmp_path / "logs"))
    finally:
        assert agent.stop() == -signal.SIGTERM  # the agent ends by the signal it got


def test_stop_returns_the_exit_code_and_is_idempotent(tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "logs")
    assert agent.proc.poll() is None and agent.port > 0
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    assert agent.stop() == -signal.SIGKILL


def test_the_fixtures_in_process(rankd_agents: AgentsFactory) -> None:
    """rankd's own test run loads the plugin through the installed entry point."""
    (agent,) = rankd_agents(1, max_jobs=1)
    assert psutil.Process(agent.pid).cmdline()[-2:] == ["--max-jobs", "1"]
    assert agent.log_dir.name == "node0" and agent.log_dir.parent.name.startswith("rankd")


def _pytest(tmp_path: Path, test_file: str, body: str) -> subprocess.CompletedProcess[str]:
    """Run pytest on one test file written into ``tmp_path``, outside this repository."""
    (tmp_path / test_file).write_text(body)
    return subprocess.run(
        [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )


def docs_example() -> str:
    """The python block that docs/testing.md marks as runnable."""
    block = r"<!-- runnable:[^\n]*-->\n```python\n(.*?)^```"
    found = re.search(block, DOC.read_text(), re.S | re.M)
    assert found, "docs/testing.md has no runnable python block"
    return found[1]


@pytest.mark.timeout(120)
def test_the_docs_example_runs(tmp_path: Path) -> None:
    done = _pytest(tmp_path, "test_distributed.py", docs_example())
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b2 passed\b", done.stdout), done.stdout


FAILING_TEST = """
import json, sys
from rankd.client import AgentClient
from rankd.v1 import agent_pb2 as pb

def test_fails_with_ranks_running(rankd_cluster, rankd_agents):
    cluster = rankd_cluster(nodes=2)
    (extra,) = rankd_agents(1)
    agents = [r.unwrap().pid for r in cluster.info()] + [extra.pid]
    ranks = []
    for address in [n.address for n in cluster.nodes] + [extra.address]:
        with AgentClient(address) as client:
            spec = pb.JobSpec(job_id="sleepers", nprocs=2, entrypoint=sys.executable,
                              args=["-c", "import time; time.sleep(600)"])
            ranks += [r.pid for r in client.start(spec).job.ranks]
    with open("pids.json", "w") as out:
        json.dump({"agents": agents, "ranks": ranks}, out)
    assert False, "fails on purpose"
"""


@pytest.mark.timeout(120)
def test_the_fixtures_tear_down_after_a_failed_test(tmp_path: Path) -> None:
    done = _pytest(tmp_path, "test_fails.py", FAILING_TEST)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed" in done.stdout and "fails on purpose" in done.stdout, done.stdout
    pids = json.loads((tmp_path / "pids.json").read_text())
    assert len(pids["agents"]) == 3 and len(pids["ranks"]) == 6
    alive = [pid for pid in pids["agents"] + pids["ranks"] if psutil.pid_exists(pid)]
    assert [p for p in alive if not _gone(psutil.Process(p))] == []
