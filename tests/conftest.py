"""Fixtures for every level of the tests. Helpers live in the `helpers` package (this
file puts tests/ on sys.path); agents start through :mod:`rankd.testing`, the one way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.agents import Agent, agents, start_agent


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    """One real agent, stopped after the test."""
    handle = start_agent(tmp_path / "agent-logs")
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Agent]]:
    """Two real agents (node i logs to tmp_path/node<i>), stopped after the test."""
    with agents(tmp_path, 2) as started:
        yield started


@pytest.fixture
def script(tmp_path: Path) -> Callable[[str, str], str]:
    """Write a Python worker script into tmp_path; returns its path."""

    def write(name: str, body: str) -> str:
        path = tmp_path / name
        path.write_text(body)
        return str(path)

    return write
