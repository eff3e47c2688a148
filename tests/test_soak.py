"""Long variants of the reliability tests (`make soak`; excluded from `make test`)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import psutil
import pytest
from conftest import AgentProcess

from rankd.v1 import agent_pb2 as pb

pytestmark = pytest.mark.soak


@pytest.mark.timeout(900)
def test_one_gigabyte_flood_beside_a_quiet_rank(
    agent: AgentProcess, script: Callable[[str, str], str]
) -> None:
    worker = script(
        "gb.py",
        "import os, sys\n"
        "if os.environ['LOCAL_RANK'] == '0':\n"
        "    block = (b'f' * 1023 + b'\\n') * 1024\n"
        "    for _ in range(1024):\n"
        "        sys.stdout.buffer.write(block)\n"
        "else:\n"
        "    for i in range(10000):\n"
        "        print('quiet', i, flush=True)\n",
    )
    spec = pb.JobSpec(job_id="gb", nprocs=2, entrypoint=sys.executable, args=[worker])
    rss0 = psutil.Process(agent.proc.pid).memory_info().rss
    agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)
    flood = 0
    quiet = []
    peak = 0
    for msg in agent.stub.Stream(pb.StreamRequest(job_id="gb", follow=True), timeout=800):
        peak = max(peak, psutil.Process(agent.proc.pid).memory_info().rss)
        for ln in msg.lines:
            if ln.local_rank == 0:
                flood += 1
            else:
                quiet.append(ln.text)
    assert flood == 1024 * 1024
    assert quiet == [f"quiet {i}" for i in range(10000)]
    assert peak - rss0 < 64 * 1024 * 1024


@pytest.mark.timeout(900)
def test_three_thousand_jobs(agent: AgentProcess) -> None:
    proc = psutil.Process(agent.proc.pid)
    numbers = []
    for i in range(3000):
        spec = pb.JobSpec(job_id=f"s{i}", nprocs=1, entrypoint="/bin/true")
        agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)
        list(agent.stub.Stream(pb.StreamRequest(job_id=f"s{i}", follow=True), timeout=30))
        if i in (100, 2999):
            numbers.append((proc.num_fds(), proc.num_threads(), proc.memory_info().rss))
    (fds0, threads0, rss0), (fds1, threads1, rss1) = numbers
    assert fds1 <= fds0 + 2 and threads1 <= threads0 + 1
    assert rss1 - rss0 < 40 * 1024 * 1024
