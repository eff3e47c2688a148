"""The README's commands run as written: every shell block marked as tested is executed."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARK = "<!-- tested"


def readme_blocks() -> list[str]:
    text = README.read_text()
    return re.findall(r"<!-- tested[^\n]*-->\n```sh\n(.*?)```", text, flags=re.S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_readme_has_readme_blocks() -> None:
    assert README.read_text().count(MARK) == len(readme_blocks()) >= 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("block", readme_blocks())
def test_readme_block_runs(block: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PORT"] = str(_free_port())
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    shown = README.read_text().split(block, 1)[1].split("```", 1)[1]  # past its fence
    expected = re.search(r"```\n(.*?)```", shown, flags=re.S)
    assert expected is not None
    for line in expected.group(1).splitlines():
        # pids differ from run to run; everything else must match what the README shows
        pattern = (
            re.escape(line).replace(r"pid\ 24380", r"pid\ \d+").replace(r"pid\ 24381", r"pid\ \d+")
        )
        assert re.search(f"^{pattern}$", result.stdout, flags=re.M), (line, result.stdout)
