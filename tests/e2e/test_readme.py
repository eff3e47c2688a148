"""The docs' commands run as written: every shell block marked as tested is executed.

The docs are README.md and every ``docs/*.md``. A tested block is a fenced ``sh`` block
right after a ``<!-- tested ... -->`` line; the next plain fenced block is what it prints.
Its test id is ``FILE::HEADING``, the file and the heading the block stands under.
The block runs with ``bash -euo pipefail`` in a temporary directory that stands for a
checkout (``deploy/`` and ``examples/`` are linked into it), with this venv's ``bin``
first on ``PATH`` and ``$PORT`` a free port.
Every shown line must appear in its stdout, where the block's default port (its
``PORT=${PORT:-N}`` line) stands for the free port and ``pid N`` for any pid. No
process the block started may outlive it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARK = "<!-- tested"
BLOCK_TIMEOUT = 60.0
# Set in every tested block's environment; a process that still carries it after the
# block ended was left behind (ranks inherit it from their agent).
LEFTOVER_VAR = "RANKD_README_BLOCK_ID"
_BLOCK_RE = re.compile(
    r"^<!-- tested[^\n]*-->\n```sh\n(?P<block>.*?)^```\n(?P<after>.*?)^```\n(?P<shown>.*?)^```",
    flags=re.S | re.M,
)


@dataclass(frozen=True)
class Block:
    title: str
    script: str
    shown: list[str]

    @property
    def default_port(self) -> str | None:
        found = re.search(r"^PORT=\$\{PORT:-(\d+)\}", self.script, flags=re.M)
        return found.group(1) if found else None


def doc_files() -> list[Path]:
    """README.md, then every docs/*.md in name order."""
    return [README, *sorted(DOCS.glob("*.md"))]


def _last_heading(text: str) -> str:
    """The last Markdown heading in ``text``, not counting `#` lines inside fenced code."""
    heading, fenced = "top", False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (found := re.match(r"#{1,6} (.+)$", line)):
            heading = found.group(1).strip()
    return heading


def file_blocks(path: Path) -> list[Block]:
    """The tested blocks of one file, each titled ``FILE::HEADING``."""
    text = path.read_text()
    name = path.relative_to(ROOT).as_posix()
    blocks = []
    for found in _BLOCK_RE.finditer(text):
        assert "```" not in found.group("after"), "a tested block must be followed by its output"
        blocks.append(
            Block(
                title=f"{name}::{_last_heading(text[: found.start()])}",
                script=found.group("block"),
                shown=found.group("shown").splitlines(),
            )
        )
    return blocks


def doc_blocks() -> list[Block]:
    return [block for path in doc_files() for block in file_blocks(path)]


def _free_port() -> int:
    """A port free on 127.0.0.1 and 127.0.0.2 (blocks may start an agent on each)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                with socket.socket() as second:
                    second.bind(("127.0.0.2", port))
            except OSError:
                continue
        return port
    raise AssertionError("no port free on both loopback addresses")


def _left_behind(block_id: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(LEFTOVER_VAR) == (
                block_id
            ):
                found.append(proc)
    return found


def _expected_line(line: str) -> str:
    """A shown line as a regex: exact, except that a pid is any number."""
    parts = re.split(r"(pid \d+)", line)
    return "".join(r"pid \d+" if re.fullmatch(r"pid \d+", p) else re.escape(p) for p in parts)


def test_docs_have_tested_blocks() -> None:
    for path in doc_files():  # every mark is followed by a block the harness runs
        assert path.read_text().count(MARK) == len(file_blocks(path)), path
    blocks = doc_blocks()
    assert len(blocks) >= 4
    titles = [b.title for b in blocks]
    assert len(set(titles)) == len(titles), titles  # test ids stay unique and readable
    assert {
        "README.md::CLI",
        "README.md::Python API",
        "docs/deploying.md::Deploying",
        "docs/security.md::Security",
    } <= set(titles), titles
    for block in blocks:
        assert block.shown, f"the block under {block.title!r} shows no output"
        assert block.default_port, f"the block under {block.title!r} has no PORT=${{PORT:-N}}"


def test_expected_line_pattern() -> None:
    pattern = _expected_line("    rank 0 (local 0): SUCCEEDED  pid 24380  exit 0")
    assert re.fullmatch(pattern, "    rank 0 (local 0): SUCCEEDED  pid 7  exit 0")
    assert not re.fullmatch(pattern, "    rank 0 (local 0): FAILED     pid 7  exit 0")


@pytest.mark.timeout(BLOCK_TIMEOUT + 30)
@pytest.mark.parametrize("block", doc_blocks(), ids=lambda b: b.title)
def test_doc_block_runs(block: Block, tmp_path: Path) -> None:
    if "openssl " in block.script and shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    for name in ("deploy", "examples"):  # the block runs as if in a checkout
        (tmp_path / name).symlink_to(ROOT / name)
    block_id = uuid.uuid4().hex
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANKD_", "SLURM_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        PORT=port,
        **{LEFTOVER_VAR: block_id},
    )
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", block.script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    started = time.monotonic()
    try:
        stdout, stderr = proc.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"block ran over {BLOCK_TIMEOUT}s:\n{stdout}\n{stderr}") from None
    finally:
        leftovers = _left_behind(block_id)
        deadline = time.monotonic() + 5
        while leftovers and time.monotonic() < deadline:  # exiting right now is fine
            time.sleep(0.05)
            leftovers = _left_behind(block_id)
        left_behind = []
        for left in leftovers:
            with contextlib.suppress(psutil.Error):
                left_behind.append(" ".join(left.cmdline()))
                left.kill()
    assert proc.returncode == 0, stdout + stderr
    assert time.monotonic() - started < BLOCK_TIMEOUT
    assert not left_behind, left_behind

    if block.default_port:
        stdout = stdout.replace(f":{port}", f":{block.default_port}")
    for line in block.shown:
        assert re.search(f"^{_expected_line(line)}$", stdout, flags=re.M), (line, stdout, stderr)
