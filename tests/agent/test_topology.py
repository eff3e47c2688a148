"""The node's topology and the ranks' CPU binding: a fake 2-socket, 4-NUMA-node, 8-GPU
machine (a tree of files, checked against torch 2.13's own `torch.numa.binding` where
it can run), and this machine (real agents, real ranks reporting their affinity)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from helpers.agents import Agent, start_agent
from helpers.fake_topology import PCI_BUSES, FakeMachine, node_cpus
from helpers.wait import wait_until

from rankd.agent.binding import check_binding, plan_binding
from rankd.agent.errors import FailedPrecondition, SpecError
from rankd.agent.topology import ROOT_ENV, Topology, TopologySource, parse_cpulist
from rankd.client.topology import (
    TopologyError,
    parse_cpu_bind,
    parse_nproc,
    parse_numa_binding,
    resolve_nproc,
)
from rankd.testing import start_agent as start_local_agent
from rankd.v1 import agent_pb2 as pb

MODES = ("node", "socket", "exclusive", "core-complex")
HOST = socket.gethostname()


def sets(topo: Topology, nprocs: int, mode: str = "", cpu_bind: str = "") -> list[set[int]]:
    planned = plan_binding(topo, nprocs, mode, cpu_bind)
    assert planned is not None
    return [set(c) for c in planned]


@pytest.fixture
def machine(tmp_path: Path) -> FakeMachine:
    return FakeMachine(tmp_path / "root")


# -- reading the tree ------------------------------------------------------------------


def test_reads_the_fake_machine(machine: FakeMachine) -> None:
    topo = TopologySource(str(machine.root)).read()
    assert topo.cpus == frozenset(range(64))
    assert {n: set(c) for n, c in topo.numa_nodes.items()} == {n: node_cpus(n) for n in range(4)}
    assert {s: set(c) for s, c in topo.sockets.items()} == {
        0: node_cpus(0) | node_cpus(1),
        1: node_cpus(2) | node_cpus(3),
    }
    assert len(topo.l3_groups) == 8 and topo.l3_groups[4] == parse_cpulist("4-7,36-39")
    assert topo.core_of[33] == 1  # siblings: CPU 1 and 33
    # PCI bus order (the driver's minor numbers run the other way), two per NUMA node
    assert [(g.index, g.numa_node, g.pci_address) for g in topo.gpus] == [
        (i, i // 2, f"0000:{bus:02x}:00.0") for i, bus in enumerate(PCI_BUSES)
    ]
    assert "64 of 64 CPUs usable" in topo.describe() and "8 GPUs" in topo.describe()


def test_the_affinity_and_cuda_visible_devices_limit_what_ranks_get(tmp_path: Path) -> None:
    root = str(FakeMachine(tmp_path, allowed=set(range(4, 64))).root)
    assert TopologySource(root).read().cpus == frozenset(range(4, 64))
    assert [g.pci_address for g in TopologySource(root, "6,1").read().gpus] == [
        "0000:ba:00.0",
        "0000:2a:00.0",
    ]
    # a UUID prefix names a GPU; CUDA ignores everything after an entry that names none
    picked = TopologySource(root, "GPU-33aa,9,0").read().gpus
    assert [(g.index, g.pci_address) for g in picked] == [(0, "0000:5d:00.0")]
    assert TopologySource(root, "").read().gpus == ()
    assert len(TopologySource(root, "0,1,0").read().gpus) == 2  # a repeat ends the list


def test_gpus_are_found_on_the_pci_bus_without_the_driver(tmp_path: Path) -> None:
    topo = TopologySource(str(FakeMachine(tmp_path, gpus=4, proc_driver=False).root)).read()
    assert [(g.index, g.numa_node) for g in topo.gpus] == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_this_machine_is_read_without_a_root() -> None:
    topo = TopologySource().read()
    assert topo.cpus == frozenset(os.sched_getaffinity(0))
    assert set().union(*topo.numa_nodes.values()) >= topo.cpus


# -- the modes -------------------------------------------------------------------------

TORCH_SIDE = """
import json, sys, types
import torch
import torch.numa.binding as b
buses, allowed, modes = json.loads(sys.argv[1])
b._get_gpu_count = lambda: len(buses)
torch.cuda.get_device_properties = lambda i: types.SimpleNamespace(
    pci_domain_id=0, pci_bus_id=buses[i], pci_device_id=0)
b._get_allowed_cpu_indices_for_current_thread = lambda: set(allowed)
out = {m: [sorted(b._get_logical_cpus_to_bind_to(
    gpu_index=i, numa_options=b.NumaOptions(affinity_mode=b.AffinityMode(m))))
    for i in range(len(buses))] for m in modes}
print(json.dumps(out))
"""


def torch_sets(root: Path, allowed: set[int]) -> dict[str, list[set[int]]]:
    """torch's own CPU sets for every GPU in every mode, with the fake tree mounted over
    /sys/devices/system and /sys/bus/pci/devices in a mount namespace of its own (torch
    reads fixed paths). torch.cuda's device properties and count, and the thread's
    affinity (the fake machine has CPUs this one lacks), are the only stand-ins."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount the fake tree over /sys")
    pytest.importorskip("torch.numa.binding")
    arg = json.dumps([list(PCI_BUSES), sorted(allowed), list(MODES)])
    mounts = " && ".join(
        f"mount --bind {root}/{d} /{d}" for d in ("sys/devices/system", "sys/bus/pci/devices")
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'{mounts} && exec "$0" -c "$1" "$2"', sys.executable, TORCH_SIDE, arg],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if done.returncode != 0 and "mount" in done.stderr and "permission" in done.stderr.lower():
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    return {m: [set(c) for c in cpus] for m, cpus in json.loads(done.stdout).items()}


@pytest.mark.parametrize(
    "allowed",
    [set(range(64)), set(range(64)) - {0, 1, 2, 3, 40, 41, 42, 43, 50}],
    ids=["all-cpus", "some-taken-by-other-tenants"],
)
def test_each_mode_gives_torchs_cpu_sets(tmp_path: Path, allowed: set[int]) -> None:
    machine = FakeMachine(tmp_path / "root", allowed=allowed)
    topo = TopologySource(str(machine.root)).read()
    expected = torch_sets(machine.root, allowed)
    for mode in MODES:
        assert sets(topo, 8, mode) == expected[mode], mode
    # and what the modes mean, spelled out on the full machine
    if allowed == set(range(64)):
        assert sets(topo, 8, "node")[3] == node_cpus(1)
        assert sets(topo, 8, "socket")[5] == node_cpus(2) | node_cpus(3)
        assert sets(topo, 8, "exclusive")[3] == parse_cpulist("12-15,44-47")


def test_without_gpus_ranks_spread_over_the_numa_nodes_in_order(tmp_path: Path) -> None:
    topo = TopologySource(str(FakeMachine(tmp_path, gpus=0).root)).read()
    assert sets(topo, 4, "node") == [node_cpus(n) for n in range(4)]
    assert sets(topo, 6, "node") == [node_cpus(n) for n in (0, 0, 1, 1, 2, 3)]
    halves = sets(topo, 8, "exclusive")
    assert halves[0] == parse_cpulist("0-3,32-35") and halves[1] == parse_cpulist("4-7,36-39")
    # more ranks on a node than cores: its logical CPUs are split instead
    many = sets(topo, 4 * 16, "exclusive")
    assert [len(c) for c in many] == [1] * 64 and set().union(*many) == set(range(64))
    with pytest.raises(
        FailedPrecondition, match=r"NUMA node 0 has 8 usable cores \(16 CPUs\) for 17 ranks"
    ):
        plan_binding(topo, 4 * 17, "exclusive", "")


def test_cpu_bind_forms(machine: FakeMachine) -> None:
    topo = TopologySource(str(machine.root)).read()
    assert sets(topo, 3, cpu_bind="cores") == [{0, 32}, {1, 33}, {2, 34}]
    assert sets(topo, 4, cpu_bind="map_cpu:0,0x2*2") == [{0}, {2}, {2}, {0}]
    assert sets(topo, 3, cpu_bind="mask_cpu:0x3,c") == [{0, 1}, {2, 3}, {0, 1}]
    assert plan_binding(topo, 3, "", "none") is None
    assert plan_binding(topo, 3, "", "") is None


@pytest.mark.parametrize(
    ("numa", "cpu_bind", "words"),
    [
        ("numa", "", "invalid numa_binding 'numa': use one of node, socket, exclusive, "),
        ("", "map_cpu:", "use one of none, cores, map_cpu:<cpu>[,<cpu>...], mask_cpu:"),
        ("", "rank", "invalid cpu_bind 'rank': use one of none, cores"),
        ("", "mask_cpu:0x0", "mask '0x0' names no CPU"),
        ("", "map_cpu:1*0", "repeat count"),
        ("node", "cores", "give one of them"),
    ],
)
def test_invalid_values_are_refused_in_one_line(numa: str, cpu_bind: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        check_binding(numa, cpu_bind)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_what_the_node_cannot_give_is_refused_naming_it(tmp_path: Path) -> None:
    topo = TopologySource(str(FakeMachine(tmp_path, gpus=2, allowed=set(range(60))).root)).read()
    for nprocs, numa, cpu_bind, words in [
        (3, "node", "", "local rank 2 has no GPU (3 ranks, 2 GPUs"),
        (2, "", "map_cpu:1,63", "CPUs 63 are not usable"),
        (33, "", "cores", "33 ranks but 32 usable cores"),
    ]:
        with pytest.raises(FailedPrecondition) as err:
            plan_binding(topo, nprocs, numa, cpu_bind)
        text = str(err.value)
        assert text.startswith(f"node {HOST} (60 of 64 CPUs usable"), text
        assert "4 NUMA nodes" in text and words in text


# -- a real agent on this machine ------------------------------------------------------

AFFINITY = """\
import os
print("CPUS", ",".join(map(str, sorted(os.sched_getaffinity(0)))), flush=True)
"""


def run(agent: Agent, script: str, job: str, nprocs: int, **binding: str) -> pb.JobStatus:
    spec = pb.JobSpec(job_id=job, nprocs=nprocs, entrypoint=sys.executable, args=[script],
                      **binding)  # fmt: skip
    agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)

    def poll() -> pb.JobStatus:
        return agent.stub.Poll(pb.PollRequest(job_id=job), timeout=5).job

    wait_until(lambda: poll().end_time > 0, 20, f"{job} to end")
    status = poll()
    assert status.state == pb.SUCCEEDED, status
    return status


def reported(status: pb.JobStatus) -> list[set[int]]:
    out = []
    for rank in status.ranks:
        line = Path(rank.stdout_path).read_text().split()
        out.append({int(c) for c in line[1].split(",")})
    return out


@pytest.fixture
def info_agent(tmp_path: Path) -> Iterator[Agent]:
    """An agent on this machine that logs at INFO (its attempts' log lines), kept in
    `stderr_lines` and not echoed (they are not a failure's output)."""
    logs = tmp_path / "agent-logs"
    handle = Agent.adopt(start_local_agent(logs, log_level="INFO", echo_stderr=False))
    try:
        yield handle
    finally:
        handle.stop()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) != 2, reason="written for a 2-CPU machine")
def test_exclusive_and_node_on_this_machine(
    info_agent: Agent, script: Callable[[str, str], str]
) -> None:
    agent = info_agent
    worker = script("affinity.py", AFFINITY)
    status = run(agent, worker, "excl", 2, numa_binding="exclusive")
    got = reported(status)
    assert got == [{0}, {1}] and [list(r.cpus) for r in status.ranks] == [[0], [1]]
    status = run(agent, worker, "node", 2, numa_binding="node")
    assert reported(status) == [{0, 1}, {0, 1}]
    assert [list(r.cpus) for r in status.ranks] == [[0, 1], [0, 1]]
    status = run(agent, worker, "map", 2, cpu_bind="map_cpu:1")
    assert reported(status) == [{1}, {1}]
    plain = run(agent, worker, "plain", 2)  # no binding: the agent's own affinity
    assert reported(plain) == [{0, 1}, {0, 1}] and not plain.ranks[0].cpus
    logged = "attempt 0 started: 2 ranks of"
    wait_until(
        lambda: any(
            logged in ln and "pinned (exclusive): 0 | 1" in ln for ln in agent.stderr_lines
        ),
        10,
        "the attempt's log line naming the binding",
    )
    # auto: no GPUs here, so as many ranks as usable CPUs
    info = agent.stub.Info(pb.InfoRequest(), timeout=5)
    assert list(info.topology.cpus) == [0, 1] and resolve_nproc("auto", info) == 2
    assert resolve_nproc("cpu", info) == 2 and resolve_nproc("3", info) == 3
    with pytest.raises(TopologyError, match=f"node {HOST} has no GPUs"):
        resolve_nproc("gpu", info)


def test_a_binding_the_node_cannot_give_starts_nothing(agent: Agent, tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    spec = pb.JobSpec(job_id="toomany", nprocs=cpus + 1, entrypoint=sys.executable,
                      args=["-c", "pass"], numa_binding="exclusive")  # fmt: skip
    with pytest.raises(grpc.RpcError) as err:
        agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    details = err.value.details()  # type: ignore[attr-defined]
    assert f"node {HOST} ({cpus} of" in details and "usable cores" in details
    assert not agent.stub.List(pb.ListRequest(), timeout=5).jobs
    assert not [p for p in (tmp_path / "agent-logs").iterdir() if p.name.startswith("toomany")]
    spec.numa_binding, spec.cpu_bind = "", "threads"
    with pytest.raises(grpc.RpcError) as err:
        agent.stub.Start(pb.StartRequest(spec=spec), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "use one of none, cores, map_cpu:" in err.value.details()  # type: ignore[attr-defined]


@pytest.fixture
def fake_agent(tmp_path: Path) -> Iterator[Agent]:
    """An agent that reads the fake 8-GPU machine, with CUDA_VISIBLE_DEVICES=7,6,5."""
    root = FakeMachine(tmp_path / "root").root
    env = {**os.environ, ROOT_ENV: str(root), "CUDA_VISIBLE_DEVICES": "7,6,5"}
    handle = Agent.adopt(start_local_agent(tmp_path / "logs", env=env))
    try:
        yield handle
    finally:
        handle.stop()


def test_info_reports_the_fake_machine(fake_agent: Agent) -> None:
    info = fake_agent.stub.Info(pb.InfoRequest(), timeout=5)
    topo = info.topology
    assert list(topo.cpus) == list(range(64))
    assert [(n.id, set(n.cpus)) for n in topo.numa_nodes] == [(n, node_cpus(n)) for n in range(4)]
    assert [s.id for s in topo.sockets] == [0, 1] and len(topo.l3_groups) == 8
    assert [(g.index, g.numa_node, g.pci_address) for g in topo.gpus] == [
        (0, 3, "0000:db:00.0"),
        (1, 3, "0000:ba:00.0"),
        (2, 2, "0000:ab:00.0"),
    ]
    assert resolve_nproc("gpu", info) == 3 and resolve_nproc("auto", info) == 3
    assert resolve_nproc("cpu", info) == 64


@pytest.mark.parametrize(
    "value",
    ["none", "cores", "map_cpu:0,2", "map_cpu:0x1f*3,4", "mask_cpu:0x3,c*2", "mask_cpu:ff",
     "map_cpu:", "map_cpu:a", "mask_cpu:0xg", "threads", "cores:1", "map_cpu:1*0", "None"],
)  # fmt: skip
def test_the_client_accepts_the_cpu_bind_values_the_agent_does(value: str) -> None:
    try:
        check_binding("", value)
        agent_ok = True
    except SpecError:
        agent_ok = False
    try:
        parse_cpu_bind(value)
        client_ok = True
    except TopologyError as err:
        client_ok = False
        assert "use one of none, cores, map_cpu:<cpu>[,<cpu>...], mask_cpu:" in str(err)
    assert client_ok == agent_ok


def test_the_client_checks_numa_modes_and_counts() -> None:
    assert [parse_numa_binding(m) for m in MODES] == list(MODES)
    with pytest.raises(TopologyError, match="use one of node, socket, exclusive, core-complex"):
        parse_numa_binding("cores")
    assert [parse_nproc(v) for v in ("auto", "gpu", "cpu", "8", 2)] == ["auto", "gpu", "cpu", 8, 2]
    for bad in ("0", "-1", "GPU", "", "1.5"):
        with pytest.raises(TopologyError, match="use auto, gpu, cpu or a number"):
            parse_nproc(bad)


@pytest.mark.skipif(0 not in os.sched_getaffinity(0), reason="CPU 0 is not ours to pin to")
def test_a_ranks_cpus_survive_an_agent_restart(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    noop = tmp_path / "noop.py"
    noop.write_text("pass\n")
    agent = start_agent(log_dir)
    try:
        status = run(agent, str(noop), "pinned", 2, cpu_bind="map_cpu:0")
        assert [list(r.cpus) for r in status.ranks] == [[0], [0]]
    finally:
        agent.stop()
    again = start_agent(log_dir)  # reads the job back from its job.json
    try:
        restored = again.stub.Poll(pb.PollRequest(job_id="pinned"), timeout=5).job
        assert [list(r.cpus) for r in restored.ranks] == [[0], [0]]
    finally:
        again.stop()
