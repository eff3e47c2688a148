"""Worker scripts shared by tests of several folders."""

from __future__ import annotations

from pathlib import Path

__all__ = ["GATED", "write"]

# Each rank waits until the file `<argv[1]>-<LOCAL_RANK>` exists, then exits with argv[2]
# (default 0): a test decides when each rank ends.
GATED = """\
import os, sys, time
gate = sys.argv[1] + "-" + os.environ["LOCAL_RANK"]
while not os.path.exists(gate):
    time.sleep(0.01)
sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
"""


def write(tmp_path: Path, name: str, body: str) -> str:
    """Write a worker script into `tmp_path`; returns its path."""
    path = tmp_path / name
    path.write_text(body)
    return str(path)
