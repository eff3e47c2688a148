"""`rankd-agent`: build the gRPC server (`create_server`) apart from running it (`main`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection

from rankd.agent import __version__, wire
from rankd.agent.errors import RankdError
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
        await self.server.stop(grace=1.0)


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

    Serves `supervisor` (or a new one over `log_dir`); with `token`, every call but
    health checks needs `authorization: Bearer <token>`; with `credentials`, TLS.
    Stop with `AgentServer.stop`, which also kills the supervisor's jobs."""
    if supervisor is None:
        supervisor = Supervisor(log_dir or default_log_dir())
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
        help="on SIGTERM/SIGINT, seconds to wait after SIGTERM to the ranks before SIGKILL "
        "(default: %(default)s)",
    )


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
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


async def _serve(args: argparse.Namespace) -> int:
    # Handlers first: a SIGTERM right after "listening on" must still stop cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
    agent = await create_server(
        _join(host, args.port),
        supervisor=_supervisor(args, log_dir),
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

    await stop.wait()
    logger.info("shutting down: stopping every job")
    await agent.stop(timeout=args.shutdown_timeout)
    if health_server is not None:
        await health_server.stop(grace=0.5)
    logger.info("stopped")
    return 0


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
    )


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _worker_env() -> dict[str, str]:
    """The environment ranks inherit: the agent's, minus the agent's own settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RANKD_")}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        return asyncio.run(_serve(args))
    except RankdError as err:
        print(f"rankd-agent: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"rankd-agent: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
