"""The RPCs of ``rankd.v1.NodeAgent`` as data, shared by the blocking and asyncio clients.

Each unary RPC is built once here as a :class:`Unary` (method, request, deadline,
whether its answer carries the agent's clock); :class:`AgentClient` sends it on a
blocking channel, :class:`AsyncAgentClient` on an asyncio one, and both read the
answer the same way. :class:`Endpoint` turns a failed RPC into the client's typed
error, with a hint when TLS settings are the likely cause.

The token never leaves this machine in the clear: :func:`check_token_transport`
(called by :meth:`Endpoint.of`, the one place the ``authorization`` metadata is
made) refuses a token on a plaintext channel to a target that is not loopback or a
unix socket, unless the caller says ``insecure``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import grpc
from google.protobuf.message import Message

from rankd.client.errors import (
    AgentError,
    AgentUnavailable,
    PlaintextTokenRefused,
    agent_error,
    name_nodes,
)
from rankd.client.liveness import Liveness
from rankd.v1 import agent_pb2

__all__ = [
    "CHANNEL_OPTIONS",
    "DEFAULT_STREAM_RETRIES",
    "DEFAULT_TIMEOUT",
    "Endpoint",
    "Unary",
    "check_token_transport",
    "default_requester",
    "info",
    "is_local_target",
    "is_tls_misconfiguration",
    "kill",
    "list_jobs",
    "poll",
    "renew",
    "start",
    "watch",
]

logger = logging.getLogger(__name__)

#: Deadline of one unary RPC, seconds.
DEFAULT_TIMEOUT = 10.0
#: Reconnects a stream makes after UNAVAILABLE before it gives up.
DEFAULT_STREAM_RETRIES = 6

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

# Kill answers after the ranks are dead: up to the kill timeout (30 s unset).
_AGENT_KILL_TIMEOUT = 30.0

R = TypeVar("R", bound=Message)
Metadata = tuple[tuple[str, str], ...] | None


@dataclass(frozen=True)
class Unary(Generic[R]):
    """One unary RPC: the stub method, its request, how much longer than the
    client's timeout its answer may take, and where the answer carries the agent's
    clock (``agent_time``, a sample for :mod:`rankd.client.clock`)."""

    method: str
    request: Message
    extra_timeout: float = 0.0
    agent_time: Callable[[R], float] | None = None
    deadline: float | None = None
    """Seconds; when set, the deadline of this call instead of the client's timeout."""


def _agent_time(
    resp: agent_pb2.PollResponse
    | agent_pb2.InfoResponse
    | agent_pb2.RenewResponse
    | agent_pb2.StartResponse
    | agent_pb2.KillResponse,
) -> float:
    return resp.agent_time  # 0 from an agent older than the field: no sample


def start(spec: agent_pb2.JobSpec) -> Unary[agent_pb2.StartResponse]:
    """Start: idempotent on ``spec.job_id``; the answer carries the agent's clock."""
    return Unary("Start", agent_pb2.StartRequest(spec=spec), agent_time=_agent_time)


def poll(job_id: str) -> Unary[agent_pb2.PollResponse]:
    """Poll: the job's status, the agent's clock and the status version."""
    return Unary("Poll", agent_pb2.PollRequest(job_id=job_id), agent_time=_agent_time)


def info() -> Unary[agent_pb2.InfoResponse]:
    """Info: who the agent is, its clock, a free port."""
    return Unary("Info", agent_pb2.InfoRequest(), agent_time=_agent_time)


def stacks(
    job_id: str, local_ranks: Sequence[int] = (), *, native: bool = False, timeout: float = 0.0
) -> Unary[agent_pb2.StacksResponse]:
    """Stacks: the Python stacks of the job's live ranks (``local_ranks``; empty: all),
    each sampled within ``timeout`` seconds (0: the agent's default, 10 s)."""
    request = agent_pb2.StacksRequest(
        job_id=job_id, local_ranks=list(local_ranks), native=native, timeout=timeout
    )
    return Unary("Stacks", request, extra_timeout=(timeout or 10.0) + 5.0)


def renew(job_id: str, *, deadline: float | None = None) -> Unary[agent_pb2.RenewResponse]:
    """Renew: the job's lease (JobSpec.lease) starts over; the answer carries the
    agent's clock."""
    return Unary(
        "Renew", agent_pb2.RenewRequest(job_id=job_id), agent_time=_agent_time, deadline=deadline
    )


def default_requester(program: str | None = None) -> str:
    """Who a Kill names when the caller names nobody: ``rankd kill on host01 (pid 4242)``."""
    name = program or os.path.basename(sys.argv[0] or "") or "python"
    return f"{name} on {socket.gethostname()} (pid {os.getpid()})"


def list_jobs() -> Unary[agent_pb2.ListResponse]:
    """List: every job the agent holds."""
    return Unary("List", agent_pb2.ListRequest())


def kill(
    job_id: str,
    *,
    signal: str | int = "SIGTERM",
    timeout: float | None = None,
    escalate: bool = True,
    requester: str | None = None,
    deadline: float | None = None,
) -> Unary[agent_pb2.KillResponse]:
    """Kill: answered once the ranks are dead, so the deadline grows by the kill
    timeout (the agent's 30 s when unset) unless ``escalate`` is False. ``requester``
    names who asks (default: :func:`default_requester`); ``deadline`` replaces the
    client's timeout (the kill timeout is still added)."""
    req = agent_pb2.KillRequest(
        job_id=job_id,
        signal=str(signal),
        no_escalate=not escalate,
        requester=(default_requester() if requester is None else requester)[:256],
    )
    if timeout is not None:
        req.timeout = timeout
    wait = (_AGENT_KILL_TIMEOUT if timeout is None else timeout) if escalate else 0.0
    return Unary("Kill", req, extra_timeout=wait, deadline=deadline, agent_time=_agent_time)


def watch(job_id: str, *, until_ended: bool, heartbeat: float) -> agent_pb2.WatchRequest:
    """The request of a Watch stream."""
    return agent_pb2.WatchRequest(job_id=job_id, until_ended=until_ended, heartbeat=heartbeat)


def _tls_hint(details: str, tls: bool) -> str:
    """What a person can do about a connection that TLS settings likely broke, or ""."""
    text = details.lower()
    if "wrong_version_number" in text:
        return "the agent does not speak TLS here (started without --tls-cert?)"
    if tls and any(mark in text for mark in ("handshake", "certificate", "verification")):
        return (
            "TLS handshake failed: the agent's certificate must be signed by the CA given "
            "(--tls-ca) and name the address used"
        )
    if tls and "socket closed" in text:
        return (
            "the agent closed the connection after the TLS handshake: an agent started with "
            "--tls-client-ca needs a client certificate signed by that CA (--tls-cert/--tls-key)"
        )
    if not tls and "socket closed" in text:
        return "the agent closed the connection: if it serves TLS, give its CA (--tls-ca)"
    return ""


def is_tls_misconfiguration(err: grpc.RpcError) -> bool:
    """A certificate the client rejects: retrying cannot help."""
    details_fn = getattr(err, "details", None)
    text = str(details_fn() or "").lower() if callable(details_fn) else ""
    return "certificate_verify_failed" in text or "verification check failed" in text


def _host_of(authority: str) -> str:
    """The host of ``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` ("" if malformed);
    a bare IPv6 literal (more than one colon) is its own host."""
    if authority.startswith("["):
        host, closed, _ = authority[1:].partition("]")
        return host if closed else ""
    if authority.count(":") == 1:
        return authority.partition(":")[0]
    return authority


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_local_target(target: str) -> bool:
    """True when the gRPC ``target`` can only reach this machine: a unix socket
    (``unix:``, ``unix-abstract:``), or hosts that are all loopback literals
    (127.0.0.0/8, ``::1``) or ``localhost``, also under ``dns:``, ``ipv4:`` and
    ``ipv6:``.

    No name is looked up: what a name resolves to when checked is not what the
    channel may reach when it connects (DNS answers change), so a host name counts as
    remote even when it resolves to 127.0.0.1 today. A target this cannot read (other
    schemes, ``dns://server/...``, malformed) is not local."""
    scheme, colon, rest = target.strip().partition(":")
    scheme = scheme.lower() if colon else ""
    if scheme in ("unix", "unix-abstract"):
        return True
    if scheme in ("ipv4", "ipv6"):  # comma-separated addresses: every one must be local
        return all(_is_loopback_host(_host_of(part)) for part in rest.split(","))
    if scheme == "dns":
        if rest.startswith("//"):
            server, slash, rest = rest[2:].partition("/")
            if server or not slash:  # a DNS server of its own decides: not judged
                return False
        return _is_loopback_host(_host_of(rest))
    return _is_loopback_host(_host_of(target.strip()))


# Remote targets already warned about (once per process: a reconnect is no news).
_warned: set[str] = set()
_warned_lock = threading.Lock()


def check_token_transport(
    addresses: Sequence[str], *, token: bool, tls: bool, insecure: bool
) -> None:
    """Refuse to send a bearer token in plaintext off this machine.

    With a ``token`` and no ``tls``, every address must be local
    (:func:`is_local_target`); otherwise raises :class:`PlaintextTokenRefused`
    naming the others, before any connection is made. With ``insecure`` the token
    goes anyway, and one warning is logged for the addresses not warned about yet."""
    if not token or tls:
        return
    remote = [a for a in addresses if not is_local_target(a)]
    if not remote:
        return
    if not insecure:
        raise PlaintextTokenRefused(remote)
    with _warned_lock:
        fresh = [a for a in remote if a not in _warned]
        _warned.update(fresh)
    if fresh:
        logger.warning(
            "sending the bearer token in plaintext to %s, not a loopback address "
            "(insecure): anyone on the path can take it and run commands on the agents",
            name_nodes(fresh),
        )


@dataclass(frozen=True)
class Endpoint:
    """One agent as its calls see it: address, whether the channel uses TLS (for
    error hints), the call metadata (the bearer token), and what was heard from it
    (every call and stream reports its answers and broken connections there)."""

    address: str
    tls: bool
    metadata: Metadata
    liveness: Liveness = field(default_factory=Liveness, compare=False)

    @classmethod
    def of(cls, address: str, *, token: str | None, tls: bool, insecure: bool = False) -> Endpoint:
        """The endpoint of ``address``; refuses a ``token`` that would go in plaintext
        to a remote address unless ``insecure`` (see :func:`check_token_transport`)."""
        check_token_transport([address], token=bool(token), tls=tls, insecure=insecure)
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        return cls(address, tls, metadata)

    def error(self, err: grpc.RpcError) -> AgentError:
        """The typed error for a failed RPC, with a hint when TLS settings are the
        likely cause. Records a broken connection in ``liveness``."""
        error = agent_error(self.address, err)
        self.liveness.broke(error.code, error.details)
        if isinstance(error, AgentUnavailable):
            hint = _tls_hint(error.details, self.tls)
            if hint:
                return AgentUnavailable(self.address, error.code, f"{error.details}; {hint}")
        return error

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Raise a failed RPC inside the block as :meth:`error` types it."""
        try:
            yield
        except grpc.RpcError as err:
            raise self.error(err) from err
