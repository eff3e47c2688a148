"""The reference: torch's ``torch.distributed.elastic.multiprocessing``, used as
``torchrun`` uses it (``start_processes`` with ``DefaultLogsSpecs``, ``wait``, ``close``,
``TailLog``).

Ranks always write into files (``redirects=Std.ALL``), as rankd's always do, so both
sides pay for the same files. torch's own log lines (``Sending process ... closing
signal``) go to ``torch.log`` in the benchmark's scratch directory, as the agent's go to
its log file.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["LockedFile", "TimedSink", "TorchLauncher"]

_ids = itertools.count()


def _import_torch_mp() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Failed to initialize NumPy" on a numpy-less venv
        import torch.distributed.elastic.multiprocessing as mp
        import torch.distributed.elastic.multiprocessing.tail_log  # noqa: F401 - mp.tail_log
    return mp


class TorchLauncher:
    """Starts process groups with torch's API under `root`."""

    def __init__(self, root: Path) -> None:
        self.mp = _import_torch_mp()
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        elastic = logging.getLogger("torch.distributed.elastic")
        if not any(getattr(h, "_rankd_bench", False) for h in elastic.handlers):
            handler = logging.FileHandler(root / "torch.log")
            handler._rankd_bench = True  # type: ignore[attr-defined]
            elastic.addHandler(handler)
            elastic.propagate = False

    def logs_specs(self, *, tee: int = 0) -> Any:
        std = self.mp.Std
        return self.mp.DefaultLogsSpecs(
            log_dir=str(self.root), redirects=std.ALL, tee=std(tee) if tee else std.NONE
        )

    def start(
        self,
        nprocs: int,
        entrypoint: str,
        args: Sequence[str] = (),
        *,
        rank_args: dict[int, Sequence[str]] | None = None,
        tee: int = 0,
    ) -> Any:
        """``start_processes`` of `nprocs` copies; returns the ``PContext`` (pids known)."""
        run_id = f"bench-{os.getpid()}-{next(_ids)}"
        rank_args = rank_args or {}
        return self.mp.start_processes(
            name="default",
            entrypoint=entrypoint,
            args={r: (*args, *rank_args.get(r, ())) for r in range(nprocs)},
            envs={r: {"TORCHELASTIC_RUN_ID": run_id, "LOCAL_RANK": str(r)} for r in range(nprocs)},
            logs_specs=self.logs_specs(tee=tee),
        )

    def tail(self, files: dict[int, str], dst: Any) -> Any:
        """A started ``TailLog`` over `files` into `dst` (torch's default 0.1 s interval)."""
        return self.mp.tail_log.TailLog("default", files, dst).start()


class TimedSink:
    """A ``TailLog`` destination that notes when each write arrived (``time.time()``)."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((time.time(), text))
        return len(text)

    def flush(self) -> None:
        pass


class LockedFile:
    """A text file that ``TailLog``'s threads can share: one lock around each write.

    ``TailLog`` gives every file its own thread and they all write into one ``dst``;
    a plain text file object is not thread-safe and then loses or repeats buffered
    data (seen here: 40,022 lines out of 40,000 written)."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            return self._file.write(text)

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def close(self) -> None:
        self._file.close()
