"""Elastic membership (issue 22) with real torch jobs (gloo, CPU) on real agents:
a node whose agent is SIGKILLed mid-run is replaced by a spare, or the job shrinks,
down to MIN; the torchrun layout is recomputed per attempt; the report lists every
attempt with its members.

The job: each rank all_reduces ones and asserts the sum is WORLD_SIZE, 20 steps of
0.3 s; rank 0 writes a checkpoint each step and prints ``step N world W attempt A``;
a restart resumes from the checkpoint. A node is lost when the test sees a chosen step
on the launch's stdout, so the loss always falls mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from helpers.agents import PYTHON, RANKD_BIN, Agent, agents, start_agent
from helpers.torchjobs import GLOO_ENV
from helpers.wait import wait_until
from helpers.workers import write

from rankd.client import AgentClient, Cluster, MembershipChange, OutputLine
from rankd.v1 import agent_pb2

pytest.importorskip("torch", reason="runs torch jobs; the torch extra (make test) installs it")
pytestmark = pytest.mark.timeout(90)

STEPS = 20
EXIT_OK, EXIT_NODE_LOST = 0, 5

TRAIN = """\
import json, os, sys, time
from pathlib import Path

import torch
import torch.distributed as dist

ckpt = Path(sys.argv[1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
assert world == int(os.environ["WORLD_SIZE"])
attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
# every rank reads before its first all_reduce, rank 0 writes only after it
start = json.loads(ckpt.read_text())["step"] + 1 if ckpt.exists() else 0
keys = ("RANK", "WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE",
        "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")
print("ENV " + json.dumps({k: os.environ[k] for k in keys}), flush=True)
for step in range(start, int(sys.argv[2])):
    value = torch.ones(1)
    dist.all_reduce(value)
    assert int(value.item()) == world, f"sum {value.item()} != world {world}"
    if rank == 0:
        tmp = ckpt.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step}))
        os.replace(tmp, ckpt)
        print(f"step {step} world {world} attempt {attempt}", flush=True)
    time.sleep(0.3)
dist.barrier()
print(f"rank {rank} done world {world} attempt {attempt}", flush=True)
dist.destroy_process_group()
"""


class Launch:
    """`rankd launch` of the training script (``steps`` steps) as a subprocess; `run`
    reads its stdout and takes the given actions in order, each on the first line with
    its text after the one before was taken."""

    def __init__(
        self, nodes: list[Agent], tmp_path: Path, run_id: str, *flags: str, steps: int = STEPS
    ) -> None:
        script = write(tmp_path, "train.py", TRAIN)
        self.ckpt = tmp_path / "ckpt.json"
        self.proc = subprocess.Popen(
            [
                RANKD_BIN,
                "launch",
                "--nodes",
                ",".join(a.address for a in nodes),
                "--run-id",
                run_id,
                "--kill-timeout",
                "5",
                "--node-timeout",
                "3",
                *(f"--env={k}={v}" for k, v in GLOO_ENV.items()),
                *flags,
                "--",
                PYTHON,
                script,
                str(self.ckpt),
                str(steps),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "SLURM_JOB_NODELIST"},
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))

    def run(self, *actions: tuple[str, Callable[[], None]], timeout: float = 80) -> int:
        assert self.proc.stdout is not None
        pending = list(actions)
        for line in self.proc.stdout:
            self.stdout.append(line.rstrip("\n"))
            if pending and pending[0][0] in line:
                pending.pop(0)[1]()
        code = self.proc.wait(timeout=timeout)
        self._drain.join(timeout=10)
        assert not pending, f"never saw {list(pending)}:\n" + "\n".join(self.stderr)
        return code

    def done(self) -> list[str]:
        """The ``rank R done world W attempt A`` lines."""
        return [line for line in self.stdout if " done world " in line]


def sigkill(agent: Agent) -> Callable[[], None]:
    """A real node loss: the agent dies at once (its guardian then kills its ranks)."""
    return lambda: os.kill(agent.proc.pid, signal.SIGKILL)


def steps_of(lines: list[str], attempt: int) -> list[int]:
    """The steps rank 0 printed in ``attempt``."""
    return [
        int(line.split()[1])
        for line in lines
        if ":step " in line and line.endswith(f" attempt {attempt}")
    ]


def envs_of(lines: list[str], attempt: int) -> list[dict[str, str]]:
    """The torchrun variables each rank of ``attempt`` printed."""
    envs = [json.loads(line.split("ENV ", 1)[1]) for line in lines if "ENV {" in line]
    return [e for e in envs if e["TORCHELASTIC_RESTART_COUNT"] == str(attempt)]


def test_spare_replaces_a_lost_node(tmp_path: Path) -> None:
    """3 agents + 1 spare, --nnodes 3:3: node 1's agent is SIGKILLed at step 5; the job
    resumes on nodes 0, 2 and the spare with world 3 and succeeds."""
    with agents(tmp_path, 4) as nodes:
        launch = Launch(nodes, tmp_path, "spare", "--nnodes", "3:3", "--max-restarts", "2")
        code = launch.run(("step 5 world 3 attempt 0", sigkill(nodes[1])))
        err = "\n".join(launch.stderr)
        assert code == EXIT_OK, err
        # one line per membership change: who left and why, who joined, the new size
        (change,) = [line for line in launch.stderr if " joined" in line or " left (" in line]
        assert change.startswith(f"rankd: attempt 1: node {nodes[1].address} left (lost: ")
        assert change.endswith(f"; spare {nodes[3].address} joined; world size 3 -> 3 on 3 nodes")
        assert sorted(launch.done()) == [
            f"[default{r}]:rank {r} done world 3 attempt 1" for r in range(3)
        ]
        # the end says how it got there: each attempt with its members and outcome
        end = launch.stderr.index("rankd: the attempts of job spare:")
        summary = launch.stderr[end:]
        assert len(summary) == 3, summary
        assert summary[1].startswith("rankd:   attempt 0: world size 3 on ")
        assert f"failed: node {nodes[1].address} lost: " in summary[1]
        assert summary[2].startswith("rankd:   attempt 1: world size 3 on ")
        assert summary[2].endswith(": succeeded") and nodes[3].address in summary[2]
        steps = steps_of(launch.stdout, 1)
        assert steps and steps[0] <= 6 and steps[-1] == STEPS - 1  # resumed, not restarted
        second = envs_of(launch.stdout, 1)
        assert sorted((e["RANK"], e["GROUP_RANK"], e["WORLD_SIZE"]) for e in second) == [
            (str(r), str(r), "3") for r in range(3)
        ]


def test_the_job_shrinks_to_the_nodes_left(tmp_path: Path) -> None:
    """3 agents, nnodes=(2, 3) through the Python API: the same loss; it finishes with
    world 2, and the result holds the membership of both attempts."""
    script = write(tmp_path, "train.py", TRAIN)
    ckpt = tmp_path / "ckpt.json"
    changes: list[MembershipChange] = []
    events: list[str] = []
    lines: list[str] = []
    with agents(tmp_path, 3) as nodes, Cluster([a.address for a in nodes], node_timeout=3) as c:

        def on_line(line: OutputLine) -> None:
            text = line.text
            lines.append(text)
            if text == "step 5 world 3 attempt 0":
                os.kill(nodes[1].proc.pid, signal.SIGKILL)

        result = c.launch(
            [PYTHON, script, str(ckpt), str(STEPS)],
            run_id="shrink",
            nnodes=(2, 3),
            max_restarts=1,
            env=GLOO_ENV,
            kill_timeout=5,
            on_line=on_line,
            on_event=events.append,
            on_membership=changes.append,
        )
    assert result.world_size == 2 and result.restart_count == 1, events
    first, second = result.memberships
    assert [m.address for m in first.members] == [a.address for a in nodes]
    assert first.outcome.startswith("failed: node ") and "lost" in first.outcome
    assert [m.address for m in second.members] == [nodes[0].address, nodes[2].address]
    assert [m.rank_offset for m in second.members] == [0, 1] and second.outcome == "succeeded"
    (change,) = changes
    assert change.left[0][0] == nodes[1].address and change.joined == ()
    assert (change.world_size, change.previous_world_size, change.nnodes) == (2, 3, 2)
    assert change.line() in events
    assert sorted(t for t in lines if " done " in t) == [
        f"rank {r} done world 2 attempt 1" for r in range(2)
    ]
    assert json.loads(ckpt.read_text()) == {"step": STEPS - 1}


def test_below_min_fails_and_says_so(tmp_path: Path) -> None:
    """3 agents, --nnodes 3:3 and no spare: after the loss only 2 nodes are left."""
    with agents(tmp_path, 3) as nodes:
        launch = Launch(nodes, tmp_path, "below", "--nnodes", "3", "--max-restarts", "3")
        code = launch.run(("step 5 world 3 attempt 0", sigkill(nodes[1])))
    err = "\n".join(launch.stderr)
    assert code == EXIT_NODE_LOST, err
    # the event line, and the same words in the report itself
    assert "Note: only 2 nodes can run attempt 1, fewer than the minimum 3 (--nnodes 3:3)" in err
    assert "Root Cause (first observed failure): a lost node" in err
    assert f"host      : {nodes[1].address} (node rank 1)" in err
    assert "attempt 1: starting" not in err


@contextmanager
def hosts(tmp_path: Path, names: list[str]) -> Iterator[list[Agent]]:
    """One agent per loopback address in ``names``, so that each node has its own host."""
    with ExitStack() as stack:
        started = []
        for i, host in enumerate(names):
            agent = start_agent(tmp_path / f"node{i}", "--host", host)
            stack.callback(agent.stop)
            started.append(agent)
        yield started


def test_node_0_lost_moves_master_addr(tmp_path: Path) -> None:
    """Node 0 (MASTER_ADDR, rank 0 and the checkpoint writer) is lost: the next attempt's
    group rank 0 is the old node 1, and MASTER_ADDR moves to its host."""
    with hosts(tmp_path, ["127.0.0.2", "127.0.0.3", "127.0.0.4"]) as nodes:
        launch = Launch(nodes, tmp_path, "master", "--nnodes", "2:3", "--max-restarts", "1")
        code = launch.run(("step 5 world 3 attempt 0", sigkill(nodes[0])))
    err = "\n".join(launch.stderr)
    assert code == EXIT_OK, err
    first, second = envs_of(launch.stdout, 0), envs_of(launch.stdout, 1)
    assert {e["MASTER_ADDR"] for e in first} == {"127.0.0.2"}
    assert {e["MASTER_ADDR"] for e in second} == {"127.0.0.3"}
    assert sorted((e["RANK"], e["GROUP_RANK"]) for e in second) == [("0", "0"), ("1", "1")]
    assert {(e["WORLD_SIZE"], e["GROUP_WORLD_SIZE"], e["ROLE_WORLD_SIZE"]) for e in second} == {
        ("2", "2", "2")
    }
    assert "MASTER_ADDR=127.0.0.3" in err


def test_max_restarts_exhausted_by_losses_lists_every_attempt(tmp_path: Path) -> None:
    """--nnodes 1:3 --max-restarts 1: node 1 is lost in attempt 0, node 2 in attempt 1;
    the report's attempts show both memberships."""
    with agents(tmp_path, 3) as nodes:
        launch = Launch(nodes, tmp_path, "exhaust", "--nnodes", "1:3", "--max-restarts", "1")
        code = launch.run(
            ("step 5 world 3 attempt 0", sigkill(nodes[1])),
            ("step 8 world 2 attempt 1", sigkill(nodes[2])),
        )
    err = "\n".join(launch.stderr)
    assert code == EXIT_NODE_LOST, err
    a = [n.address for n in nodes]
    attempts = err.split("Attempts:\n", 1)[1].splitlines()
    assert attempts[0].startswith(f"  attempt 0: world size 3 on {a[0]}, {a[1]}, {a[2]} ")
    assert f"failed: node {a[1]} lost" in attempts[0]
    assert attempts[1].startswith(f"  attempt 1: world size 2 on {a[0]}, {a[2]} ")
    assert f"failed: node {a[2]} lost" in attempts[1]
    assert f"rankd job exhaust FAILED (attempt 1, 2 ranks on 2 nodes): node {a[2]} lost" in err


def test_a_spare_that_never_saw_the_job_starts_a_later_attempt(tmp_path: Path) -> None:
    """What a spare joining at attempt N gets: a Start with restart_count N of a job it
    does not hold; the agent starts it as that attempt."""
    with agents(tmp_path, 1) as (node,), AgentClient(node.address) as client:
        spec = agent_pb2.JobSpec(
            job_id="late", nprocs=1, entrypoint=PYTHON, args=["-c", "pass"], restart_count=3
        )
        started = client.start(spec)
        assert started.created and started.job.restart_count == 3
        final = client.wait("late", timeout=30)
        assert final.state == agent_pb2.SUCCEEDED and final.restart_count == 3


def test_a_node_that_comes_back_is_a_spare(tmp_path: Path) -> None:
    """--nnodes 2:2 over 3 agents: node 1's agent freezes (SIGSTOP) at step 5 and is lost
    (no answer for the node timeout); attempt 1 runs on nodes 0 and 2. Node 1 comes back
    (SIGCONT; its lease stops what was left of its ranks); when node 2 is lost in
    attempt 1, node 1 joins attempt 2 as a spare and the job succeeds."""
    with agents(tmp_path, 3) as nodes:
        one = nodes[1]

        def thaw_when_lost() -> None:
            os.kill(one.proc.pid, signal.SIGCONT)
            # its old ranks end on their own (lease, or their collective's error), not
            # by the launch: node 1 is no member now, nothing calls it
            wait_until(lambda: not one.workers("train.py"), timeout=15, what="node 1 idle")

        launch = Launch(
            nodes,
            tmp_path,
            "back",
            "--nnodes",
            "2:2",
            "--max-restarts",
            "2",
            "--lease",
            "4",
            steps=50,
        )
        try:
            code = launch.run(
                ("step 5 world 2 attempt 0", lambda: os.kill(one.proc.pid, signal.SIGSTOP)),
                ("world 2 attempt 1", thaw_when_lost),  # attempt 1 runs: node 1 was lost
                ("world 2 attempt 1", sigkill(nodes[2])),
                timeout=120,
            )
        finally:
            os.kill(one.proc.pid, signal.SIGCONT)
        err = "\n".join(launch.stderr)
        assert code == EXIT_OK, err
        a = [n.address for n in nodes]
        assert f"node {a[1]} left (lost: " in err and f"spare {a[2]} joined" in err
        assert f"node {a[2]} left (lost: " in err and f"spare {a[1]} joined" in err
        assert sorted(launch.done()) == [
            f"[default{r}]:rank {r} done world 2 attempt 2" for r in range(2)
        ]
        wait_until(lambda: not one.workers("train.py"), timeout=10, what="no rank left on node 1")


def test_an_agent_that_shuts_down_is_a_node_failure(tmp_path: Path) -> None:
    """--nnodes 2:3: node 2's agent is stopped in order (SIGTERM, e.g. a drained node) and
    stops its ranks, KILLED by its shutdown: in an elastic job that is a node failure,
    not a kill of the job; it goes on without the node."""
    with agents(tmp_path, 3) as nodes:
        launch = Launch(nodes, tmp_path, "drain", "--nnodes", "2:3", "--max-restarts", "1")
        term = lambda: os.kill(nodes[2].proc.pid, signal.SIGTERM)  # noqa: E731
        code = launch.run(("step 5 world 3 attempt 0", term))
    err = "\n".join(launch.stderr)
    assert code == EXIT_OK, err
    assert f"node {nodes[2].address} left (lost: its agent stopped the job: agent shutting" in err
    assert sorted(launch.done()) == [
        f"[default{r}]:rank {r} done world 2 attempt 1" for r in range(2)
    ]
