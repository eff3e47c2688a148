"""One job across many agents, as torchrun runs one across many processes.

- Global ranks node by node: ``RANK = node_rank * nproc_per_node + local_rank``,
  and the whole torchrun environment on every rank (:func:`torchrun_env`).
- Merged live logs: every node's lines, prefixed with the global rank
  (template ``[${role_name}${rank}]:`` unless another is given; placeholders
  ``${rank}``, ``${local_rank}``, ``${role_name}``, ``${host}``). stdout lines
  go to stdout, stderr lines to stderr; ``redirects`` hides a rank's stream
  from the terminal unless ``tee`` shows it; ``local_ranks_filter`` limits the
  terminal to some local ranks. Every line stays in the agents' log files.
- All-or-nothing: the first failure on any node (a failed rank, a lost agent)
  kills the job on every node (SIGTERM, SIGKILL after ``kill_timeout``).
- Liveness: a node from which nothing arrived for the cluster's ``node_timeout``
  seconds, or whose connection stayed refused for a moment, is lost: it is never
  called again, the stop on the others goes ahead without it (every call there has
  a deadline), and the report names it as the root cause (unless a rank failed on
  its own before it went silent).
- Lease: the launch renews the job's lease (``lease`` seconds) on every node while
  it runs; an agent that hears nothing for that long stops its ranks itself.
- A job that another client kills ends :class:`rankd.client.errors.JobKilled`,
  never failed, and is not restarted. ``detach`` starts the job without a lease
  and returns at once.
- ``max_restarts``: a failed attempt is stopped everywhere and attempt
  ``restart_count + 1`` starts on every node, up to ``max_restarts`` times.
- Failure: :class:`rankd.client.errors.JobFailed` with the :mod:`rankd.client.report`.
- Cancellation (Ctrl-C): the job is killed on every node, then the
  cancellation propagates.

A launch drives a :class:`Fleet`, the few things it needs of an ``AsyncCluster``,
so this module does not depend on the cluster that calls it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Sequence
from string import Template

import rankd.client.rpc as rpc
from rankd.client.attempt import Attempt, Fleet
from rankd.client.errors import (
    JobFailed,
    JobKilled,
    JobNotFound,
    RankdError,
    cluster_error,
)
from rankd.client.report import FailureReport
from rankd.client.streams import StreamOptions, follow_to_end
from rankd.client.torchrun import (
    DEFAULT_PREFIX_TEMPLATE,
    LaunchConfig,
    LaunchHooks,
    LaunchResult,
    OutputLine,
    new_run_id,
    parse_std,
    torchrun_defaults,
    torchrun_env,
)
from rankd.v1 import agent_pb2

__all__ = ["Fleet", "run_launch"]

logger = logging.getLogger(__name__)

_STD_BITS = {"stdout": 1, "stderr": 2}


class _Launch:
    """The state of one ``launch`` call."""

    def __init__(self, cluster: Fleet, config: LaunchConfig, hooks: LaunchHooks) -> None:
        self.cluster = cluster
        self.config = config
        self.hooks = hooks
        self.run_id = config.run_id or new_run_id()
        self.nnodes = len(cluster.nodes)
        self.world_size = self.nnodes * config.nproc_per_node
        self.template = config.log_line_prefix_template or DEFAULT_PREFIX_TEMPLATE
        self.interval = hooks.progress_interval if hooks.on_progress else 2.0
        self._redirects = parse_std(config.redirects, "redirects")
        self._tee = parse_std(config.tee, "tee")
        self._prefixes: dict[tuple[int, int], str] = {}

    # -- output ---------------------------------------------------------------

    def event(self, message: str) -> None:
        if self.hooks.on_event is not None:
            self.hooks.on_event(message)
        else:
            logger.info("%s", message)

    def visible(self, local_rank: int, stream: str) -> bool:
        """Does this rank's stream reach the terminal? (torchrun's rules)"""
        ranks = self.config.local_ranks_filter
        if ranks and local_rank not in ranks:
            return False
        bit = _STD_BITS[stream]
        return not self._redirects(local_rank) & bit or bool(self._tee(local_rank) & bit)

    def prefix(self, node_rank: int, local_rank: int) -> str:
        key = (node_rank, local_rank)
        if key not in self._prefixes:
            self._prefixes[key] = Template(self.template).safe_substitute(
                role_name=self.config.role_name,
                rank=node_rank * self.config.nproc_per_node + local_rank,
                local_rank=local_rank,
                host=self.cluster.names[node_rank],
            )
        return self._prefixes[key]

    def emit(self, node_rank: int, line: agent_pb2.LogLine, restart_count: int) -> None:
        stream = "stderr" if line.stream == agent_pb2.STDERR else "stdout"
        if not self.visible(line.local_rank, stream):
            return
        prefix = self.prefix(node_rank, line.local_rank)
        if self.hooks.on_line is not None:
            self.hooks.on_line(
                OutputLine(
                    host=self.cluster.names[node_rank],
                    node_rank=node_rank,
                    global_rank=node_rank * self.config.nproc_per_node + line.local_rank,
                    local_rank=line.local_rank,
                    stream=stream,
                    text=line.text,
                    prefix=prefix,
                    partial=line.partial,
                    restart_count=restart_count,
                )
            )
            return
        hooks = self.hooks
        out = (hooks.stderr or sys.stderr) if stream == "stderr" else (hooks.stdout or sys.stdout)
        out.write(f"{prefix}{line.text}\n")
        out.flush()

    # -- specs ----------------------------------------------------------------

    def spec(
        self, node_rank: int, restart_count: int, master_addr: str, port: int
    ) -> agent_pb2.JobSpec:
        cfg = self.config
        common, per_rank = torchrun_env(
            node_rank=node_rank,
            nnodes=self.nnodes,
            nproc_per_node=cfg.nproc_per_node,
            master_addr=master_addr,
            master_port=port,
            run_id=self.run_id,
            restart_count=restart_count,
            max_restarts=cfg.max_restarts,
            role_name=cfg.role_name,
            env=cfg.env,
        )
        spec = agent_pb2.JobSpec(
            job_id=self.run_id,
            nprocs=cfg.nproc_per_node,
            entrypoint=cfg.cmd[0],
            args=list(cfg.cmd[1:]),
            env=common,
            default_env=torchrun_defaults(cfg.nproc_per_node),
            cwd=cfg.cwd,
            role_name=cfg.role_name,
            restart_count=restart_count,
            redirects=cfg.redirects,
            tee=cfg.tee,
            local_ranks_filter=list(cfg.local_ranks_filter),
            # ${host} is ours; the agent renders the rest the same way.
            log_line_prefix_template=self.template.replace(
                "${host}", self.cluster.names[node_rank]
            ),
            rank_offset=node_rank * cfg.nproc_per_node,
            kill_timeout=cfg.kill_timeout,
            lease=0.0 if cfg.detach else cfg.lease,
        )
        for local_rank, env in per_rank.items():
            spec.rank_env[local_rank].env.update(env)
        return spec

    def stream_options(self, restart_count: int) -> StreamOptions:
        """What a node's log stream of this attempt follows: the terminal's lines."""
        streams = [
            s
            for s in ("stdout", "stderr")
            if any(self.visible(r, s) for r in range(self.config.nproc_per_node))
        ]
        options = (
            follow_to_end()  # nothing for the terminal: follow only for the end
            if not streams
            else StreamOptions(
                follow=True, ranks=list(self.config.local_ranks_filter), streams=streams
            )
        )
        options["restart_count"] = restart_count
        return options

    # -- the run ----------------------------------------------------------------

    async def run(self) -> LaunchResult:
        answers = await self.cluster.info()
        errors = {str(r.node): r.error for r in answers if r.error is not None}
        if errors:  # a refusal (token, TLS) is named as such, not as "cannot reach"
            raise cluster_error("cannot reach every node", errors, self.nnodes)
        infos = [r.unwrap() for r in answers]
        await self.cluster.info()  # a second round trip: a tighter clock estimate
        master_addr = self.config.master_addr or self.cluster.nodes[0].host
        restart_count = 0
        if self.config.detach:
            port = self.config.master_port or infos[0].free_port
            self.event(
                f"starting job {self.run_id} detached, {_count(self.world_size, 'rank')} on "
                f"{_count(self.nnodes, 'node')} (MASTER_ADDR={master_addr} MASTER_PORT={port})"
            )
            statuses = await self.start(0, master_addr, port)
            return LaunchResult(self.run_id, 0, self.world_size, tuple(statuses), detached=True)
        try:
            while True:
                port = self.config.master_port or infos[0].free_port
                report = await self.attempt(restart_count, master_addr, port)
                if not isinstance(report, FailureReport):
                    self.event(f"job {self.run_id} succeeded (attempt {restart_count})")
                    return LaunchResult(self.run_id, restart_count, self.world_size, report)
                if report.state == "KILLED":
                    raise JobKilled(report)
                if restart_count >= self.config.max_restarts or report.lost_nodes:
                    raise JobFailed(report)
                restart_count += 1
                self.event(
                    f"attempt {restart_count - 1} failed ({_root_line(report)}); restarting "
                    f"(restart {restart_count} of {self.config.max_restarts})"
                )
                if self.config.master_port is None:
                    fresh = await self.cluster.info()
                    if fresh[0].ok:
                        infos[0] = fresh[0].unwrap()
        except asyncio.CancelledError:
            self.event(f"interrupted: killing job {self.run_id} on {self.nnodes} nodes")
            await asyncio.shield(self.kill_everywhere())
            raise

    async def kill_everywhere(
        self,
        only: Sequence[int] | None = None,
        *,
        skip: set[int] | frozenset[int] = frozenset(),
        why: str = "",
    ) -> dict[int, agent_pb2.JobStatus]:
        """Kill the job on every node (or the node ranks in ``only``) but those in
        ``skip`` (lost nodes), all at once; each call has a deadline (the kill timeout
        plus the node timeout). Returns the answers by node rank; reports, not raises,
        the nodes where that failed. The agents record this launch as the requester."""
        ranks = [i for i in (range(self.nnodes) if only is None else only) if i not in skip]
        requester = f"rankd launch on {socket.gethostname()} (pid {os.getpid()})"
        if why:
            requester += f": {why}"
        deadline = min(self.cluster.timeout, self.cluster.node_timeout) + 1.0
        op = rpc.kill(
            self.run_id,
            timeout=self.config.kill_timeout,
            requester=requester[:256],
            deadline=deadline,
        )
        answers: dict[int, agent_pb2.JobStatus] = {}

        async def one(i: int) -> None:
            try:
                answers[i] = (await self.cluster.clients[i].call(op)).job
            except JobNotFound:
                pass
            except RankdError as err:
                self.event(f"could not kill job {self.run_id} on {self.cluster.names[i]}: {err}")

        await asyncio.gather(*(one(i) for i in ranks))
        return answers

    async def start(
        self, restart_count: int, master_addr: str, port: int
    ) -> list[agent_pb2.JobStatus]:
        specs = [self.spec(i, restart_count, master_addr, port) for i in range(self.nnodes)]

        async def one(i: int) -> agent_pb2.StartResponse:
            return await self.cluster.clients[i].start(specs[i])

        results = await asyncio.gather(
            *(one(i) for i in range(self.nnodes)), return_exceptions=True
        )
        errors: dict[str, Exception] = {}
        created: list[int] = []
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                if not isinstance(result, RankdError):
                    raise result
                errors[str(self.cluster.nodes[i])] = result
            elif result.created:
                created.append(i)
            else:  # the id names a job that was already there: not ours to follow
                errors[str(self.cluster.nodes[i])] = RankdError(
                    f"{self.cluster.nodes[i]}: job id {self.run_id!r} is already in use "
                    f"(attempt {result.job.restart_count}); choose another run id"
                )
        if errors:
            # Stop only what this call started: a clash must not kill another job.
            await self.kill_everywhere(only=created)
            raise cluster_error(f"cannot start job {self.run_id}", errors, self.nnodes)
        return [r.job for r in results]  # type: ignore[union-attr]

    async def attempt(
        self, restart_count: int, master_addr: str, port: int
    ) -> tuple[agent_pb2.JobStatus, ...] | FailureReport:
        """Run one attempt everywhere: each node's final status, or the report."""
        self.event(
            f"attempt {restart_count}: starting job {self.run_id}, "
            f"{_count(self.world_size, 'rank')} on {_count(self.nnodes, 'node')} "
            f"(MASTER_ADDR={master_addr} MASTER_PORT={port})"
        )
        await self.start(restart_count, master_addr, port)
        run = Attempt(self, restart_count)
        return await run.run()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _root_line(report: FailureReport) -> str:
    root = report.root_cause
    if root is None:
        return report.reason or "no failure recorded"
    return f"global rank {root.global_rank} on {root.node}: {root.summary()}"


async def run_launch(cluster: Fleet, config: LaunchConfig, hooks: LaunchHooks) -> LaunchResult:
    """Run one job on every node of ``cluster`` until it succeeds or gives up;
    its output goes where ``hooks`` say.

    Raises ``ClusterError`` when a node cannot be reached or refuses the job
    (``AuthenticationFailed``, a ``ClusterError``, when a node refused this
    client's token, TLS settings or permissions), ``JobFailed`` when the job failed.
    """
    return await _Launch(cluster, config, hooks).run()
