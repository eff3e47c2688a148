"""Node lists: ``host:port`` lists, hostfiles and Slurm node-list expressions.

Every source yields :class:`Node` objects in order: the order is the node rank
(``GROUP_RANK``), so node 0 hosts ``MASTER_ADDR`` by default.

- ``"a:50051,b:50052"``: comma-separated ``host[:port]`` entries;
- Slurm syntax in any entry: ``node[01-04,07]`` (zero padding kept),
  ``a[1-2],b3``, several bracket groups (``rack[1-2]-n[01-02]``);
- hostfiles: one ``host[:port]`` per line, ``#`` comments, blank lines, and
  trailing words such as MPI's ``slots=8`` ignored;
- ``SLURM_JOB_NODELIST`` as the default source.

IPv6 literals are written in brackets: ``[::1]:29600``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rankd.client.errors import NodeListError

__all__ = [
    "DEFAULT_PORT",
    "Node",
    "expand_hostlist",
    "nodes_from_env",
    "parse_nodes",
    "read_hostfile",
    "resolve_nodes",
]

#: The port a ``rankd-agent`` is assumed to listen on when a node names none.
DEFAULT_PORT = 29600  # rankd-agent's default --port

_MAX_EXPANSION = 100_000
_HOST_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True, order=True)
class Node:
    """One agent: its host and port."""

    host: str
    port: int = DEFAULT_PORT

    @property
    def address(self) -> str:
        """The gRPC target, ``host:port`` (``[v6]:port`` for IPv6 literals)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.address


def _split_outside_brackets(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise NodeListError(f"unbalanced ']' in {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise NodeListError(f"unbalanced '[' in {text!r}")
    parts.append("".join(current))
    return parts


def _expand_range_list(body: str, expr: str) -> list[str]:
    values: list[str] = []
    for item in body.split(","):
        item = item.strip()
        if not item:
            raise NodeListError(f"empty range in {expr!r}")
        lo, dash, hi = item.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise NodeListError(f"bad range {item!r} in {expr!r}: expected N or N-M")
        if not dash:
            values.append(lo)
            continue
        start, stop = int(lo), int(hi)
        if stop < start:
            raise NodeListError(f"bad range {item!r} in {expr!r}: end before start")
        if stop - start >= _MAX_EXPANSION:
            raise NodeListError(f"range {item!r} in {expr!r} is too large")
        # Slurm keeps the width of the lower bound: node[08-10] -> node08..node10.
        width = len(lo) if lo.startswith("0") else 0
        values.extend(str(n).zfill(width) for n in range(start, stop + 1))
    return values


def expand_hostlist(expr: str) -> list[str]:
    """Expand a Slurm host list: ``"node[01-03,07],gpu1"`` -> five host names.

    Zero padding is kept; several bracket groups in one name multiply out in
    order (``"r[1-2]-n[1-2]"`` -> ``r1-n1, r1-n2, r2-n1, r2-n2``).
    """
    hosts: list[str] = []
    for entry in _split_outside_brackets(expr.strip(), ","):
        entry = entry.strip()
        if not entry:
            continue
        hosts.extend(_expand_entry(entry, expr))
        if len(hosts) > _MAX_EXPANSION:
            raise NodeListError(f"node list {expr!r} expands to too many hosts")
    return hosts


def _expand_entry(entry: str, expr: str) -> list[str]:
    pieces: list[list[str]] = []
    pos = 0
    for match in re.finditer(r"\[([^\[\]]*)\]", entry):
        pieces.append([entry[pos : match.start()]])
        pieces.append(_expand_range_list(match.group(1), expr))
        pos = match.end()
    pieces.append([entry[pos:]])
    names = ["".join(combo) for combo in itertools.product(*pieces)]
    for name in names:
        if not _HOST_RE.match(name):
            raise NodeListError(f"bad host name {name!r} in {expr!r}")
    return names


def _split_port(entry: str, default_port: int, source: str) -> tuple[str, int]:
    """``entry`` -> (host expression, port)."""
    if entry.startswith("[") and "]" in entry and ":" in entry[: entry.index("]")]:
        host, _, rest = entry[1:].partition("]")  # IPv6 literal
        if rest and not rest.startswith(":"):
            raise NodeListError(f"bad address {entry!r} in {source}")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = entry.rpartition(":") if ":" in entry else (entry, "", "")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise NodeListError(f"bad port {port_text!r} in {entry!r} ({source})")
    return host, int(port_text)


def _nodes_from_entry(entry: str, default_port: int, source: str) -> list[Node]:
    host_expr, port = _split_port(entry, default_port, source)
    if not host_expr:
        raise NodeListError(f"missing host in {entry!r} ({source})")
    if ":" in host_expr:  # IPv6 literal: no Slurm expansion
        return [Node(host_expr, port)]
    return [Node(host, port) for host in expand_hostlist(host_expr)]


def _check_unique(nodes: list[Node], source: str) -> list[Node]:
    seen: set[Node] = set()
    for node in nodes:
        if node in seen:
            raise NodeListError(f"node {node} appears twice in {source}")
        seen.add(node)
    if not nodes:
        raise NodeListError(f"no nodes in {source}")
    return nodes


def parse_nodes(text: str, *, default_port: int = DEFAULT_PORT) -> list[Node]:
    """Parse ``"h1:p1,h2,node[01-04]:p"``; entries without a port get ``default_port``."""
    source = f"node list {text!r}"
    nodes: list[Node] = []
    for entry in _split_outside_brackets(text.strip(), ","):
        entry = entry.strip()
        if entry:
            nodes.extend(_nodes_from_entry(entry, default_port, source))
    return _check_unique(nodes, source)


def read_hostfile(path: str | Path, *, default_port: int = DEFAULT_PORT) -> list[Node]:
    """Read a hostfile: one ``host[:port]`` (or Slurm expression) per line.

    ``#`` starts a comment, blank lines are skipped, and words after the first
    (MPI's ``slots=8``) are ignored.
    """
    source = f"hostfile {str(path)!r}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise NodeListError(f"cannot read {source}: {err.strerror or err}") from err
    nodes: list[Node] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        entry = line.split()[0]
        try:
            nodes.extend(_nodes_from_entry(entry, default_port, source))
        except NodeListError as err:
            raise NodeListError(f"{err} (line {lineno})") from err
    return _check_unique(nodes, source)


def nodes_from_env(
    environ: Mapping[str, str], *, default_port: int = DEFAULT_PORT
) -> list[Node] | None:
    """The nodes of ``SLURM_JOB_NODELIST`` in ``environ``, or None when it is unset."""
    nodelist = environ.get("SLURM_JOB_NODELIST", "").strip()
    if not nodelist:
        return None
    return parse_nodes(nodelist, default_port=default_port)


def resolve_nodes(
    *,
    nodes: str | None = None,
    hostfile: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    default_port: int = DEFAULT_PORT,
) -> list[Node]:
    """The node list from ``nodes``, else ``hostfile``, else ``SLURM_JOB_NODELIST``."""
    if nodes is not None and hostfile is not None:
        raise NodeListError("give either a node list or a hostfile, not both")
    if nodes is not None:
        return parse_nodes(nodes, default_port=default_port)
    if hostfile is not None:
        return read_hostfile(hostfile, default_port=default_port)
    found = nodes_from_env(environ or {}, default_port=default_port)
    if found is None:
        raise NodeListError(
            "no nodes given: use --nodes HOST:PORT,... or --hostfile FILE "
            "(or run inside a Slurm allocation, which sets SLURM_JOB_NODELIST)"
        )
    return found
