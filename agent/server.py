"""`rankd-agent`: build the gRPC server (`create_server`) apart from running it (`main`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection

from rankd.agent import __version__, resources, wire
from rankd.agent.errors import RankdError
from rankd.agent.follow import FOLLOW_MODES
from rankd.agent.logfmt import configure_logging
from rankd.agent.metrics import MetricsInterceptor, StreamStats, serve_metrics
from rankd.agent.security import TokenInterceptor, check_bind_policy, load_token, server_credentials
from rankd.agent.service import NodeAgentService
from rankd.agent.specs import Limits
from rankd.agent.supervisor import Supervisor
from rankd.v1 import agent_pb2

__all__ = ["DEFAULT_PORT", "AgentServer", "create_server", "default_log_dir", "main"]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 29500 + 100  # 29600: beside torchrun's 29500 rendezvous default
#: The agent's own signals: each starts an orderly teardown, as torch's elastic agent
#: handles TORCHELASTIC_SIGNALS_TO_HANDLE; a second one during it SIGKILLs every rank.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: Seconds RPCs under way get to finish once every job was stopped; streams that would
#: go on (a Watch without until_ended) are cancelled then.
STOP_GRACE = 0.2
DEFAULT_MIN_FREE_SPACE = "100M"
SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"].full_name
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def default_log_dir() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "rankd", "logs")


@dataclass(frozen=True)
class AgentServer:
    """A started agent server: the gRPC server, the supervisor it serves, its port."""

    server: grpc.aio.Server
    supervisor: Supervisor
    port: int

    async def stop(self, timeout: float = 10.0) -> None:
        """Kill every job of the supervisor (SIGTERM, SIGKILL after `timeout`), then stop
        the server."""
        await self.supervisor.close(timeout)
        await self.server.stop(grace=STOP_GRACE)


async def create_server(
    address: str = "127.0.0.1:0",
    *,
    supervisor: Supervisor | None = None,
    log_dir: str | None = None,
    token: str | None = None,
    credentials: grpc.ServerCredentials | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    metrics: tuple[str, int] | None = None,
) -> AgentServer:
    """A started server bound to `address` (port 0 = any free port).

    Serves `supervisor` (or a new one over `log_dir`), bound to the running loop first
    (`Supervisor.bind`); with `token`, every call but health checks needs
    `authorization: Bearer <token>`; with `credentials`, TLS. Stop with
    `AgentServer.stop`, which also kills the supervisor's jobs."""
    if supervisor is None:
        supervisor = Supervisor(log_dir or default_log_dir())
    supervisor.bind()
    stats = StreamStats()
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if token:
        interceptors.append(TokenInterceptor(token))
    if metrics is not None:
        registry, metrics_port = serve_metrics(metrics[0], metrics[1], supervisor, stats)
        interceptors.append(MetricsInterceptor(registry))
        logger.info("metrics on http://%s:%d/metrics", metrics[0], metrics_port)
        print(f"metrics on {metrics[0]}:{metrics_port}", file=sys.stderr, flush=True)
    server = grpc.aio.server(
        interceptors=interceptors or None,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            # clients ping every second or more to detect lost nodes (rankd launch
            # --node-timeout): allowed, never answered with GOAWAY too_many_pings
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    wire.register(NodeAgentService(supervisor, stats), server)
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as err:
        raise RankdError(f"cannot listen on {address}: {err}") from None
    if port == 0:
        raise RankdError(f"cannot listen on {address}: address in use or not available")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return AgentServer(server, supervisor, port)


async def create_health_server(address: str) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with only the standard health service, for probes that cannot
    speak TLS (Kubernetes' gRPC probe). It runs no commands and needs no token."""
    server = grpc.aio.server()
    servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RankdError(f"cannot listen on {address} for health checks")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return server, port


def _parser() -> argparse.ArgumentParser:
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
        metavar="PATH",
        help="only these executables may be started (repeatable; default: any)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=MAX_MESSAGE_BYTES,
        help="largest request accepted (default: %(default)s)",
    )


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
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="the agent's own log records: text, or one JSON object per line with job_id "
        "and local_rank where they apply (default: %(default)s)",
    )


class _Stopper:
    """The agent's signals (STOP_SIGNALS), handled on the loop whatever disposition the
    agent inherited (`cmd &` in a script ignores SIGINT and SIGQUIT, nohup SIGHUP): the
    first asks for the teardown; any later one, during it, SIGKILLs every rank at once."""

    def __init__(self) -> None:
        self.signal = 0
        self.event = asyncio.Event()
        self.supervisor: Supervisor | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self, sig)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # (inherited blocked?)

    def __call__(self, sig: int) -> None:
        if not self.signal:
            self.signal = sig
            self.event.set()
            return
        logger.warning("%s during the teardown: SIGKILL to every rank now", _name(sig))
        if self.supervisor is not None:
            self.supervisor.kill_now()


async def _serve(args: argparse.Namespace) -> int:
    """Run the agent until a signal; returns that signal's number once every job stopped."""
    # Handlers first: a SIGTERM right after "listening on" must still stop cleanly.
    stopper = _Stopper()
    stopper.install(asyncio.get_running_loop())
    # logged once listening: the first lines on stderr are others' (warnings, health on)
    fd_limits = resources.raise_fd_limit()
    token = load_token(args.token_file) if args.token_file else None
    credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    warning = check_bind_policy(
        args.host, token=token is not None, tls=credentials is not None, insecure=args.insecure
    )
    if warning:
        logger.warning("%s", warning)
        print(warning, file=sys.stderr, flush=True)
    log_dir = args.log_dir or default_log_dir()
    host = args.host
    stopper.supervisor = supervisor = _supervisor(args, log_dir)
    agent = await create_server(
        _join(host, args.port),
        supervisor=supervisor,
        token=token,
        credentials=credentials,
        max_message_bytes=args.max_message_bytes,
        metrics=None if args.metrics_port is None else (args.metrics_host, args.metrics_port),
    )
    health_server = None
    if args.health_port is not None:
        health_address = _join(host, args.health_port)
        health_server, health_port = await create_health_server(health_address)
        print(f"health on {host}:{health_port}", file=sys.stderr, flush=True)
    # What is alive now lives as long as the agent (modules, the server, restored jobs):
    # frozen, the collector's full passes skip it; they would otherwise walk all of it
    # and stall the loop each time.
    gc.collect()
    gc.freeze()
    print(f"listening on {host}:{agent.port}", flush=True)
    logger.info(
        "rankd-agent %s serving on %s:%d, logs in %s", __version__, host, agent.port, log_dir
    )
    _log_fd_limits(*fd_limits)

    await stopper.event.wait()
    logger.info(
        "stopping on %s: SIGTERM to every rank, SIGKILL after %g s",
        _name(stopper.signal),
        args.shutdown_timeout,
    )
    await agent.stop(timeout=args.shutdown_timeout)
    if health_server is not None:
        await health_server.stop(grace=STOP_GRACE)
    logger.info("stopped on %s", _name(stopper.signal))
    return stopper.signal


def _name(sig: int) -> str:
    return signal.Signals(sig).name


def _log_fd_limits(before: int, now: int, hard: int) -> None:
    if now != before:
        logger.info("open files limit: soft %d raised to the hard limit %d", before, now)
    else:
        logger.info("open files limit: soft %d, hard %d", now, hard)


def _size(text: str) -> int:
    try:
        return resources.parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _supervisor(args: argparse.Namespace, log_dir: str) -> Supervisor:
    """The agent's supervisor: a child subreaper with a guardian, as the flags say."""
    return Supervisor(
        log_dir,
        limits=Limits(max_nprocs=args.max_nprocs),
        base_env=_worker_env(),
        subreaper=True,
        guardian=True,
        max_jobs=args.max_jobs,
        max_running_ranks=args.max_running_ranks,
        allowed_entrypoints=args.allow_entrypoint,
        log_follow=args.log_follow,
        min_free_space=args.min_free_space,
    )


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _worker_env() -> dict[str, str]:
    """The environment ranks inherit: the agent's, minus the agent's own settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RANKD_")}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent. Exits 2, with one line on stderr, when it cannot start; stopped by
    a signal, it ends by that same signal once every job stopped (see `_end_by`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.log_follow not in FOLLOW_MODES:  # a default from the environment
        parser.error(
            f"RANKD_LOG_FOLLOW must be one of {', '.join(FOLLOW_MODES)}, not {args.log_follow!r}"
        )
    configure_logging(args.log_level, args.log_format)
    try:
        sig = asyncio.run(_serve(args))
    except RankdError as err:
        print(f"rankd-agent: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"rankd-agent: error: {err}", file=sys.stderr)
        return 2
    return _end_by(sig)


def _end_by(sig: int) -> int:
    """End this process by `sig`'s default action, as a program that does not catch it
    would, so that whoever started it sees which signal stopped it: a shell's `$?` is
    128+N, Popen's returncode -N, and systemd counts SIGTERM, SIGINT and SIGHUP as a clean
    stop. Without the core dump of SIGQUIT's default action. Returns 128+N if it lives
    on."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if sig == signal.SIGQUIT:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(
                resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1])
            )
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    return 128 + sig


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
