"""Running the ``rankd`` command: dispatch, exit codes, and the launch command.

The entry point is :func:`rankd.client.cli.main`; the parser is
:mod:`rankd.client.cli_parser`, the other commands :mod:`rankd.client.cli_jobs`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import IO

from rankd.client.cli_jobs import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_KILLED,
    EXIT_NODE_LOST,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    cmd_kill,
    cmd_logs,
    cmd_status,
    connection,
    error,
    exit_code_for,
    node_list,
    node_timeout,
)
from rankd.client.cli_parser import build_parser
from rankd.client.cli_stacks import cmd_stacks
from rankd.client.cluster import Cluster
from rankd.client.errors import (
    AuthenticationFailed,
    JobFailed,
    JobKilled,
    PlaintextTokenRefused,
    RankdError,
    refusal,
)
from rankd.client.membership import format_history
from rankd.client.torchrun import Progress

__all__ = [
    "EXIT_AUTH",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_KILLED",
    "EXIT_NODE_LOST",
    "EXIT_OK",
    "EXIT_USAGE",
    "run",
]


# Flags whose default is an environment variable: set once, like the token.
_ENV_DEFAULTS = (
    ("token_file", "RANKD_TOKEN_FILE"),
    ("tls_ca", "RANKD_TLS_CA"),
    ("tls_cert", "RANKD_TLS_CERT"),
    ("tls_key", "RANKD_TLS_KEY"),
)

_PLAINTEXT_REMEDY = (
    "give the agents' CA (--tls-ca or RANKD_TLS_CA), or pass --insecure if the network is trusted"
)


@contextmanager
def _warnings_on_stderr() -> Iterator[None]:
    """The client's security warnings (a token sent in plaintext under --insecure) as
    ``rankd: warning:`` lines on stderr while a command runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("rankd: warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    rpc_logger = logging.getLogger("rankd.client.rpc")
    rpc_logger.addHandler(handler)
    try:
        yield
    finally:
        rpc_logger.removeHandler(handler)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: kill the job everywhere, then exit."""


def run(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run ``rankd``; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2), already printed
        return int(done.code or 0)
    func = _COMMANDS[args.command]
    env = os.environ if environ is None else environ
    for dest, variable in _ENV_DEFAULTS:
        if getattr(args, dest) is None:
            setattr(args, dest, env.get(variable) or None)
    try:
        with _warnings_on_stderr():
            return func(args, env)
    except _Terminated:
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except PlaintextTokenRefused as err:
        error(str(PlaintextTokenRefused(err.addresses, remedy=_PLAINTEXT_REMEDY)))
        return EXIT_AUTH
    except AuthenticationFailed as err:
        error(str(err))
        return EXIT_AUTH
    except RankdError as err:
        error(refusal(err) or str(err))
        return exit_code_for(err)
    except ValueError as err:
        error(str(err))
        return EXIT_USAGE


# -- launch --------------------------------------------------------------------


class _Terminal:
    """Writes rank lines, notices and (on a terminal) a live status line.

    Lines into a file or pipe are flushed in batches, at most :data:`FLUSH_AFTER`
    seconds after they were written (a flush per line was most of the cost of
    ``rankd launch > file``); a switch between stdout and stderr flushes the other
    first, so their order holds where both go to one place. On a terminal with a
    status line, every line is flushed at once."""

    FLUSH_AFTER = 0.05

    def __init__(self, stdout: IO[str], stderr: IO[str], live: bool) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.live = live
        self._status = ""
        self._lock = threading.Lock()
        self._dirty: IO[str] | None = None  # written to since its last flush
        self._timer: threading.Timer | None = None

    def _clear(self) -> None:
        if self._status:
            self.stderr.write("\r\x1b[K")

    def _draw(self) -> None:
        if self._status:
            self.stderr.write(self._status)
            self.stderr.flush()

    def text(self, stream: str, text: str) -> None:
        """Rendered lines (``prefix + text + "\\n"`` each) of one stream."""
        target = self.stderr if stream == "stderr" else self.stdout
        with self._lock:
            if self.live:
                self._clear()
                self.stderr.flush()
                target.write(text)
                target.flush()
                self._draw()
                return
            if self._dirty is not None and self._dirty is not target:
                self._dirty.flush()
            target.write(text)
            self._dirty = target
            if self._timer is None:
                self._timer = threading.Timer(self.FLUSH_AFTER, self._flush_later)
                self._timer.daemon = True
                self._timer.start()

    def _flush_later(self) -> None:
        with self._lock:
            self._timer = None
            self._flush()

    def _flush(self) -> None:
        """Under the lock: what was written reaches its file."""
        if self._dirty is not None:
            self._dirty.flush()
            self._dirty = None

    def event(self, message: str) -> None:
        with self._lock:
            self._flush()
            self._clear()
            self.stderr.write(f"rankd: {message}\n")
            self.stderr.flush()
            self._draw()

    def progress(self, progress: Progress) -> None:
        with self._lock:
            self._clear()
            self._status = f"rankd: {progress.line()}"
            self._draw()

    def finish(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._flush()
            self._clear()
            self._status = ""
            self.stderr.flush()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cmd_launch(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ValueError("no command: rankd launch [OPTIONS] -- COMMAND [ARGS...]")
    nodes = node_list(args, environ)
    terminal = _Terminal(sys.stdout, sys.stderr, live=sys.stderr.isatty())
    settings = connection(args)
    with (
        _sigterm_as_interrupt(),
        Cluster(nodes, node_timeout=node_timeout(args), **settings) as cluster,
    ):
        try:
            result = cluster.launch(
                cmd,
                nproc_per_node=args.nproc_per_node,
                run_id=args.run_id,
                max_restarts=args.max_restarts,
                redirects=args.redirects,
                tee=args.tee,
                local_ranks_filter=args.local_ranks_filter or (),
                log_line_prefix_template=args.log_line_prefix_template,
                master_addr=args.master_addr,
                master_port=args.master_port,
                role_name=args.role,
                env=dict(args.env),
                cwd=args.cwd,
                kill_timeout=args.kill_timeout,
                lease=args.lease,
                detach=args.detach,
                hang_timeout=args.hang_timeout,
                numa_binding=args.numa_binding or "",
                cpu_bind=args.cpu_bind or "",
                nnodes=args.nnodes,
                on_text=terminal.text,
                on_event=terminal.event,
                on_progress=terminal.progress if terminal.live else None,
            )
        except JobKilled as killed:
            terminal.finish()
            print(killed.report.format(), file=sys.stderr, flush=True)
            return EXIT_KILLED
        except JobFailed as failed:
            terminal.finish()
            print(failed.report.format(), file=sys.stderr, flush=True)
            return EXIT_NODE_LOST if failed.report.root_node is not None else EXIT_FAILED
        except KeyboardInterrupt:
            terminal.finish()
            raise
        terminal.finish()
    if result.detached:
        _print_detached(result.job_id, args, cluster.nodes)
    elif len(result.memberships) > 1:  # restarted: how it got there, as a failure shows it
        lines = [f"rankd: the attempts of job {result.job_id}:"]
        lines += [f"rankd: {line}" for line in format_history(result.memberships)]
        print("\n".join(lines), file=sys.stderr, flush=True)
    return EXIT_OK


def _print_detached(run_id: str, args: argparse.Namespace, nodes: Sequence[object]) -> None:
    """The run id on stdout (for scripts), how to follow it on stderr."""
    where = f"--nodes {','.join(str(n) for n in nodes)}"
    print(run_id, flush=True)
    print(
        f"rankd: job {run_id} runs detached (no lease: it runs until it ends or is killed)\n"
        f"rankd:   follow it: rankd logs -f {run_id} {where}\n"
        f"rankd:   its state: rankd status {run_id} {where}\n"
        f"rankd:   stop it:   rankd kill {run_id} {where}",
        file=sys.stderr,
        flush=True,
    )


_Command = Callable[[argparse.Namespace, Mapping[str, str]], int]
_COMMANDS: dict[str, _Command] = {
    "launch": _cmd_launch,
    "status": cmd_status,
    "logs": cmd_logs,
    "stacks": cmd_stacks,
    "kill": cmd_kill,
}
