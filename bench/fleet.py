"""Many agents and idle agents: job status across a fleet through ``client.Cluster``
(watch-fed, unary fan-out, push latency), and what an agent costs while nothing
happens."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import psutil

from bench.agents import Agent, job_id, launch_agents, make_spec, stop_all
from bench.config import TRUE, Config, ms
from bench.harness import RowSpec, Samples, Scenario, Target
from rankd.v1 import agent_pb2 as pb

__all__ = ["scenarios"]


@dataclass
class _Fleet:
    agents: list[Agent]
    job: str
    cluster: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: this process (every thread: the client) and all agents."""
        return time.process_time(), sum(_cpu_seconds(a.pid) for a in self.agents)


def _cpu_seconds(pid: int) -> float:
    """CPU time of every thread of `pid`, in ns precision (schedstat), not clock ticks."""
    total = 0
    task_dir = f"/proc/{pid}/task"
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def _timed_calls(f: _Fleet, calls: int, call: Any) -> Samples:
    """`calls` timed calls, and the CPU they cost the client and the agents (ms per call):
    32 agents sharing this machine's cores bound a fan-out from below by their CPU."""
    out = []
    client0, agents0 = f.cpu()
    for _ in range(calls):
        t0 = perf_counter()
        call()
        out.append(ms(perf_counter() - t0))
    client1, agents1 = f.cpu()
    return {
        "poll": out,
        "client CPU/call": [ms(client1 - client0) / calls],
        "agents CPU/call": [ms(agents1 - agents0) / calls],
    }


def _poll_fanout(cfg: Config) -> Scenario:
    count, calls = cfg.pick(32, 4), cfg.pick(100, 10)
    exits = cfg.pick(3, 1)  # push-latency rounds per repetition

    def setup() -> _Fleet:
        from rankd.client import Cluster  # the client package, as a coordinator would use it

        agents = launch_agents(cfg.scratch("agents"), count, prefix="fanout")
        fleet = _Fleet(agents, job_id("fanout"))
        try:
            for agent in agents:  # the same job id on every node: it is the run id
                agent.start(make_spec(fleet.job, 1, "/bin/sleep", ["3600"]))
            fleet.cluster = Cluster([a.address for a in agents])
            if not fleet.cluster.watch(fleet.job, timeout=30):
                raise RuntimeError("the cluster's watches did not come up")
        except BaseException:
            if fleet.cluster is not None:
                fleet.cluster.close()
            stop_all(agents)
            raise
        return fleet

    def teardown(fleet: _Fleet | None) -> None:
        if fleet is None:
            return
        if fleet.cluster is not None:
            fleet.cluster.close()
        stop_all(fleet.agents)

    def polled(results: list[Any]) -> None:
        bad = [r for r in results if not r.ok or r.value.state != pb.RUNNING]
        if bad:
            raise RuntimeError(f"fan-out poll: {len(bad)} nodes failed: {bad[0]}")

    def cluster(f: _Fleet) -> Samples:
        return _timed_calls(f, calls, lambda: polled(f.cluster.poll(f.job)))

    def fresh(f: _Fleet) -> Samples:
        return _timed_calls(f, calls, lambda: polled(f.cluster.poll(f.job, fresh=True)))

    def push(f: _Fleet) -> Samples:
        """A rank exits on every agent; from the last exit (the agent's own timestamp:
        one machine, one clock) until the Cluster's view shows every node ended."""
        out = []
        for _ in range(exits):
            job = job_id("exit")
            for agent in f.agents:
                agent.start(make_spec(job, 1, "/bin/sleep", ["1"]))
            if not f.cluster.watch(job, timeout=30):
                raise RuntimeError("the cluster's watches did not come up")
            finals = f.cluster.wait(job, timeout=60)
            seen = time.time()
            view = f.cluster.poll(job)
            if not all(r.ok and r.value.ranks[0].HasField("exit_code") for r in view):
                raise RuntimeError(f"job {job}: not every node ended in the cluster's view")
            last_exit = max(r.unwrap().ranks[0].end_time for r in finals)
            out.append(ms(seen - last_exit))
        return {"push": out}

    def futures(f: _Fleet) -> Samples:
        request = pb.PollRequest(job_id=f.job)
        stubs = [a.stub for a in f.agents]

        def call() -> None:
            pending = [stub.Poll.future(request, timeout=30) for stub in stubs]
            for answer in pending:
                answer.result()

        return _timed_calls(f, calls, call)

    def one(f: _Fleet) -> Samples:
        request, poll = pb.PollRequest(job_id=f.job), f.agents[0].stub.Poll
        return _timed_calls(f, calls, lambda: poll(request, timeout=30))

    rows = [
        RowSpec(
            id="poll_fanout",
            title=f"Poll fan-out across {count} agents (client.Cluster, watch-fed)",
            unit="ms",
            metrics=("poll",),
            side="cluster",
            ref_side="one agent",
            ref_label="1 agent",
            target=Target("ratio_max", 5.0),
            note="ref: one agent's unary Poll round trip (sync stub)",
            note_metrics=("client CPU/call", "agents CPU/call"),
        ),
        RowSpec(
            id="poll_fanout_fresh",
            title="  same, unary fan-out: poll(fresh=True) (info)",
            unit="ms",
            metrics=("poll",),
            side="fresh",
            ref_side="one agent",
            ref_label="1 agent",
            note_metrics=("client CPU/call", "agents CPU/call"),
        ),
        RowSpec(
            id="poll_fanout_push",
            title=f"  rank exit on all {count} agents -> ended in the Cluster's view (info)",
            unit="ms",
            metrics=("push",),
            side="push",
            ref_side=None,
            note="from the last exit (agent timestamp) until Cluster.wait returns",
        ),
        RowSpec(
            id="poll_fanout_futures",
            title=f"  same, grpc futures over {count} channels (info)",
            unit="ms",
            metrics=("poll",),
            side="futures",
            ref_side="one agent",
            ref_label="1 agent",
            note_metrics=("client CPU/call", "agents CPU/call"),
        ),
    ]
    return Scenario(
        id="poll_fanout",
        sides={
            "cluster": cluster,
            "fresh": fresh,
            "futures": futures,
            "one agent": one,
            "push": push,
        },
        rows=rows,
        setup=setup,
        teardown=teardown,
    )


def _usage(proc: psutil.Process, window: float) -> tuple[float, float]:
    """CPU % of one core over `window` seconds, and RSS in MB at its end."""
    before, t0 = proc.cpu_times(), time.monotonic()
    time.sleep(window)
    after, elapsed = proc.cpu_times(), time.monotonic() - t0
    used = (after.user + after.system) - (before.user + before.system)
    return used / elapsed * 100.0, proc.memory_info().rss / 1e6


def _idle(cfg: Config) -> Scenario:
    window = 3.0 if cfg.quick else 60.0

    def setup() -> _Fleet:
        (agent,) = launch_agents(cfg.scratch("agents"), 1, prefix="idle")
        fleet = _Fleet([agent], job_id("sleeping"))
        try:
            done = job_id("finished")
            agent.start(make_spec(done, 8, TRUE))
            agent.wait_end(done)
            agent.start(make_spec(fleet.job, 1, "/bin/sleep", ["3600"]))
            agent.poll(fleet.job)
            time.sleep(1.0)  # let the start's after-effects pass: the window is idle time
        except BaseException:
            stop_all([agent])
            raise
        return fleet

    def measure(f: _Fleet) -> Samples:
        proc = psutil.Process(f.agents[0].pid)
        cpu, rss = _usage(proc, window)
        guardians = [c for c in proc.children() if "rankd.agent.guardian" in " ".join(c.cmdline())]
        f.extras = {
            "window_s": window,
            "agent_threads": proc.num_threads(),
            "guardian_rss_mb": [round(g.memory_info().rss / 1e6, 1) for g in guardians],
            "guardian_cpu_s": [round(sum(g.cpu_times()[:2]), 3) for g in guardians],
        }
        return {"cpu": [cpu], "rss": [rss]}

    rows = [
        RowSpec(
            id="idle_cpu",
            title=f"agent idle {window:g} s (1 finished, 1 sleeping job): CPU",
            unit="%",
            metrics=("cpu",),
            ref_side=None,
            target=Target("max", 0.2),
            note="% of one core",
        ),
        RowSpec(
            id="idle_rss",
            title="  same: RSS of the agent process",
            unit="MB",
            metrics=("rss",),
            ref_side=None,
            target=Target("max", 60.0),
        ),
    ]
    return Scenario(
        id="idle",
        sides={"rankd": measure},
        rows=rows,
        setup=setup,
        teardown=lambda f: f and stop_all(f.agents),
        repeat=1,
        warmup=False,
        extras=lambda f: f.extras,
    )


def scenarios(cfg: Config) -> list[Scenario]:
    return [_poll_fanout(cfg), _idle(cfg)]
