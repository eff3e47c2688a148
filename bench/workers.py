"""The ranks the benchmarks run: tiny Python programs given to ``python -c``.

Both sides run exactly the same argv (``PYTHON -c SOURCE ARGS...``), so the work a rank
does is identical and only the launcher differs.
"""

from __future__ import annotations

import sys

__all__ = [
    "EXIT_AT",
    "FLOOD",
    "LINE_BYTES",
    "PYTHON",
    "SLEEP",
    "SLEEP_READY",
    "TIMESTAMPS",
    "flood_line",
    "python_args",
]

PYTHON = sys.executable

# Sleep for argv[1] seconds.
SLEEP = "import sys, time\ntime.sleep(float(sys.argv[1]))\n"

# Create the file argv[1]/<pid> (the rank is ready: its interpreter is up), then sleep
# for argv[2] seconds.
SLEEP_READY = """\
import os, sys, time
open(os.path.join(sys.argv[1], str(os.getpid())), "w").close()
time.sleep(float(sys.argv[2]))
"""

# Print argv[1] lines, each the wall-clock time it was written, argv[2] seconds apart.
TIMESTAMPS = """\
import sys, time
count, gap = int(sys.argv[1]), float(sys.argv[2])
for _ in range(count):
    print(repr(time.time()), flush=True)
    time.sleep(gap)
"""

# Write argv[2] lines of exactly LINE_BYTES bytes (newline included) as fast as the
# kernel takes them; argv[1] is the rank, written into every line so lines differ.
LINE_BYTES = 100
FLOOD = """\
import os, sys
rank, count = int(sys.argv[1]), int(sys.argv[2])
block = 1000
lines = [(f"r{rank} {i:09d} ".ljust(99, "x") + "\\n").encode() for i in range(block)]
data = b"".join(lines)
for _ in range(count // block):
    os.write(1, data)
rest = count % block
if rest:
    os.write(1, b"".join(lines[:rest]))
"""

# Sleep argv[2] seconds, then write the wall-clock exit instant into the file argv[1]
# and exit at once.
EXIT_AT = """\
import os, sys, time
time.sleep(float(sys.argv[2]))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, repr(time.time()).encode())
os._exit(0)
"""


def python_args(source: str, *args: object) -> list[str]:
    """The args after the interpreter: ``-c SOURCE ARGS...``."""
    return ["-c", source, *(str(a) for a in args)]


def flood_line(rank: int, index: int) -> str:
    """The text (without newline) FLOOD writes as line `index` of `rank`."""
    return f"r{rank} {index:09d} ".ljust(99, "x")
