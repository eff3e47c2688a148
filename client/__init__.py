"""The rankd client: one agent, many agents, and the ``rankd`` CLI.

    from rankd.client import Cluster, JobFailed

    with Cluster(["node01:29600", "node02:29600"]) as cluster:
        try:
            cluster.launch(["python3", "train.py"], nproc_per_node=8, max_restarts=1)
        except JobFailed as failed:
            print(failed.report)

It depends on the wire contract (``rankd.v1``) only, never on the agent. Names load on
first use, so importing the package imports no gRPC and changes no process-wide setting.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rankd.client.agent_client import AgentClient, AsyncAgentClient
    from rankd.client.clock import ClockEstimator, ClockSample
    from rankd.client.cluster import AsyncCluster, Cluster
    from rankd.client.errors import (
        AgentError,
        AgentTimeout,
        AgentUnavailable,
        AlreadyExists,
        AuthenticationFailed,
        ClusterError,
        InvalidArgument,
        JobFailed,
        JobKilled,
        JobNotFound,
        NodeListError,
        NodeLostError,
        PlaintextTokenRefused,
        RankdError,
    )
    from rankd.client.membership import Member, Membership, MembershipChange
    from rankd.client.nodes import DEFAULT_PORT, Node, expand_hostlist, parse_nodes, read_hostfile
    from rankd.client.report import FailureReport, NodeLost, RankFailure
    from rankd.client.results import NodeResult
    from rankd.client.streams import AsyncLogStream, AsyncStatusWatch, LogStream, StatusWatch
    from rankd.client.torchrun import LaunchConfig, LaunchResult, OutputLine, Progress, torchrun_env
    from rankd.v1.agent_pb2 import JobSpec, JobStatus, LogLine

_WHERE = {
    "AgentClient": "rankd.client.agent_client",
    "AgentError": "rankd.client.errors",
    "AgentTimeout": "rankd.client.errors",
    "AgentUnavailable": "rankd.client.errors",
    "AlreadyExists": "rankd.client.errors",
    "AsyncAgentClient": "rankd.client.agent_client",
    "AsyncCluster": "rankd.client.cluster",
    "AsyncLogStream": "rankd.client.streams",
    "AsyncStatusWatch": "rankd.client.streams",
    "AuthenticationFailed": "rankd.client.errors",
    "ClockEstimator": "rankd.client.clock",
    "ClockSample": "rankd.client.clock",
    "Cluster": "rankd.client.cluster",
    "ClusterError": "rankd.client.errors",
    "DEFAULT_PORT": "rankd.client.nodes",
    "FailureReport": "rankd.client.report",
    "InvalidArgument": "rankd.client.errors",
    "JobFailed": "rankd.client.errors",
    "JobKilled": "rankd.client.errors",
    "JobNotFound": "rankd.client.errors",
    "JobSpec": "rankd.v1.agent_pb2",
    "JobStatus": "rankd.v1.agent_pb2",
    "LaunchConfig": "rankd.client.torchrun",
    "LaunchResult": "rankd.client.torchrun",
    "LogLine": "rankd.v1.agent_pb2",
    "LogStream": "rankd.client.streams",
    "Member": "rankd.client.membership",
    "Membership": "rankd.client.membership",
    "MembershipChange": "rankd.client.membership",
    "Node": "rankd.client.nodes",
    "NodeListError": "rankd.client.errors",
    "NodeLost": "rankd.client.report",
    "NodeLostError": "rankd.client.errors",
    "NodeResult": "rankd.client.results",
    "OutputLine": "rankd.client.torchrun",
    "PlaintextTokenRefused": "rankd.client.errors",
    "Progress": "rankd.client.torchrun",
    "RankFailure": "rankd.client.report",
    "RankdError": "rankd.client.errors",
    "StatusWatch": "rankd.client.streams",
    "expand_hostlist": "rankd.client.nodes",
    "parse_nodes": "rankd.client.nodes",
    "read_hostfile": "rankd.client.nodes",
    "torchrun_env": "rankd.client.torchrun",
}

__all__ = [
    "DEFAULT_PORT",
    "AgentClient",
    "AgentError",
    "AgentTimeout",
    "AgentUnavailable",
    "AlreadyExists",
    "AsyncAgentClient",
    "AsyncCluster",
    "AsyncLogStream",
    "AsyncStatusWatch",
    "AuthenticationFailed",
    "ClockEstimator",
    "ClockSample",
    "Cluster",
    "ClusterError",
    "FailureReport",
    "InvalidArgument",
    "JobFailed",
    "JobKilled",
    "JobNotFound",
    "JobSpec",
    "JobStatus",
    "LaunchConfig",
    "LaunchResult",
    "LogLine",
    "LogStream",
    "Member",
    "Membership",
    "MembershipChange",
    "Node",
    "NodeListError",
    "NodeLost",
    "NodeLostError",
    "NodeResult",
    "OutputLine",
    "PlaintextTokenRefused",
    "Progress",
    "RankFailure",
    "RankdError",
    "StatusWatch",
    "expand_hostlist",
    "parse_nodes",
    "read_hostfile",
    "torchrun_env",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
