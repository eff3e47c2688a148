"""rankd: a node agent that starts, watches, streams and stops the ranks of distributed jobs.

- `rankd.agent`: the node agent (`rankd-agent`);
- `rankd.client`: the client and the `rankd` CLI (`from rankd.client import Cluster`);
- `rankd.v1`: the generated wire contract (`rankd/v1/agent.proto`);
- `rankd.testing`: real local agents for integration tests.
"""

__version__ = "0.1.0"
