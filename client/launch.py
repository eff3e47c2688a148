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
  ``restart_count + 1`` starts, up to ``max_restarts`` times (every restart counts,
  for a failed rank as for a lost node).
- Membership (:mod:`rankd.client.membership`, :mod:`rankd.client.elastic`): each
  attempt runs on its members, in group-rank order; global ranks, ``WORLD_SIZE``,
  ``GROUP_RANK``, ``MASTER_ADDR`` (the first member's host) and ``MASTER_PORT`` are
  laid out per attempt. Without ``nnodes`` every node is a member and must answer.
  With ``nnodes=(MIN, MAX)`` the job starts on the first MAX nodes that answer (the
  rest are spares); before each restart every node is checked within the node
  timeout, and the next attempt runs on the members that answer plus spares up to
  MAX, if there are at least MIN. Each change is one event (and ``on_membership``).
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
from collections.abc import Sequence

import rankd.client.rpc as rpc
from rankd.client.attempt import Attempt, Fleet
from rankd.client.elastic import Elastic, MemberFleet, count, root_line
from rankd.client.errors import (
    JobFailed,
    JobKilled,
    JobNotFound,
    RankdError,
    cluster_error,
)
from rankd.client.membership import Membership
from rankd.client.output import RankOutput
from rankd.client.report import FailureReport
from rankd.client.streams import StreamOptions, follow_to_end
from rankd.client.torchrun import (
    LaunchConfig,
    LaunchHooks,
    LaunchResult,
    new_run_id,
    torchrun_defaults,
    torchrun_env,
)
from rankd.client.watches import heartbeat_for
from rankd.v1 import agent_pb2

__all__ = ["Fleet", "run_launch"]

logger = logging.getLogger(__name__)


class _Launch:
    """The state of one ``launch`` call."""

    def __init__(self, cluster: Fleet, config: LaunchConfig, hooks: LaunchHooks) -> None:
        self.fleet = cluster  # every node, spares included
        self.cluster: Fleet = cluster  # the current attempt's members (see use())
        self.config = config
        self.hooks = hooks
        self.run_id = config.run_id or new_run_id()
        self.nnodes = len(cluster.nodes)
        self.world_size = 0  # known once the first membership is laid out (use())
        self.elastic = Elastic(cluster, config, self.event, hooks.on_membership)
        self.interval = hooks.progress_interval if hooks.on_progress else 2.0
        self.output = RankOutput(config, hooks)

    @property
    def membership(self) -> Membership:
        return self.elastic.membership

    def use(self, membership: Membership) -> None:
        """Make ``membership`` the layout of the attempt that starts next."""
        self.elastic.use(membership)
        self.cluster = MemberFleet(self.fleet, membership)
        self.nnodes = membership.nnodes
        self.world_size = membership.world_size
        self.output.use(membership, self.cluster.names)

    # -- output ---------------------------------------------------------------

    def event(self, message: str) -> None:
        if self.hooks.on_event is not None:
            self.hooks.on_event(message)
        else:
            logger.info("%s", message)

    # -- specs ----------------------------------------------------------------

    def spec(self, node_rank: int) -> agent_pb2.JobSpec:
        """The spec of group rank ``node_rank`` in the current membership."""
        cfg = self.config
        layout = self.membership
        nproc, offset = layout.members[node_rank].nproc, layout.members[node_rank].rank_offset
        common, per_rank = torchrun_env(
            node_rank=node_rank,
            nnodes=self.nnodes,
            nproc_per_node=nproc,
            master_addr=layout.master_addr,
            master_port=layout.master_port,
            run_id=self.run_id,
            restart_count=layout.restart_count,
            max_restarts=cfg.max_restarts,
            role_name=cfg.role_name,
            env=cfg.env,
            rank_offset=offset,
            world_size=self.world_size,
        )
        spec = agent_pb2.JobSpec(
            job_id=self.run_id,
            nprocs=nproc,
            entrypoint=cfg.cmd[0],
            args=list(cfg.cmd[1:]),
            env=common,
            default_env=torchrun_defaults(nproc),
            numa_binding=cfg.numa_binding,
            cpu_bind=cfg.cpu_bind,
            cwd=cfg.cwd,
            role_name=cfg.role_name,
            restart_count=layout.restart_count,
            redirects=cfg.redirects,
            tee=cfg.tee,
            local_ranks_filter=list(cfg.local_ranks_filter),
            # ${host} is ours; the agent renders the rest the same way.
            log_line_prefix_template=self.output.template.replace(
                "${host}", self.cluster.names[node_rank]
            ),
            rank_offset=offset,
            kill_timeout=cfg.kill_timeout,
            lease=0.0 if cfg.detach else cfg.lease,
        )
        for local_rank, env in per_rank.items():
            spec.rank_env[local_rank].env.update(env)
        return spec

    def stream_options(self, restart_count: int) -> StreamOptions:
        """What a node's log stream of this attempt follows: the terminal's lines."""
        streams = self.output.streams()
        options = (
            follow_to_end()  # nothing for the terminal: follow only for the end
            if not streams
            else StreamOptions(
                follow=True, ranks=list(self.config.local_ranks_filter), streams=streams
            )
        )
        options["restart_count"] = restart_count
        options["heartbeat"] = heartbeat_for(self.cluster.node_timeout)  # a sign of life
        return options

    # -- the run ----------------------------------------------------------------

    async def run(self) -> LaunchResult:
        self.use(await self.elastic.first())
        if self.config.detach:
            self.event(
                f"starting job {self.run_id} detached, {count(self.world_size, 'rank')} on "
                f"{count(self.nnodes, 'node')} ({self.membership.master()})"
            )
            statuses = await self.start()
            return LaunchResult(
                self.run_id,
                0,
                self.world_size,
                tuple(statuses),
                detached=True,
                memberships=tuple(self.elastic.history),
            )
        try:
            return await self.attempts()
        except asyncio.CancelledError:
            self.event(f"interrupted: killing job {self.run_id} on {self.nnodes} nodes")
            await asyncio.shield(self.kill_everywhere())
            raise

    async def attempts(self) -> LaunchResult:
        """Attempts one after the other until one succeeds or the launch gives up."""
        while True:
            restart_count = self.membership.restart_count
            report = await self.attempt()
            elastic = self.elastic
            if not isinstance(report, FailureReport):
                elastic.record("succeeded")
                self.event(f"job {self.run_id} succeeded (attempt {restart_count})")
                return LaunchResult(
                    self.run_id,
                    restart_count,
                    self.world_size,
                    report,
                    memberships=tuple(elastic.history),
                )
            elastic.record(f"{report.state.lower()}: {root_line(report)}")
            if report.state == "KILLED":
                raise JobKilled(elastic.with_history(report))
            if restart_count >= self.config.max_restarts:
                raise JobFailed(elastic.with_history(report))
            nxt = elastic.next_membership(report)
            if isinstance(nxt, str):
                self.event(nxt)
                raise JobFailed(elastic.with_history(report, nxt))
            self.event(
                f"attempt {restart_count} failed ({root_line(report)}); restarting "
                f"(restart {restart_count + 1} of {self.config.max_restarts})"
            )
            previous = self.membership
            self.use(nxt)
            await self.clear_joiners(previous)

    async def clear_joiners(self, previous: Membership) -> None:
        """Stop what is left of this job on the nodes that join now (a node that comes
        back may still run an old attempt until its lease ends)."""
        old = set(previous.indices)
        joiners = [m.group_rank for m in self.membership.members if m.index not in old]
        if joiners:
            await self.kill_everywhere(only=joiners, why="a node joins the next attempt")

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

    async def start(self) -> list[agent_pb2.JobStatus]:
        """Start the current attempt on every member."""
        specs = [self.spec(i) for i in range(self.nnodes)]

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

    async def attempt(self) -> tuple[agent_pb2.JobStatus, ...] | FailureReport:
        """Run the current attempt on its members: each one's final status, or the
        report. A failed attempt ends with a check of every node (:mod:`elastic`):
        a member that does not answer is lost, and the report says so."""
        restart_count = self.membership.restart_count
        self.event(
            f"attempt {restart_count}: starting job {self.run_id}, "
            f"{count(self.world_size, 'rank')} on {count(self.nnodes, 'node')} "
            f"({self.membership.counts()}{_binding(self.config)}, {self.membership.master()})"
        )
        await self.start()
        for watch in self.cluster.watches_of(self.run_id) or ():
            if not watch.live:  # a spare's watch backs off while it lacks the job
                watch.kick()
        run = Attempt(self, restart_count)
        outcome = await run.run()
        if not isinstance(outcome, FailureReport) or outcome.state == "KILLED":
            return outcome
        return await self.elastic.check(run, outcome)


async def run_launch(cluster: Fleet, config: LaunchConfig, hooks: LaunchHooks) -> LaunchResult:
    """Run one job on every node of ``cluster`` until it succeeds or gives up;
    its output goes where ``hooks`` say.

    Raises ``ClusterError`` when a node cannot be reached or refuses the job
    (``AuthenticationFailed``, a ``ClusterError``, when a node refused this
    client's token, TLS settings or permissions), ``JobFailed`` when the job failed,
    ``ValueError`` (nothing started) when ``nnodes`` asks for more nodes than listed.
    """
    return await _Launch(cluster, config, hooks).run()


def _binding(cfg: LaunchConfig) -> str:
    if cfg.numa_binding:
        return f", numa binding {cfg.numa_binding}"
    return f", cpu bind {cfg.cpu_bind}" if cfg.cpu_bind else ""
