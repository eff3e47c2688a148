"""The bearer token never leaves this machine in the clear (issue 20, finding 1).

A client with a token and no TLS refuses, before connecting, any agent address that is
not loopback (127.0.0.0/8, ::1, ``localhost``) or a unix socket: ``PlaintextTokenRefused``
in Python, one line and exit 3 from ``rankd``. ``insecure=True`` / ``--insecure`` sends it
anyway, with a warning. ``RANKD_TLS_CA``/``_CERT``/``_KEY`` default the ``--tls-*`` flags.

The "agents" that must receive no token are real gRPC servers that record every call's
metadata, bound on this machine's own non-loopback address (so a leak would really reach
them: the insecure cases prove it does), or on 127.0.0.1 reached through a host name.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
import trustme
from helpers.agents import RANKD_BIN, start_agent

import rankd.client.rpc as rpc
from rankd.client import AgentClient, AsyncAgentClient, AsyncCluster, Cluster, PlaintextTokenRefused
from rankd.client.cli_app import run
from rankd.client.rpc import is_local_target
from rankd.v1 import agent_pb2

TOKEN = "plaintext-test-token-0123456789abcdef"
BEARER = ("authorization", f"Bearer {TOKEN}")
_ANSWERS = {"List": agent_pb2.ListResponse(), "Info": agent_pb2.InfoResponse()}


def _outside_ip() -> str | None:
    """An address of this machine that is not loopback (IPv4 first), or None."""
    found: list[str] = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(addr.address.split("%")[0])
            if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
                found.append(str(ip))
    found.sort(key=lambda a: ":" in a)
    return found[0] if found else None


OUTSIDE_IP = _outside_ip()
needs_outside = pytest.mark.skipif(
    OUTSIDE_IP is None,
    reason="this machine has no non-loopback address to bind a fake agent on "
    "(127.0.0.0/8 is all loopback, so it cannot stand for a remote agent)",
)


@dataclass
class FakeAgent:
    """A gRPC server answering List and Info with empty messages (others: UNIMPLEMENTED)
    and recording every call's method and metadata, whatever the method."""

    host: str
    credentials: grpc.ServerCredentials | None = None
    calls: list[tuple[str, tuple[tuple[str, str], ...]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((_Recorder(self),))
        bind = f"[{self.host}]:0" if ":" in self.host else f"{self.host}:0"
        if self.credentials is None:
            self.port = self.server.add_insecure_port(bind)
        else:
            self.port = self.server.add_secure_port(bind, self.credentials)
        self.server.start()

    def at(self, host: str | None = None) -> str:
        """This server's address, through ``host`` (default: the one it is bound on)."""
        host = host or self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def tokens(self) -> list[str]:
        return [v for _, md in self.calls for k, v in md if k == "authorization"]

    def stop(self) -> None:
        self.server.stop(None).wait(5)


class _Recorder(grpc.GenericRpcHandler):
    def __init__(self, fake: FakeAgent) -> None:
        self.fake = fake

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = str(details.method)
        metadata = tuple((key, str(value)) for key, value in details.invocation_metadata)
        self.fake.calls.append((method, metadata))
        answer = _ANSWERS.get(method.rpartition("/")[2])
        if answer is None:
            return None
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: answer.SerializeToString(),
            request_deserializer=None,
            response_serializer=None,
        )


FakeFactory = Callable[..., FakeAgent]


@pytest.fixture
def fakes() -> Iterator[FakeFactory]:
    """``fakes(host=OUTSIDE_IP, credentials=None)``: a new FakeAgent, stopped afterwards."""
    made: list[FakeAgent] = []

    def make(
        host: str | None = None, credentials: grpc.ServerCredentials | None = None
    ) -> FakeAgent:
        assert OUTSIDE_IP is not None or host is not None
        made.append(FakeAgent(host or str(OUTSIDE_IP), credentials))
        return made[-1]

    try:
        yield make
    finally:
        for fake in made:
            fake.stop()


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    # gRPC honours *_proxy variables: a proxy would stand between client and fake agent.
    for name in ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    # Warnings are once per address per process; a port reused from an earlier test
    # must not hide this test's warning.
    monkeypatch.setattr(rpc, "_warned", set())


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return str(path)


def rankd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real `rankd`, with no RANKD_*, SLURM_* or proxy variable but ``env``."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANKD_", "SLURM_")) and not k.lower().endswith("_proxy")
    }
    return subprocess.run(
        [RANKD_BIN, *args], capture_output=True, text=True, timeout=60, env={**clean, **(env or {})}
    )


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.splitlines()


# -- what counts as this machine ----------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "local"),
    [
        ("127.0.0.1:29600", True),
        ("127.8.9.10:1", True),
        ("localhost:29600", True),
        ("LOCALHOST", True),
        ("[::1]:29600", True),
        ("::1", True),
        ("dns:///localhost:29600", True),
        ("dns:127.0.0.1:29600", True),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", True),
        ("ipv6:[::1]:29600", True),
        ("unix:/run/rankd.sock", True),
        ("unix:///run/rankd.sock", True),
        ("unix-abstract:rankd", True),
        ("192.0.2.2:29600", False),
        ("10.0.0.1:29600", False),
        ("[fd00::2]:29600", False),
        ("0.0.0.0:29600", False),  # reaches every interface's listener: not a promise
        ("node01:29600", False),
        ("localhost.example.com:29600", False),
        ("dns://8.8.8.8/localhost:29600", False),  # another resolver decides
        ("ipv4:127.0.0.1:1,10.0.0.1:2", False),
        ("ipv4:", False),
        ("127.1:29600", False),  # inet_aton shorthand: not read as loopback, so refused
        ("[::1:29600", False),
        ("xds:///rankd", False),
        ("", False),
    ],
)
def test_local_targets(target: str, local: bool) -> None:
    assert is_local_target(target) is local


# -- the Python API ----------------------------------------------------------------------


@needs_outside
async def test_clients_refuse_a_plaintext_token_to_a_remote_address(fakes: FakeFactory) -> None:
    fake, other = fakes(), fakes()
    address = fake.at()
    makers: list[Callable[[], object]] = [
        lambda: AgentClient(address, token=TOKEN),
        lambda: AsyncAgentClient(address, token=TOKEN),
        lambda: AsyncCluster(["127.0.0.1:1", address, other.at()], token=TOKEN),
        lambda: Cluster([address], token=TOKEN),
    ]
    for make in makers:
        with pytest.raises(PlaintextTokenRefused) as refused:
            make()
        assert address in refused.value.addresses
        assert "127.0.0.1:1" not in refused.value.addresses
        (line,) = str(refused.value).splitlines()
        assert line.startswith(f"refusing to send the bearer token in plaintext to {address}")
        assert "credentials=" in line and "insecure=True" in line
    assert refused.value.addresses == (address,)
    assert fake.calls == [] and other.calls == []

    # The fake is reachable: the same client without a token gets through, token-free.
    with AgentClient(address, timeout=5) as client:
        client.info()
    assert [m for m, _ in fake.calls] == ["/rankd.v1.NodeAgent/Info"]
    assert fake.tokens == []


@needs_outside
async def test_insecure_sends_the_token_and_warns_once(
    fakes: FakeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rankd.client.rpc")
    fake, other = fakes(), fakes()
    with AgentClient(fake.at(), token=TOKEN, timeout=5, insecure=True) as client:
        client.info()
    async with AsyncAgentClient(fake.at(), token=TOKEN, timeout=5, insecure=True) as aclient:
        await aclient.info()
    assert fake.tokens == [BEARER[1]] * 2
    (warning,) = [r.getMessage() for r in caplog.records]  # once per address
    assert warning.startswith(f"sending the bearer token in plaintext to {fake.at()}")

    caplog.clear()
    with Cluster(["127.0.0.1:1", other.at(), fake.at()], token=TOKEN, timeout=5, insecure=True):
        pass
    # one line for the cluster, naming only the address not warned about yet
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        f"sending the bearer token in plaintext to {other.at()}"
    ]


async def test_a_host_name_is_not_trusted_as_loopback(fakes: FakeFactory) -> None:
    # The issue's case: a fake server on loopback, reached by a name. Names are not looked
    # up (DNS may answer otherwise at connect time), so only literals count as local.
    name = socket.gethostname()
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)}
    except OSError:
        resolved = set()
    if not resolved or not all(ipaddress.ip_address(a).is_loopback for a in resolved):
        pytest.skip(f"this host's name {name!r} does not resolve to loopback only")
    fake = fakes(host="127.0.0.1")
    with pytest.raises(PlaintextTokenRefused):
        AgentClient(fake.at(name), token=TOKEN)
    assert fake.calls == []
    with AgentClient(fake.at(name), token=TOKEN, timeout=5, insecure=True) as client:
        client.info()  # the name does lead to the fake
    assert fake.tokens == [BEARER[1]]


def test_loopback_agents_still_take_the_token(
    tmp_path: Path, token_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rankd.client.rpc")
    agent = start_agent(tmp_path / "logs", "--token-file", token_file)
    try:
        port = agent.address.rpartition(":")[2]
        for address in (agent.address, f"localhost:{port}", f"dns:///127.0.0.1:{port}"):
            with AgentClient(address, token=TOKEN, timeout=5) as client:
                assert client.list() == []
        with Cluster([agent.address], token=TOKEN, timeout=5) as cluster:
            assert cluster.list()[0].unwrap() == []
        result = rankd("status", "--nodes", agent.address, "--token-file", token_file)
        assert result.returncode == 0, result.stderr
        assert "warning" not in result.stderr
    finally:
        agent.stop()
    assert caplog.records == []


# -- the CLI -----------------------------------------------------------------------------


@needs_outside
def test_cli_refuses_a_plaintext_token_with_exit_3(fakes: FakeFactory, token_file: str) -> None:
    fake = fakes()
    address = fake.at()
    expected = (
        f"rankd: error: refusing to send the bearer token in plaintext to {address}, not a "
        "loopback address: anyone on the path could take it; give the agents' CA (--tls-ca "
        "or RANKD_TLS_CA), or pass --insecure if the network is trusted"
    )
    runs = [
        rankd("status", "--nodes", address, "--token-file", token_file),
        rankd("logs", "job", "--nodes", address, env={"RANKD_TOKEN_FILE": token_file}),
        rankd(
            "launch", "--nodes", f"127.0.0.1:1,{address}", "--token-file", token_file, "--", "true"
        ),
    ]
    for result in runs:
        assert result.returncode == 3, result.stderr
        assert stderr_lines(result) == [expected]
    assert fake.calls == []


@needs_outside
def test_cli_insecure_sends_the_token_with_a_warning(fakes: FakeFactory, token_file: str) -> None:
    fake = fakes()
    result = rankd("status", "--nodes", fake.at(), "--token-file", token_file, "--insecure")
    assert result.returncode == 0, result.stderr
    (warning,) = stderr_lines(result)
    assert warning.startswith(
        f"rankd: warning: sending the bearer token in plaintext to {fake.at()}, "
    )
    assert fake.tokens == [BEARER[1]]


@dataclass
class Pki:
    dir: Path
    server: grpc.ServerCredentials

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """ca.pem (signs a certificate for OUTSIDE_IP and the client's), wrong-ca.pem,
    client.pem/client.key; ``server`` requires a client certificate (mutual TLS)."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "wrong-ca.pem"))
    leaf = ca.issue_cert(str(OUTSIDE_IP))
    client = ca.issue_cert("rankd-client")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    server = grpc.ssl_server_credentials(
        [(leaf.private_key_pem.bytes(), b"".join(p.bytes() for p in leaf.cert_chain_pems))],
        root_certificates=ca.cert_pem.bytes(),
        require_client_auth=True,
    )
    return Pki(tmp_path, server)


@needs_outside
def test_tls_settings_come_from_the_environment(
    fakes: FakeFactory, pki: Pki, token_file: str
) -> None:
    fake = fakes(credentials=pki.server)
    env = {
        "RANKD_TOKEN_FILE": token_file,
        "RANKD_TLS_CA": pki["ca.pem"],
        "RANKD_TLS_CERT": pki["client.pem"],
        "RANKD_TLS_KEY": pki["client.key"],
    }
    ok = rankd("status", "--nodes", fake.at(), env=env)
    assert ok.returncode == 0, ok.stderr
    assert stderr_lines(ok) == []
    assert fake.tokens == [BEARER[1]]  # over TLS, to a remote address: allowed

    # a flag wins over its variable
    wrong = rankd("status", "--nodes", fake.at(), "--tls-ca", pki["wrong-ca.pem"], env=env)
    assert wrong.returncode == 3, wrong.stderr
    assert "TLS handshake failed" in wrong.stderr
    # the variables are read one by one: a certificate without its key is a usage error
    half = rankd("status", "--nodes", fake.at(), env={**env, "RANKD_TLS_KEY": ""})
    assert half.returncode == 2, half.stderr
    assert stderr_lines(half) == [
        "rankd: error: a client certificate needs both --tls-cert and --tls-key"
    ]
    # without RANKD_TLS_CA the channel is plaintext again, so the token is refused
    plain = {k: v for k, v in env.items() if not k.startswith("RANKD_TLS_")}
    refused = rankd("status", "--nodes", fake.at(), env=plain)
    assert refused.returncode == 3 and "refusing to send the bearer token" in refused.stderr
    assert len(fake.tokens) == 1


@pytest.mark.parametrize("command", ["launch", "status", "logs", "kill", "stacks"])
def test_help_names_the_tls_variables_and_insecure(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run([command, "--help"], environ={}) == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("$RANKD_TLS_CA", "$RANKD_TLS_CERT", "$RANKD_TLS_KEY", "$RANKD_TOKEN_FILE"):
        assert f"(default: {shown})" in text
    assert "--insecure" in text and "127.0.0.0/8, ::1 or localhost" in text
