"""``rankd status``, ``rankd logs`` and ``rankd kill``: look at and stop a job.

Shared with :mod:`rankd.client.cli_app`: the exit codes, one-line errors, node lists.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import grpc

from rankd.client.cluster import AsyncCluster, Cluster
from rankd.client.errors import JobNotFound, RankdError, refusal
from rankd.client.liveness import check_node_timeout
from rankd.client.nodes import Node, resolve_nodes
from rankd.client.report import NodeView, build_report, format_ranks
from rankd.client.results import NodeResult
from rankd.client.rpc import default_requester
from rankd.v1 import agent_pb2

__all__ = [
    "EXIT_AUTH",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_KILLED",
    "EXIT_NODE_LOST",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "cmd_kill",
    "cmd_logs",
    "cmd_status",
    "connection",
    "error",
    "exit_code_for",
    "node_error",
    "node_list",
    "node_timeout",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: An agent refused this client: token, TLS settings or permissions (no retry helps).
EXIT_AUTH = 3
#: `rankd launch`: the job was killed by another client (`rankd kill`), its lease, or
#: an agent shutting down; KILLED, not failed.
EXIT_KILLED = 4
#: `rankd launch`: a node was lost (silent for --node-timeout, or refusing
#: connections) and is the root cause of the failure.
EXIT_NODE_LOST = 5
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def error(message: str) -> None:
    print(f"rankd: error: {message}", file=sys.stderr, flush=True)


def exit_code_for(err: BaseException) -> int:
    """EXIT_AUTH for a refusal (token, TLS, permission), else EXIT_USAGE."""
    return EXIT_AUTH if refusal(err) is not None else EXIT_USAGE


def node_error(err: RankdError) -> int:
    """Print one node's error as one line (a refusal says so); its exit code."""
    error(refusal(err) or str(err))
    return exit_code_for(err)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise RankdError(f"cannot read {what} {path}: {err.strerror or err}") from None


def connection(args: argparse.Namespace) -> dict[str, Any]:
    """Cluster keyword arguments from --timeout, --token-file, --tls-* and --insecure."""
    token = None
    if args.token_file:
        token = _read(args.token_file, "token file").decode(errors="replace").strip()
        if not token:
            raise RankdError(f"token file {args.token_file} is empty")
    credentials = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        if bool(args.tls_cert) != bool(args.tls_key):
            raise RankdError("a client certificate needs both --tls-cert and --tls-key")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(args.tls_ca, "CA file") if args.tls_ca else None,
            private_key=_read(args.tls_key, "key file") if args.tls_key else None,
            certificate_chain=_read(args.tls_cert, "certificate file") if args.tls_cert else None,
        )
    return {
        "timeout": args.timeout,
        "token": token,
        "credentials": credentials,
        "insecure": args.insecure,
    }


def node_timeout(args: argparse.Namespace) -> float:
    """--node-timeout, checked (a usage error when it is not a positive number)."""
    return check_node_timeout(args.node_timeout)


def node_list(args: argparse.Namespace, environ: Mapping[str, str]) -> list[Node]:
    return resolve_nodes(
        nodes=args.nodes, hostfile=args.hostfile, environ=environ, default_port=args.port
    )


# -- status --------------------------------------------------------------------


def _state(status: Any) -> str:
    return str(agent_pb2.JobState.Name(status.state))


def _overall(states: Sequence[str]) -> str:
    for state in ("FAILED", "KILLED", "RUNNING"):
        if state in states:
            return state
    return "SUCCEEDED" if states else "UNKNOWN"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _rank_line(status: Any, rank: Any) -> str:
    offset = status.spec.rank_offset
    state = str(agent_pb2.RankState.Name(rank.state)).removeprefix("RANK_")
    text = (
        f"    rank {offset + rank.local_rank} (local {rank.local_rank}): {state:<10} pid {rank.pid}"
    )
    if rank.HasField("exit_code"):
        text += f"  exit {rank.exit_code}"
        if rank.signal_name:
            text += f" ({rank.signal_name})"
    if rank.state == agent_pb2.RANK_RUNNING:
        text += f"  rss {_mib(rank.rss_bytes)}  cpu {rank.cpu_seconds:.1f}s"
    return text


#: Jobs of at most this many ranks get a line per node and per rank by default; larger
#: ones a line per group of alike nodes (``--verbose``/``--ranks`` for the detail).
DETAIL_RANKS = 16


def _node_key(status: Any) -> tuple[Any, ...]:
    """What makes two nodes' lines alike: job state, reason, rank states, rank count."""
    states = sorted(collections.Counter(r.state for r in status.ranks).items())
    return (status.state, status.reason, status.nprocs, tuple(states))


def _group_line(node_ranks: Sequence[int], status: Any) -> str:
    """``nodes 0-4094: RUNNING, 8 ranks each`` (or what differs among the ranks)."""
    count = len(node_ranks)
    where = (
        f"node {node_ranks[0]}"
        if count == 1
        else f"nodes {format_ranks(node_ranks, limit=8)} ({count} nodes)"
    )
    each = " each" if count > 1 else ""
    by_state = collections.Counter(r.state for r in status.ranks)
    own = {agent_pb2.RUNNING: agent_pb2.RANK_RUNNING, agent_pb2.SUCCEEDED: agent_pb2.RANK_SUCCEEDED}
    ranks = f"{status.nprocs} rank{'s' * (status.nprocs != 1)}{each}"
    if set(by_state) != {own.get(status.state)}:
        parts = sorted(by_state.items())
        ranks += ": " + ", ".join(
            f"{n} {str(agent_pb2.RankState.Name(s)).removeprefix('RANK_')}" for s, n in parts
        )
    reason = f" ({status.reason})" if status.reason else ""
    return f"  {where}: {_state(status)}{reason}, {ranks}"


def _folded(results: Sequence[NodeResult[Any]], names: Sequence[str]) -> list[str]:
    """One line per group of alike nodes, then one per kind of error (O(nodes))."""
    groups: dict[tuple[Any, ...], tuple[list[int], Any]] = {}
    errors: dict[str, list[str]] = {}
    for result in results:
        if not result.ok:
            errors.setdefault(str(result.error), []).append(names[result.node_rank])
            continue
        status = result.unwrap()
        groups.setdefault(_node_key(status), ([], status))[0].append(result.node_rank)
    lines = [_group_line(nodes, status) for nodes, status in groups.values()]
    for why, where in errors.items():
        shown = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
        lines.append(f"  {len(where)} node{'s' * (len(where) != 1)} ({shown}): {why}")
    return lines


def cmd_status(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    nodes = node_list(args, environ)
    with Cluster(nodes, **connection(args)) as cluster:
        if args.run_id is None:
            return _list_jobs(cluster.list(), cluster.names)
        results = cluster.poll(args.run_id, fresh=True)  # one Poll each: no Watch to open and close
        clocks = [c.clock.best for c in cluster.clients]
    found = [r for r in results if r.ok]
    if not found:
        return _not_found(args.run_id, results)
    statuses = [r.unwrap() for r in found]
    world = sum(s.nprocs for s in statuses)
    attempt = max(s.restart_count for s in statuses)
    overall = _overall([_state(s) for s in statuses])
    where = f"{world} rank{'s' * (world != 1)} on {len(found)} node{'s' * (len(found) != 1)}"
    print(f"job {args.run_id}: {overall}, attempt {attempt}, {where}")
    show_ranks = args.ranks or world <= DETAIL_RANKS
    per_node = show_ranks or args.verbose
    if not per_node:
        print("\n".join(_folded(results, cluster.names)))
    views: list[tuple[NodeView, Any]] = []
    for result in results:
        name = cluster.names[result.node_rank]
        if not result.ok:
            if per_node:
                print(f"  node {name}: {result.error}")
            continue
        status = result.unwrap()
        offset, nprocs = status.spec.rank_offset, status.nprocs
        node_rank = offset // nprocs if nprocs else result.node_rank
        if per_node:
            ranks = format_ranks(range(offset, offset + nprocs))
            reason = f" ({status.reason})" if status.reason else ""
            print(
                f"  node {name} (node rank {node_rank}, global ranks {ranks}): "
                f"{_state(status)}{reason}"
            )
        if show_ranks:
            for rank in status.ranks:
                print(_rank_line(status, rank))
        view = NodeView(str(result.node), name, node_rank, offset, clocks[result.node_rank])
        views.append((view, status))
    if any(status.failures for _, status in views):
        # killed by a client, not failed: say who, and name no root cause
        reasons = [s.reason for _, s in views if s.state == agent_pb2.KILLED]
        killed_by = reasons[0] if overall == "KILLED" and reasons else ""
        report = build_report(
            args.run_id, views, world_size=world, restart_count=attempt, killed_by=killed_by
        )
        print(report.format())
    return EXIT_OK


def _not_found(run_id: str, results: Sequence[NodeResult[Any]]) -> int:
    if all(isinstance(r.error, JobNotFound) for r in results):
        error(f"job {run_id} not found on any of the {len(results)} nodes")
        return EXIT_USAGE
    errors = [r.error for r in results if r.error and not isinstance(r.error, JobNotFound)]
    return max((node_error(err) for err in errors), default=EXIT_USAGE)


def _list_jobs(results: Sequence[NodeResult[list[Any]]], names: Sequence[str]) -> int:
    jobs: dict[str, list[Any]] = {}
    codes = [node_error(r.error) for r in results if r.error is not None]
    for result in results:
        for status in result.value or ():
            jobs.setdefault(status.job_id, []).append(status)
    if codes and not jobs:
        return max(codes)
    print(f"{'JOB':<24} {'STATE':<10} {'ATTEMPT':>7} {'NODES':>5} {'RANKS':>6}  STARTED")
    for job_id, statuses in jobs.items():
        started = min(s.start_time for s in statuses)
        when = datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M:%S") if started else "-"
        print(
            f"{job_id:<24} {_overall([_state(s) for s in statuses]):<10} "
            f"{max(s.restart_count for s in statuses):>7} {len(statuses):>5} "
            f"{sum(s.nprocs for s in statuses):>6}  {when}"
        )
    return EXIT_OK


# -- logs ----------------------------------------------------------------------


def cmd_logs(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    nodes = node_list(args, environ)
    return asyncio.run(_logs(args, nodes))


async def _logs(args: argparse.Namespace, nodes: Sequence[Node]) -> int:
    async with AsyncCluster(nodes, **connection(args)) as cluster:
        results = await cluster.poll(args.run_id)
        if not any(r.ok for r in results):
            return _not_found(args.run_id, results)
        streams = ["stdout"] if args.stdout else ["stderr"] if args.stderr else []
        wanted = set(args.ranks) if args.ranks is not None else None
        plans: list[tuple[int, list[int]]] = []
        for result in results:
            if result.error is not None:
                if not isinstance(result.error, JobNotFound):
                    node_error(result.error)
                continue
            status = result.unwrap()
            offset = status.spec.rank_offset
            local = [r for r in range(status.nprocs) if wanted is None or offset + r in wanted]
            if local:
                plans.append((result.node_rank, local))

        async def show(node_rank: int, local: list[int]) -> None:
            client = cluster.clients[node_rank]
            async with client.stream(
                args.run_id,
                follow=args.follow,
                ranks=local,
                streams=streams,
                contains=args.grep,
                restart_count=args.attempt,
            ) as lines:
                async for chunk in lines.chunks():  # rendered a block at a time
                    sys.stdout.write(chunk.text)
                sys.stdout.flush()

        if args.follow:
            await asyncio.gather(*(show(n, local) for n, local in plans))
        else:
            for n, local in plans:
                await show(n, local)
    return EXIT_OK


# -- kill ----------------------------------------------------------------------


def cmd_kill(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    nodes = node_list(args, environ)
    with Cluster(nodes, **connection(args)) as cluster:
        results = cluster.kill(
            args.run_id,
            signal=args.signal,
            timeout=args.grace,
            escalate=not args.no_escalate,
            requester=args.requester or default_requester("rankd kill"),
        )
        names = cluster.names
    if not any(r.ok for r in results):
        return _not_found(args.run_id, results)
    code = EXIT_OK
    for result in results:
        name = names[result.node_rank]
        if isinstance(result.error, JobNotFound):
            print(f"{name}: job not found")
        elif result.error is not None:
            code = max(code, node_error(result.error))
        else:
            status = result.unwrap()
            print(f"{name}: {_state(status)} ({status.nprocs} ranks)")
    return code
