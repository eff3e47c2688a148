"""The RPCs of ``rankd.v1.NodeAgent`` as data, shared by the blocking and asyncio clients.

Each unary RPC is built once here as a :class:`Unary` (method, request, deadline,
whether its answer carries the agent's clock); :class:`AgentClient` sends it on a
blocking channel, :class:`AsyncAgentClient` on an asyncio one, and both read the
answer the same way. :class:`Endpoint` turns a failed RPC into the client's typed
error, with a hint when TLS settings are the likely cause.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import grpc
from google.protobuf.message import Message

from rankd.client.errors import AgentError, AgentUnavailable, agent_error
from rankd.client.liveness import Liveness
from rankd.v1 import agent_pb2

__all__ = [
    "CHANNEL_OPTIONS",
    "DEFAULT_STREAM_RETRIES",
    "DEFAULT_TIMEOUT",
    "Endpoint",
    "Unary",
    "default_requester",
    "info",
    "is_tls_misconfiguration",
    "kill",
    "list_jobs",
    "poll",
    "renew",
    "start",
    "watch",
]

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
    resp: agent_pb2.PollResponse | agent_pb2.InfoResponse | agent_pb2.RenewResponse,
) -> float:
    return resp.agent_time


def start(spec: agent_pb2.JobSpec) -> Unary[agent_pb2.StartResponse]:
    """Start: idempotent on ``spec.job_id``."""
    return Unary("Start", agent_pb2.StartRequest(spec=spec))


def poll(job_id: str) -> Unary[agent_pb2.PollResponse]:
    """Poll: the job's status, the agent's clock and the status version."""
    return Unary("Poll", agent_pb2.PollRequest(job_id=job_id), agent_time=_agent_time)


def info() -> Unary[agent_pb2.InfoResponse]:
    """Info: who the agent is, its clock, a free port."""
    return Unary("Info", agent_pb2.InfoRequest(), agent_time=_agent_time)


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
    return Unary("Kill", req, extra_timeout=wait, deadline=deadline)


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
    def of(cls, address: str, *, token: str | None, tls: bool) -> Endpoint:
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
