"""How a rank starts (agent.procs.spawn): its own session, stdin from /dev/null, output
appended to its files, default signal dispositions, nothing blocked, no descriptor of
the agent."""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import pytest

from rankd.agent import procs

pytestmark = pytest.mark.timeout(30)

REPORT = """
import os, sys
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
print("fds", fds[:-1] if len(fds) > 3 else fds)  # the last: listdir's own
print("sid", os.getsid(0) == os.getpid(), "pgid", os.getpgid(0) == os.getpid())
print("stdin", os.readlink("/proc/self/fd/0"))
blocked = open("/proc/self/status").read().split("SigBlk:")[1].split()[0]
print("blocked", int(blocked, 16))
print("cwd", os.getcwd())
print("env", os.environ.get("ONLY"), "PATH" in os.environ)
print("to stderr", file=sys.stderr)
"""


def _run(tmp_path: Path, argv: list[str], cwd: str | None = None) -> tuple[int, str, str]:
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    out.write_text("earlier\n")  # appended to, never truncated
    pid = procs.spawn(argv, env=[b"ONLY=this"], cwd=cwd, stdout_path=str(out), stderr_path=str(err))
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.read_text(), err.read_text()


def test_a_rank_starts_clean(tmp_path: Path) -> None:
    leak = os.open(os.devnull, os.O_RDONLY)  # an inheritable descriptor of the "agent"
    os.set_inheritable(leak, True)
    try:
        code, out, err = _run(tmp_path, [sys.executable, "-c", REPORT], cwd=str(tmp_path))
    finally:
        os.close(leak)
    assert code == 0, err
    assert out.splitlines() == [
        "earlier",
        "fds [0, 1, 2]",
        "sid True pgid True",
        "stdin /dev/null",
        "blocked 0",
        f"cwd {tmp_path}",
        "env this False",
    ]
    assert err == "to stderr\n"


def test_signals_python_ignores_are_default_in_a_rank(tmp_path: Path) -> None:
    # Python ignores SIGPIPE and SIGXFSZ; a rank must not inherit that (Python ranks
    # set their own at start, so look at a program that does not: grep itself)
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
    code, out, _ = _run(tmp_path, ["/bin/grep", "SigIgn", "/proc/self/status"])
    assert code == 0
    ignored = int(out.splitlines()[1].split()[1], 16)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGINT):
        assert not ignored & (1 << (sig - 1)), sig


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda p: str(p / "missing"), errno.ENOENT),
        (lambda p: _write(p / "data.txt", "not a program\n", 0o644), errno.EACCES),
        (lambda p: _write(p / "noshebang", "echo hi\n", 0o755), errno.ENOEXEC),
    ],
    ids=["missing", "not-executable", "no-shebang"],
)
def test_a_rank_that_cannot_start_is_an_oserror(tmp_path: Path, make: object, code: int) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    before = procs.agent_children()
    with pytest.raises(OSError) as raised:
        _run(tmp_path, [path])
    assert raised.value.errno == code
    assert procs.agent_children() == before  # nothing left to reap


def _write(path: Path, text: str, mode: int) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)
