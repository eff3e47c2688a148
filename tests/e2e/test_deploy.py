"""The deployment files are valid and carry the settings that matter."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
AGENT_BIN = str(Path(sys.executable).with_name("rankd-agent"))


def _agent_flags() -> set[str]:
    help_text = subprocess.run(
        [AGENT_BIN, "--help"], capture_output=True, text=True, check=True
    ).stdout
    return set(re.findall(r"--[a-z][a-z-]+", help_text))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "rankd-agent.service").read_text()
    # verify checks that ExecStart exists: point it at this checkout's agent
    local = tmp_path / "rankd-agent.service"
    local.write_text(unit.replace("/usr/local/bin/rankd-agent", AGENT_BIN))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "rankd-agent.service" not in result.stderr, result.stderr  # no warnings about it


def test_systemd_unit_settings() -> None:
    unit = (DEPLOY / "systemd" / "rankd-agent.service").read_text()
    flat = unit.replace("\\\n", " ")
    exec_start = next(line for line in flat.splitlines() if line.startswith("ExecStart="))
    used = set(re.findall(r"--[a-z][a-z-]+", exec_start))
    assert used <= _agent_flags(), used - _agent_flags()
    for needed in ("--token-file", "--tls-cert", "--tls-key"):
        assert needed in used
    for setting in ("NoNewPrivileges=yes", "KillMode=mixed", "User=rankd", "LoadCredential=token:"):
        assert setting in unit


def test_kubernetes_manifests() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "rankd-agent.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"DaemonSet", "Service"}
    ds, svc = kinds["DaemonSet"], kinds["Service"]
    assert ds["apiVersion"] == "apps/v1"
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["clusterIP"] == "None"

    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    assert {f"--{k}" for k in args} <= _agent_flags()
    port = int(args["port"])
    assert port in {p["containerPort"] for p in container["ports"]}
    assert svc["spec"]["ports"][0]["port"] == port
    probe = container["readinessProbe"]["grpc"]
    assert probe["port"] == int(args["health-port"])
    assert probe["service"] == "rankd.v1.NodeAgent"

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    token = volumes["token"]["secret"]
    assert token["secretName"] == "rankd-token"
    assert token["defaultMode"] & 0o007 == 0  # the agent refuses a world-readable token
    assert args["token-file"].startswith(mounts["token"] + "/")
    assert args["tls-cert"].startswith(mounts["tls"] + "/")
    assert args["log-dir"] == mounts["logs"]


def test_kubernetes_agent_user_can_read_its_secrets_and_write_its_logs() -> None:
    """The agent runs as the image's non-root user: the secrets and the log directory
    must be usable by it (root-owned 0400 files and a root-owned hostPath are not)."""
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "rankd-agent.yaml").read_text()))
    pod = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    security = pod["securityContext"]
    user, group = security["runAsUser"], security["runAsGroup"]
    assert security["runAsNonRoot"] is True and user != 0
    assert security["fsGroup"] == group  # secret files become group `group`

    # The image's user is the one the manifest runs as.
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(rf"^USER {user}:{group}$", dockerfile, flags=re.M)
    assert f"--uid {user}" in dockerfile and f"--gid {group}" in dockerfile

    for volume in pod["volumes"]:
        if "secret" in volume:
            mode = volume["secret"]["defaultMode"]
            assert mode & 0o040, volume  # readable by fsGroup, i.e. by the agent
            assert mode & 0o007 == 0, volume  # never by others

    (container,) = pod["containers"]
    log_dir = dict(a.removeprefix("--").split("=", 1) for a in container["args"])["log-dir"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["chown", f"{user}:{group}", log_dir]
    assert {m["mountPath"] for m in init["volumeMounts"]} == {log_dir}
    assert init["image"] == container["image"]


def test_docker_build_context_leaves_out_the_venv() -> None:
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignored)
