"""Topology on the client's side: how many ranks `--nproc-per-node auto|gpu|cpu|N` gives
a node, from what its agent reports in Info, and the checks of the `--numa-binding` and
`--cpu-bind` values (the agent checks them again and computes the CPUs).

torchrun's meanings: `gpu` is the node's GPU count (as its agent sees them, after its
CUDA_VISIBLE_DEVICES), `cpu` the CPUs the agent may use, `auto` the GPUs if there are
any, else the CPUs. Each node is resolved by its own Info, so nodes may differ.
"""

from __future__ import annotations

import re

from rankd.client.errors import RankdError
from rankd.v1 import agent_pb2 as pb

__all__ = [
    "CPU_BIND_FORMS",
    "NPROC_MODES",
    "NUMA_MODES",
    "TopologyError",
    "parse_cpu_bind",
    "parse_nproc",
    "parse_numa_binding",
    "resolve_nproc",
]

NPROC_MODES = ("auto", "gpu", "cpu")
NUMA_MODES = ("node", "socket", "exclusive", "core-complex")
CPU_BIND_FORMS = "none, cores, map_cpu:<cpu>[,<cpu>...], mask_cpu:<hex>[,<hex>...]"
_COUNT = r"(\*[1-9][0-9]*)?"
_CPU_BIND = re.compile(
    rf"none|cores|map_cpu:((0[xX][0-9a-fA-F]+|[0-9]+){_COUNT},)*(0[xX][0-9a-fA-F]+|[0-9]+){_COUNT}"
    rf"|mask_cpu:((0[xX])?[0-9a-fA-F]+{_COUNT},)*(0[xX])?[0-9a-fA-F]+{_COUNT}"
)


class TopologyError(RankdError, ValueError):
    """A node cannot give what was asked (`gpu` ranks on a node without GPUs), or a
    topology flag's value is invalid."""


def parse_nproc(value: str | int) -> str | int:
    """`--nproc-per-node`'s value: "auto", "gpu", "cpu" or a count >= 1. Raises
    TopologyError in one line listing the valid values."""
    text = str(value).strip()
    if text in NPROC_MODES:
        return text
    if text.isdecimal() and int(text) >= 1:
        return int(text)
    raise TopologyError(
        f"invalid --nproc-per-node {value!r}: use auto, gpu, cpu or a number of ranks >= 1"
    )


def parse_numa_binding(value: str) -> str:
    """`--numa-binding`'s value (torch's modes); raises TopologyError listing them."""
    if value not in NUMA_MODES:
        raise TopologyError(f"invalid --numa-binding {value!r}: use one of {', '.join(NUMA_MODES)}")
    return value


def parse_cpu_bind(value: str) -> str:
    """`--cpu-bind`'s value (srun's forms); raises TopologyError listing them."""
    if not _CPU_BIND.fullmatch(value):
        raise TopologyError(f"invalid --cpu-bind {value!r}: use one of {CPU_BIND_FORMS}")
    return value


def resolve_nproc(mode: str | int, info: pb.InfoResponse) -> int:
    """The number of local ranks `mode` gives the node that answered `info`. Raises
    TopologyError for `gpu` on a node without GPUs (naming the node and what it has), for
    `cpu` or `auto` on a node whose agent reported no CPUs (an agent older than the
    topology report), and for an invalid mode."""
    wanted = parse_nproc(mode)
    if isinstance(wanted, int):
        return wanted
    topo = info.topology
    gpus, cpus = len(topo.gpus), len(topo.cpus)
    if wanted == "gpu" and gpus == 0:
        raise TopologyError(
            f"--nproc-per-node gpu: node {info.hostname or '?'} has no GPUs "
            f"({cpus} usable CPUs, {len(topo.numa_nodes)} NUMA nodes); "
            "give a number, or cpu"
        )
    if wanted == "gpu" or (wanted == "auto" and gpus):
        return gpus
    if cpus == 0:
        raise TopologyError(
            f"--nproc-per-node {wanted}: node {info.hostname or '?'} reported no topology "
            f"(agent version {info.version or '?'}); give a number"
        )
    return cpus
