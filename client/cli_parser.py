"""The ``rankd`` command line: one parser per command, the connection flags shared by all.

Parsing only: :mod:`rankd.client.cli_app` runs the command the parsed arguments name
(``args.command``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias, TypeVar

from rankd.client.liveness import DEFAULT_NODE_TIMEOUT
from rankd.client.membership import parse_nnodes
from rankd.client.nodes import DEFAULT_PORT
from rankd.client.rpc import DEFAULT_TIMEOUT
from rankd.client.topology import parse_cpu_bind, parse_nproc, parse_numa_binding
from rankd.client.torchrun import DEFAULT_LEASE, DEFAULT_PREFIX_TEMPLATE

__all__ = ["build_parser"]

_LAUNCH_EXAMPLES = """\
examples:
  # 2 nodes x 4 ranks; every rank gets RANK, WORLD_SIZE, MASTER_ADDR, ...
  rankd launch --nodes node01:29600,node02:29600 --nproc-per-node 4 -- python3 train.py

  # nodes of the Slurm allocation (SLURM_JOB_NODELIST), agents on the default port
  rankd launch --nproc-per-node 8 --max-restarts 2 -- python3 train.py --epochs 10

  # elastic: 3 nodes run the job, the 4th is a spare; down to 2 nodes if none is left
  rankd launch --nodes node[01-04] --nnodes 2:3 --max-restarts 3 -- python3 train.py

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
exit codes: 0 success (or, with --detach, started); 1 the job failed (report on
stderr); 2 usage error, unreachable node or bad request; 3 an agent refused this
client (token, TLS settings or its policy), or rankd refused to send the token
without TLS to a node off loopback (see --insecure); 4 the job was killed by another
client, its lease or an agent's shutdown (KILLED report on stderr); 5 a node was
lost (silent for --node-timeout or refusing connections) and is the root cause;
130 after Ctrl-C, 143 after SIGTERM (the job is stopped on every node first).
"""


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


T = TypeVar("T")


def _checked(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser that raises ValueError with a full sentence."""

    def check(text: str) -> T:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return check


def _rank_list(text: str) -> list[int]:
    """``0,2,4-7`` -> [0, 2, 4, 5, 6, 7]."""
    ranks: list[int] = []
    for item in text.split(","):
        lo, dash, hi = item.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise argparse.ArgumentTypeError(f"expected ranks like 0,2,4-7, not {text!r}")
        ranks.extend(range(int(lo), int(hi if dash else lo) + 1))
    return ranks


def _nnodes(text: str) -> tuple[int, int]:
    try:
        return parse_nnodes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
    group.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="CA certificates to verify agents: TLS (default: $RANKD_TLS_CA)",
    )
    group.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="client certificate, for mutual TLS (default: $RANKD_TLS_CERT)",
    )
    group.add_argument(
        "--tls-key",
        metavar="PEM",
        help="client private key, for mutual TLS (default: $RANKD_TLS_KEY)",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="send the token without TLS also to agents that are not on loopback "
        "(a trusted network only; prints a warning). Without it, a token without "
        "--tls-ca goes only to 127.0.0.0/8, ::1 or localhost",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="deadline of each request to an agent (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``rankd``; ``args.command`` names the command given."""
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
    for add_command in (_add_launch, _add_status, _add_logs, _add_stacks, _add_kill):
        add_command(sub)
    return parser


# What add_subparsers returns; generic only for type checkers, hence the string.
_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _command(
    sub: _Commands, name: str, summary: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    """A command's parser: ``summary`` in ``rankd --help``, the rest in its own."""
    return sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _examples(*commands: str) -> str:
    """The epilog of a command that looks at a job: examples, then the node list."""
    return "examples:\n" + "".join(f"  {c}\n" for c in commands) + "\n" + _NODES_HELP


def _add_launch(sub: _Commands) -> None:
    launch = _command(
        sub,
        "launch",
        "run a command on every node with the torchrun environment",
        "Start COMMAND as nproc-per-node local ranks on every node, with global ranks "
        "node by node (RANK = node_rank * nproc_per_node + local_rank) and the torchrun "
        "environment. Merges every rank's output, prefixed with its global rank; the "
        "first failure anywhere stops the job on every node; prints one failure report.",
        _LAUNCH_EXAMPLES + "\n" + _NODES_HELP + "\n" + _EXIT_CODES,
    )
    _add_node_args(launch)
    job = launch.add_argument_group("job")
    _add_job_args(job)
    _add_binding_args(job)
    _add_rank_env_args(job)
    _add_liveness_args(launch.add_argument_group("lost nodes and launchers"))
    _add_output_args(launch.add_argument_group("output (as torchrun)"))
    launch.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")


def _add_binding_args(job: argparse._ArgumentGroup) -> None:
    """Where ranks run on a node: torchrun's NUMA binding, srun's CPU binding."""
    job.add_argument(
        "--numa-binding",
        "--numa_binding",
        type=_checked(parse_numa_binding),
        metavar="MODE",
        help="bind each rank to the CPUs near its GPU (local rank i uses GPU i), as "
        "torchrun's --numa-binding: node, socket, exclusive or core-complex; without GPUs, "
        "ranks spread over the NUMA nodes in order. Applied by the agents, no numactl",
    )
    job.add_argument(
        "--cpu-bind",
        type=_checked(parse_cpu_bind),
        metavar="BIND",
        help="pin ranks to CPUs as srun --cpu-bind: none, cores, map_cpu:0,2,... "
        "(a CPU per local rank) or mask_cpu:0x3,... (a mask per local rank)",
    )


def _add_job_args(job: argparse._ArgumentGroup) -> None:
    """Which job, how many ranks, how often it restarts, where rank 0 listens."""
    job.add_argument(
        "--nproc-per-node",
        "--nproc_per_node",
        type=_checked(parse_nproc),
        default=1,
        metavar="N",
        help="Number of workers per node; supported values: [auto, cpu, gpu, int]. "
        "gpu: the node's GPUs; cpu: its usable CPUs; auto: its GPUs if it has any, else "
        "its CPUs; each node's agent reports its own, so nodes may run different numbers "
        "of ranks (default: %(default)s)",
    )
    job.add_argument(
        "--nnodes",
        type=_nnodes,
        metavar="NNODES",
        help="Number of nodes, or the range of nodes in form <minimum_nodes>:<maximum_nodes>. "
        "Nodes listed beyond the maximum are spares: a lost node is replaced by a spare, "
        "or the job goes on with fewer nodes, down to the minimum (default: every node)",
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
        help="Maximum number of worker group restarts before failing: on a failure (a "
        "rank's, or a lost node's), stop every node and restart the job (default: 0)",
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


def _add_rank_env_args(job: argparse._ArgumentGroup) -> None:
    """What every rank runs in, and how it is stopped."""
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


def _add_liveness_args(group: argparse._ArgumentGroup) -> None:
    """When a node counts as lost; how the job outlives (or not) this launcher."""
    group.add_argument(
        "--node-timeout",
        type=float,
        default=DEFAULT_NODE_TIMEOUT,
        metavar="SECONDS",
        help="a node from which nothing arrived for this long is lost; the job is "
        "stopped on the others (a refused connection: after about 1.5 s) "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--lease",
        type=float,
        default=DEFAULT_LEASE,
        metavar="SECONDS",
        help="the agents stop the job when this launcher has not renewed its lease for "
        "this long (it died or was cut off); 0 = no lease (default: %(default)s)",
    )
    group.add_argument(
        "--detach",
        action="store_true",
        help="start the job without a lease, print its run id and exit 0; follow it "
        "with `rankd logs -f RUN_ID`",
    )
    group.add_argument(
        "--hang-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="when no rank wrote a line for this long (CPU use does not count), the job "
        "is hung: every rank's Python stack is taken (py-spy beside the agents) and "
        "printed folded in a HUNG report, and the job is stopped; counts as a failure "
        "for --max-restarts; 0 = off (default: %(default)s)",
    )


def _add_output_args(out: argparse._ArgumentGroup) -> None:
    """torchrun's output flags: what reaches the terminal, with which prefix."""
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


def _add_status(sub: _Commands) -> None:
    status = _command(
        sub,
        "status",
        "state of a job on every node (or every job, without RUN_ID)",
        "Show a job's state: a line per group of alike nodes ('nodes 0-4094: RUNNING, "
        "8 ranks each'; a line per node and rank for jobs of up to 16 ranks), and the "
        "failure report when it failed. Without RUN_ID, list the jobs the agents hold.",
        _examples("rankd status --nodes node[01-02] my-run", "rankd status"),
    )
    status.add_argument("run_id", nargs="?", metavar="RUN_ID")
    status.add_argument("--verbose", "-v", action="store_true", help="a line per node")
    status.add_argument(
        "--ranks", action="store_true", help="a line per node and per rank (pid, exit, RSS, CPU)"
    )
    _add_node_args(status)


def _add_logs(sub: _Commands) -> None:
    logs = _command(
        sub,
        "logs",
        "print (or follow) a job's log lines from every node",
        "Print a job's log lines from every node, prefixed as at launch "
        "(global ranks). With -f, follow live until the job ends.",
        _examples("rankd logs my-run --ranks 0-3 --stderr", "rankd logs -f my-run"),
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


def _add_stacks(sub: _Commands) -> None:
    stacks = _command(
        sub,
        "stacks",
        "Python stacks of a job's ranks on every node, folded (find the rank that hangs)",
        "Take the Python stack of every thread of every live rank on every node at "
        "once (py-spy beside each agent: pip install 'rankd[stacks]'), fold identical "
        "stacks across ranks and print each group once, smallest group first: the rank "
        "that holds the others up comes first. Frames are innermost last. Ranks that "
        "could not be sampled are listed with the reason.",
        _examples(
            "rankd stacks my-run",
            "rankd stacks my-run --ranks 0,4-7 --native",
            "rankd stacks my-run --json > stacks.json",
        ),
    )
    stacks.add_argument("run_id", metavar="RUN_ID")
    stacks.add_argument(
        "--ranks", type=_rank_list, metavar="RANKS", help="global ranks, e.g. 0,4-7; default all"
    )
    stacks.add_argument(
        "--native", action="store_true", help="include C/C++ frames (py-spy --native; slower)"
    )
    stacks.add_argument("--json", action="store_true", help="print the folded groups as JSON")
    stacks.add_argument(
        "--sample-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds each agent may take to sample its ranks (default: %(default)s)",
    )
    _add_node_args(stacks)


def _add_kill(sub: _Commands) -> None:
    kill = _command(
        sub,
        "kill",
        "stop a job on every node",
        "Send a signal to every rank of a job on every node; SIGKILL after "
        "--kill-timeout unless --no-escalate.",
        _examples(
            "rankd kill my-run",
            "rankd kill my-run --signal SIGUSR1 --no-escalate   # a preemption notice",
        ),
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
    kill.add_argument(
        "--requester",
        metavar="NAME",
        help="who asks, as the job's reason and its launcher's report will say "
        "(default: rankd kill on HOST (pid N))",
    )
    _add_node_args(kill)
