"""torchrun equivalence: one script under `torchrun` and under `rankd launch` (one
agent) sees the same torchrun environment, rank by rank, and runs gloo unchanged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.agents import PYTHON, Agent, agents, closed_port
from helpers.torchjobs import (
    ENV_AND_ALL_REDUCE,
    GLOO_ENV,
    TORCHRUN_KEYS,
    env_dumps,
    rankd,
)
from helpers.workers import write

pytest.importorskip("torch", reason="runs torchrun; the torch extra (make test) installs it")
TORCHRUN_BIN = str(Path(sys.executable).with_name("torchrun"))
RUN_ID = "equiv-run"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Agent]:
    with agents(tmp_path, 1) as (agent,):
        yield agent


def torchrun(script: str, port: int) -> subprocess.CompletedProcess[str]:
    """torchrun with the static rendezvous on loopback: no network beyond 127.0.0.1."""
    # OMP_NUM_THREADS from the caller would reach torchrun's workers only.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run(
        [
            TORCHRUN_BIN,
            "--nnodes",
            "1",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
            "--rdzv-id",
            RUN_ID,
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            script,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, **GLOO_ENV},
    )


@pytest.mark.timeout(90)
def test_rankd_sets_the_environment_torchrun_sets(node: Agent, tmp_path: Path) -> None:
    script = write(tmp_path, "env.py", ENV_AND_ALL_REDUCE)
    port = closed_port()

    under_torchrun = torchrun(script, port)
    assert under_torchrun.returncode == 0, under_torchrun.stderr
    under_rankd = rankd(
        "launch",
        "--nodes",
        node.address,
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "--run-id",
        RUN_ID,
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        *(f"--env={k}={v}" for k, v in GLOO_ENV.items()),
        "--",
        PYTHON,
        script,
    )
    assert under_rankd.returncode == 0, under_rankd.stderr

    theirs = env_dumps(under_torchrun.stdout.splitlines())
    ours = env_dumps(under_rankd.stdout.splitlines())
    assert sorted(theirs) == sorted(ours) == ["0", "1"]
    for rank in ("0", "1"):
        assert {k: ours[rank][k] for k in TORCHRUN_KEYS} == {
            k: theirs[rank][k] for k in TORCHRUN_KEYS
        }, f"rank {rank}"
        assert ours[rank]["TORCHELASTIC_RUN_ID"] == RUN_ID
        # Same error-file layout: <log_dir>/<run_id>_<random>/attempt_<n>/<local_rank>/.
        layout = re.compile(rf"/{RUN_ID}_[^/]+/attempt_0/{rank}/error\.json$")
        for env in (ours[rank], theirs[rank]):
            assert layout.search(env["TORCHELASTIC_ERROR_FILE"] or ""), env
        # torchrun's agent hosts the TCPStore; under rankd rank 0 hosts it.
        assert theirs[rank]["TORCHELASTIC_USE_AGENT_STORE"] == "True"
        assert ours[rank]["TORCHELASTIC_USE_AGENT_STORE"] == "False"

    # ... and torch.distributed ran unchanged under both.
    assert sorted(line for line in under_torchrun.stdout.splitlines() if " sum " in line) == [
        "rank 0 sum 2",
        "rank 1 sum 2",
    ]
    assert sorted(line for line in under_rankd.stdout.splitlines() if " sum " in line) == [
        "[default0]:rank 0 sum 2",
        "[default1]:rank 1 sum 2",
    ]
