"""The pure side of elastic membership (issue 22): --nnodes parsing, the choice of the
next attempt's members, the per-attempt layout and the torchrun variables it gives."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from helpers.agents import PYTHON, RANKD_BIN, agents, closed_port

from rankd.client import Cluster, ClusterError, OutputLine
from rankd.client.cli_parser import build_parser
from rankd.client.membership import (
    MembershipChange,
    choose_members,
    format_history,
    layout,
    parse_nnodes,
)
from rankd.client.torchrun import LaunchConfig, torchrun_env


@pytest.mark.parametrize(
    ("given", "expected"),
    [("3", (3, 3)), ("2:4", (2, 4)), (" 1:1 ", (1, 1)), (5, (5, 5)), ((1, 2), (1, 2))],
)
def test_parse_nnodes(given: str | int | tuple[int, int], expected: tuple[int, int]) -> None:
    assert parse_nnodes(given) == expected


@pytest.mark.parametrize("bad", ["", "a", "3:2", "0:2", "0", "2:", ":3", "1:2:3", (2, 1)])
def test_parse_nnodes_refuses(bad: str | tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="nnodes"):
        parse_nnodes(bad)


def test_cli_nnodes_flag() -> None:
    parser = build_parser()
    args = parser.parse_args(["launch", "--nnodes", "2:3", "--", "true"])
    assert args.nnodes == (2, 3)
    assert parser.parse_args(["launch", "--", "true"]).nnodes is None
    with pytest.raises(SystemExit):
        parser.parse_args(["launch", "--nnodes", "3:2", "--", "true"])


def test_launch_help_uses_torchruns_words() -> None:
    """`rankd launch --help` gives --nnodes and --max-restarts torchrun's own help text
    (then says what is rankd's), and torchrun's spellings of the flags."""
    run = pytest.importorskip("torch.distributed.run", reason="compares with torchrun's help")
    torch_help = {a.dest: a for a in run.get_args_parser()._actions}
    ours = {a.dest: a for a in _launch_parser()._actions}
    shown = " ".join(
        subprocess.run(
            [RANKD_BIN, "launch", "--help"], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    for dest in ("nnodes", "max_restarts"):
        words = " ".join(str(torch_help[dest].help).split()).rstrip(".")
        assert set(torch_help[dest].option_strings) <= set(ours[dest].option_strings), dest
        assert " ".join(str(ours[dest].help).split()).startswith(words), dest
        assert re.search(re.escape(words) + r"[.:]", shown), (dest, shown)


def _launch_parser() -> argparse.ArgumentParser:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["launch"]


def test_config_normalises_nnodes() -> None:
    assert LaunchConfig(cmd=("true",), nnodes=4).nnodes == (4, 4)
    with pytest.raises(ValueError, match="nnodes"):
        LaunchConfig(cmd=("true",), nnodes=(3, 1))


def test_choose_keeps_survivors_in_order_then_spares() -> None:
    # members 0,1,2; node 1 lost; spares 3,4 answer: 0,2 keep their order, 3 joins
    assert choose_members([0, 1, 2], {0, 2, 3, 4}, range(5), maximum=3) == [0, 2, 3]
    # no spare: shrink
    assert choose_members([0, 1, 2], {0, 2}, range(3), maximum=3) == [0, 2]
    # node 0 lost: node 1 becomes group rank 0
    assert choose_members([0, 1, 2], {1, 2, 3}, range(4), maximum=3) == [1, 2, 3]
    # a shrunk job grows back to MAX when a node answers again
    assert choose_members([0, 2], {0, 1, 2}, range(3), maximum=3) == [0, 2, 1]
    # never more than MAX
    assert choose_members([0, 1], {0, 1, 2, 3}, range(4), maximum=2) == [0, 1]


def test_layout_and_torchrun_env_per_attempt() -> None:
    members = [(2, "c", "c:1", "hc"), (0, "a", "a:1", "ha"), (3, "d", "d:1", "hd")]
    plan = layout(1, members, nproc_per_node=2, master_addr=None, master_port=1234)
    assert plan.world_size == 6 and plan.nnodes == 3 and plan.indices == [2, 0, 3]
    assert plan.master_addr == "hc"  # the first member's host
    assert [(m.group_rank, m.rank_offset) for m in plan.members] == [(0, 0), (1, 2), (2, 4)]
    second = plan.members[1]
    common, per_rank = torchrun_env(
        node_rank=second.group_rank,
        nnodes=plan.nnodes,
        nproc_per_node=2,
        master_addr=plan.master_addr,
        master_port=plan.master_port,
        run_id="r",
        restart_count=plan.restart_count,
        max_restarts=3,
        rank_offset=second.rank_offset,
        world_size=plan.world_size,
    )
    assert common["WORLD_SIZE"] == common["ROLE_WORLD_SIZE"] == "6"
    assert (common["GROUP_RANK"], common["GROUP_WORLD_SIZE"]) == ("1", "3")
    assert (common["MASTER_ADDR"], common["TORCHELASTIC_RESTART_COUNT"]) == ("hc", "1")
    assert [per_rank[r]["RANK"] for r in (0, 1)] == ["2", "3"]
    fixed = layout(0, members, nproc_per_node=1, master_addr="m", master_port=1)
    assert fixed.master_addr == "m"


def test_change_and_history_lines() -> None:
    change = MembershipChange(2, (("b", "lost: no answer for 3 s"),), ("d",), 3, 6, 6)
    assert change.line() == (
        "attempt 2: node b left (lost: no answer for 3 s); spare d joined; "
        "world size 6 -> 6 on 3 nodes"
    )
    plan = layout(0, [(0, "a", "a:1", "a")], nproc_per_node=1, master_addr=None, master_port=9)
    assert format_history([plan]) == ["  attempt 0: world size 1 on a (MASTER_ADDR=a:9)"]


# -- start: which nodes answer (real agents, no torch) ---------------------------------

WHO = "import os; print('node', os.environ['GROUP_RANK'], 'of', os.environ['GROUP_WORLD_SIZE'])"


def test_an_unreachable_node_at_start_is_left_out(tmp_path: Path) -> None:
    """--nnodes 2:2 over [agent, closed port, agent, agent]: the job starts on the first
    two nodes that answer; the silent one is named, the last one stays a spare."""
    events: list[str] = []
    lines: list[OutputLine] = []
    with agents(tmp_path, 3) as nodes:
        addresses = [
            nodes[0].address,
            f"127.0.0.1:{closed_port()}",
            *(a.address for a in nodes[1:]),
        ]
        with Cluster(addresses, node_timeout=3) as cluster:
            result = cluster.launch(
                [PYTHON, "-c", WHO], nnodes=(2, 2), on_line=lines.append, on_event=events.append
            )
    (only,) = result.memberships
    assert [m.address for m in only.members] == [nodes[0].address, nodes[1].address]
    assert sorted(line.text for line in lines) == ["node 0 of 2", "node 1 of 2"]
    assert any(f"node {addresses[1]} does not answer, left out" in e for e in events), events


def test_fewer_than_min_at_start_is_an_error(tmp_path: Path) -> None:
    with agents(tmp_path, 1) as nodes:
        addresses = [nodes[0].address, f"127.0.0.1:{closed_port()}"]
        with Cluster(addresses, node_timeout=3) as cluster:
            with pytest.raises(ClusterError, match=r"cannot reach 2 nodes \(--nnodes 2:2\)"):
                cluster.launch([PYTHON, "-c", WHO], nnodes=2, on_event=lambda m: None)
            with pytest.raises(ClusterError, match="cannot reach every node"):
                cluster.launch([PYTHON, "-c", WHO], on_event=lambda m: None)
            # below MIN nothing started anywhere
            (jobs,) = [r.unwrap() for r in cluster.list()[:1]]
            assert jobs == []


def test_min_beyond_the_listed_nodes_is_refused(tmp_path: Path) -> None:
    """--nnodes 3 over 2 nodes is bad input: refused before anything starts (Python:
    ValueError; CLI: exit 2 with the reason), never run on the 2 nodes there are."""
    with agents(tmp_path, 2) as nodes, Cluster([a.address for a in nodes]) as cluster:
        with pytest.raises(ValueError, match=r"--nnodes 3:4 needs at least 3 nodes, 2 listed"):
            cluster.launch([PYTHON, "-c", WHO], nnodes=(3, 4), on_event=lambda m: None)
        cli = subprocess.run(
            [
                RANKD_BIN,
                "launch",
                "--nodes",
                ",".join(a.address for a in nodes),
                "--nnodes",
                "3",
                "--",
                PYTHON,
                "-c",
                WHO,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "SLURM_JOB_NODELIST"},
        )
        assert cli.returncode == 2, cli.stderr
        assert "--nnodes 3:3 needs at least 3 nodes, 2 listed" in cli.stderr
        assert "node " not in cli.stdout
        assert [r.unwrap() for r in cluster.list()] == [[], []]


FAIL_ONCE = """\
import os, sys, time
rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
if rank == 0 and attempt == 0:
    time.sleep(1.5)
    print("failing", flush=True)
    time.sleep(0.2)
    sys.exit(3)
print(f"rank {rank} of {os.environ['WORLD_SIZE']} ok in attempt {attempt}", flush=True)
"""


def test_the_check_before_a_restart_finds_a_silent_node(tmp_path: Path) -> None:
    """Node 1's ranks are done when its agent freezes (SIGSTOP), so nothing in the attempt
    waits on it; rank 0 then fails. The check before the restart gets no answer from node
    1 within the node timeout: it is lost, the report's root cause, and out of attempt 1."""
    script = tmp_path / "fail_once.py"
    script.write_text(FAIL_ONCE)
    changes: list[MembershipChange] = []
    lines: list[str] = []
    with agents(tmp_path, 3) as nodes, Cluster([a.address for a in nodes], node_timeout=2) as c:
        frozen = nodes[1]

        def on_line(line: OutputLine) -> None:
            lines.append(line.text)
            if line.text == "failing":
                os.kill(frozen.proc.pid, signal.SIGSTOP)

        try:
            result = c.launch(
                [PYTHON, str(script)],
                nnodes=(1, 3),
                max_restarts=1,
                on_line=on_line,
                on_event=lambda m: None,
                on_membership=changes.append,
            )
        finally:
            os.kill(frozen.proc.pid, signal.SIGCONT)
    first, second = result.memberships
    assert first.outcome.startswith(f"failed: node {frozen.address} lost: no answer to the check")
    assert second.indices == [0, 2] and second.outcome == "succeeded"
    (change,) = changes
    assert change.left[0][0] == frozen.address
    assert change.left[0][1].startswith("lost: no answer to the check before a restart")
    assert sorted(t for t in lines if " ok in attempt 1" in t) == [
        "rank 0 of 2 ok in attempt 1",
        "rank 1 of 2 ok in attempt 1",
    ]


def test_a_rank_failure_restarts_on_the_same_nodes(tmp_path: Path) -> None:
    """--nnodes 1:2 over 3 healthy agents: rank 0 fails in attempt 0 (a rank failure, not
    a node's); attempt 1 runs on the same two nodes in the same order, no membership
    change is announced and the spare never gets the job."""
    script = tmp_path / "fail_once.py"
    script.write_text(FAIL_ONCE)
    changes: list[MembershipChange] = []
    events: list[str] = []
    with agents(tmp_path, 3) as nodes, Cluster([a.address for a in nodes], node_timeout=3) as c:
        result = c.launch(
            [PYTHON, str(script)],
            nnodes=(1, 2),
            max_restarts=1,
            on_event=events.append,
            on_membership=changes.append,
        )
        spare_jobs = c.list()[2].unwrap()
    first, second = result.memberships
    assert first.indices == second.indices == [0, 1], events
    assert first.outcome.startswith("failed: global rank 0 on "), first.outcome
    assert second.outcome == "succeeded" and result.restart_count == 1
    assert changes == [] and not [e for e in events if " joined" in e or " left (" in e]
    assert list(spare_jobs) == []
