"""Folding stacks: identical thread stacks across ranks become one group, the odd ones
out first, readable at 10,000 ranks (synthetic stacks, no processes needed)."""

from __future__ import annotations

import json

import pytest

from rankd.client.stackfold import RankSample, fold_stacks

pytestmark = pytest.mark.timeout(30)

MAIN = ("<module>", "/job/train.py", 40)
ALL_REDUCE = (
    MAIN,
    ("train_step", "/job/train.py", 22),
    ("all_reduce", "/venv/torch/distributed/distributed_c10d.py", 2801),
)
LOADER = (MAIN, ("train_step", "/job/train.py", 19), ("slow_data_loader", "/job/data.py", 7))
IDLE = (("Thread._bootstrap", "/py/threading.py", 1002), ("wait", "/py/threading.py", 331))


def sample(rank: int, *threads: tuple[str, tuple[tuple[str, str, int], ...]]) -> RankSample:
    return RankSample(
        global_rank=rank, node=f"node{rank // 8:04d}", local_rank=rank % 8, pid=1000 + rank,
        threads=threads, silent_for=30.0, last_line=f"step 99 rank {rank}", cpu_percent=0.0,
    )  # fmt: skip


def ten_thousand() -> list[RankSample]:
    """10,000 ranks on 1,250 nodes: 9,997 in all_reduce, ranks 4242 and 4243 in the data
    loader, rank 7 unsampleable; every rank has an idle pin-memory thread too."""
    out = []
    for rank in range(10_000):
        if rank == 7:
            out.append(RankSample(rank, "node0000", 7, 1007, error="the rank exited"))
            continue
        main = LOADER if rank in (4242, 4243) else ALL_REDUCE
        out.append(sample(rank, ("MainThread", main), (f"Thread-{rank % 3} (pin)", IDLE)))
    return out


def test_ten_thousand_ranks_fold_into_a_few_readable_groups() -> None:
    folded = fold_stacks(ten_thousand())
    assert folded.samples == 10_000
    assert [len(g.ranks) for g in folded.groups] == [2, 9_997, 9_999]
    odd = folded.groups[0]
    assert odd.frames == LOADER and odd.ranks == [4242, 4243]
    assert odd.header() == "global ranks 4242-4243 (node0530): 2 ranks"
    # the bulk names its ranks as ranges, not 9,997 numbers, and a few nodes
    bulk = folded.groups[1].header()
    assert bulk.startswith("global ranks 0-6,8-4241,4244-9999 (node0000, node0001, node0002, ")
    assert bulk.endswith("+1246 more nodes): 9997 ranks")
    # a thread name that differs from rank to rank does not split a group
    assert folded.groups[2].threads == {"Thread-0 (pin)", "Thread-1 (pin)", "Thread-2 (pin)"}
    lines = folded.lines()
    assert len(lines) <= 30, "\n".join(lines)
    assert lines[0] == odd.header()
    assert lines[-1] == "global rank 7 (node0000): not sampled: the rank exited"
    # innermost frame last
    assert lines[2:5] == [
        "    <module> (/job/train.py:40)",
        "    train_step (/job/train.py:19)",
        "    slow_data_loader (/job/data.py:7)",
    ]


def test_rank_details_are_bounded_per_group() -> None:
    lines = fold_stacks(ten_thousand()).lines(rank_details=4)
    details = [ln for ln in lines if ln.startswith("  rank ")]
    assert len(details) == 4 + 2 + 4  # at most four per group; the odd group has two
    assert "  rank 4242 (node0530): silent 30.0 s, cpu 0%, last line: 'step 99 rank 4242'" in lines
    assert "  ... and 9995 more ranks" in lines


def test_two_threads_of_one_rank_in_one_place_count_the_rank_once() -> None:
    folded = fold_stacks([sample(0, ("a", IDLE), ("b", IDLE)), sample(1, ("a", IDLE))])
    (group,) = folded.groups
    assert group.ranks == [0, 1]
    assert group.threads == {"a", "b"}


def test_equal_groups_put_the_main_thread_first_and_json_carries_everything() -> None:
    folded = fold_stacks([sample(r, ("worker", IDLE), ("MainThread", ALL_REDUCE)) for r in (0, 1)])
    assert [g.frames for g in folded.groups] == [ALL_REDUCE, IDLE]
    folded.node_errors.append(("node9", "UNAVAILABLE: connection refused"))
    data = json.loads(json.dumps(folded.as_json()))
    assert data["groups"][0]["ranks"] == [0, 1]
    assert data["groups"][0]["frames"][-1] == {
        "function": "all_reduce",
        "file": "/venv/torch/distributed/distributed_c10d.py",
        "line": 2801,
    }
    assert data["node_errors"] == [{"node": "node9", "error": "UNAVAILABLE: connection refused"}]
    assert folded.lines()[-1] == "node node9: not sampled: UNAVAILABLE: connection refused"
