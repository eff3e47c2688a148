"""Scale (issue 24): what users of a launcher feel across hundreds and thousands of
nodes. Real agents where this machine can hold them (128 on loopback), hollow agents
(:mod:`bench.hollow`) for 4,096 nodes, and the report of 32,768 ranks.

Every figure is the client's work plus what its agents (real or hollow) cost on the
same two cores; the hollow agents run in processes of their own, so the client's CPU
is counted apart (``client CPU/node`` in the notes).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

from bench.agents import Agent, job_id, launch_agents, make_spec, stop_all
from bench.config import TRUE, Config, ms
from bench.harness import RowSpec, Samples, Scenario, Target
from bench.hollow import HollowFleet
from rankd.v1 import agent_pb2 as pb

__all__ = ["scenarios"]

# `python -m`: the rankd of this interpreter and sys.path, whatever is installed
_RANKD = [sys.executable, "-m", "rankd.client.cli"]
_SH = "/bin/sh"
# rank 0 fails after argv[1] s (once every rank runs); every other rank sleeps
_FAIL_ONE = 'if [ "$RANK" = 0 ]; then sleep "$1"; exit 3; fi; exec sleep 3600'
# argv[1] lines of output as fast as the kernel takes them
_LINES = 'yes "rank $RANK: a line of output of a scale benchmark" | head -n "$1"'


def _quiet(_: Any) -> None:
    """Swallow a launch's lines and events (the rows time the work, not a console)."""


def _cli_env(cache: Path) -> dict[str, str]:
    """The environment of the ``rankd`` commands: bytecode cached (in `cache`, not the
    tree), as an installed rankd has it. This machine sets PYTHONDONTWRITEBYTECODE, and
    compiling rankd's sources anew took a fifth of a ``rankd logs`` of a million lines."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


def _prime(cfg: Config) -> None:
    """Compile the CLI's modules into the cache once, before anything is timed."""
    subprocess.run(
        [*_RANKD, "--help"],
        env=_cli_env(cfg.scratch("pycache")),
        capture_output=True,
        timeout=120,
        check=True,
    )


def _cli(cfg: Config, args: list[str], out: Path) -> tuple[float, int]:
    """Run ``rankd ARGS`` with stdout into `out`; (seconds, exit code)."""
    env = _cli_env(cfg.scratch("pycache"))
    t0 = perf_counter()
    with open(out, "wb") as f:
        proc = subprocess.run(
            [*_RANKD, *args], stdout=f, stderr=subprocess.PIPE, timeout=600, env=env
        )
    took = perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"rankd {args[0]}: exit {proc.returncode}: {proc.stderr[-500:]!r}")
    return took, proc.returncode


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))


# -- real agents -------------------------------------------------------------------


@dataclass
class _Real:
    agents: list[Agent]
    scratch: Path
    cluster: Any = None


def _real(cfg: Config) -> Scenario:
    count = cfg.pick(128, 4)
    merged = min(count, cfg.pick(64, 2))
    per_rank = cfg.pick(50_000, 1000)
    replayed = cfg.pick(1_000_000, 10_000)

    def setup() -> _Real:
        from rankd.client import Cluster

        _prime(cfg)
        agents = launch_agents(cfg.scratch("scale-agents"), count, prefix="scale")
        state = _Real(agents, cfg.scratch("scale-out"))
        try:
            state.cluster = Cluster([a.address for a in agents])
        except BaseException:
            stop_all(agents)
            raise
        return state

    def teardown(state: _Real | None) -> None:
        if state is None:
            return
        if state.cluster is not None:
            state.cluster.close()
        stop_all(state.agents)

    def launch(state: _Real) -> float:
        t0 = perf_counter()
        state.cluster.launch([TRUE], nproc_per_node=1, on_line=_quiet, on_event=_quiet)
        return ms(perf_counter() - t0)

    def fail_fast(state: _Real) -> float:
        from rankd.client import JobFailed

        run = job_id("scale-fail")
        # rank 0 fails once every node runs its ranks (a launch here takes < 1 s)
        cmd = [_SH, "-c", _FAIL_ONE, "sh", "2"]
        with contextlib.suppress(JobFailed):
            state.cluster.launch(
                cmd, nproc_per_node=2, run_id=run, kill_timeout=5, on_line=_quiet, on_event=_quiet
            )
        ends = [r.unwrap() for r in state.cluster.poll(run, fresh=True)]
        failed = [r.end_time for s in ends for r in s.ranks if r.state == pb.RANK_FAILED]
        reaped = [r.end_time for s in ends for r in s.ranks]
        if len(failed) != 1 or not all(reaped):
            raise RuntimeError(f"fail-fast: {len(failed)} failed ranks, not every rank ended")
        return ms(max(reaped) - failed[0])

    def merge(state: _Real) -> float:
        run = job_id("scale-merge")
        nodes = ",".join(a.address for a in state.agents[:merged])
        out = state.scratch / f"{run}.out"
        args = ["launch", "--nodes", nodes, "--nproc-per-node", "1", "--run-id", run]
        took, code = _cli(cfg, [*args, "--", _SH, "-c", _LINES, "sh", str(per_rank)], out)
        got = _lines(out)
        if code != 0 or got != merged * per_rank:
            raise RuntimeError(f"merged logs: exit {code}, {got} of {merged * per_rank} lines")
        return got / took

    def replay(state: _Real) -> float:
        agent = state.agents[0]
        run = job_id("scale-replay")
        agent.start(make_spec(run, 1, _SH, ["-c", _LINES, "sh", str(replayed)]))
        agent.wait_end(run)
        out = state.scratch / f"{run}.out"
        took, code = _cli(cfg, ["logs", "--nodes", agent.address, run], out)
        got = _lines(out)
        if code != 0 or got != replayed:
            raise RuntimeError(f"rankd logs: exit {code}, {got} of {replayed} lines")
        return got / took

    def rankd(state: _Real) -> Samples:
        return {
            "launch": [launch(state)],
            "fail-fast": [fail_fast(state)],
            "merge": [merge(state)],
            "replay": [replay(state)],
        }

    return Scenario(
        id="scale_real",
        sides={"rankd": rankd},
        rows=[
            RowSpec(
                id="scale_launch_real",
                title=f"launch on {count} real agents, 1 /bin/true rank each (call → result)",
                unit="ms",
                metrics=("launch",),
                ref_side=None,
                target=Target("max", 500.0),
            ),
            RowSpec(
                id="scale_failfast_real",
                title=f"fail-fast on {count} real agents: failing exit → every rank reaped",
                unit="ms",
                metrics=("fail-fast",),
                ref_side=None,
                target=Target("max", 500.0),
                note="2 sh ranks per node; rank 0 exits 3; the agents' own exit times",
            ),
            RowSpec(
                id="scale_merge_real",
                title=f"merged logs, {merged} real agents x 1 rank x {per_rank:,} lines "
                "(rankd launch → file)",
                unit="lines/s",
                metrics=("merge",),
                ref_side=None,
                higher_is_better=True,
                target=Target("min", 1e6),
                note="lines / wall time of the whole `rankd launch` command",
            ),
            RowSpec(
                id="scale_replay",
                title=f"rankd logs replay of {replayed:,} lines from one agent (→ file)",
                unit="lines/s",
                metrics=("replay",),
                ref_side=None,
                higher_is_better=True,
                target=Target("min", 2e6),
                note="lines / wall time of the whole `rankd logs` command",
            ),
        ],
        setup=setup,
        teardown=teardown,
        repeat=3,
    )


# -- hollow agents -----------------------------------------------------------------


@dataclass
class _Hollow:
    fleet: HollowFleet
    hostfile: Path
    running: str = ""
    launch_s: float = 5.0
    extras: dict[str, Any] = field(default_factory=dict)


_MEMORY = """\
import sys, psutil
from rankd.client import Cluster
with Cluster(open(sys.argv[1]).read().split()) as cluster:
    if not cluster.watch(sys.argv[2], timeout=300):
        sys.exit("the watches did not come up")
    print(psutil.Process().memory_info().rss)
"""


def _hollow(cfg: Config) -> Scenario:
    nodes, nprocs = cfg.pick(4096, 16), 8

    def setup() -> _Hollow:
        from rankd.client import Cluster

        _prime(cfg)
        fleet = HollowFleet(nodes, procs=2)
        state = _Hollow(fleet, cfg.scratch("scale-hollow") / "hosts")
        try:
            state.hostfile.write_text("\n".join(fleet.addresses) + "\n")
            state.running = job_id("scale-status")
            with Cluster(fleet.addresses) as cluster:
                cluster.launch(
                    ["hollow", "run=inf"],
                    nproc_per_node=nprocs,
                    run_id=state.running,
                    detach=True,
                    on_event=_quiet,
                )
        except BaseException:
            fleet.close()
            raise
        return state

    def teardown(state: _Hollow | None) -> None:
        if state is not None:
            state.fleet.close()

    def launch(state: _Hollow) -> Samples:
        from rankd.client import Cluster

        run = job_id("scale-launch")
        with Cluster(state.fleet.addresses) as cluster:
            c0, t0 = time.process_time(), time.time()
            cluster.launch(
                ["hollow", "run=1"],
                nproc_per_node=nprocs,
                run_id=run,
                on_line=_quiet,
                on_event=_quiet,
            )
            took, cpu = time.time() - t0, time.process_time() - c0
        stats = state.fleet.stats(run)
        if stats["starts"] != nodes:
            raise RuntimeError(f"launch: {stats['starts']} of {nodes} nodes started")
        state.launch_s = stats["last_start"] - t0
        return {
            "running": [ms(state.launch_s)],
            "result": [ms(took)],
            "client CPU/node": [ms(cpu) / nodes],
        }

    def fail_fast(state: _Hollow) -> Samples:
        from rankd.client import Cluster, JobFailed

        run = job_id("scale-fail")
        seen: list[float] = []

        def event(message: str) -> None:
            if "stopping job" in message and not seen:
                seen.append(time.time())

        after = f"fail_after={state.launch_s + 1.0:.1f}"  # once every node runs
        with (
            Cluster(state.fleet.addresses) as cluster,
            contextlib.suppress(JobFailed),
        ):
            cluster.launch(
                ["hollow", "run=inf", "fail=5", after],
                nproc_per_node=nprocs,
                run_id=run,
                on_line=_quiet,
                on_event=event,
            )
        stats = state.fleet.stats(run)
        if not seen or stats["kills"] < nodes - 1:
            raise RuntimeError(f"fail-fast: seen {seen}, {stats['kills']} kills of {nodes - 1}")
        return {
            "kill sent": [ms(stats["last_kill"] - seen[0])],
            "exit → seen": [ms(seen[0] - stats["fail"])],
        }

    def status(state: _Hollow) -> Samples:
        out = state.hostfile.with_suffix(".status")
        took, code = _cli(cfg, ["status", "--hostfile", str(state.hostfile), state.running], out)
        text = out.read_text()
        if code != 0 or f"{nodes * nprocs} ranks on {nodes} nodes" not in text:
            raise RuntimeError(f"rankd status: exit {code}: {text[:300]!r}")
        return {"status": [ms(took)], "status lines": [float(len(text.splitlines()))]}

    def memory(state: _Hollow) -> Samples:
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY, str(state.hostfile), state.running],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory: {proc.stderr[-500:]}")
        return {"rss": [int(proc.stdout) / 1e6]}

    def rankd(state: _Hollow) -> Samples:
        return {**launch(state), **fail_fast(state), **status(state), **memory(state)}

    hollow = f"{nodes:,} hollow agents"
    return Scenario(
        id="scale_hollow",
        sides={"rankd": rankd},
        rows=[
            RowSpec(
                id="scale_launch_hollow",
                title=f"launch on {hollow} x {nprocs} ranks: call → every node running",
                unit="ms",
                metrics=("running",),
                ref_side=None,
                target=Target("max", 3000.0),
                note="the last Start's arrival at a hollow agent",
                note_metrics=("result", "client CPU/node"),
            ),
            RowSpec(
                id="scale_failfast_hollow",
                title=f"fail-fast on {hollow}: first failure seen → Kill sent to every node",
                unit="ms",
                metrics=("kill sent",),
                ref_side=None,
                target=Target("max", 1000.0),
                note="the last Kill's arrival",
                note_metrics=("exit → seen",),
            ),
            RowSpec(
                id="scale_memory_hollow",
                title=f"client memory with {hollow} connected and watched (RSS)",
                unit="MB",
                metrics=("rss",),
                ref_side=None,
                target=Target("max", 1000.0),
            ),
            RowSpec(
                id="scale_status_hollow",
                title=f"rankd status of {hollow} x {nprocs} ranks (whole command)",
                unit="ms",
                metrics=("status",),
                ref_side=None,
                target=Target("max", 2000.0),
            ),
            RowSpec(
                id="scale_status_lines",
                title=f"rankd status of {hollow}: lines printed",
                unit="lines",
                metrics=("status lines",),
                ref_side=None,
                target=Target("max", 60.0),
            ),
        ],
        setup=setup,
        teardown=teardown,
        repeat=3,
        warmup=False,
    )


# -- the report ----------------------------------------------------------------------


def _report(cfg: Config) -> Scenario:
    nodes, nprocs = cfg.pick(4096, 16), 8

    def outcomes() -> list[tuple[Any, pb.JobStatus]]:
        from rankd.client.report import NodeView

        now = time.time()
        views = []
        for n in range(nodes):
            status = pb.JobStatus(job_id="big", state=pb.KILLED, nprocs=nprocs)
            status.spec.rank_offset = n * nprocs
            for r in range(nprocs):
                root = n == 0 and r == 5
                code = 1 if root else -15
                status.failures.add(
                    local_rank=r,
                    pid=1000 + r,
                    exit_code=code,
                    signal_name="" if root else "SIGTERM",
                    message="Process 1005 exited with code 1" if root else "Signal 15 (SIGTERM)",
                    error_file="<N/A>",
                    timestamp=now + (0 if root else 0.01 + n * 1e-5),
                    terminated_by_agent=not root,
                )
            views.append((NodeView(f"127.0.0.1:{10000 + n}", f"node{n:04}", n, n * nprocs), status))
        return views

    def rankd(views: list[tuple[Any, pb.JobStatus]]) -> Samples:
        from rankd.client.report import build_report

        t0 = perf_counter()
        text = build_report("big", views, world_size=nodes * nprocs, restart_count=0).format()
        took = perf_counter() - t0
        sys.stdout.flush()
        with open(os.devnull, "w") as devnull:
            devnull.write(text)
        return {"report": [ms(took)], "report lines": [float(len(text.splitlines()))]}

    return Scenario(
        id="scale_report",
        sides={"rankd": rankd},
        rows=[
            RowSpec(
                id="scale_report",
                title=f"report of {nodes * nprocs:,} ranks (1 root cause): build and format",
                unit="ms",
                metrics=("report",),
                ref_side=None,
                target=Target("max", 500.0),
            ),
            RowSpec(
                id="scale_report_lines",
                title=f"report of {nodes * nprocs:,} ranks: lines",
                unit="lines",
                metrics=("report lines",),
                ref_side=None,
                target=Target("max", 40.0),
            ),
        ],
        setup=outcomes,
        repeat=3,
        warmup=False,
    )


def scenarios(cfg: Config) -> list[Scenario]:
    return [_report(cfg), _hollow(cfg), _real(cfg)]
