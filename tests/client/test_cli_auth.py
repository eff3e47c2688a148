"""An agent that refuses this client is named as such, not as "cannot reach every node".

`rankd launch` (and status, logs, kill) print one line naming the node and the real
cause: the token (UNAUTHENTICATED), the agent's policy (PERMISSION_DENIED) or the TLS
settings, and exit with 3, apart from 2 (usage, unreachable, bad request). The Python
API raises `AuthenticationFailed`, a `ClusterError`. Real agents on 127.0.0.1;
certificates made at test time with trustme.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from helpers.agents import PYTHON, RANKD_BIN, Agent, closed_port, start_agent

from rankd.client import (
    AgentError,
    AgentUnavailable,
    AuthenticationFailed,
    Cluster,
    ClusterError,
    InvalidArgument,
)
from rankd.client.errors import cluster_error, refusal

TOKEN = "auth-test-token-0123456789abcdef"
OTHER_TOKEN = "another-token-0123456789abcdef"
# gRPC's C core may log a failed handshake itself before rankd explains it.
_GRPC_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")


@dataclass
class Files:
    dir: Path

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


@pytest.fixture
def files(tmp_path: Path) -> Files:
    """token, other-token, agent.pem/.key (CA ca.pem, names 127.0.0.1), wrong-ca.pem."""
    where = tmp_path / "secrets"
    where.mkdir()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(where / "wrong-ca.pem"))
    leaf = ca.issue_cert("127.0.0.1")
    (where / "agent.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(where / "agent.key"))
    for name, secret in (("token", TOKEN), ("other-token", OTHER_TOKEN)):
        (where / name).write_text(secret + "\n")
        (where / name).chmod(0o600)
    return Files(where)


@pytest.fixture
def secure(tmp_path: Path, files: Files) -> Iterator[list[Agent]]:
    """Two agents with token + TLS; the second one's token is `other-token`."""
    started: list[Agent] = []
    try:
        for i, token in enumerate(("token", "other-token")):
            started.append(
                start_agent(
                    tmp_path / f"node{i}",
                    "--token-file",
                    files[token],
                    "--tls-cert",
                    files["agent.pem"],
                    "--tls-key",
                    files["agent.key"],
                )
            )
        yield started
    finally:
        for agent in started:
            agent.stop()


def rankd(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANKD_", "SLURM_"))}
    return subprocess.run([RANKD_BIN, *args], capture_output=True, text=True, timeout=60, env=env)


def error_lines(result: subprocess.CompletedProcess[str], code: int) -> list[str]:
    """rankd's error lines (gRPC's own log lines aside); no traceback, exit ``code``."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not _GRPC_LOG.match(line)]
    return [line for line in lines if not line.startswith("rankd: attempt ")]


@pytest.mark.timeout(60)
def test_launch_names_the_node_that_refused_the_token(secure: list[Agent], files: Files) -> None:
    first = secure[0].address
    tls = ["--tls-ca", files["ca.pem"]]
    cmd = ["--", PYTHON, "-c", "print('ran')"]

    wrong = rankd("launch", "--nodes", first, *tls, "--token-file", files["other-token"], *cmd)
    assert error_lines(wrong, 3) == [
        f"rankd: error: node {first} refused the token: UNAUTHENTICATED: wrong bearer token"
    ]
    missing = rankd("launch", "--nodes", first, *tls, *cmd)
    (line,) = error_lines(missing, 3)
    assert line.startswith(
        f"rankd: error: node {first} refused the token: UNAUTHENTICATED: missing bearer token"
    )
    assert "--token-file" in line  # what to do

    # Two nodes, one of which holds another token: that one is named, once.
    both = ",".join(a.address for a in secure)
    mixed = rankd("launch", "--nodes", both, *tls, "--token-file", files["token"], *cmd)
    assert error_lines(mixed, 3) == [
        f"rankd: error: node {secure[1].address} refused the token: "
        "UNAUTHENTICATED: wrong bearer token"
    ]
    assert "ran" not in wrong.stdout + missing.stdout + mixed.stdout
    for agent in secure:
        assert list(agent.log_dir.iterdir()) == []  # nothing was started anywhere


@pytest.mark.timeout(60)
def test_launch_names_a_tls_mismatch(secure: list[Agent], files: Files) -> None:
    first = secure[0].address
    token = ["--token-file", files["token"]]
    cmd = ["--", PYTHON, "-c", "pass"]

    wrong_ca = rankd("launch", "--nodes", first, "--tls-ca", files["wrong-ca.pem"], *token, *cmd)
    (line,) = error_lines(wrong_ca, 3)
    assert line.startswith(f"rankd: error: TLS connection to node {first} failed: ")
    assert "TLS handshake failed" in line and "cannot reach" not in line

    plaintext = rankd("launch", "--nodes", first, *token, *cmd)
    (line,) = error_lines(plaintext, 3)
    assert line.startswith(f"rankd: error: TLS connection to node {first} failed: ")
    assert "give its CA (--tls-ca)" in line


@pytest.mark.timeout(60)
def test_other_commands_exit_3_on_a_refusal(secure: list[Agent], files: Files) -> None:
    first = secure[0].address
    tls = ["--tls-ca", files["ca.pem"]]
    for command in (["status"], ["status", "a-run"], ["logs", "a-run"], ["kill", "a-run"]):
        result = rankd(*command, "--nodes", first, *tls, "--token-file", files["other-token"])
        assert error_lines(result, 3) == [
            f"rankd: error: node {first} refused the token: UNAUTHENTICATED: wrong bearer token"
        ], command
    # With the right settings the same commands run: exit 0, or 2 for an unknown job.
    ok = ["--nodes", first, *tls, "--token-file", files["token"]]
    assert rankd("status", *ok).returncode == 0
    unknown = rankd("status", "a-run", *ok)
    assert error_lines(unknown, 2) == ["rankd: error: job a-run not found on any of the 1 nodes"]


@pytest.mark.timeout(60)
def test_policy_refusal_is_named_and_exits_3(tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "logs", "--allow-entrypoint", PYTHON)
    try:
        denied = rankd("launch", "--nodes", agent.address, "--", "/bin/true")
        (line,) = error_lines(denied, 3)
        assert line.startswith(
            f"rankd: error: node {agent.address} refused the request: PERMISSION_DENIED: "
            "entrypoint /bin/true is not allowed on this agent"
        )
        assert "--allow-entrypoint" in line
        allowed = rankd("launch", "--nodes", agent.address, "--", PYTHON, "-c", "print('ok')")
        assert allowed.returncode == 0, allowed.stderr
        assert allowed.stdout == "[default0]:ok\n"
    finally:
        agent.stop()


@pytest.mark.timeout(60)
def test_unreachable_is_still_exit_2() -> None:
    dead = f"127.0.0.1:{closed_port()}"
    result = rankd("launch", "--nodes", dead, "--timeout", "5", "--", PYTHON, "-c", "pass")
    head, detail = error_lines(result, 2)
    assert head == "rankd: error: cannot reach every node: 1 of 1 nodes failed"
    assert detail.startswith(f"  {dead}: agent unreachable (")


@pytest.mark.timeout(60)
def test_python_api_raises_authentication_failed(secure: list[Agent], files: Files) -> None:
    addresses = [a.address for a in secure]
    dead = f"127.0.0.1:{closed_port()}"
    creds = grpc.ssl_channel_credentials(root_certificates=Path(files["ca.pem"]).read_bytes())
    with (
        Cluster([*addresses, dead], timeout=5, token=TOKEN, credentials=creds) as cluster,
        pytest.raises(AuthenticationFailed) as err,
    ):
        cluster.launch([PYTHON, "-c", "pass"])
    assert isinstance(err.value, ClusterError)  # callers catching ClusterError still do
    assert set(err.value.errors) == {addresses[1], dead}
    assert type(err.value.errors[addresses[1]]) is AgentError  # the per-node error is unchanged
    assert isinstance(err.value.errors[dead], AgentUnavailable)
    lines = str(err.value).splitlines()
    assert (
        lines[0]
        == "cannot reach every node: 1 of 3 nodes refused this client (1 more failed otherwise)"
    )
    assert lines[1] == (
        f"  node {addresses[1]} refused the token: UNAUTHENTICATED: wrong bearer token"
    )
    assert lines[2].startswith(f"  {dead}: agent unreachable")
    for agent in secure:
        assert list(agent.log_dir.iterdir()) == []


def test_refusal_classifies_errors() -> None:
    address = "node01:29600"
    assert refusal(AgentError(address, "UNAUTHENTICATED", "wrong bearer token")) == (
        "node node01:29600 refused the token: UNAUTHENTICATED: wrong bearer token"
    )
    assert refusal(AgentError(address, "PERMISSION_DENIED", "entrypoint x")) == (
        "node node01:29600 refused the request: PERMISSION_DENIED: entrypoint x"
    )
    tls = AgentUnavailable(address, "UNAVAILABLE", "Tls handshake failed (TSI_PROTOCOL_FAILURE)")
    assert refusal(tls) == (
        "TLS connection to node node01:29600 failed: Tls handshake failed (TSI_PROTOCOL_FAILURE)"
    )
    refused_conn = AgentUnavailable(address, "UNAVAILABLE", "Connection refused")
    for not_refused in (
        refused_conn,
        InvalidArgument(address, "INVALID_ARGUMENT", "nprocs must be between 1 and 4, got 5"),
        AgentError(address, "RESOURCE_EXHAUSTED", "certificate-free limit"),
        ValueError("certificate"),
    ):
        assert refusal(not_refused) is None, not_refused

    assert type(cluster_error("x", {address: refused_conn}, 1)) is ClusterError
    one = cluster_error("x", {address: tls}, 4)
    assert type(one) is AuthenticationFailed
    assert str(one) == refusal(tls)  # one node: one line
