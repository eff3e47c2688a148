"""Process lifecycle: start, run to the end, kill, and how fast an exit shows in Poll.

rankd: one fresh agent per scenario, driven with the generated stubs over loopback;
every figure includes the RPC round trips. torch: ``start_processes``, ``wait``,
``close`` in this process.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

from bench.agents import Agent, job_id, launch_agents, make_spec, wait_exec
from bench.config import TRUE, Config, ms
from bench.harness import RowSpec, Samples, Scenario, Target
from bench.torch_side import TorchLauncher
from bench.workers import EXIT_AT, PYTHON, SLEEP, python_args
from protos.rankd.v1 import agent_pb2 as pb

__all__ = ["scenarios"]


@dataclass
class _Pair:
    agent: Agent
    torch: TorchLauncher
    scratch: Path


def _setup(cfg: Config, name: str) -> _Pair:
    torch = cfg.torch()
    (agent,) = launch_agents(cfg.scratch("agents"), 1, prefix=name)
    return _Pair(agent, torch, cfg.scratch(name))


def _teardown(pair: _Pair | None) -> None:
    if pair is not None:
        pair.agent.stop()


def _scenario(cfg: Config, sid: str, sides: dict[str, Any], rows: list[RowSpec]) -> Scenario:
    return Scenario(
        id=sid,
        sides=sides,
        rows=rows,
        setup=lambda: _setup(cfg, sid),
        teardown=_teardown,
    )


def _start_true(cfg: Config) -> Scenario:
    inner, nprocs = cfg.pick(10, 3), 8

    def rankd(p: _Pair) -> Samples:
        out = []
        for _ in range(inner):
            spec = make_spec(job_id("true"), nprocs, TRUE)
            t0 = perf_counter()
            p.agent.start(spec)
            out.append(ms(perf_counter() - t0))
            p.agent.wait_end(spec.job_id)
        return {"start": out}

    def torch(p: _Pair) -> Samples:
        out = []
        for _ in range(inner):
            t0 = perf_counter()
            pc = p.torch.start(nprocs, TRUE)
            out.append(ms(perf_counter() - t0))
            pc.wait(period=0.005)
            pc.close()
        return {"start": out}

    row = RowSpec(
        id="start_true",
        title=f"start {nprocs} x /bin/true → all pids known",
        unit="ms",
        metrics=("start",),
        target=Target("ratio_max", 1.0),
    )
    return _scenario(cfg, "start_true", {"rankd": rankd, "torch": torch}, [row])


def _start_python(cfg: Config) -> Scenario:
    inner, nprocs = cfg.pick(3, 1), 32
    args = python_args(SLEEP, 60)

    def rankd(p: _Pair) -> Samples:
        out = []
        for _ in range(inner):
            spec = make_spec(job_id("py"), nprocs, PYTHON, args)
            t0 = perf_counter()
            p.agent.start(spec)
            out.append(ms(perf_counter() - t0))
            p.agent.kill(spec.job_id)
        return {"start": out}

    def torch(p: _Pair) -> Samples:
        out = []
        for _ in range(inner):
            t0 = perf_counter()
            pc = p.torch.start(nprocs, PYTHON, args)
            out.append(ms(perf_counter() - t0))
            pc.close()
        return {"start": out}

    row = RowSpec(
        id="start_python",
        title=f"start {nprocs} Python ranks → all pids known",
        unit="ms",
        metrics=("start",),
        target=Target("ratio_max", 1.0),
    )
    return _scenario(cfg, "start_python", {"rankd": rankd, "torch": torch}, [row])


def _full_run(cfg: Config, *, tee: bool) -> Scenario:
    """Start → result known. rankd learns the result two ways, alternated: the end
    message of a Stream(follow) opened right after Start, or Poll in a tight loop."""
    inner, nprocs = cfg.pick(6, 2), 8
    sid = "full_run_tee" if tee else "full_run"

    def rankd(p: _Pair) -> Samples:
        out: Samples = {"stream end": [], "poll loop": []}
        for i in range(inner):
            spec = make_spec(job_id("run"), nprocs, TRUE, tee="3" if tee else "")
            t0 = perf_counter()
            p.agent.start(spec)
            if i % 2 == 0:
                job = p.agent.wait_end(spec.job_id)
                out["stream end"].append(ms(perf_counter() - t0))
            else:
                job = p.agent.poll_until_ended(spec.job_id)
                out["poll loop"].append(ms(perf_counter() - t0))
            if job.state != pb.SUCCEEDED:
                raise RuntimeError(f"job {spec.job_id} ended {pb.JobState.Name(job.state)}")
        return out

    def torch(p: _Pair) -> Samples:
        out = []
        for _ in range(inner):
            t0 = perf_counter()
            pc = p.torch.start(nprocs, TRUE, tee=3 if tee else 0)
            result = pc.wait(period=0.01)
            out.append(ms(perf_counter() - t0))
            if result is None or result.is_failed():
                raise RuntimeError(f"torch run failed: {result}")
            pc.close()
        return {"wait": out}

    row = RowSpec(
        id=sid,
        title=f"full run {nprocs} x /bin/true, start → result" + (" (tee=3)" if tee else ""),
        unit="ms",
        metrics=("stream end", "poll loop"),
        ref_metric="wait",
        target=Target("ratio_max", 0.2 if tee else 0.8),
    )
    return _scenario(cfg, sid, {"rankd": rankd, "torch": torch}, [row])


def _kill(cfg: Config) -> Scenario:
    inner, nprocs = cfg.pick(3, 1), 32
    sleep = "/bin/sleep"

    def rankd(p: _Pair) -> Samples:
        out = []
        for _ in range(inner):
            spec = make_spec(job_id("kill"), nprocs, sleep, ["600"])
            job = p.agent.start(spec)
            wait_exec([r.pid for r in job.ranks], "sleep")
            t0 = perf_counter()
            job = p.agent.kill(spec.job_id)
            out.append(ms(perf_counter() - t0))
            if job.state != pb.KILLED:
                raise RuntimeError(f"killed job is {pb.JobState.Name(job.state)}")
        return {"kill": out}

    def torch(p: _Pair) -> Samples:
        out = []
        for _ in range(inner):
            pc = p.torch.start(nprocs, sleep, ["600"])
            wait_exec(pc.pids().values(), "sleep")
            t0 = perf_counter()
            pc.close()
            out.append(ms(perf_counter() - t0))
            if any(h.proc.returncode is None for h in pc.subprocess_handlers.values()):
                raise RuntimeError("torch close() returned with ranks unreaped")
        return {"kill": out}

    row = RowSpec(
        id="kill",
        title=f"kill {nprocs} sleeping ranks (SIGTERM) → all reaped",
        unit="ms",
        metrics=("kill",),
        target=Target("ratio_max", 1.2),
        note="rankd: Kill RPC returns; torch: close()",
    )
    return _scenario(cfg, "kill", {"rankd": rankd, "torch": torch}, [row])


def _exit_to_poll(cfg: Config) -> Scenario:
    """The rank writes its exit instant (time.time()) to a file right before
    os._exit(0); rankd's client polls in a tight loop, torch's waits with period 0.01."""
    inner, delay = cfg.pick(4, 2), 0.05

    def _exit_instant(path: Path) -> float:
        return float(path.read_text())

    def rankd(p: _Pair) -> Samples:
        out = []
        request_for = pb.PollRequest
        for _ in range(inner):
            jid = job_id("exit")
            path = p.scratch / jid
            p.agent.start(make_spec(jid, 1, PYTHON, python_args(EXIT_AT, path, delay)))
            request, poll = request_for(job_id=jid), p.agent.stub.Poll
            while poll(request, timeout=30).job.ranks[0].state == pb.RANK_RUNNING:
                pass
            seen = time.time()
            out.append(ms(seen - _exit_instant(path)))
        return {"latency": out}

    def floor(p: _Pair) -> Samples:
        """No agent, no RPC: this process waits on the rank's pidfd itself. What is left
        is the kernel's share (the rank's exit and teardown, the wake-up)."""
        out = []
        for _ in range(inner):
            path = p.scratch / job_id("fexit")
            argv = [PYTHON, *python_args(EXIT_AT, path, delay)]
            with subprocess.Popen(argv, stdin=subprocess.DEVNULL) as proc:
                fd = os.pidfd_open(proc.pid)
                try:
                    select.select([fd], [], [], 30)
                    seen = time.time()
                finally:
                    os.close(fd)
            out.append(ms(seen - _exit_instant(path)))
        return {"latency": out}

    def torch(p: _Pair) -> Samples:
        out = []
        for _ in range(inner):
            path = p.scratch / job_id("texit")
            pc = p.torch.start(1, PYTHON, python_args(EXIT_AT, path, delay))
            pc.wait(period=0.01)
            seen = time.time()
            out.append(ms(seen - _exit_instant(path)))
            pc.close()
        return {"latency": out}

    rows = [
        RowSpec(
            id="exit_to_poll",
            title="rank exit → visible in Poll, p50",
            unit="ms",
            metrics=("latency",),
            stat="p50",
            ref_label="torch wait(period=0.01)",
            target=Target("max", 2.0),
        ),
        RowSpec(
            id="exit_floor",
            title="  same, floor: own pidfd wake-up, no agent (info)",
            unit="ms",
            metrics=("latency",),
            stat="p50",
            side="pidfd",
            ref_side=None,
        ),
    ]
    sides = {"rankd": rankd, "torch": torch, "pidfd": floor}
    return _scenario(cfg, "exit_to_poll", sides, rows)


def scenarios(cfg: Config) -> list[Scenario]:
    return [
        _start_true(cfg),
        _start_python(cfg),
        _full_run(cfg, tee=False),
        _full_run(cfg, tee=True),
        _kill(cfg),
        _exit_to_poll(cfg),
    ]
