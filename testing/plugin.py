"""The rankd pytest plugin (entry point ``pytest11: rankd``, loaded wherever rankd is
installed; ``-p no:rankd`` turns it off).

Fixtures:

- ``rankd_cluster``: ``rankd_cluster(nodes=2, **agent_options) -> rankd.client.Cluster``
  over that many fresh local agents (see :func:`rankd.testing.local_cluster`).
- ``rankd_agents``: ``rankd_agents(nodes=2, **agent_options) -> list[LocalAgent]``, the
  agents alone (address, pid, log dir, output), for tests that drive them otherwise.

Both may be called several times in a test. Whatever they started is stopped after
the test, passed or failed: clusters closed, agents sent SIGTERM (their ranks stopped),
SIGKILL after a bound. The agents' logs stay under pytest's temporary directory
(``<basetemp>/rankd<N>/node<i>``), kept as pytest keeps ``tmp_path``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from rankd.testing.agents import LocalAgent, agent_command, local_agents
from rankd.testing.cluster import AgentsFactory, ClusterFactory, local_cluster
from rankd.testing.options import agent_args

if TYPE_CHECKING:
    from rankd.client import Cluster

__all__ = ["rankd_agents", "rankd_cluster"]


@pytest.fixture
def rankd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterFactory]:
    """A factory of clusters of local agents: ``rankd_cluster(nodes=2, **agent_options)``
    returns a connected ``rankd.client.Cluster``; all is torn down after the test."""
    with contextlib.ExitStack() as stack:

        def make(nodes: int = 2, **agent_options: object) -> Cluster:
            log_dir = tmp_path_factory.mktemp("rankd")
            return stack.enter_context(local_cluster(nodes, log_dir=log_dir, **agent_options))

        yield make


@pytest.fixture
def rankd_agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentsFactory]:
    """A factory of local agents: ``rankd_agents(nodes=2, **agent_options)`` returns
    the started ``LocalAgent``\\ s; all are stopped after the test."""
    with contextlib.ExitStack() as stack:

        def make(nodes: int = 2, **agent_options: object) -> list[LocalAgent]:
            args = agent_args(agent_options, agent_command())
            log_dir = tmp_path_factory.mktemp("rankd")
            return stack.enter_context(local_agents(nodes, *args, log_dir=log_dir))

        yield make
