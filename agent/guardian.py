"""The guardian: kills every process of an agent's jobs when the agent dies, even by SIGKILL.

The agent starts one guardian and keeps the write end of a pipe whose read end is the
guardian's stdin. When the agent exits for any reason the kernel closes that end; the
guardian reads EOF and SIGKILLs every process whose environment carries the agent's
marker (`RANKD_ATTEMPT=<agent tag>/...`): ranks, their children, grandchildren that
called setsid or were orphaned. Only a process that scrubbed its own environment and
re-exec'd escapes; that is documented.

Run as `python -m agent.guardian <agent tag>`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from agent.linux import read_environ_marker

__all__ = ["kill_marked", "spawn_guardian"]

_ROUNDS = 40  # forks in flight are caught by the next scan; bounded, ~2 s at most
_PAUSE = 0.05


def spawn_guardian(agent_tag: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start the guardian; returns it and the pipe's write end, which the agent must
    keep open (and never pass to a child) for as long as it lives."""
    read_end, write_end = os.pipe()  # both non-inheritable by default
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.guardian", agent_tag],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the agent must not kill it
            close_fds=True,
        )
    finally:
        os.close(read_end)
    return proc, write_end


def kill_marked(agent_tag: str) -> int:
    """SIGKILL every process marked as belonging to `agent_tag`; returns how many."""
    prefix = agent_tag.encode() + b"/"
    me = os.getpid()
    killed = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        marker = read_environ_marker(int(name))
        if marker is not None and marker.startswith(prefix):
            try:
                os.kill(int(name), signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m agent.guardian <agent tag>", file=sys.stderr)
        return 2
    tag = argv[0]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while os.read(0, 4096):  # blocks until the agent is gone
        pass
    for _ in range(_ROUNDS):
        if kill_marked(tag) == 0:
            break
        time.sleep(_PAUSE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
