"""What every scenario factory gets: where to put files, how big to make things."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.torch_side import TorchLauncher

__all__ = ["TRUE", "Config", "ms"]

TRUE = "/bin/true" if os.path.exists("/bin/true") else (shutil.which("true") or "true")


def ms(seconds: float) -> float:
    return seconds * 1000.0


@dataclass
class Config:
    """`root`: the run's scratch directory (agents' and torch's log dirs). `quick`: tiny
    sizes for the smoke test."""

    root: Path
    quick: bool = False
    _torch: TorchLauncher | None = field(default=None, repr=False)

    def pick(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def torch(self) -> TorchLauncher:
        """One torch launcher for the run (importing torch takes a second or two)."""
        if self._torch is None:
            from bench.torch_side import TorchLauncher

            self._torch = TorchLauncher(self.root / "torch")
        return self._torch

    def scratch(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path
