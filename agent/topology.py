"""The node's topology as the agent sees it: its usable CPUs, NUMA nodes, sockets, L3
(core-complex) groups, physical cores and GPUs, read from sysfs and procfs under an
injectable root (no torch, no nvidia-ml).

What is read, under `root`:
- `sys/devices/system/cpu/online` and, per CPU, `topology/physical_package_id`,
  `topology/thread_siblings_list`, and `cache/index*/{type,level,shared_cpu_list}`
  (the highest-level data or unified cache, as torch's core-complex mode takes);
- `sys/devices/system/node/node*/cpulist` (nodes without CPUs are left out; without
  the directory the node is one NUMA node 0);
- GPUs: the PCI addresses under `proc/driver/nvidia/gpus/` (with their `information`
  for the UUID), else the NVIDIA display and 3D controllers (vendor 0x10de, class
  0x0300xx or 0x0302xx) of `sys/bus/pci/devices/`; each GPU's NUMA node from
  `sys/bus/pci/devices/<address>/numa_node`. They are numbered in PCI bus order (as
  nvidia-smi, and CUDA with CUDA_DEVICE_ORDER=PCI_BUS_ID), then CUDA_VISIBLE_DEVICES
  picks and renumbers them as CUDA does (indices or UUID prefixes, up to the first
  entry that names no GPU).
- The agent's affinity: `os.sched_getaffinity(0)` for the real root; under another
  root, `proc/self/status`'s Cpus_allowed_list, else every online CPU.

The root is "/" unless the agent's environment sets RANKD_TOPOLOGY_ROOT (for tests
that describe another machine with a tree of files).
"""

from __future__ import annotations

import functools
import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "ROOT_ENV",
    "Gpu",
    "Topology",
    "TopologySource",
    "agent_source",
    "format_cpulist",
    "parse_cpulist",
]

#: The agent's environment variable naming another sysfs/procfs root (tests).
ROOT_ENV = "RANKD_TOPOLOGY_ROOT"
_NVIDIA = 0x10DE
_GPU_CLASSES = (0x0300, 0x0302)  # VGA compatible, 3D controller
_NODE_DIR = re.compile(r"node(\d+)")


def parse_cpulist(text: str) -> frozenset[int]:
    """CPUs of a kernel cpulist such as "0-3,8,10-11" ("" is none). Raises ValueError."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """The kernel's compact form of a set of CPUs: {0, 1, 2, 5} -> "0-2,5"."""
    parts: list[str] = []
    ordered = sorted(cpus)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True, slots=True)
class Gpu:
    """A GPU the ranks can use: `index` as CUDA numbers it for them."""

    index: int
    numa_node: int
    pci_address: str


@dataclass(frozen=True)
class Topology:
    """What one node has. `cpus` are those the agent may use (its affinity); the NUMA
    nodes list all their CPUs. `socket_of`, `core_of` and `l3_of` map each online CPU
    to its socket, its physical core (the lowest CPU of its hyperthread siblings) and
    its L3 group (the group's lowest CPU)."""

    hostname: str
    cpus: frozenset[int]
    numa_nodes: Mapping[int, frozenset[int]]
    socket_of: Mapping[int, int]
    core_of: Mapping[int, int]
    l3_of: Mapping[int, int]
    gpus: tuple[Gpu, ...] = ()

    @property
    def sockets(self) -> dict[int, frozenset[int]]:
        return _groups(self.socket_of)

    @property
    def l3_groups(self) -> dict[int, frozenset[int]]:
        return _groups(self.l3_of)

    def usable_nodes(self) -> dict[int, frozenset[int]]:
        """Each NUMA node's CPUs that the agent may use, for nodes that have any."""
        nodes = {n: cpus & self.cpus for n, cpus in sorted(self.numa_nodes.items())}
        return {n: cpus for n, cpus in nodes.items() if cpus}

    def describe(self) -> str:
        """One line: "2 of 64 CPUs usable (0-1); 2 NUMA nodes (0: 0-31, 1: 32-63);
        2 sockets; 8 GPUs (NUMA nodes 0,0,0,0,1,1,1,1)"."""
        nodes = ", ".join(f"{n}: {format_cpulist(c)}" for n, c in sorted(self.numa_nodes.items()))
        words = [
            f"{len(self.cpus)} of {len(self.socket_of)} CPUs usable ({format_cpulist(self.cpus)})",
            f"{_count(len(self.numa_nodes), 'NUMA node')} ({nodes})",
            _count(len(self.sockets), "socket"),
        ]
        if self.gpus:
            where = ",".join(str(g.numa_node) for g in self.gpus)
            words.append(f"{_count(len(self.gpus), 'GPU')} (NUMA nodes {where})")
        else:
            words.append("no GPUs")
        return "; ".join(words)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _groups(of: Mapping[int, int]) -> dict[int, frozenset[int]]:
    out: dict[int, set[int]] = {}
    for cpu, key in of.items():
        out.setdefault(key, set()).add(cpu)
    return {key: frozenset(cpus) for key, cpus in sorted(out.items())}


@dataclass(frozen=True)
class TopologySource:
    """Reads the node's `Topology` under `root`; `cuda_visible_devices` is the agent's
    CUDA_VISIBLE_DEVICES (None: unset, every GPU). Each `read` looks again (the
    affinity and the GPUs can change); the CPU layout is cached while the online CPUs
    stay the same."""

    root: str = "/"
    cuda_visible_devices: str | None = None

    def read(self) -> Topology:
        """The topology now. Raises OSError only when even the online CPUs cannot be
        read; a missing detail (caches, NUMA, GPUs) reads as absent."""
        online_text = _read(self._path("sys/devices/system/cpu/online"))
        if online_text is None:
            raise OSError(f"cannot read {self._path('sys/devices/system/cpu/online')}")
        online = parse_cpulist(online_text)
        nodes = _numa_nodes(self._path("sys/devices/system/node"), online)
        socket_of, core_of, l3_of = _cpu_layout(self._path("sys/devices/system/cpu"), online)
        return Topology(
            hostname=socket.gethostname(),
            cpus=self._affinity(online),
            numa_nodes=nodes,
            socket_of=socket_of,
            core_of=core_of,
            l3_of={cpu: l3_of.get(cpu, _node_key(nodes, cpu)) for cpu in online},
            gpus=self._gpus(),
        )

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _affinity(self, online: frozenset[int]) -> frozenset[int]:
        if os.path.realpath(self.root) == "/":
            return frozenset(os.sched_getaffinity(0))
        status = _read(self._path("proc/self/status")) or ""
        found = re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.MULTILINE)
        return parse_cpulist(found.group(1)) & online if found else online

    def _gpus(self) -> tuple[Gpu, ...]:
        uuids = _nvidia_proc_gpus(self._path("proc/driver/nvidia/gpus"))
        pci = self._path("sys/bus/pci/devices")
        if uuids is None:
            uuids = dict.fromkeys(_nvidia_pci_gpus(pci), "")
        visible = _visible(sorted(uuids), uuids, self.cuda_visible_devices)
        return tuple(
            Gpu(i, max(_int(_read(os.path.join(pci, addr, "numa_node")), 0), 0), addr)
            for i, addr in enumerate(visible)
        )


@functools.cache
def agent_source() -> TopologySource:
    """The agent's own source, from its environment as it started: RANKD_TOPOLOGY_ROOT
    (default "/") and CUDA_VISIBLE_DEVICES. The one reader of those settings, shared by
    Info and the launcher so that both see the same node."""
    return TopologySource(os.environ.get(ROOT_ENV) or "/", os.environ.get("CUDA_VISIBLE_DEVICES"))


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _int(text: str | None, default: int, base: int = 10) -> int:
    try:
        return int((text or "").strip(), base)
    except ValueError:
        return default


def _numa_nodes(node_dir: str, online: frozenset[int]) -> dict[int, frozenset[int]]:
    try:
        names = os.listdir(node_dir)
    except OSError:
        names = []
    nodes: dict[int, frozenset[int]] = {}
    for name in names:
        match = _NODE_DIR.fullmatch(name)
        text = _read(os.path.join(node_dir, name, "cpulist")) if match else None
        if match and text is not None:
            cpus = parse_cpulist(text) & online
            if cpus:  # a memory-only node (CXL, HBM) runs no rank
                nodes[int(match.group(1))] = cpus
    return dict(sorted(nodes.items())) or {0: online}


def _node_key(nodes: Mapping[int, frozenset[int]], cpu: int) -> int:
    """Without cache information, a CPU's L3 group is its NUMA node (named by its lowest
    CPU, as groups are)."""
    for cpus in nodes.values():
        if cpu in cpus:
            return min(cpus)
    return cpu


@functools.lru_cache(maxsize=8)
def _cpu_layout(
    cpu_dir: str, online: frozenset[int]
) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
    """Per online CPU: its socket, its core (lowest sibling) and, where the caches are
    described, its last-level cache group (lowest CPU sharing it)."""
    socket_of: dict[int, int] = {}
    core_of: dict[int, int] = {}
    l3_of: dict[int, int] = {}
    for cpu in sorted(online):
        base = os.path.join(cpu_dir, f"cpu{cpu}")
        socket_of[cpu] = _int(_read(os.path.join(base, "topology/physical_package_id")), 0)
        siblings = _read(os.path.join(base, "topology/thread_siblings_list"))
        core_of[cpu] = min(parse_cpulist(siblings or "") | {cpu})
        shared = _last_level_cache(os.path.join(base, "cache"))
        if shared:
            l3_of[cpu] = min(shared | {cpu})
    return socket_of, core_of, l3_of


def _last_level_cache(cache_dir: str) -> frozenset[int]:
    """The CPUs sharing the highest-level data or unified cache (torch's rule)."""
    try:
        names = os.listdir(cache_dir)
    except OSError:
        return frozenset()
    best, shared = -1, frozenset[int]()
    for name in names:
        if not (name.startswith("index") and name[5:].isdecimal()):
            continue
        index = os.path.join(cache_dir, name)
        if (_read(os.path.join(index, "type")) or "").strip() not in ("Unified", "Data"):
            continue
        level = _int(_read(os.path.join(index, "level")), -1)
        text = _read(os.path.join(index, "shared_cpu_list"))
        if level > best and text is not None:
            best, shared = level, parse_cpulist(text)
    return shared


def _nvidia_proc_gpus(proc_dir: str) -> dict[str, str] | None:
    """The driver's GPUs: PCI address -> UUID ("" if not stated); None without the
    driver's directory."""
    try:
        names = os.listdir(proc_dir)
    except OSError:
        return None
    found: dict[str, str] = {}
    for name in names:
        info = _read(os.path.join(proc_dir, name, "information")) or ""
        uuid = re.search(r"^GPU UUID:\s*(\S+)", info, re.MULTILINE)
        found[name.lower()] = uuid.group(1) if uuid else ""
    return found


def _nvidia_pci_gpus(pci_dir: str) -> tuple[str, ...]:
    try:
        names = os.listdir(pci_dir)
    except OSError:
        return ()
    return _nvidia_among(pci_dir, tuple(sorted(names)))


@functools.lru_cache(maxsize=8)
def _nvidia_among(pci_dir: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """The NVIDIA GPUs among the PCI devices `names` (cached while the bus holds the
    same devices: a host has hundreds, and Info reads them)."""
    return tuple(
        name
        for name in names
        if _int(_read(os.path.join(pci_dir, name, "vendor")), -1, 16) == _NVIDIA
        and _int(_read(os.path.join(pci_dir, name, "class")), -1, 16) >> 8 in _GPU_CLASSES
    )


def _visible(physical: list[str], uuids: Mapping[str, str], value: str | None) -> list[str]:
    """The GPUs CUDA_VISIBLE_DEVICES leaves, in its order: indices into `physical` or
    UUID prefixes ("GPU-8f2a..."), up to the first entry that names no GPU or names one
    again (CUDA ignores the rest)."""
    if value is None:
        return list(physical)
    chosen: list[str] = []
    for token in value.split(","):
        token = token.strip()
        if token.isdecimal() and int(token) < len(physical):
            addr = physical[int(token)]
        else:
            matches = [a for a in physical if token and uuids.get(a, "").startswith(token)]
            if len(matches) != 1:
                break
            addr = matches[0]
        if addr in chosen:
            break
        chosen.append(addr)
    return chosen
