"""Which CPUs each local rank is pinned to: torch's --numa-binding modes and srun's
--cpu-bind forms, computed from the node's `Topology` (pure: no process is touched).

NUMA modes, with torch 2.13's meanings (`torch/numa/binding.py`) when the node has
GPUs (local rank i uses GPU i; the CPUs are always those the agent may use):
- node: the CPUs of the NUMA node of the rank's GPU;
- socket: the CPUs of every NUMA node on that node's socket;
- exclusive: that NUMA node's physical cores split evenly among the GPUs on the node
  (lower GPU indices get the spare cores), a rank gets its share with all hyperthreads;
- core-complex: one L3 group of that NUMA node per GPU on it, the largest first,
  reused round-robin when the GPUs outnumber the groups.
Without GPUs the ranks spread over the NUMA nodes in order (the first nodes take one
more when they do not divide evenly) and each node's ranks stand where its GPUs would;
exclusive then splits logical CPUs when there are fewer cores than ranks on a node.

--cpu-bind (srun's forms): none; cores (rank i gets the i-th usable physical core);
map_cpu:<cpu>,... (rank i gets one CPU); mask_cpu:<hex>,... (rank i gets a mask's
CPUs). An entry may end in *<count>, and entries are reused from the start when the
ranks outnumber them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NoReturn

from rankd.agent.errors import FailedPrecondition, SpecError
from rankd.agent.topology import Topology, format_cpulist

__all__ = [
    "CPU_BIND_FORMS",
    "NUMA_MODES",
    "check_binding",
    "describe",
    "plan_binding",
]

NUMA_MODES = ("node", "socket", "exclusive", "core-complex")
CPU_BIND_FORMS = "none, cores, map_cpu:<cpu>[,<cpu>...], mask_cpu:<hex>[,<hex>...]"
_MAX_REPEAT = 4096


def check_binding(numa_binding: str, cpu_bind: str) -> None:
    """Raises SpecError (one line listing the valid values) unless both are well formed
    and at most one is set."""
    if numa_binding and numa_binding not in NUMA_MODES:
        raise SpecError(
            f"invalid numa_binding {numa_binding!r}: use one of {', '.join(NUMA_MODES)}"
        )
    entries = _cpu_bind_entries(cpu_bind)
    if numa_binding and entries is not None:
        raise SpecError(
            f"numa_binding {numa_binding!r} and cpu_bind {cpu_bind!r} both pin the ranks: "
            "give one of them"
        )


def _cpu_bind_entries(cpu_bind: str) -> list[frozenset[int]] | None:
    """None for no binding, [] for cores, else one CPU set per entry of a map or mask.
    Raises SpecError."""
    kind, _, values = cpu_bind.partition(":")
    if kind in ("", "none") and not values:
        return None
    if kind == "cores" and not values:
        return []
    if kind in ("map_cpu", "mask_cpu") and values:
        try:
            return _entries(values, mask=kind == "mask_cpu")
        except ValueError as err:
            raise SpecError(f"invalid cpu_bind {cpu_bind!r}: {err}") from None
    raise SpecError(f"invalid cpu_bind {cpu_bind!r}: use one of {CPU_BIND_FORMS}")


def _entries(values: str, *, mask: bool) -> list[frozenset[int]]:
    out: list[frozenset[int]] = []
    for item in values.split(","):
        text, star, count = item.strip().partition("*")
        repeat = int(count) if star else 1
        if not 1 <= repeat <= _MAX_REPEAT:
            raise ValueError(f"repeat count of {item!r} must be 1-{_MAX_REPEAT}")
        if mask:  # srun: always hexadecimal, "0x" optional
            bits = int(text.removeprefix("0x").removeprefix("0X"), 16)
            cpus = frozenset(i for i in range(bits.bit_length()) if bits >> i & 1)
            if not cpus:
                raise ValueError(f"mask {text!r} names no CPU")
        else:  # srun: decimal, or hexadecimal after "0x"
            cpu = int(text, 16) if text.lower().startswith("0x") else int(text)
            if cpu < 0:
                raise ValueError(f"CPU {text!r} is negative")
            cpus = frozenset({cpu})
        out.extend([cpus] * repeat)
    return out


def plan_binding(
    topo: Topology, nprocs: int, numa_binding: str, cpu_bind: str
) -> list[frozenset[int]] | None:
    """Each local rank's CPUs, or None when the spec binds nothing. The arguments were
    checked by `check_binding`. Raises FailedPrecondition, naming the node and its
    topology, when this node cannot give the binding."""
    if numa_binding:
        return _numa(topo, nprocs, numa_binding)
    entries = _cpu_bind_entries(cpu_bind)
    if entries is None:
        return None
    if not entries:
        return _cores(topo, nprocs)
    outside = sorted(set().union(*entries) - topo.cpus)
    if outside:
        _refuse(topo, f"cpu_bind {cpu_bind}: CPUs {format_cpulist(outside)} are not usable")
    return [entries[i % len(entries)] for i in range(nprocs)]


def _refuse(topo: Topology, what: str) -> NoReturn:
    raise FailedPrecondition(f"node {topo.hostname} ({topo.describe()}): {what}")


def _cores(topo: Topology, nprocs: int) -> list[frozenset[int]]:
    cores = _grouped(topo.cpus, topo.core_of)
    if nprocs > len(cores):
        _refuse(topo, f"cpu_bind cores: {nprocs} ranks but {len(cores)} usable cores")
    return [cores[i] for i in range(nprocs)]


def _grouped(cpus: frozenset[int], key: Mapping[int, int]) -> list[frozenset[int]]:
    """`cpus` grouped by `key` (core, L3 group), groups ordered by their key."""
    groups: dict[int, set[int]] = {}
    for cpu in cpus:
        groups.setdefault(key.get(cpu, cpu), set()).add(cpu)
    return [frozenset(groups[k]) for k in sorted(groups)]


def _numa(topo: Topology, nprocs: int, mode: str) -> list[frozenset[int]]:
    nodes = topo.usable_nodes()
    if not nodes:
        _refuse(topo, f"numa_binding {mode}: no NUMA node has a usable CPU")
    places = _places(topo, nprocs, mode, nodes)
    return [_mode_cpus(topo, mode, nodes, node, i, peers) for node, i, peers in places]


def _places(
    topo: Topology, nprocs: int, mode: str, nodes: Mapping[int, frozenset[int]]
) -> list[tuple[int, int, int]]:
    """Per local rank: (its NUMA node, its index among the node's GPUs or ranks, how
    many GPUs or ranks the node has)."""
    if not topo.gpus:
        ids = list(nodes)
        share, extra = divmod(nprocs, len(ids))
        counts = [share + (1 if j < extra else 0) for j in range(len(ids))]
        return [(ids[j], i, counts[j]) for j in range(len(ids)) for i in range(counts[j])]
    if nprocs > len(topo.gpus):
        _refuse(
            topo,
            f"numa_binding {mode}: local rank {len(topo.gpus)} has no GPU "
            f"({nprocs} ranks, {len(topo.gpus)} GPUs; local rank i uses GPU i)",
        )
    places = []
    for gpu in topo.gpus[:nprocs]:
        peers = [g.index for g in topo.gpus if g.numa_node == gpu.numa_node]
        if gpu.numa_node not in nodes:
            _refuse(
                topo,
                f"numa_binding {mode}: GPU {gpu.index}'s NUMA node "
                f"{gpu.numa_node} has no usable CPU",
            )
        places.append((gpu.numa_node, peers.index(gpu.index), len(peers)))
    return places


def _mode_cpus(
    topo: Topology, mode: str, nodes: Mapping[int, frozenset[int]], node: int, i: int, peers: int
) -> frozenset[int]:
    cpus = nodes[node]
    if mode == "node":
        return cpus
    if mode == "socket":
        # torch: the socket of the node's lowest usable CPU, and every node whose lowest
        # usable CPU is on it
        sock = topo.socket_of.get(min(cpus), 0)
        return frozenset().union(
            *(c for c in nodes.values() if topo.socket_of.get(min(c), 0) == sock)
        )
    if mode == "core-complex":
        groups = sorted(_grouped(cpus, topo.l3_of), key=lambda g: (-len(g), min(g)))
        return groups[i % len(groups)]
    units = cores = _grouped(cpus, topo.core_of)
    if len(units) < peers and not topo.gpus and len(cpus) >= peers:
        units = [frozenset({c}) for c in sorted(cpus)]  # no GPUs: logical CPUs will do
    share, extra = divmod(len(units), peers)
    if share < 1:
        _refuse(
            topo,
            f"numa_binding exclusive: NUMA node {node} has {len(cores)} usable cores "
            f"({len(cpus)} CPUs) for {peers} {'GPUs' if topo.gpus else 'ranks'}",
        )
    start = i * share + min(i, extra)
    return frozenset().union(*units[start : start + share + (1 if i < extra else 0)])


def describe(mode: str, cpus: Sequence[Sequence[int]]) -> str:
    """The binding for the attempt's log line: ", pinned (node): 0-3 | 0-3 | 4-7" by
    local rank ("" when no rank is pinned)."""
    if not any(cpus):
        return ""
    return f", pinned ({mode}): " + " | ".join(format_cpulist(c) for c in cpus)
