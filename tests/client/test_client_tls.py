"""The client side of token + TLS + mutual TLS, against real agents on loopback.

`AgentClient`, `AsyncAgentClient`, `Cluster` and the `rankd` CLI start, stream, poll
and kill jobs with the right settings, and fail with a typed error (CLI: one
`rankd: error:` line, exit 2, no traceback) with a wrong CA, a missing or foreign
client certificate under mTLS, a missing or wrong token, or plaintext against TLS.
Certificates are made at test time with trustme.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from helpers.agents import PYTHON, RANKD_BIN, Agent, start_agent

from rankd.client import (
    AgentClient,
    AgentError,
    AgentUnavailable,
    AsyncAgentClient,
    Cluster,
    ClusterError,
    OutputLine,
)
from rankd.v1 import agent_pb2

TOKEN = "tls-test-token-0123456789abcdef"

LINES = """\
import os, sys
for i in range(int(sys.argv[1])):
    print(f"line {os.environ.get('RANK', os.environ['LOCAL_RANK'])} {i}", flush=True)
"""

SLEEPER = """\
import time
print("ready", flush=True)
time.sleep(300)
"""

# gRPC's C core logs failed handshakes itself (e.g. `I1124 01:37:50.677 6877
# ssl_transport_security.cc:...] Handshake failed ...`) before Python sees the error;
# that is the library's logging, not rankd's message.
_GRPC_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")


@dataclass
class Pki:
    """Files made from a CA for agents and a CA for clients (plus strangers)."""

    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def creds(self, ca: str = "ca.pem", client: str | None = "client") -> grpc.ChannelCredentials:
        """Channel credentials: trust ``ca``; present ``client``.pem/.key (None: no cert)."""
        return grpc.ssl_channel_credentials(
            root_certificates=(self.dir / ca).read_bytes(),
            private_key=(self.dir / f"{client}.key").read_bytes() if client else None,
            certificate_chain=(self.dir / f"{client}.pem").read_bytes() if client else None,
        )


def _write_cert(cert: trustme.LeafCert, pem: Path, key: Path) -> None:
    pem.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    ca, client_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(pki_dir / "ca.pem"))
    client_ca.cert_pem.write_to_path(str(pki_dir / "client-ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(pki_dir / "wrong-ca.pem"))
    _write_cert(
        ca.issue_cert("127.0.0.1", "localhost"), pki_dir / "agent.pem", pki_dir / "agent.key"
    )
    _write_cert(ca.issue_cert("elsewhere.example"), pki_dir / "other.pem", pki_dir / "other.key")
    _write_cert(client_ca.issue_cert("client"), pki_dir / "client.pem", pki_dir / "client.key")
    _write_cert(
        trustme.CA().issue_cert("client"), pki_dir / "stranger.pem", pki_dir / "stranger.key"
    )
    for name, secret in (("token", TOKEN), ("wrong-token", "not-the-token-0123456789")):
        (pki_dir / name).write_text(secret + "\n")
        (pki_dir / name).chmod(0o600)
    return Pki(pki_dir)


def _agent(tmp_path: Path, pki: Pki, name: str, *extra: str) -> Agent:
    return start_agent(
        tmp_path / name,
        "--token-file",
        pki.path("token"),
        "--tls-cert",
        pki.path("agent.pem"),
        "--tls-key",
        pki.path("agent.key"),
        *extra,
    )


@pytest.fixture
def tls_agent(tmp_path: Path, pki: Pki) -> Iterator[Agent]:
    """Token + TLS (server certificate only)."""
    agent = _agent(tmp_path, pki, "tls-logs")
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def mtls_agents(tmp_path: Path, pki: Pki) -> Iterator[list[Agent]]:
    """Two agents with token + mutual TLS (client certificates signed by client-ca)."""
    started: list[Agent] = []
    try:
        for i in range(2):
            started.append(
                _agent(
                    tmp_path, pki, f"mtls-logs-{i}", "--tls-client-ca", pki.path("client-ca.pem")
                )
            )
        yield started
    finally:
        for agent in started:
            agent.stop()


def _spec(job_id: str, script: Path, *args: str, nprocs: int = 2) -> agent_pb2.JobSpec:
    return agent_pb2.JobSpec(
        job_id=job_id, nprocs=nprocs, entrypoint=PYTHON, args=[str(script), *args]
    )


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


# -- Python API ------------------------------------------------------------------------


def test_agent_client_over_tls_with_token(tls_agent: Agent, pki: Pki, tmp_path: Path) -> None:
    lines = _script(tmp_path, "lines.py", LINES)
    sleeper = _script(tmp_path, "sleep.py", SLEEPER)
    with AgentClient(
        tls_agent.address, timeout=5, token=TOKEN, credentials=pki.creds(client=None)
    ) as c:
        assert c.start(_spec("tls-job", lines, "30")).created
        with c.stream("tls-job", follow=True, timeout=30) as stream:
            got = sorted((line.local_rank, line.text) for line in stream)
        assert stream.final.state == agent_pb2.SUCCEEDED
        assert got == sorted((r, f"line {r} {i}") for r in range(2) for i in range(30))
        assert c.poll("tls-job").state == agent_pb2.SUCCEEDED
        assert c.wait("tls-job", timeout=10).state == agent_pb2.SUCCEEDED
        assert [j.job_id for j in c.list()] == ["tls-job"]
        assert c.info().pid == tls_agent.proc.pid

        c.start(_spec("tls-sleep", sleeper, nprocs=1))
        with c.stream("tls-sleep", follow=True, timeout=30) as stream:
            assert next(stream).text == "ready"
        assert c.kill("tls-sleep", timeout=5).state == agent_pb2.KILLED


async def test_async_client_over_tls_with_token(tls_agent: Agent, pki: Pki, tmp_path: Path) -> None:
    lines = _script(tmp_path, "lines.py", LINES)
    creds = pki.creds(client=None)
    async with AsyncAgentClient(tls_agent.address, timeout=5, token=TOKEN, credentials=creds) as c:
        await c.start(_spec("async-tls", lines, "10"))
        async with c.stream("async-tls", follow=True, timeout=30) as stream:
            got = sorted([(line.local_rank, line.text) async for line in stream])
        assert got == sorted((r, f"line {r} {i}") for r in range(2) for i in range(10))
        assert (await c.poll("async-tls")).state == agent_pb2.SUCCEEDED
    async with AsyncAgentClient(tls_agent.address, timeout=5, credentials=creds) as anonymous:
        with pytest.raises(AgentError) as err:
            await anonymous.poll("async-tls")
        assert err.value.code == "UNAUTHENTICATED"
    wrong = pki.creds(ca="wrong-ca.pem", client=None)
    async with AsyncAgentClient(tls_agent.address, timeout=5, token=TOKEN, credentials=wrong) as c:
        with pytest.raises(AgentUnavailable, match="TLS handshake failed"):
            await c.info()


def test_cluster_launch_over_mutual_tls(mtls_agents: list[Agent], pki: Pki, tmp_path: Path) -> None:
    lines = _script(tmp_path, "lines.py", LINES)
    addresses = [a.address for a in mtls_agents]
    out: list[OutputLine] = []
    with Cluster(addresses, timeout=5, token=TOKEN, credentials=pki.creds()) as cluster:
        result = cluster.launch(
            [PYTHON, str(lines), "5"], nproc_per_node=2, run_id="mtls-run", on_line=out.append
        )
        assert result.world_size == 4
        assert sorted((o.global_rank, o.text) for o in out) == sorted(
            (r, f"line {r} {i}") for r in range(4) for i in range(5)
        )
        states = [r.unwrap().state for r in cluster.poll("mtls-run")]
        assert states == [agent_pb2.SUCCEEDED] * 2

    # Without a client certificate every node refuses; the error names each node.
    with (
        Cluster(addresses, timeout=5, token=TOKEN, credentials=pki.creds(client=None)) as bare,
        pytest.raises(ClusterError) as err,
    ):
        bare.launch([PYTHON, str(lines), "1"], nproc_per_node=1, on_line=out.append)
    assert set(err.value.errors) == set(addresses)
    assert all(isinstance(e, AgentUnavailable) for e in err.value.errors.values())
    assert "--tls-client-ca" in str(err.value)
    results = Cluster(addresses, timeout=5, token="nope-nope-nope-nope", credentials=pki.creds())
    try:
        errors = [r.error for r in results.poll("mtls-run")]
        assert [type(e) for e in errors] == [AgentError, AgentError]
        assert {e.code for e in errors if isinstance(e, AgentError)} == {"UNAUTHENTICATED"}
    finally:
        results.close()


@pytest.mark.parametrize(
    ("case", "error", "needle"),
    [
        ("wrong CA", AgentUnavailable, "TLS handshake failed"),
        ("no client certificate", AgentUnavailable, "--tls-client-ca needs a client certificate"),
        ("client certificate of another CA", AgentUnavailable, "client certificate"),
        ("plaintext", AgentUnavailable, "if it serves TLS, give its CA (--tls-ca)"),
        ("no token", AgentError, "UNAUTHENTICATED: missing bearer token"),
        ("wrong token", AgentError, "UNAUTHENTICATED: wrong bearer token"),
    ],
)
def test_wrong_settings_fail_with_typed_errors(
    mtls_agents: list[Agent],
    pki: Pki,
    tmp_path: Path,
    case: str,
    error: type[AgentError],
    needle: str,
) -> None:
    agent = mtls_agents[0]
    settings: dict[str, tuple[str | None, grpc.ChannelCredentials | None]] = {
        "wrong CA": (TOKEN, pki.creds(ca="wrong-ca.pem")),
        "no client certificate": (TOKEN, pki.creds(client=None)),
        "client certificate of another CA": (TOKEN, pki.creds(client="stranger")),
        "plaintext": (TOKEN, None),
        "no token": (None, pki.creds()),
        "wrong token": ("not-the-token-0123456789", pki.creds()),
    }
    token, creds = settings[case]
    lines = _script(tmp_path, "lines.py", LINES)
    # One stream retry: a closed connection may be an agent restarting, and is retried.
    client = AgentClient(agent.address, timeout=5, token=token, credentials=creds, stream_retries=1)
    with client:
        for call in (
            lambda: client.start(_spec("refused", lines, "1")),
            lambda: client.poll("refused"),
            lambda: client.kill("refused"),
            lambda: list(client.stream("refused", timeout=10)),
        ):
            started = time.monotonic()
            with pytest.raises(error) as info:
                call()
            assert time.monotonic() - started < 5
            assert type(info.value) is error  # exactly: a wrong token is not "unreachable"
            assert needle in str(info.value)
            assert str(info.value).startswith(f"{agent.address}: ")
            assert isinstance(info.value.__cause__, grpc.RpcError)
    assert list(agent.log_dir.iterdir()) == []  # nothing was started


def test_certificate_naming_another_host_and_no_stream_retries(tmp_path: Path, pki: Pki) -> None:
    agent = start_agent(
        tmp_path / "other-logs",
        "--token-file",
        pki.path("token"),
        "--tls-cert",
        pki.path("other.pem"),
        "--tls-key",
        pki.path("other.key"),
    )
    try:
        creds = pki.creds(client=None)
        with AgentClient(agent.address, timeout=5, token=TOKEN, credentials=creds) as client:
            with pytest.raises(AgentUnavailable, match="name the address used"):
                client.info()
            # A certificate the client rejects is not retried (default stream retries).
            started = time.monotonic()
            with pytest.raises(AgentUnavailable, match="TLS handshake failed"):
                list(client.stream("any", follow=True, timeout=30))
            assert time.monotonic() - started < 10.0  # not retried until the 30 s ran out
    finally:
        agent.stop()


# -- CLI --------------------------------------------------------------------------------


def _rankd(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANKD_", "SLURM_"))}
    return subprocess.run(
        [RANKD_BIN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
    )


def _one_error_line(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The CLI's single error line (exit ``code``, no traceback); gRPC's own logs aside.
    Exit 3 = an agent refused this client (token, TLS), 2 = any other error."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if not _GRPC_LOG.match(line)]
    heads = [line for line in ours if line.startswith("rankd: error: ")]
    assert len(heads) == 1, result.stderr
    # a many-node error lists one indented line per node under its head
    assert all(line == heads[0] or line.startswith("  ") for line in ours), result.stderr
    return "\n".join(ours)


def test_cli_over_mutual_tls(mtls_agents: list[Agent], pki: Pki, tmp_path: Path) -> None:
    lines = _script(tmp_path, "lines.py", LINES)
    nodes = ",".join(a.address for a in mtls_agents)
    tls = ["--tls-ca", pki.path("ca.pem"), "--tls-cert", pki.path("client.pem")]
    tls += ["--tls-key", pki.path("client.key")]
    env = {"RANKD_TOKEN_FILE": pki.path("token")}

    launched = _rankd(
        "launch", "--nodes", nodes, *tls, "--nproc-per-node", "2", "--run-id", "cli-tls",
        "--", PYTHON, str(lines), "3", env=env,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr
    printed = sorted(line for line in launched.stdout.splitlines() if "line " in line)
    assert printed == sorted(f"[default{r}]:line {r} {i}" for r in range(4) for i in range(3))

    status = _rankd("status", "cli-tls", "--nodes", nodes, *tls, env=env)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("job cli-tls: SUCCEEDED")
    logs = _rankd("logs", "cli-tls", "--nodes", nodes, *tls, "--token-file", pki.path("token"))
    assert logs.returncode == 0, logs.stderr
    assert sorted(logs.stdout.splitlines()) == printed
    killed = _rankd("kill", "cli-tls", "--nodes", nodes, *tls, env=env)
    assert killed.returncode == 0, killed.stderr
    # --token-file wins over RANKD_TOKEN_FILE
    wrong_env = {"RANKD_TOKEN_FILE": pki.path("wrong-token")}
    override = _rankd(
        "status",
        "cli-tls",
        "--nodes",
        nodes,
        *tls,
        "--token-file",
        pki.path("token"),
        env=wrong_env,
    )
    assert override.returncode == 0, override.stderr
    first = mtls_agents[0].address
    assert "wrong bearer token" in _one_error_line(
        _rankd("status", "cli-tls", "--nodes", first, *tls, env=wrong_env), code=3
    )


def test_cli_wrong_settings_are_one_line_errors(mtls_agents: list[Agent], pki: Pki) -> None:
    address = mtls_agents[0].address
    ca, wrong_ca = ["--tls-ca", pki.path("ca.pem")], ["--tls-ca", pki.path("wrong-ca.pem")]
    cert = ["--tls-cert", pki.path("client.pem"), "--tls-key", pki.path("client.key")]
    token = ["--token-file", pki.path("token")]
    cases = {
        "TLS handshake failed": [*wrong_ca, *cert, *token],
        "--tls-client-ca needs a client certificate": [*ca, *token],
        "if it serves TLS, give its CA (--tls-ca)": token,
        "missing bearer token": [*ca, *cert],
        "wrong bearer token": [*ca, *cert, "--token-file", pki.path("wrong-token")],
        "needs both --tls-cert and --tls-key": [*ca, "--tls-cert", pki.path("client.pem")],
        "cannot read CA file": ["--tls-ca", pki.path("missing.pem"), *cert, *token],
        "cannot read token file": [*ca, *cert, "--token-file", pki.path("missing-token")],
    }
    local = {"needs both --tls-cert and --tls-key", "cannot read CA file", "cannot read token file"}
    for needle, flags in cases.items():
        for command in (["status", "some-run"], ["launch", "--", PYTHON, "-c", "pass"]):
            message = _one_error_line(
                _rankd(*command[:1], "--nodes", address, *flags, *command[1:]),
                code=2 if needle in local else 3,  # 3: the agent refused this client
            )
            assert needle in message, (needle, command[0], message)
            assert needle in local or f"node {address}" in message
    assert list(mtls_agents[0].log_dir.iterdir()) == []  # nothing was started
