"""torchrun's defaults (OMP_NUM_THREADS=1, ...) yield to the node's own environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from rankd.client.torchrun import torchrun_defaults
from rankd.v1 import agent_pb2 as pb
from rankd.v1 import agent_pb2_grpc

AGENT = str(Path(sys.executable).with_name("rankd-agent"))
SHOW = "import os; print(os.environ['OMP_NUM_THREADS'], os.environ['X_DEF'], os.environ['Y_DEF'])"


def _env_seen(tmp_path: Path, agent_env: dict[str, str]) -> list[str]:
    proc = subprocess.Popen(
        [AGENT, "--port", "0", "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE,
        text=True,
        env=agent_env,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().split()[-1]
        with grpc.insecure_channel(address) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            spec = pb.JobSpec(
                job_id="defaults",
                nprocs=1,
                entrypoint=sys.executable,
                args=["-c", SHOW],
                env={"Y_DEF": "from-spec"},
                default_env={"OMP_NUM_THREADS": "1", "X_DEF": "default", "Y_DEF": "default"},
            )
            stub.Start(pb.StartRequest(spec=spec), timeout=10)
            msgs = stub.Stream(pb.StreamRequest(job_id="defaults", follow=True), timeout=30)
            return [ln.text for m in msgs for ln in m.lines]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_defaults_yield_to_the_agents_environment(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "X_DEF")}
    assert _env_seen(tmp_path / "a", base) == ["1 default from-spec"]
    assert _env_seen(tmp_path / "b", {**base, "OMP_NUM_THREADS": "4"}) == ["4 default from-spec"]


def test_torchrun_defaults() -> None:
    assert torchrun_defaults(1) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert torchrun_defaults(2)["OMP_NUM_THREADS"] == "1"
