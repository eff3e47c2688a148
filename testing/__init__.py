"""Real local rankd agents for integration tests, and the pytest plugin's machinery.

    from rankd.testing import local_cluster

    with local_cluster(2, max_jobs=10) as cluster:      # 2 `rankd-agent` processes
        cluster.launch([sys.executable, "train.py"], nproc_per_node=2)

With pytest, the ``rankd_cluster`` and ``rankd_agents`` fixtures of
:mod:`rankd.testing.plugin` do the same per test. Lower level: :func:`start_agent`
(one agent), :func:`local_agents` (N agents, no client). Needs no pytest.
"""

from __future__ import annotations

from rankd.testing.agents import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    AgentStartError,
    LeftoverProcessWarning,
    LocalAgent,
    agent_command,
    local_agents,
    start_agent,
    stop_agents,
)
from rankd.testing.cluster import AgentsFactory, ClusterFactory, local_cluster
from rankd.testing.options import agent_args

__all__ = [
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "AgentStartError",
    "AgentsFactory",
    "ClusterFactory",
    "LeftoverProcessWarning",
    "LocalAgent",
    "agent_args",
    "agent_command",
    "local_agents",
    "local_cluster",
    "start_agent",
    "stop_agents",
]
