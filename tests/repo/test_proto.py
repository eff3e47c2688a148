"""The committed generated code must be what `make proto` produces from the .proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("rankd/v1/agent.proto")  # relative to protos/, the include root
GENERATED = ["agent_pb2.py", "agent_pb2.pyi", "agent_pb2_grpc.py"]


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    (tmp_path / PROTO.parent).mkdir(parents=True)
    shutil.copy(ROOT / "protos" / PROTO, tmp_path / PROTO)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            str(PROTO),
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / PROTO.parent / name).read_text()
        committed = (ROOT / "protos" / PROTO.parent / name).read_text()
        assert fresh == committed, f"{name} is out of date with {PROTO}: run `make proto`"


def test_registered_name_is_the_import_path() -> None:
    from rankd.v1 import agent_pb2

    assert agent_pb2.DESCRIPTOR.name == "rankd/v1/agent.proto"
