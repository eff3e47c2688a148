"""The hollow agents of the scale bench (bench/hollow.py) are driven by the real client,
unchanged; and a cluster of many nodes closes without leaving gRPC events behind."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rankd.client import Cluster, JobFailed

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # bench is a directory of the repository, not installed

from bench.hollow import HollowFleet  # noqa: E402


@pytest.fixture
def fleet() -> Iterator[HollowFleet]:
    hollow = HollowFleet(8, procs=1)
    try:
        yield hollow
    finally:
        hollow.close()


def _quiet(_: object) -> None:
    pass


def test_the_real_client_launches_and_folds_a_failure_on_hollow_agents(
    fleet: HollowFleet,
) -> None:
    with Cluster(fleet.addresses) as cluster:
        result = cluster.launch(
            ["hollow", "run=0.1"], nproc_per_node=2, run_id="ok", on_line=_quiet, on_event=_quiet
        )
        assert result.world_size == 16 and len(result.statuses) == 8
        with pytest.raises(JobFailed) as failed:
            cluster.launch(
                ["hollow", "run=inf", "fail=5", "fail_exit=7"],
                nproc_per_node=2,
                run_id="bad",
                on_line=_quiet,
                on_event=_quiet,
            )
    root = failed.value.report.root_cause
    assert root is not None and root.global_rank == 5 and root.exit_code == 7
    stats = fleet.stats("bad")
    assert stats["starts"] == 8 and stats["kills"] >= 7  # every other node was stopped


# Clusters one after the other in one process, each launching on every node: the second
# one's loop polls gRPC's queue, where the first one's cancelled calls left their ends.
_SEQUENTIAL = """\
import sys
from rankd.client import Cluster
addresses = sys.argv[1:]
for rep in range(3):
    with Cluster(addresses) as cluster:
        cluster.launch(["hollow", "run=0.2"], nproc_per_node=2, run_id=f"j{rep}",
                       on_line=lambda _: None, on_event=lambda _: None)
print("done")
"""


@pytest.mark.timeout(300)
def test_closing_a_big_cluster_leaves_no_events_for_a_closed_loop() -> None:
    # 128 nodes: a few watches' and streams' ends were still in flight at close (with
    # the old close: hundreds of "Event loop is closed" tracebacks on stderr)
    hollow = HollowFleet(128, procs=1)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _SEQUENTIAL, *hollow.addresses],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
    finally:
        hollow.close()
    assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr[-2000:]
    assert "Event loop is closed" not in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
