"""Log delivery: how soon a line reaches a remote client, and how many lines per second.

rankd: a Stream(follow) client over loopback. torch: ``TailLog`` (torch's 0.1 s poll
interval, as ``start_processes`` uses it) into a destination in this process. The
throughput ceiling is a bare ``grpc.aio`` server (``bench.bare_stream``) streaming
pre-built batches of the same messages.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

from bench.agents import Agent, job_id, launch_agents, make_spec, stop_all
from bench.config import Config, ms
from bench.harness import RowSpec, Samples, Scenario, Target
from bench.torch_side import LockedFile, TimedSink, TorchLauncher
from bench.workers import FLOOD, LINE_BYTES, PYTHON, TIMESTAMPS, python_args
from rankd.v1 import agent_pb2 as pb

__all__ = ["scenarios"]

_HEADER = "[default0]:"


@dataclass
class _State:
    agent: Agent
    torch: TorchLauncher
    scratch: Path
    bare: Agent | None = None


def _line_latency(cfg: Config) -> Scenario:
    count, gap = cfg.pick(200, 20), 0.005
    args = python_args(TIMESTAMPS, count, gap)

    def setup() -> _State:
        torch = cfg.torch()
        (agent,) = launch_agents(cfg.scratch("agents"), 1, prefix="line_latency")
        return _State(agent, torch, cfg.scratch("line_latency"))

    def rankd(s: _State) -> Samples:
        jid = job_id("lines")
        s.agent.start(make_spec(jid, 1, PYTHON, args))
        req = pb.StreamRequest(job_id=jid, follow=True, streams=[pb.STDOUT])
        out = []
        for resp in s.agent.stub.Stream(req, timeout=60):
            now = time.time()
            out.extend(ms(now - float(line.text)) for line in resp.lines)
        if len(out) != count:
            raise RuntimeError(f"rankd stream delivered {len(out)} of {count} lines")
        return {"latency": out}

    def torch(s: _State) -> Samples:
        pc = s.torch.start(1, PYTHON, args)
        sink = TimedSink()
        tail = s.torch.tail({0: pc.stdouts[0]}, sink)
        try:
            pc.wait(period=0.01)
        finally:
            tail.stop()
            pc.close()
        out = [ms(at - float(text.removeprefix(_HEADER))) for at, text in sink.writes]
        if len(out) != count:
            raise RuntimeError(f"TailLog delivered {len(out)} of {count} lines")
        return {"latency": out}

    rows = [
        RowSpec(
            id=f"line_latency_{p}",
            title=f"line written → received (Stream follow), {p}",
            unit="ms",
            metrics=("latency",),
            stat=p,
            ref_label="torch TailLog",
            target=Target("max", limit),
        )
        for p, limit in (("p50", 5.0), ("p99", 20.0))
    ]
    return Scenario(
        id="line_latency",
        sides={"rankd": rankd, "torch": torch},
        rows=rows,
        setup=setup,
        teardown=lambda s: s and s.agent.stop(),
    )


def _throughput(cfg: Config) -> Scenario:
    nprocs, per_rank = 8, cfg.pick(125_000, 5_000)
    total = nprocs * per_rank
    args = python_args(FLOOD)
    rank_args = {r: [str(r), str(per_rank)] for r in range(nprocs)}

    def setup() -> _State:
        torch = cfg.torch()
        root = cfg.scratch("agents")
        (agent,) = launch_agents(root, 1, prefix="throughput")
        bare = Agent(root, "bare-stream", [PYTHON, "-m", "bench.bare_stream"])
        state = _State(agent, torch, cfg.scratch("throughput"), bare)
        try:
            bare.connect()
        except BaseException:
            stop_all([agent, bare])
            raise
        return state

    def teardown(s: _State | None) -> None:
        if s is not None:
            stop_all([a for a in (s.agent, s.bare) if a is not None])

    def rankd(s: _State) -> Samples:
        jid = job_id("flood")
        t0 = perf_counter()
        job = s.agent.start(make_spec(jid, nprocs, PYTHON, args, rank_args=rank_args))
        got, final = 0, None
        req = pb.StreamRequest(job_id=jid, follow=True, packed=True)
        for resp in s.agent.stub.Stream(req, timeout=600):
            got += sum(block.count for block in resp.blocks)
            if resp.end:
                final = resp.job
        elapsed = perf_counter() - t0
        shutil.rmtree(job.run_dir, ignore_errors=True)
        if got != total or final is None or final.state != pb.SUCCEEDED:
            raise RuntimeError(f"rankd stream delivered {got} of {total} lines")
        return {"rate": [total / elapsed]}

    def torch(s: _State) -> Samples:
        dst_path = s.scratch / "taillog.out"
        dst = LockedFile(dst_path)
        try:
            t0 = perf_counter()
            pc = s.torch.start(nprocs, PYTHON, args, rank_args=rank_args)
            tail = s.torch.tail(dict(pc.stdouts), dst)
            try:
                pc.wait(period=0.01)
            finally:
                tail.stop()
                pc.close()
            dst.flush()
            elapsed = perf_counter() - t0
        finally:
            dst.close()
        with open(dst_path, "rb") as f:
            got = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        dst_path.unlink()
        shutil.rmtree(Path(pc.stdouts[0]).parents[2], ignore_errors=True)
        if got != total:
            raise RuntimeError(f"TailLog delivered {got} of {total} lines")
        return {"rate": [total / elapsed]}

    def bare_stream(s: _State, packed: bool) -> Samples:
        assert s.bare is not None
        t0 = perf_counter()
        got = 0
        req = pb.StreamRequest(job_id=str(total), packed=packed)
        for resp in s.bare.stub.Stream(req, timeout=600):
            got += len(resp.lines) + sum(block.count for block in resp.blocks)
        elapsed = perf_counter() - t0
        if got != total:
            raise RuntimeError(f"bare stream delivered {got} of {total} lines")
        return {"rate": [total / elapsed]}

    def bare(s: _State) -> Samples:
        return bare_stream(s, packed=False)

    def bare_packed(s: _State) -> Samples:
        return bare_stream(s, packed=True)

    title = f"{nprocs} ranks x {per_rank:,} lines of {LINE_BYTES} B → one client"
    rows = [
        RowSpec(
            id="throughput",
            title=f"{title}, lines/s",
            unit="lines/s",
            metrics=("rate",),
            ref_label="torch TailLog to a file",
            target=Target("min", 1_000_000),
            higher_is_better=True,
        ),
        RowSpec(
            id="throughput_vs_bare_grpc",
            title="  same, vs a bare gRPC batched stream",
            unit="lines/s",
            metrics=("rate",),
            ref_side="bare",
            ref_label="bare gRPC, LogLines",
            target=Target("ratio_min", 0.5),
            higher_is_better=True,
            note="bare: pre-built batches of 4,096 LogLines, no workers, files or reading",
        ),
        RowSpec(
            id="throughput_vs_bare_packed",
            title="  same, vs bare gRPC of pre-built LogBlocks (info)",
            unit="lines/s",
            metrics=("rate",),
            ref_side="bare_packed",
            ref_label="bare gRPC, LogBlocks",
            higher_is_better=True,
            note="bare: 1 MiB messages of pre-built LogBlocks: the transport alone",
        ),
    ]
    sides: dict[str, Any] = {
        "rankd": rankd,
        "torch": torch,
        "bare": bare,
        "bare_packed": bare_packed,
    }
    return Scenario(id="throughput", sides=sides, rows=rows, setup=setup, teardown=teardown)


def scenarios(cfg: Config) -> list[Scenario]:
    return [_line_latency(cfg), _throughput(cfg)]
