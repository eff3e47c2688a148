"""The guardian: kills every process of an agent's jobs when the agent dies, even by SIGKILL.

The agent starts one guardian and keeps the write end of a pipe whose read end is the
guardian's stdin. When the agent exits for any reason the kernel closes that end; the
guardian reads EOF and SIGKILLs every process whose environment carries the agent's
marker (`RANKD_ATTEMPT=<agent tag>/...`): ranks, their children, grandchildren that
called setsid or were orphaned. Only a process that scrubbed its own environment and
re-exec'd escapes; that is documented.

Run as `python -P -m rankd.agent.guardian <agent tag>`: `-P` keeps the agent's working
directory off `sys.path`, so no folder there can shadow rankd's modules. Once its signal
handling is set up the guardian writes `armed` on stdout; an agent whose guardian does not
say so within `ARM_TIMEOUT` refuses to start (`GuardianError`).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time

from rankd.agent.errors import RankdError
from rankd.agent.linux import read_environ_marker

__all__ = ["ARM_TIMEOUT", "GuardianError", "kill_marked", "spawn_guardian"]

ARM_TIMEOUT = 20.0  # a cold interpreter start on a loaded node takes well under a second
_ARMED = b"armed\n"


class GuardianError(RankdError):
    """The guardian did not start, so an agent's SIGKILL would leave its ranks behind."""


_ROUNDS = 40  # forks in flight are caught by the next scan; bounded, ~2 s at most
_PAUSE = 0.05


def spawn_guardian(
    agent_tag: str, *, timeout: float = ARM_TIMEOUT
) -> tuple[subprocess.Popen[bytes], int]:
    """Start the guardian and wait until it is armed; returns it and the pipe's write end,
    which the agent must keep open (and never pass to a child) for as long as it lives.

    Raises `GuardianError`, naming the cause from the guardian's stderr, when it exits or
    stays silent for `timeout` seconds; nothing is left running then."""
    read_end, write_end = os.pipe()  # both non-inheritable by default
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "rankd.agent.guardian", agent_tag],
                stdin=read_end,
                stdout=subprocess.PIPE,
                stderr=errors,
                start_new_session=True,  # a Ctrl-C meant for the agent must not kill it
                close_fds=True,
            )
        except OSError:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        assert proc.stdout is not None
        with proc.stdout:
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            said = os.read(proc.stdout.fileno(), len(_ARMED)) if ready else b""
        if said == _ARMED:
            return proc, write_end
        os.close(write_end)  # an armed-late guardian sweeps nothing: no rank exists yet
        proc.kill()
        proc.wait()
        errors.seek(0)
        raise GuardianError(_why(said, errors.read(), timeout))


def _why(said: bytes, stderr: bytes, timeout: float) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    if lines:
        cause = lines[-1]
    elif said:
        cause = f"it said {said!r} instead of 'armed'"
    else:
        cause = f"it exited or was silent for {timeout:g} s"
    return f"the guardian (which kills this agent's ranks if it dies) did not start: {cause}"


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
        print("usage: python -P -m rankd.agent.guardian <agent tag>", file=sys.stderr)
        return 2
    tag = argv[0]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.write(1, _ARMED)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the agent stopped reading
    while os.read(0, 4096):  # blocks until the agent is gone
        pass
    for _ in range(_ROUNDS):
        if kill_marked(tag) == 0:
            break
        time.sleep(_PAUSE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
