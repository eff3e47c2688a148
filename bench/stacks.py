"""Stacks of a hung job: ``Cluster.stacks`` over 64 Python ranks on 4 agents, beside
what a user has without rankd, py-spy run on each rank's pid one after the other."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from bench.agents import Agent, job_id, launch_agents, make_spec, stop_all, wait_files
from bench.config import Config, ms
from bench.harness import RowSpec, Samples, Scenario, Target
from bench.workers import PYTHON, SLEEP_READY, python_args
from rankd.agent.stacks import find_sampler

__all__ = ["scenarios"]


@dataclass
class _Job:
    agents: list[Agent]
    job: str
    pids: list[int] = field(default_factory=list)
    cluster: Any = None


def _stacks(cfg: Config) -> Scenario:
    nodes, per_node = 4, cfg.pick(16, 2)
    ranks = nodes * per_node
    sampler = find_sampler()

    def setup() -> _Job:
        from rankd.client import Cluster

        if sampler is None:
            raise RuntimeError("py-spy is not installed: pip install 'rankd[stacks]'")
        agents = launch_agents(cfg.scratch("agents"), nodes, prefix="stacks")
        state = _Job(agents, job_id("stacks"))
        ready = cfg.scratch("stacks-ready")
        for stale in ready.iterdir():
            stale.unlink()
        try:
            for i, agent in enumerate(agents):
                spec = make_spec(state.job, per_node, PYTHON, python_args(SLEEP_READY, ready, 3600))
                spec.rank_offset = i * per_node  # global ranks as a launch gives them
                state.pids += [r.pid for r in agent.start(spec).ranks]
            # Every interpreter is up and in its sleep (not still importing), so every
            # rank's stack is the same line and the fold is one group.
            wait_files(ready, ranks)
            state.cluster = Cluster([a.address for a in agents])
        except BaseException:
            stop_all(agents)
            raise
        return state

    def teardown(state: _Job | None) -> None:
        if state is None:
            return
        if state.cluster is not None:
            state.cluster.close()
        stop_all(state.agents)

    def rankd(state: _Job) -> Samples:
        t0 = perf_counter()
        folded = state.cluster.stacks(state.job)
        took = perf_counter() - t0
        # Every rank sleeps in the same line: one group holding every rank.
        groups = folded.groups
        if (
            len(groups) != 1
            or groups[0].ranks != list(range(ranks))
            or folded.unsampled
            or folded.node_errors
        ):
            raise RuntimeError(f"stacks: not one group of every rank: {folded.lines()}")
        return {"stacks": [ms(took)]}

    def serial(state: _Job) -> Samples:
        t0 = perf_counter()
        for pid in state.pids:
            subprocess.run(
                [str(sampler), "dump", "--pid", str(pid), "--json"],
                check=True,
                capture_output=True,
                timeout=30,
            )
        return {"stacks": [ms(perf_counter() - t0)]}

    return Scenario(
        id="stacks",
        sides={"rankd": rankd, "py-spy serial": serial},
        rows=[
            RowSpec(
                id="stacks_64",
                title=f"stacks of {ranks} ranks on {nodes} agents, folded (Cluster.stacks)",
                unit="ms",
                metrics=("stacks",),
                ref_side="py-spy serial",
                ref_label="py-spy per pid",
                target=Target("max", 2000.0),
                note="ref: `py-spy dump --json` on each rank's pid in turn, one machine",
            )
        ],
        setup=setup,
        teardown=teardown,
    )


def scenarios(cfg: Config) -> list[Scenario]:
    return [_stacks(cfg)]
