"""The ``rankd`` command's parser and its launch command; the entry point is
:func:`rankd.client.cli.main`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import IO

from rankd.client.agent_client import DEFAULT_TIMEOUT
from rankd.client.cli_jobs import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    cmd_kill,
    cmd_logs,
    cmd_status,
    connection,
    error,
    exit_code_for,
    node_list,
)
from rankd.client.cluster import Cluster
from rankd.client.errors import AuthenticationFailed, JobFailed, RankdError, refusal
from rankd.client.nodes import DEFAULT_PORT
from rankd.client.torchrun import DEFAULT_PREFIX_TEMPLATE, OutputLine, Progress

__all__ = ["EXIT_AUTH", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "run"]


_LAUNCH_EXAMPLES = """\
examples:
  # 2 nodes x 4 ranks; every rank gets RANK, WORLD_SIZE, MASTER_ADDR, ...
  rankd launch --nodes node01:29600,node02:29600 --nproc-per-node 4 -- python3 train.py

  # nodes of the Slurm allocation (SLURM_JOB_NODELIST), agents on the default port
  rankd launch --nproc-per-node 8 --max-restarts 2 -- python3 train.py --epochs 10

  # a hostfile (one host[:port] per line), only local rank 0 on the terminal
  rankd launch --hostfile hosts.txt --nproc-per-node 8 --local-ranks-filter 0 -- ./bench

The command runs as given: COMMAND is an executable on each node (absolute path
or a name on the agent's PATH), e.g. `python3 train.py`, not `train.py`.
Logs of every rank stay on the nodes: see `rankd logs RUN_ID`.
"""

_NODES_HELP = f"""\
nodes: --nodes takes host[:port] entries separated by commas, with Slurm
ranges allowed (node[01-04,07]:29600); --hostfile a file of one host[:port]
per line (# comments). Without either, SLURM_JOB_NODELIST is used. Ports
default to --port ({DEFAULT_PORT}, rankd-agent's default).
"""


_EXIT_CODES = """\
exit codes: 0 success; 1 the job failed (report on stderr); 2 usage error,
unreachable node or bad request; 3 an agent refused this client (token, TLS
settings or its policy); 130 after Ctrl-C, 143 after SIGTERM (the job is
stopped on every node first).
"""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: kill the job everywhere, then exit."""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 0,1,2, not {text!r}"
        ) from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, not {text!r}")
    return values


def _rank_list(text: str) -> list[int]:
    """``0,2,4-7`` -> [0, 2, 4, 5, 6, 7]."""
    ranks: list[int] = []
    for item in text.split(","):
        lo, dash, hi = item.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise argparse.ArgumentTypeError(f"expected ranks like 0,2,4-7, not {text!r}")
        ranks.extend(range(int(lo), int(hi if dash else lo) + 1))
    return ranks


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, value


def _add_node_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("nodes")
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--nodes",
        metavar="LIST",
        help="agents as host[:port],... with Slurm ranges (node[01-04]:29600)",
    )
    where.add_argument("--hostfile", metavar="FILE", help="file of host[:port], one per line")
    group.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="agent port for nodes given without one (default: %(default)s)",
    )
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the bearer token of agents started with --token-file "
        "(default: $RANKD_TOKEN_FILE)",
    )
    group.add_argument("--tls-ca", metavar="PEM", help="CA certificates to verify agents (TLS)")
    group.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS)")
    group.add_argument("--tls-key", metavar="PEM", help="client private key (mutual TLS)")
    group.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="deadline of each request to an agent (default: %(default)s)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankd",
        description="Run and inspect distributed jobs on rankd agents (one per node).",
        epilog=_NODES_HELP
        + "\n"
        + _EXIT_CODES
        + "\nRun `rankd COMMAND --help` for each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    launch = sub.add_parser(
        "launch",
        help="run a command on every node with the torchrun environment",
        description=(
            "Start COMMAND as nproc-per-node local ranks on every node, with global ranks "
            "node by node (RANK = node_rank * nproc_per_node + local_rank) and the torchrun "
            "environment. Merges every rank's output, prefixed with its global rank; the "
            "first failure anywhere stops the job on every node; prints one failure report."
        ),
        epilog=_LAUNCH_EXAMPLES + "\n" + _NODES_HELP + "\n" + _EXIT_CODES,
        formatter_class=fmt,
    )
    _add_node_args(launch)
    job = launch.add_argument_group("job")
    job.add_argument(
        "--nproc-per-node",
        "--nproc_per_node",
        type=int,
        default=1,
        metavar="N",
        help="local ranks per node (default: %(default)s)",
    )
    job.add_argument(
        "--run-id",
        "--run_id",
        metavar="ID",
        help="job id = TORCHELASTIC_RUN_ID, the same on every node (default: random)",
    )
    job.add_argument(
        "--max-restarts",
        "--max_restarts",
        type=int,
        default=0,
        metavar="K",
        help="on failure, stop every node and restart the job up to K times (default: 0)",
    )
    job.add_argument(
        "--master-addr",
        "--master_addr",
        metavar="HOST",
        help="MASTER_ADDR (default: the first node's host)",
    )
    job.add_argument(
        "--master-port",
        "--master_port",
        type=int,
        metavar="PORT",
        help="MASTER_PORT (default: a free port the first node's agent reports)",
    )
    job.add_argument(
        "--role",
        default="default",
        metavar="NAME",
        help="ROLE_NAME, also in the log prefix (default: %(default)s)",
    )
    job.add_argument(
        "--env",
        action="append",
        type=_env_pair,
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every rank (repeatable)",
    )
    job.add_argument("--cwd", default="", metavar="DIR", help="working directory on the nodes")
    job.add_argument(
        "--kill-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="grace between SIGTERM and SIGKILL when stopping ranks (default: %(default)s)",
    )
    out = launch.add_argument_group("output (as torchrun)")
    out.add_argument(
        "--redirects",
        "-r",
        default="0",
        metavar="STD",
        help="streams kept off the terminal (still in the node's log files): 0 none, "
        "1 stdout, 2 stderr, 3 both, or per local rank like 0:3,1:0 (default: 0)",
    )
    out.add_argument(
        "--tee",
        "-t",
        default="0",
        metavar="STD",
        help="streams shown on the terminal even when redirected; same values (default: 0)",
    )
    out.add_argument(
        "--local-ranks-filter",
        "--local_ranks_filter",
        type=_int_list,
        metavar="RANKS",
        help="only these local ranks (on every node) reach the terminal, e.g. 0,1",
    )
    out.add_argument(
        "--log-line-prefix-template",
        "--log_line_prefix_template",
        metavar="T",
        help="line prefix; placeholders ${rank} (global), ${local_rank}, ${role_name}, "
        "${host} (default: " + DEFAULT_PREFIX_TEMPLATE + ")",
    )
    launch.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    launch.set_defaults(func=_cmd_launch)

    status = sub.add_parser(
        "status",
        help="state of a job on every node (or every job, without RUN_ID)",
        description="Show a job's state on every node, per rank; the failure report when it "
        "failed. Without RUN_ID, list the jobs the agents hold.",
        epilog="examples:\n  rankd status --nodes node[01-02] my-run\n  rankd status\n\n"
        + _NODES_HELP,
        formatter_class=fmt,
    )
    status.add_argument("run_id", nargs="?", metavar="RUN_ID")
    _add_node_args(status)
    status.set_defaults(func=cmd_status)

    logs = sub.add_parser(
        "logs",
        help="print (or follow) a job's log lines from every node",
        description="Print a job's log lines from every node, prefixed as at launch "
        "(global ranks). With -f, follow live until the job ends.",
        epilog="examples:\n  rankd logs my-run --ranks 0-3 --stderr\n  rankd logs -f my-run\n\n"
        + _NODES_HELP,
        formatter_class=fmt,
    )
    logs.add_argument("run_id", metavar="RUN_ID")
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    logs.add_argument(
        "--ranks", type=_rank_list, metavar="RANKS", help="global ranks, e.g. 0,2,4-7"
    )
    which = logs.add_mutually_exclusive_group()
    which.add_argument("--stdout", action="store_true", help="stdout lines only")
    which.add_argument("--stderr", action="store_true", help="stderr lines only")
    logs.add_argument("--grep", default="", metavar="TEXT", help="only lines containing TEXT")
    logs.add_argument(
        "--attempt", type=int, metavar="N", help="attempt (restart count) to read; default latest"
    )
    _add_node_args(logs)
    logs.set_defaults(func=cmd_logs)

    kill = sub.add_parser(
        "kill",
        help="stop a job on every node",
        description="Send a signal to every rank of a job on every node; SIGKILL after "
        "--kill-timeout unless --no-escalate.",
        epilog="examples:\n  rankd kill my-run\n  rankd kill my-run --signal SIGUSR1 "
        "--no-escalate   # a preemption notice\n\n" + _NODES_HELP,
        formatter_class=fmt,
    )
    kill.add_argument("run_id", metavar="RUN_ID")
    kill.add_argument(
        "--signal", default="SIGTERM", help="signal name or number (default: %(default)s)"
    )
    kill.add_argument(
        "--kill-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        dest="grace",
        help="seconds before SIGKILL (default: the agent's, 30)",
    )
    kill.add_argument(
        "--no-escalate", action="store_true", help="only deliver the signal; no SIGKILL, no wait"
    )
    _add_node_args(kill)
    kill.set_defaults(func=cmd_kill)
    return parser


def run(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run ``rankd``; returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2), already printed
        return int(done.code or 0)
    func: Callable[[argparse.Namespace, Mapping[str, str]], int] = args.func
    env = os.environ if environ is None else environ
    if args.token_file is None:
        args.token_file = env.get("RANKD_TOKEN_FILE") or None
    try:
        return func(args, env)
    except _Terminated:
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except AuthenticationFailed as err:
        error(str(err))
        return EXIT_AUTH
    except RankdError as err:
        error(refusal(err) or str(err))
        return exit_code_for(err)
    except ValueError as err:
        error(str(err))
        return EXIT_USAGE


# -- launch --------------------------------------------------------------------


class _Terminal:
    """Writes rank lines, notices and (on a terminal) a live status line."""

    def __init__(self, stdout: IO[str], stderr: IO[str], live: bool) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.live = live
        self._status = ""
        self._lock = threading.Lock()

    def _clear(self) -> None:
        if self._status:
            self.stderr.write("\r\x1b[K")

    def _draw(self) -> None:
        if self._status:
            self.stderr.write(self._status)
            self.stderr.flush()

    def line(self, out: OutputLine) -> None:
        target = self.stderr if out.stream == "stderr" else self.stdout
        with self._lock:
            self._clear()
            self.stderr.flush()
            target.write(f"{out.prefix}{out.text}\n")
            target.flush()
            self._draw()

    def event(self, message: str) -> None:
        with self._lock:
            self._clear()
            self.stderr.write(f"rankd: {message}\n")
            self.stderr.flush()
            self._draw()

    def progress(self, progress: Progress) -> None:
        with self._lock:
            self._clear()
            self._status = f"rankd: {progress.line()}"
            self._draw()

    def finish(self) -> None:
        with self._lock:
            self._clear()
            self._status = ""
            self.stderr.flush()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cmd_launch(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ValueError("no command: rankd launch [OPTIONS] -- COMMAND [ARGS...]")
    nodes = node_list(args, environ)
    terminal = _Terminal(sys.stdout, sys.stderr, live=sys.stderr.isatty())
    with _sigterm_as_interrupt(), Cluster(nodes, **connection(args)) as cluster:
        try:
            cluster.launch(
                cmd,
                nproc_per_node=args.nproc_per_node,
                run_id=args.run_id,
                max_restarts=args.max_restarts,
                redirects=args.redirects,
                tee=args.tee,
                local_ranks_filter=args.local_ranks_filter or (),
                log_line_prefix_template=args.log_line_prefix_template,
                master_addr=args.master_addr,
                master_port=args.master_port,
                role_name=args.role,
                env=dict(args.env),
                cwd=args.cwd,
                kill_timeout=args.kill_timeout,
                on_line=terminal.line,
                on_event=terminal.event,
                on_progress=terminal.progress if terminal.live else None,
            )
        except JobFailed as failed:
            terminal.finish()
            print(failed.report.format(), file=sys.stderr, flush=True)
            return EXIT_FAILED
        except KeyboardInterrupt:
            terminal.finish()
            raise
        terminal.finish()
    return EXIT_OK
