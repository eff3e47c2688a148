"""`rankd stacks`: the folded Python stacks of a job's ranks on every node."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping

from rankd.client.cli_jobs import EXIT_FAILED, EXIT_OK, EXIT_USAGE, connection, error, node_list
from rankd.client.cluster import Cluster
from rankd.client.errors import JobNotFound

__all__ = ["cmd_stacks"]


def cmd_stacks(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Print the folded stacks (or JSON); 1 when no rank could be sampled."""
    if not (math.isfinite(args.sample_timeout) and 0 < args.sample_timeout <= 300):
        error("--sample-timeout must be between 0 and 300 seconds")
        return EXIT_USAGE
    nodes = node_list(args, environ)
    with Cluster(nodes, **connection(args)) as cluster:
        folded = cluster.stacks(
            args.run_id,
            ranks=set(args.ranks) if args.ranks else None,
            native=args.native,
            timeout=args.sample_timeout,
        )
    errors = [why for _, why in folded.node_errors]
    if errors and len(errors) == len(nodes) and all(isinstance(e, JobNotFound) for e in errors):
        error(f"job {args.run_id} not found on any of the {len(nodes)} nodes")
        return EXIT_USAGE
    if args.json:
        print(json.dumps(folded.as_json(), indent=2))
    else:
        for line in folded.lines():
            print(line)
    return EXIT_OK if folded.groups else EXIT_FAILED
