"""Fixtures of the agent-core tests: a Supervisor over tmp_path, no gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers.core import Core, open_core


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core(tmp_path) as handle:
        yield handle
