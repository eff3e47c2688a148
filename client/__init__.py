"""The rankd client: one agent, many agents, and the ``rankd`` CLI.

    from client import Cluster, JobFailed

    with Cluster(["node01:29600", "node02:29600"]) as cluster:
        try:
            cluster.launch(["python3", "train.py"], nproc_per_node=8, max_restarts=1)
        except JobFailed as failed:
            print(failed.report)

It depends on the wire contract (``protos``) only, never on the agent.
"""

from __future__ import annotations

import os as _os

# gRPC's C core logs handshake failures on stderr before rankd can explain them; a CLI
# must print one readable line. Must be set before grpc is first imported.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from client.agent_client import (
    AgentClient,
    AsyncAgentClient,
    AsyncLogStream,
    AsyncStatusWatch,
    LogStream,
    StatusWatch,
)
from client.clock import ClockEstimator, ClockSample
from client.cluster import AsyncCluster, Cluster
from client.errors import (
    AgentError,
    AgentTimeout,
    AgentUnavailable,
    AlreadyExists,
    AuthenticationFailed,
    ClusterError,
    InvalidArgument,
    JobFailed,
    JobNotFound,
    NodeListError,
    RankdError,
)
from client.nodes import DEFAULT_PORT, Node, expand_hostlist, parse_nodes, read_hostfile
from client.report import FailureReport, RankFailure
from client.results import NodeResult
from client.torchrun import LaunchConfig, LaunchResult, OutputLine, Progress, torchrun_env
from protos.rankd.v1.agent_pb2 import JobSpec, JobStatus, LogLine

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
    "JobNotFound",
    "JobSpec",
    "JobStatus",
    "LaunchConfig",
    "LaunchResult",
    "LogLine",
    "LogStream",
    "Node",
    "NodeListError",
    "NodeResult",
    "OutputLine",
    "Progress",
    "RankFailure",
    "RankdError",
    "StatusWatch",
    "expand_hostlist",
    "parse_nodes",
    "read_hostfile",
    "torchrun_env",
]
