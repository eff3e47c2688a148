"""Operating an agent: Prometheus metrics scraped during a job, JSON log records."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.agents import AGENT_BIN
from helpers.wait import wait_until
from prometheus_client.parser import text_string_to_metric_families

from rankd.v1 import agent_pb2 as pb
from rankd.v1 import agent_pb2_grpc


class ObservedAgent:
    def __init__(self, log_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [
                AGENT_BIN,
                "--port",
                "0",
                "--log-dir",
                str(log_dir),
                "--metrics-port",
                "0",
                "--log-format",
                "json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.address = self.proc.stdout.readline().split()[-1]
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        wait_until(lambda: any(ln.startswith("metrics on ") for ln in self.stderr), 10)
        line = next(ln for ln in self.stderr if ln.startswith("metrics on "))
        self.metrics_url = f"http://{line.split()[-1]}/metrics"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = agent_pb2_grpc.NodeAgentStub(self.channel)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            text = resp.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self._reader.join(5)
        self.channel.close()


@pytest.fixture
def observed(tmp_path: Path) -> Iterator[ObservedAgent]:
    agent = ObservedAgent(tmp_path / "logs")
    try:
        yield agent
    finally:
        agent.stop()


def test_metrics_during_a_job(observed: ObservedAgent) -> None:
    spec = pb.JobSpec(
        job_id="m1",
        nprocs=2,
        entrypoint=sys.executable,
        args=["-c", "import time; print('x', flush=True); time.sleep(60)"],
    )
    observed.stub.Start(pb.StartRequest(spec=spec), timeout=10)
    stream = observed.stub.Stream(pb.StreamRequest(job_id="m1", follow=True), timeout=60)
    seen = 0
    while seen < 2:  # both ranks' lines arrive; the stream stays open
        seen += len(next(stream).lines)
    m = observed.scrape()
    assert m[("rankd_ranks_running", ())] == 2
    assert m[("rankd_jobs", (("state", "RUNNING"),))] == 1
    assert m[("rankd_active_streams", ())] == 1
    assert m[("rankd_rpc_duration_seconds_count", (("code", "OK"), ("method", "Start")))] == 1

    with pytest.raises(grpc.RpcError):
        observed.stub.Poll(pb.PollRequest(job_id="nope"), timeout=5)
    observed.stub.Kill(pb.KillRequest(job_id="m1", timeout=5), timeout=15)
    rest = list(stream)
    assert rest[-1].end

    m = observed.scrape()
    assert m[("rankd_ranks_running", ())] == 0
    assert m[("rankd_jobs", (("state", "KILLED"),))] == 1
    assert m[("rankd_rank_exits_total", (("reason", "terminated"),))] == 2
    assert m[("rankd_log_lines_streamed_total", ())] >= 2
    assert m[("rankd_log_bytes_streamed_total", ())] >= 2
    assert m[("rankd_active_streams", ())] == 0
    assert m[("rankd_rpc_duration_seconds_count", (("code", "NOT_FOUND"), ("method", "Poll")))] == 1
    assert m[("rankd_rpc_duration_seconds_count", (("code", "OK"), ("method", "Stream")))] == 1


def test_json_log_records_carry_job_and_rank(observed: ObservedAgent) -> None:
    spec = pb.JobSpec(
        job_id="j1",
        nprocs=2,
        entrypoint=sys.executable,
        args=["-c", "import os, sys; sys.exit(int(os.environ['LOCAL_RANK']) * 5)"],
    )
    observed.stub.Start(pb.StartRequest(spec=spec), timeout=10)
    wait_until(lambda: any('"ended' in ln or "ended:" in ln for ln in observed.stderr), 10)
    records = [json.loads(ln) for ln in observed.stderr if ln.startswith("{")]
    assert records, observed.stderr
    about_job = [r for r in records if r.get("job_id") == "j1"]
    messages = [r["message"] for r in about_job]
    assert any("started" in msg for msg in messages)
    assert any("ended: FAILED" in msg for msg in messages)
    failed = [r for r in about_job if "failed" in r["message"] and r["level"] == "WARNING"]
    assert failed and failed[0]["local_rank"] == 1 and failed[0]["restart_count"] == 0
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)


def test_plaintext_health_port_beside_a_token_agent(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-long-enough-token-0123456789")
    token.chmod(0o600)
    proc = subprocess.Popen(
        [
            AGENT_BIN,
            "--port",
            "0",
            "--log-dir",
            str(tmp_path / "logs"),
            "--token-file",
            str(token),
            "--health-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        health_line = proc.stderr.readline()
        assert health_line.startswith("health on "), health_line
        assert proc.stdout.readline().startswith("listening on ")
        with grpc.insecure_channel(health_line.split()[-1]) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="rankd.v1.NodeAgent"), timeout=5
            )
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as info:  # nothing else is served there
                agent_pb2_grpc.NodeAgentStub(channel).Info(pb.InfoRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        proc.terminate()
        assert proc.wait(20) == -signal.SIGTERM  # the agent ends by the signal it got
