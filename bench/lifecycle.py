"""Process lifecycle: start, run to the end, kill, and how fast an exit shows in Poll.

rankd: one fresh agent per scenario, driven with the generated stubs over loopback;
every figure includes the RPC round trips. torch: ``start_processes``, ``wait``,
``close`` in this process.
"""

from __future__ import annotations

import asyncio
import io
import os
import select
import subprocess
import time
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any, TypeVar

from bench.agents import Agent, job_id, launch_agents, make_spec, wait_exec, wait_files
from bench.config import TRUE, Config, ms
from bench.harness import SETTLE, RowSpec, Samples, Scenario, Target
from bench.torch_side import TorchLauncher
from bench.workers import EXIT_AT, PYTHON, SLEEP, SLEEP_READY, python_args
from rankd.agent.convert import cache_ended_rank, spec_from_pb
from rankd.agent.supervisor import Supervisor
from rankd.v1 import agent_pb2 as pb

__all__ = ["scenarios"]

T = TypeVar("T")


@dataclass
class _Pair:
    agent: Agent
    torch: TorchLauncher
    scratch: Path
    core: _Core | None = None

    def in_process(self) -> _Core:
        if self.core is None:
            self.core = _Core(self.scratch / "core")
        return self.core


class _Core:
    """The agent's core (its Supervisor) in this process on its own loop: what the
    agent does for Start and Kill without the RPC, measured as torch is."""

    def __init__(self, log_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.sup = self.loop.run_until_complete(self._create(log_dir))

    @staticmethod
    async def _create(log_dir: Path) -> Supervisor:
        # as the agent runs it: subreaper (a kill signals process groups, no tree walk).
        # Safe beside torch here: the sides alternate, and torch reaps its own ranks
        # before ours run again.
        sup = Supervisor(
            str(log_dir),
            console_out=io.StringIO(),
            console_err=io.StringIO(),
            subreaper=True,
        )
        sup.exit_hooks.append(cache_ended_rank)  # as the service does
        return sup

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.loop.run_until_complete(self.sup.close(timeout=5.0))
        self.loop.close()


def _setup(cfg: Config, name: str) -> _Pair:
    torch = cfg.torch()
    (agent,) = launch_agents(cfg.scratch("agents"), 1, prefix=name)
    return _Pair(agent, torch, cfg.scratch(name))


def _teardown(pair: _Pair | None) -> None:
    if pair is not None:
        if pair.core is not None:
            pair.core.close()
        pair.agent.stop()


_PAUSE = 0.005  # seconds: the pause before a "cold" round trip, as after wait_exec
_TORCH_PERIOD = 0.01  # torch's wait(period=...) in the full runs (issue 7's reference)


def _round_trip_after_pause(agent: Agent) -> float:
    """One Info round trip to the agent after a pause, in ms (the rows below call the
    agent after such pauses; back to back, a round trip costs about half)."""
    time.sleep(_PAUSE)
    t0 = perf_counter()
    agent.stub.Info(pb.InfoRequest(), timeout=30)
    return ms(perf_counter() - t0)


def _info_rows(sid: str, title: str, metric: str) -> list[RowSpec]:
    """What a row's rankd figure is made of: the agent's core alone (against torch), and
    one round trip after a pause like the one before the measured call."""
    return [
        RowSpec(
            id=f"{sid}_core",
            title="  same, the agent's core in this process, no RPC (info)",
            unit="ms",
            metrics=(metric,),
            side="core",
        ),
        RowSpec(
            id=f"{sid}_round_trip",
            title=f"  {title}: an agent round trip after a {_PAUSE * 1e3:g} ms pause (info)",
            unit="ms",
            metrics=("round trip",),
            ref_side=None,
        ),
    ]


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
        out, trips = [], []
        for _ in range(inner):
            spec = make_spec(job_id("true"), nprocs, TRUE)
            t0 = perf_counter()
            p.agent.start(spec)
            out.append(ms(perf_counter() - t0))
            p.agent.wait_end(spec.job_id)
            trips.append(_round_trip_after_pause(p.agent))
        return {"start": out, "round trip": trips}

    def core(p: _Pair) -> Samples:
        c, out = p.in_process(), []
        for _ in range(inner):
            spec = spec_from_pb(make_spec(job_id("ctrue"), nprocs, TRUE))
            t0 = perf_counter()
            c.run(c.sup.start(spec))
            out.append(ms(perf_counter() - t0))
            c.run(c.sup.wait(spec.job_id))
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
    rows = [row, *_info_rows("start_true", "start", "start")]
    return _scenario(cfg, "start_true", {"rankd": rankd, "torch": torch, "core": core}, rows)


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
        out, first = [], []
        for _ in range(inner):
            t0 = perf_counter()
            pc = p.torch.start(nprocs, TRUE, tee=3 if tee else 0)
            t1 = perf_counter()
            result = pc.wait(period=_TORCH_PERIOD)
            out.append(ms(perf_counter() - t0))
            # wait() returned at its first poll: every rank had exited while
            # start_processes ran; otherwise it slept at least one period
            first.append(100.0 if perf_counter() - t1 < _TORCH_PERIOD else 0.0)
            if result is None or result.is_failed():
                raise RuntimeError(f"torch run failed: {result}")
            pc.close()
        return {"wait": out, "first poll": first}

    row = RowSpec(
        id=sid,
        title=f"full run {nprocs} x /bin/true, start → result" + (" (tee=3)" if tee else ""),
        unit="ms",
        metrics=("stream end", "poll loop"),
        ref_metric="wait",
        target=Target("ratio_max", 0.2 if tee else 0.8),
    )
    # torch's times fall in two groups: ~its start (the first poll finds every rank
    # gone) and start + a 10 ms period; the median follows whichever group is larger
    first = RowSpec(
        id=f"{sid}_torch_first_poll",
        title="  torch runs done at wait()'s first poll, no period slept (info)",
        unit="%",
        metrics=("first poll",),
        stat="mean",
        side="torch",
        ref_side=None,
    )
    return _scenario(cfg, sid, {"rankd": rankd, "torch": torch}, [row, first])


class _Sleepers:
    """The ranks a kill scenario kills, the same argv on every side. ``python``: Python
    ranks asleep after start-up (each says so with a file in a directory of its own),
    the workload of issue 7's reference (torch's close() ≈ 12-14 ms there); ``bin``:
    /bin/sleep, whose exits cost the kernel a third of that, so that a fixed round
    trip weighs three times more."""

    def __init__(self, kind: str, scratch: Path, nprocs: int) -> None:
        self.kind, self.nprocs = kind, nprocs
        if kind == "python":
            self.ready = scratch / job_id("ready")
            self.ready.mkdir(parents=True)
            self.entrypoint, self.args = PYTHON, python_args(SLEEP_READY, self.ready, 600)
        else:
            self.entrypoint, self.args = "/bin/sleep", ["600"]

    def wait(self, pids: Iterable[int]) -> None:
        """Until every rank sleeps: both sides are killed from the same state."""
        if self.kind == "python":
            wait_files(self.ready, self.nprocs)
        else:
            wait_exec(pids, "sleep")


_KILLED = {"bin": "kill bin", "python": "kill"}  # sleeper kind -> metric


def _sleepers(scratch: Path, nprocs: int) -> Iterator[tuple[_Sleepers, str]]:
    """Each kind of sleepers in turn, after a settle: what the previous kill left for
    the agent to do (its job.json write, 10 ms after the end) is not measured."""
    for kind, metric in _KILLED.items():
        time.sleep(SETTLE)
        yield _Sleepers(kind, scratch, nprocs), metric


def _kill(cfg: Config) -> Scenario:
    inner, nprocs = cfg.pick(3, 1), 32

    def rankd(p: _Pair) -> Samples:
        out: Samples = {"round trip": []}
        for _ in range(inner):
            for ranks, metric in _sleepers(p.scratch, nprocs):
                spec = make_spec(job_id("kill"), nprocs, ranks.entrypoint, ranks.args)
                job = p.agent.start(spec)
                ranks.wait(r.pid for r in job.ranks)
                t0 = perf_counter()
                job = p.agent.kill(spec.job_id)
                out.setdefault(metric, []).append(ms(perf_counter() - t0))
                if job.state != pb.KILLED:
                    raise RuntimeError(f"killed job is {pb.JobState.Name(job.state)}")
            out["round trip"].append(_round_trip_after_pause(p.agent))
        return out

    def core(p: _Pair) -> Samples:
        c, out = p.in_process(), {}
        for _ in range(inner):
            for ranks, metric in _sleepers(p.scratch, nprocs):
                spec = spec_from_pb(
                    make_spec(job_id("ckill"), nprocs, ranks.entrypoint, ranks.args)
                )
                job, _ = c.run(c.sup.start(spec))
                ranks.wait(r.pid for r in job.current.ranks)
                t0 = perf_counter()
                attempt = c.run(c.sup.kill(spec.job_id))
                out.setdefault(metric, []).append(ms(perf_counter() - t0))
                if any(r.alive for r in attempt.ranks):
                    raise RuntimeError("the core's kill returned with ranks alive")
        return out

    def torch(p: _Pair) -> Samples:
        out: Samples = {}
        for _ in range(inner):
            for ranks, metric in _sleepers(p.scratch, nprocs):
                pc = p.torch.start(nprocs, ranks.entrypoint, ranks.args)
                ranks.wait(pc.pids().values())
                t0 = perf_counter()
                pc.close()
                out.setdefault(metric, []).append(ms(perf_counter() - t0))
                if any(h.proc.returncode is None for h in pc.subprocess_handlers.values()):
                    raise RuntimeError("torch close() returned with ranks unreaped")
        return out

    row = RowSpec(
        id="kill",
        title=f"kill {nprocs} sleeping Python ranks (SIGTERM) → all reaped",
        unit="ms",
        metrics=("kill",),
        target=Target("ratio_max", 1.2),
        note="rankd: Kill RPC returns; torch: close()",
    )
    rows = [
        row,
        *_info_rows("kill", "kill", "kill"),
        RowSpec(
            id="kill_bin",
            title=f"  same, {nprocs} /bin/sleep ranks (info)",
            unit="ms",
            metrics=("kill bin",),
        ),
        RowSpec(
            id="kill_bin_core",
            title="  same, /bin/sleep, the agent's core in this process, no RPC (info)",
            unit="ms",
            metrics=("kill bin",),
            side="core",
        ),
    ]
    return _scenario(cfg, "kill", {"rankd": rankd, "torch": torch, "core": core}, rows)


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
