"""Fake sysfs/procfs trees that describe another machine's topology, for an agent
started with RANKD_TOPOLOGY_ROOT (or `agent.topology.TopologySource(root)`).

The default machine: 2 sockets, 2 NUMA nodes per socket, 8 cores per node with 2
hyperthreads each (64 CPUs: CPU c and c+32 are siblings, as Linux numbers them), two L3
groups of 4 cores per node, and `gpus` NVIDIA GPUs spread evenly over the nodes in PCI
bus order.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CORES", "NODES", "PCI_BUSES", "FakeMachine", "node_cpus"]

NODES = 4
CORES = 8  # per NUMA node
THREADS = NODES * CORES  # CPU c and c + THREADS share a core
PCI_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)


def node_cpus(node: int) -> set[int]:
    """All CPUs of NUMA node `node` in the default machine."""
    first = set(range(node * CORES, (node + 1) * CORES))
    return first | {c + THREADS for c in first}


def _cpulist(cpus: set[int]) -> str:
    ordered = sorted(cpus)
    parts, start = [], ordered[0]
    for prev, cur in zip(ordered, [*ordered[1:], -1], strict=True):
        if cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(parts)


class FakeMachine:
    """Writes the tree under `root`. `gpus`: how many GPUs (<= 8); `allowed`: the agent's
    affinity (proc/self/status), all CPUs by default; `proc_driver`: whether the NVIDIA
    driver's proc directory is there (else GPUs are found on the PCI bus only)."""

    def __init__(
        self,
        root: Path,
        *,
        gpus: int = 8,
        allowed: set[int] | None = None,
        proc_driver: bool = True,
    ) -> None:
        self.root = root
        self.gpus = gpus
        self.cpus = set(range(2 * THREADS))
        self.allowed = self.cpus if allowed is None else allowed
        self.proc_driver = proc_driver
        self.write()

    def gpu_node(self, index: int) -> int:
        return index * NODES // max(self.gpus, 1)

    def pci(self, index: int) -> str:
        return f"0000:{PCI_BUSES[index]:02x}:00.0"

    def _put(self, rel: str, text: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

    def write(self) -> None:
        system = "sys/devices/system"
        self._put(f"{system}/cpu/online", _cpulist(self.cpus))
        self._put(f"{system}/node/possible", f"0-{NODES - 1}")
        self._put(f"{system}/node/online", f"0-{NODES - 1}")
        for node in range(NODES):
            self._put(f"{system}/node/node{node}/cpulist", _cpulist(node_cpus(node)))
        for cpu in sorted(self.cpus):
            core = cpu % THREADS
            node = core // CORES
            base = f"{system}/cpu/cpu{cpu}"
            self._put(f"{base}/topology/physical_package_id", str(node // 2))
            self._put(f"{base}/topology/thread_siblings_list", _cpulist({core, core + THREADS}))
            self._put(f"{base}/cache/index0/type", "Data")
            self._put(f"{base}/cache/index0/level", "1")
            self._put(f"{base}/cache/index0/shared_cpu_list", _cpulist({core, core + THREADS}))
            self._put(f"{base}/cache/index1/type", "Instruction")
            self._put(f"{base}/cache/index1/level", "1")
            self._put(f"{base}/cache/index1/shared_cpu_list", _cpulist({core, core + THREADS}))
            first = core - core % 4  # 4 cores share an L3
            l3 = set(range(first, first + 4))
            self._put(f"{base}/cache/index3/type", "Unified")
            self._put(f"{base}/cache/index3/level", "3")
            self._put(
                f"{base}/cache/index3/shared_cpu_list", _cpulist(l3 | {c + THREADS for c in l3})
            )
        self._put(
            "proc/self/status", f"Name:\trankd-agent\nCpus_allowed_list:\t{_cpulist(self.allowed)}"
        )
        for index in range(self.gpus):
            self._gpu(index)
        self._put("sys/bus/pci/devices/0000:00:1f.2/vendor", "0x8086")  # not a GPU
        self._put("sys/bus/pci/devices/0000:00:1f.2/class", "0x010601")
        self._put("sys/bus/pci/devices/0000:00:1f.2/numa_node", "-1")

    def _gpu(self, index: int) -> None:
        pci = self.pci(index)
        dev = f"sys/bus/pci/devices/{pci}"
        self._put(f"{dev}/vendor", "0x10de")
        self._put(f"{dev}/class", "0x030200")
        self._put(f"{dev}/numa_node", str(self.gpu_node(index)))
        if self.proc_driver:
            self._put(
                f"proc/driver/nvidia/gpus/{pci}/information",
                f"Model: \t\t NVIDIA H100 80GB HBM3\nDevice Minor: \t {7 - index}\n"
                f"GPU UUID: \t GPU-{index:x}{index:x}aa1234-0000-0000-0000-000000000000\n"
                f"Bus Location: \t {pci}",
            )
