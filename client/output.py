"""Where a launch's rank lines go: torchrun's rules for what reaches the terminal
(``redirects``, ``tee``, ``local_ranks_filter``), each line's prefix (template
``[${role_name}${rank}]:`` unless another is given; ``${rank}``, ``${local_rank}``,
``${role_name}``, ``${host}``), and the caller's hooks: ``on_line`` an
:class:`~rankd.client.torchrun.OutputLine` per line, else ``on_text`` (or the process's
stdout/stderr) a rendered batch at a time."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from string import Template

from rankd.client.membership import Membership
from rankd.client.streams import TextChunk
from rankd.client.torchrun import (
    DEFAULT_PREFIX_TEMPLATE,
    LaunchConfig,
    LaunchHooks,
    OutputLine,
    parse_std,
)
from rankd.v1 import agent_pb2

__all__ = ["RankOutput"]

_STD_BITS = {"stdout": 1, "stderr": 2}


class RankOutput:
    """The output side of one launch; :meth:`use` each attempt's layout first."""

    def __init__(self, config: LaunchConfig, hooks: LaunchHooks) -> None:
        self.config = config
        self.hooks = hooks
        self.template = config.log_line_prefix_template or DEFAULT_PREFIX_TEMPLATE
        self._redirects = parse_std(config.redirects, "redirects")
        self._tee = parse_std(config.tee, "tee")
        self._prefixes: dict[tuple[int, int], str] = {}
        self._membership = Membership(0, (), "", 0)
        self._names: Sequence[str] = ()

    def use(self, membership: Membership, names: Sequence[str]) -> None:
        """The attempt's layout and its members' names, by group rank."""
        self._membership = membership
        self._names = names
        self._prefixes.clear()

    def visible(self, local_rank: int, stream: str) -> bool:
        """Does this rank's stream reach the terminal? (torchrun's rules)"""
        ranks = self.config.local_ranks_filter
        if ranks and local_rank not in ranks:
            return False
        bit = _STD_BITS[stream]
        return not self._redirects(local_rank) & bit or bool(self._tee(local_rank) & bit)

    def streams(self) -> list[str]:
        """The streams of which some rank of the attempt reaches the terminal."""
        nproc = self._membership.max_nproc
        return [s for s in ("stdout", "stderr") if any(self.visible(r, s) for r in range(nproc))]

    def prefix(self, node_rank: int, local_rank: int) -> str:
        key = (node_rank, local_rank)
        if key not in self._prefixes:
            self._prefixes[key] = Template(self.template).safe_substitute(
                role_name=self.config.role_name,
                rank=self._offset(node_rank) + local_rank,
                local_rank=local_rank,
                host=self._names[node_rank],
            )
        return self._prefixes[key]

    def _offset(self, node_rank: int) -> int:
        return self._membership.members[node_rank].rank_offset

    def line(self, node_rank: int, line: agent_pb2.LogLine, restart_count: int) -> None:
        """One line of group rank ``node_rank``'s stream (``on_line``, or written)."""
        stream = "stderr" if line.stream == agent_pb2.STDERR else "stdout"
        if not self.visible(line.local_rank, stream):
            return
        prefix = self.prefix(node_rank, line.local_rank)
        if self.hooks.on_line is None:
            self.write(stream, f"{prefix}{line.text}\n")
            return
        self.hooks.on_line(
            OutputLine(
                host=self._names[node_rank],
                node_rank=node_rank,
                global_rank=self._offset(node_rank) + line.local_rank,
                local_rank=line.local_rank,
                stream=stream,
                text=line.text,
                prefix=prefix,
                partial=line.partial,
                restart_count=restart_count,
            )
        )

    def chunk(self, chunk: TextChunk) -> None:
        """Rendered lines of one rank's stream (``on_text``, or written)."""
        stream = "stderr" if chunk.stream == agent_pb2.STDERR else "stdout"
        if self.visible(chunk.local_rank, stream):
            self.write(stream, chunk.text)

    def write(self, stream: str, text: str) -> None:
        hooks = self.hooks
        if hooks.on_text is not None:
            hooks.on_text(stream, text)
            return
        out = (hooks.stderr or sys.stderr) if stream == "stderr" else (hooks.stdout or sys.stdout)
        out.write(text)
        out.flush()
