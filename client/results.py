"""What a fanned-out call answers: one :class:`NodeResult` per node."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from rankd.client.errors import ClusterError, RankdError
from rankd.client.nodes import Node

__all__ = ["NodeResult", "raise_for_errors"]

T = TypeVar("T")


@dataclass(frozen=True)
class NodeResult(Generic[T]):
    """One node's answer to a fanned-out call: ``value`` or ``error``."""

    node: Node
    node_rank: int
    value: T | None = None
    error: RankdError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> T:
        """The value, or raise the node's error."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


def raise_for_errors(action: str, results: Sequence[NodeResult[T]]) -> list[T]:
    """The values of ``results``, or a :class:`ClusterError` naming every failed node."""
    errors = {str(r.node): r.error for r in results if r.error is not None}
    if errors:
        raise ClusterError(action, errors, len(results))
    return [r.unwrap() for r in results]
