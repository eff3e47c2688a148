"""`local_cluster`: N real agents on loopback and a connected `rankd.client.Cluster`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from rankd.testing.agents import LocalAgent, agent_command, local_agents
from rankd.testing.options import agent_args

if TYPE_CHECKING:  # the client (gRPC) loads when a cluster is made, not with the plugin
    from rankd.client import Cluster

__all__ = ["AgentsFactory", "ClusterFactory", "local_cluster"]


@contextlib.contextmanager
def local_cluster(
    nodes: int = 2, *, log_dir: Path | str | None = None, **agent_options: object
) -> Iterator[Cluster]:
    """Start ``nodes`` `rankd-agent` processes on 127.0.0.1 and yield a ``Cluster`` over
    them (node ``i`` is agent ``i``, logging to ``<log_dir>/node<i>``; ``log_dir`` None:
    a temporary directory, removed afterwards).

    ``agent_options`` are the agent's flags as keywords (``max_jobs=3`` is
    ``--max-jobs 3``; ``True`` gives a bare flag, a list repeats it); an option
    rankd-agent does not have is a ``TypeError`` before anything starts. With
    ``token_file``, the cluster sends that token.

    On exit: the cluster is closed, every agent gets SIGTERM (they stop their ranks),
    SIGKILL after ``STOP_TIMEOUT``; no agent, guardian or rank is left running. When an
    agent fails to start, those already started are stopped and ``AgentStartError``
    (with its stderr tail) is raised."""
    args = agent_args(agent_options, agent_command())
    token_file = agent_options.get("token_file")
    token = Path(str(token_file)).read_text().strip() if token_file else None
    from rankd.client import Cluster

    with (
        local_agents(nodes, *args, log_dir=log_dir) as agents,
        Cluster([a.address for a in agents], token=token) as cluster,
    ):
        yield cluster


class ClusterFactory(Protocol):
    """The ``rankd_cluster`` fixture: ``rankd_cluster(nodes=2, **agent_options)``."""

    def __call__(self, nodes: int = 2, **agent_options: object) -> Cluster: ...


class AgentsFactory(Protocol):
    """The ``rankd_agents`` fixture: ``rankd_agents(nodes=2, **agent_options)``."""

    def __call__(self, nodes: int = 2, **agent_options: object) -> list[LocalAgent]: ...
