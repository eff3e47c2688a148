"""Nobody runs a command through an agent without the right to: token, TLS, mTLS, policy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers.agents import AGENT_BIN, Agent, start_agent
from helpers.wait import wait_until

from rankd.v1 import agent_pb2 as pb
from rankd.v1 import agent_pb2_grpc

TOKEN = "s3cret-token-0123456789abcdef"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def token_agent(tmp_path: Path, token_file: Path) -> Iterator[Agent]:
    handle = start_agent(tmp_path / "logs", "--token-file", str(token_file))
    try:
        yield handle
    finally:
        handle.stop()


def _calls(
    stub: agent_pb2_grpc.NodeAgentStub, metadata: list[tuple[str, str]]
) -> dict[str, Callable[[], object]]:
    spec = pb.JobSpec(job_id="auth-job", nprocs=1, entrypoint=sys.executable, args=["-c", "pass"])
    md = metadata or None
    return {
        "Start": lambda: stub.Start(pb.StartRequest(spec=spec), metadata=md, timeout=10),
        "Poll": lambda: stub.Poll(pb.PollRequest(job_id="auth-job"), metadata=md, timeout=5),
        "Stream": lambda: list(
            stub.Stream(pb.StreamRequest(job_id="auth-job"), metadata=md, timeout=5)
        ),
        "Kill": lambda: stub.Kill(pb.KillRequest(job_id="auth-job"), metadata=md, timeout=10),
        "List": lambda: stub.List(pb.ListRequest(), metadata=md, timeout=5),
        "Info": lambda: stub.Info(pb.InfoRequest(), metadata=md, timeout=5),
    }


def test_token_required_for_every_rpc(token_agent: Agent) -> None:
    stub = token_agent.stub
    for metadata, needle in (
        ([], "missing bearer token"),
        ([("authorization", "Bearer nope")], "wrong"),
    ):
        for name, call in _calls(stub, metadata).items():
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert needle in info.value.details(), name
    assert list(token_agent.log_dir.iterdir()) == []  # nothing was started

    good = [("authorization", f"Bearer {TOKEN}")]
    for name, call in _calls(stub, good).items():
        call()  # each succeeds with the right token
        if name == "Start":
            wait_until(
                lambda: (
                    stub.Poll(pb.PollRequest(job_id="auth-job"), metadata=good).job.state
                    == pb.SUCCEEDED
                )
            )

    health = health_pb2_grpc.HealthStub(token_agent.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    refl = reflection_pb2_grpc.ServerReflectionStub(token_agent.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.RpcError) as info:
        list(refl.ServerReflectionInfo(iter([request]), timeout=5))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    answers = list(refl.ServerReflectionInfo(iter([request]), metadata=good, timeout=5))
    assert answers[0].list_services_response.service


def _run_agent(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AGENT_BIN, "--port", "0", *args], capture_output=True, text=True, timeout=timeout
    )


def test_refuses_unsafe_settings(tmp_path: Path, token_file: Path) -> None:
    result = _run_agent("--host", "0.0.0.0", "--log-dir", str(tmp_path / "l"))
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr
    assert "--token-file" in result.stderr and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr

    result = _run_agent("--host", "0.0.0.0", "--token-file", str(token_file))
    assert result.returncode == 2 and "--tls-cert/--tls-key" in result.stderr

    token_file.chmod(0o644)
    result = _run_agent("--token-file", str(token_file), "--log-dir", str(tmp_path / "l"))
    assert result.returncode == 2
    assert "readable or writable by others" in result.stderr and "chmod 600" in result.stderr

    log_file = tmp_path / "a-file"
    log_file.write_text("")
    result = _run_agent("--log-dir", str(log_file))
    assert result.returncode == 2 and "not a directory" in result.stderr


def test_insecure_public_bind_warns(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [AGENT_BIN, "--host", "0.0.0.0", "--port", "0", "--insecure", "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith("listening on 0.0.0.0:")
        assert "WARNING" in proc.stderr.readline()
    finally:
        proc.terminate()
        assert proc.wait(20) == -signal.SIGTERM  # the agent ends by the signal it got


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def _tls_agent(tmp_path: Path, ca: trustme.CA, *extra: str) -> tuple[subprocess.Popen[str], str]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "agent.pem", tmp_path / "agent.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    proc = subprocess.Popen(
        [
            AGENT_BIN,
            "--port",
            "0",
            "--log-dir",
            str(tmp_path / "logs"),
            "--tls-cert",
            str(cert_path),
            "--tls-key",
            str(key_path),
            *extra,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc, line.split()[-1]


def _info(address: str, creds: grpc.ChannelCredentials) -> pb.InfoResponse:
    with grpc.secure_channel(address, creds) as channel:
        return agent_pb2_grpc.NodeAgentStub(channel).Info(pb.InfoRequest(), timeout=5)


def test_tls_handshake(tmp_path: Path, ca: trustme.CA) -> None:
    proc, address = _tls_agent(tmp_path, ca)
    try:
        good = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        assert _info(address, good).pid == proc.pid
        wrong = grpc.ssl_channel_credentials(root_certificates=trustme.CA().cert_pem.bytes())
        with pytest.raises(grpc.RpcError) as info:
            _info(address, wrong)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(address) as plain, pytest.raises(grpc.RpcError):
            agent_pb2_grpc.NodeAgentStub(plain).Info(pb.InfoRequest(), timeout=5)
    finally:
        proc.terminate()
        proc.wait(20)


def test_mutual_tls(tmp_path: Path, ca: trustme.CA) -> None:
    client_ca = trustme.CA()
    ca_path = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(ca_path))
    proc, address = _tls_agent(tmp_path, ca, "--tls-client-ca", str(ca_path))
    try:
        root = ca.cert_pem.bytes()
        with pytest.raises(grpc.RpcError) as info:
            _info(address, grpc.ssl_channel_credentials(root_certificates=root))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        stranger = trustme.CA().issue_cert("client")
        with pytest.raises(grpc.RpcError):
            _info(
                address,
                grpc.ssl_channel_credentials(
                    root, stranger.private_key_pem.bytes(), stranger.cert_chain_pems[0].bytes()
                ),
            )
        member = client_ca.issue_cert("client")
        creds = grpc.ssl_channel_credentials(
            root, member.private_key_pem.bytes(), member.cert_chain_pems[0].bytes()
        )
        assert _info(address, creds).pid == proc.pid
    finally:
        proc.terminate()
        proc.wait(20)


def test_workers_do_not_inherit_secrets(tmp_path: Path, token_file: Path) -> None:
    env = dict(os.environ, RANKD_TOKEN_FILE=str(token_file), RANKD_TOKEN=TOKEN)
    proc = subprocess.Popen(
        [
            AGENT_BIN,
            "--port",
            "0",
            "--log-dir",
            str(tmp_path / "logs"),
            "--token-file",
            str(token_file),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().split()[-1]
        md = [("authorization", f"Bearer {TOKEN}")]
        with grpc.insecure_channel(address) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            spec = pb.JobSpec(
                job_id="env",
                nprocs=1,
                entrypoint=sys.executable,
                args=["-c", "import os; print(repr(dict(os.environ)))"],
            )
            stub.Start(pb.StartRequest(spec=spec), metadata=md, timeout=10)
            lines: list[str] = []
            for msg in stub.Stream(
                pb.StreamRequest(job_id="env", follow=True), metadata=md, timeout=20
            ):
                lines.extend(ln.text for ln in msg.lines)
        dump = "\n".join(lines)
        assert "LOCAL_RANK" in dump
        assert TOKEN not in dump and str(token_file) not in dump
    finally:
        proc.terminate()
        proc.wait(20)


def test_policy_limits(tmp_path: Path) -> None:
    handle = start_agent(
        tmp_path / "logs",
        "--allow-entrypoint",
        sys.executable,
        "--max-nprocs",
        "4",
        "--max-jobs",
        "2",
        "--max-running-ranks",
        "5",
        "--max-message-bytes",
        "65536",
    )
    stub = handle.stub

    def start(job_id: str, nprocs: int, entry: str = sys.executable, **kw: object) -> object:
        spec = pb.JobSpec(
            job_id=job_id,
            nprocs=nprocs,
            entrypoint=entry,
            args=["-c", "import time; time.sleep(60)"],
            **kw,
        )
        return stub.Start(pb.StartRequest(spec=spec), timeout=10)

    def code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            call()
        return info.value.code(), info.value.details()

    try:
        c, d = code(lambda: start("a", 1, "/bin/sh"))
        assert c == grpc.StatusCode.PERMISSION_DENIED and "not allowed" in d
        c, d = code(lambda: start("a", 5))
        assert c == grpc.StatusCode.INVALID_ARGUMENT and "between 1 and 4" in d
        c, d = code(lambda: start("a", 1, env={"BIG": "x" * 100_000}))
        assert c == grpc.StatusCode.RESOURCE_EXHAUSTED
        start("a", 4)
        c, d = code(lambda: start("b", 2))
        assert c == grpc.StatusCode.RESOURCE_EXHAUSTED and "running ranks" in d
        start("b", 1)
        c, d = code(lambda: start("c", 1))
        assert c == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in d
        assert sorted(j.job_id for j in stub.List(pb.ListRequest(), timeout=5).jobs) == ["a", "b"]
    finally:
        handle.stop()
