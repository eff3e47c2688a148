"""The ``rankd`` command: launch a job on many agents; status, logs and kill.

Exit codes: 0 success (``launch --detach``: the job started); 1 the job failed
(report on stderr); 2 usage errors, unreachable nodes and bad requests (one line on
stderr); 3 an agent refused this client: missing or wrong token, TLS settings that
do not match the agent's, or a request its policy denies (one line per node on
stderr); 4 (launch) the job was killed by another client, its lease or an agent's
shutdown (a KILLED report naming who, on stderr); 5 (launch) a node was lost and is
the root cause (the report names it); 130 after Ctrl-C (the job is killed on every
node first); 143 after SIGTERM (likewise).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run ``rankd``; returns the exit code."""
    # gRPC's C core logs handshake failures on stderr before rankd can explain them, and
    # reads this once, when grpc is first imported: the commands import it below.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from rankd.client.cli_app import run

    return run(argv, environ)


if __name__ == "__main__":
    raise SystemExit(main())
