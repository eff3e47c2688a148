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

from rankd.agent import __version__, flags, resources, security, wire
from rankd.agent.errors import RankdError
from rankd.agent.flags import DEFAULT_PORT
from rankd.agent.follow import FOLLOW_MODES
from rankd.agent.logfmt import configure_logging
from rankd.agent.metrics import MetricsEndpoint, MetricsInterceptor, StreamStats, metrics_registry
from rankd.agent.security import DEFAULT_LIMITS, ConnectionLimits
from rankd.agent.service import NodeAgentService
from rankd.agent.specs import Limits
from rankd.agent.stacks import Sampler, find_sampler
from rankd.agent.supervisor import Supervisor
from rankd.v1 import agent_pb2

__all__ = ["DEFAULT_PORT", "AgentServer", "create_server", "default_log_dir", "main"]

logger = logging.getLogger(__name__)

#: The agent's own signals: each starts an orderly teardown, as torch's elastic agent
#: handles TORCHELASTIC_SIGNALS_TO_HANDLE; a second one during it SIGKILLs every rank.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: Seconds RPCs under way get to finish once every job was stopped; streams that would
#: go on (a Watch without until_ended) are cancelled then.
STOP_GRACE = 0.2
SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"].full_name
#: Largest answer sent: a Stream's packed blocks and a Poll of many ranks.
MAX_SEND_BYTES = 16 * 1024 * 1024


def default_log_dir() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "rankd", "logs")


@dataclass(frozen=True)
class AgentServer:
    """A started agent server: the gRPC server, the supervisor it serves, its port."""

    server: grpc.aio.Server
    supervisor: Supervisor
    port: int
    metrics: MetricsEndpoint | None = None

    async def stop(self, timeout: float = 10.0) -> None:
        """Kill every job of the supervisor (SIGTERM, SIGKILL after `timeout`), then stop
        the servers."""
        await self.supervisor.close(timeout)
        await self.server.stop(grace=STOP_GRACE)
        if self.metrics is not None:
            await self.metrics.close()


def _add_services(
    server: grpc.aio.Server, supervisor: Supervisor, stats: StreamStats, stacks_sampler: str | None
) -> AsyncHealthServicer:
    """The agent's service, health and reflection on `server`; returns the health servicer."""
    sampler = Sampler(find_sampler(stacks_sampler), children=supervisor.children)
    if sampler.program is None and stacks_sampler:
        logger.warning("--stacks-sampler %s is not executable: no stacks", stacks_sampler)
    wire.register(NodeAgentService(supervisor, stats, sampler), server)
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return health_servicer


async def create_server(
    address: str = "127.0.0.1:0",
    *,
    supervisor: Supervisor | None = None,
    log_dir: str | None = None,
    token: str | None = None,
    credentials: grpc.ServerCredentials | None = None,
    metrics: tuple[str, int] | None = None,
    limits: ConnectionLimits = DEFAULT_LIMITS,
    stacks_sampler: str | None = None,
) -> AgentServer:
    """A started server bound to `address` (port 0 = any free port).

    Serves `supervisor` (or a new one over `log_dir`), bound to the running loop first
    (`Supervisor.bind`); with `token`, every call but health checks needs
    `authorization: Bearer <token>`; with `credentials`, TLS; peers get the room of
    `limits`; Stacks runs `stacks_sampler` (None: py-spy beside this Python or on
    PATH). Stop with `AgentServer.stop`, which also kills the supervisor's jobs."""
    if supervisor is None:
        supervisor = Supervisor(log_dir or default_log_dir())
    supervisor.bind()
    stats = StreamStats()
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if token:
        interceptors.append(security.TokenInterceptor(token))
    endpoint = None
    if metrics is not None:
        endpoint = MetricsEndpoint(metrics_registry(supervisor, stats), *metrics)
        interceptors.append(MetricsInterceptor(endpoint.registry))
    server = grpc.aio.server(
        interceptors=interceptors or None,
        options=[
            *limits.options(),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 0),
            # clients ping every second or more to detect lost nodes (rankd launch
            # --node-timeout): allowed, never answered with GOAWAY too_many_pings
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    health_servicer = _add_services(server, supervisor, stats, stacks_sampler)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as err:
        raise RankdError(f"cannot listen on {address}: {err}") from None
    if port == 0:
        raise RankdError(f"cannot listen on {address}: address in use or not available")
    if endpoint is not None:
        await endpoint.start()
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return AgentServer(server, supervisor, port, endpoint)


async def create_health_server(
    address: str, limits: ConnectionLimits = DEFAULT_LIMITS
) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with only the standard health check, for probes that cannot
    speak TLS (Kubernetes' gRPC probe). It runs no commands and needs no token; Watch,
    a stream that would hold a connection for good, is UNIMPLEMENTED there."""
    server = grpc.aio.server(
        interceptors=[security.OpenMethodsOnly()],
        options=limits.options(),
    )
    servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RankdError(f"cannot listen on {address} for health checks")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return server, port


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
    token = security.load_token(args.token_file) if args.token_file else None
    credentials = security.server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    warning = security.check_bind_policy(
        args.host, token=token is not None, tls=credentials is not None, insecure=args.insecure
    )
    if warning:
        logger.warning("%s", warning)
        print(warning, file=sys.stderr, flush=True)
    log_dir = args.log_dir or default_log_dir()
    host = args.host
    stopper.supervisor = supervisor = _supervisor(args, log_dir)
    limits = ConnectionLimits(
        args.max_connections, args.max_streams_per_connection, args.max_message_bytes
    )
    agent = await create_server(
        _join(host, args.port),
        supervisor=supervisor,
        token=token,
        credentials=credentials,
        metrics=None if args.metrics_port is None else (args.metrics_host, args.metrics_port),
        limits=limits,
        stacks_sampler=args.stacks_sampler,
    )
    health_server = None
    if args.health_port is not None:
        health_server, health_port = await create_health_server(
            _join(host, args.health_port), limits
        )
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
    logger.info("%s", limits)

    await stopper.event.wait()
    logger.info(
        "stopping on %s: SIGTERM to every rank, SIGKILL after %g s",
        _name(stopper.signal),
        args.shutdown_timeout,
    )
    await agent.stop(timeout=args.shutdown_timeout)
    if health_server is not None:
        await health_server.stop(grace=STOP_GRACE)
    await _let_calls_finish()
    logger.info("stopped on %s", _name(stopper.signal))
    return stopper.signal


async def _let_calls_finish(timeout: float = 1.0) -> None:
    """Give gRPC's own tasks for the calls the stopped servers cancelled (a stream still
    filtering, say) up to `timeout` s to end: cancelled by the loop's close instead, each
    prints a bare CancelledError traceback from gRPC's code."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=timeout)


def _name(sig: int) -> str:
    return signal.Signals(sig).name


def _log_fd_limits(before: int, now: int, hard: int) -> None:
    if now != before:
        logger.info("open files limit: soft %d raised to the hard limit %d", before, now)
    else:
        logger.info("open files limit: soft %d, hard %d", now, hard)


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
        allowed_env=args.allow_env,
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
    parser = flags.parser()
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
