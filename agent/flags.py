"""The `rankd-agent` command line: its flags, grouped by what they govern."""

from __future__ import annotations

import argparse
import os

from rankd.agent import __version__, resources, security
from rankd.agent.follow import FOLLOW_MODES
from rankd.agent.specs import Limits

__all__ = ["DEFAULT_MIN_FREE_SPACE", "DEFAULT_PORT", "parser"]

DEFAULT_PORT = 29500 + 100  # 29600: beside torchrun's 29500 rendezvous default
DEFAULT_MIN_FREE_SPACE = "100M"


def parser() -> argparse.ArgumentParser:
    """The parser of `rankd-agent`."""
    parser = argparse.ArgumentParser(
        prog="rankd-agent",
        description=(
            "The rankd node agent: a gRPC server (rankd.v1.NodeAgent) that starts, watches, "
            "streams and kills the local ranks of distributed jobs on this node. "
            "Run one per node. Its first stdout line is 'listening on HOST:PORT'."
        ),
        epilog="Example: rankd-agent --port 29600 --log-dir /var/log/rankd",
    )
    _add_serving_flags(parser)
    _add_limit_flags(parser)
    _add_security_flags(parser)
    _add_observability_flags(parser)
    parser.add_argument("--version", action="version", version=f"rankd-agent {__version__}")
    return parser


def _add_serving_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="port to bind; 0 picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--log-dir",
        default=None,
        help="where jobs' logs go (default: $XDG_STATE_HOME/rankd/logs or "
        "~/.local/state/rankd/logs)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the agent's own log level (default: %(default)s)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="on SIGTERM, SIGINT, SIGHUP or SIGQUIT, seconds to wait after SIGTERM to the "
        "ranks before SIGKILL; a second signal sends SIGKILL at once (default: %(default)s)",
    )


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--min-free-space",
        type=_size,
        default=DEFAULT_MIN_FREE_SPACE,
        metavar="SIZE",
        help="refuse a Start (RESOURCE_EXHAUSTED) while the log directory's file system "
        "has less free; suffixes K, M, G (powers of 1024); 0 = no check (default: "
        "%(default)s)",
    )
    parser.add_argument(
        "--log-follow",
        choices=FOLLOW_MODES,
        default=os.environ.get("RANKD_LOG_FOLLOW", "auto"),
        help="how log files are followed: auto (inotify, polling every 25 ms where it "
        "cannot be had) or poll (default: $RANKD_LOG_FOLLOW or auto)",
    )
    parser.add_argument(
        "--max-jobs",
        type=int,
        default=1000,
        help="jobs held in memory; past that, the job that ended longest ago is forgotten "
        "(its logs and job.json stay on disk) (default: %(default)s)",
    )
    parser.add_argument(
        "--max-nprocs",
        type=int,
        default=Limits.max_nprocs,
        help="ranks per job (default: %(default)s)",
    )
    parser.add_argument(
        "--max-running-ranks",
        type=int,
        default=4096,
        help="ranks running at once over all jobs (default: %(default)s)",
    )
    parser.add_argument(
        "--allow-entrypoint",
        action="append",
        default=None,
        metavar="ENTRY",
        help="only this program may be started: an absolute path, optionally followed by "
        "the arguments that begin every rank's command line, e.g. '/usr/bin/python3 "
        "/opt/train.py'; also refuses job variables that load code (LD_*, PYTHONPATH, "
        "BASH_ENV, ...). A guard against mistakes, not a sandbox (repeatable; default: "
        "any program, any variable)",
    )
    parser.add_argument(
        "--allow-env",
        action="append",
        default=[],
        metavar="NAME",
        help="with --allow-entrypoint: let jobs set this variable that loads code (repeatable)",
    )
    security.add_connection_flags(parser)


def _add_security_flags(parser: argparse.ArgumentParser) -> None:
    sec = parser.add_argument_group(
        "security",
        "Any address but loopback needs --token-file and --tls-cert/--tls-key "
        "(or --insecure on a trusted network).",
    )
    sec.add_argument(
        "--token-file", help="file holding the bearer token clients must send (mode 600)"
    )
    sec.add_argument("--tls-cert", help="PEM certificate chain of this agent")
    sec.add_argument("--tls-key", help="PEM private key of this agent")
    sec.add_argument(
        "--tls-client-ca", help="PEM CA bundle: require client certificates signed by it (mTLS)"
    )
    sec.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address without token and TLS (loud warning)",
    )


def _add_observability_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics over HTTP on this port (0 = any free port; "
        "the address is printed on stderr as 'metrics on HOST:PORT')",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the metrics endpoint (default: %(default)s)",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="also serve grpc.health.v1 alone, plaintext, on this port of --host (for "
        "probes that cannot do TLS, e.g. Kubernetes gRPC probes)",
    )
    parser.add_argument(
        "--stacks-sampler",
        metavar="PATH",
        help="the py-spy executable that Stacks (`rankd stacks`, --hang-timeout) runs "
        "(default: py-spy beside this Python, else on PATH; pip install 'rankd[stacks]')",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="the agent's own log records: text, or one JSON object per line with job_id "
        "and local_rank where they apply (default: %(default)s)",
    )


def _size(text: str) -> int:
    try:
        return resources.parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
