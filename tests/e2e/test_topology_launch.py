"""A mixed cluster: one agent whose (fake) node has 4 GPUs, one with 2. Each node's rank
count comes from its own agent's Info, so `nproc_per_node="gpu"` runs 6 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.agents import RANKD_BIN, Agent
from helpers.fake_topology import FakeMachine

from rankd.client import Cluster
from rankd.client.topology import TopologyError, resolve_nproc
from rankd.testing import start_agent as start_local_agent

ENV_FILE = """\
import json, os, sys
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")
with open(os.path.join(sys.argv[1], os.environ["RANK"] + ".json"), "w") as f:
    json.dump({k: int(os.environ[k]) for k in keys}, f)
"""


@pytest.fixture
def mixed(tmp_path: Path) -> Iterator[list[Agent]]:
    """Two agents: node 0 reads a fake machine with 4 GPUs, node 1 one with 2."""
    started: list[Agent] = []
    try:
        for i, gpus in enumerate((4, 2)):
            root = FakeMachine(tmp_path / f"root{i}", gpus=gpus).root
            env = {**os.environ, "RANKD_TOPOLOGY_ROOT": str(root)}
            env.pop("CUDA_VISIBLE_DEVICES", None)
            started.append(Agent.adopt(start_local_agent(tmp_path / f"node{i}", env=env)))
        yield started
    finally:
        for agent in started:
            agent.stop()


def test_each_node_resolves_its_own_rank_count(mixed: list[Agent]) -> None:
    with Cluster([a.address for a in mixed]) as cluster:
        infos = [r.unwrap() for r in cluster.info()]
    assert [resolve_nproc("gpu", i) for i in infos] == [4, 2]
    assert [resolve_nproc("auto", i) for i in infos] == [4, 2]
    assert [resolve_nproc("cpu", i) for i in infos] == [64, 64]
    assert [resolve_nproc(3, i) for i in infos] == [3, 3]
    with pytest.raises(TopologyError, match="invalid --nproc-per-node 'gpus': use auto, gpu"):
        resolve_nproc("gpus", infos[0])


def test_nproc_per_node_gpu_gives_world_size_6(mixed: list[Agent], tmp_path: Path) -> None:
    out = tmp_path / "ranks"
    out.mkdir()
    script = tmp_path / "env_file.py"
    script.write_text(ENV_FILE)
    events: list[str] = []
    with Cluster([a.address for a in mixed]) as cluster:
        result = cluster.launch(
            [sys.executable, str(script), str(out)],
            nproc_per_node="gpu",
            on_event=events.append,
        )
    assert result.world_size == 6
    assert "6 ranks on 2 nodes (4+2 per node, " in events[0], events
    seen = {int(p.stem): json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(seen) == list(range(6))
    for rank, env in seen.items():
        node, local, local_world = (0, rank, 4) if rank < 4 else (1, rank - 4, 2)
        assert env == {
            "RANK": rank,
            "LOCAL_RANK": local,
            "WORLD_SIZE": 6,
            "LOCAL_WORLD_SIZE": local_world,
            "GROUP_RANK": node,
        }


def test_gpu_ranks_on_a_node_without_gpus_are_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    agent = Agent.adopt(start_local_agent(tmp_path / "node"))
    try:
        proc = subprocess.run(
            [
                RANKD_BIN,
                "launch",
                "--nodes",
                agent.address,
                "--nproc-per-node=gpu",
                "--run-id=no-gpus",
                "--",
                sys.executable,
                "-c",
                "pass",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("rankd: error:")]
        assert "has no GPUs" in line and "give a number, or cpu" in line
        with Cluster([agent.address]) as cluster:
            assert cluster.list()[0].unwrap() == []  # nothing was started
        bad = subprocess.run(
            [RANKD_BIN, "launch", "--nodes", agent.address, "--numa-binding", "nodes", "--", "x"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2
        assert "invalid --numa-binding 'nodes': use one of node, socket" in bad.stderr
    finally:
        agent.stop()
