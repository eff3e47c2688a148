"""Node lists: host:port lists, Slurm node-list syntax, hostfiles, SLURM_JOB_NODELIST."""

from __future__ import annotations

from pathlib import Path

import pytest

from rankd.client.errors import NodeListError
from rankd.client.nodes import (
    DEFAULT_PORT,
    Node,
    expand_hostlist,
    parse_nodes,
    read_hostfile,
    resolve_nodes,
)


@pytest.mark.parametrize(
    ("expr", "hosts"),
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("node[8-10]", ["node8", "node9", "node10"]),
        ("node[08-10]", ["node08", "node09", "node10"]),
        ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
        ("single", ["single"]),
        ("x[3],y", ["x3", "y"]),
        ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
        ("host.example.com", ["host.example.com"]),
    ],
)
def test_expand_hostlist(expr: str, hosts: list[str]) -> None:
    assert expand_hostlist(expr) == hosts


@pytest.mark.parametrize(
    "expr",
    ["node[1-", "node]1[", "node[a-b]", "node[3-1]", "node[1,,2]", "bad host", "n[1-2"],
)
def test_expand_hostlist_rejects_garbage(expr: str) -> None:
    with pytest.raises(NodeListError):
        expand_hostlist(expr)


def test_parse_nodes_ports_and_order() -> None:
    nodes = parse_nodes("b:7001, a ,node[01-02]:7005", default_port=7000)
    assert nodes == [
        Node("b", 7001),
        Node("a", 7000),
        Node("node01", 7005),
        Node("node02", 7005),
    ]
    assert [n.address for n in nodes] == ["b:7001", "a:7000", "node01:7005", "node02:7005"]


def test_parse_nodes_default_port_and_ipv6() -> None:
    assert parse_nodes("h") == [Node("h", DEFAULT_PORT)]
    nodes = parse_nodes("[::1]:5000,[::1]")
    assert nodes == [Node("::1", 5000), Node("::1", DEFAULT_PORT)]
    assert nodes[0].address == "[::1]:5000"


@pytest.mark.parametrize("text", ["", " , ", "a:b", "a:0", "a:70000", "a:1,a:1", ":5"])
def test_parse_nodes_errors(text: str) -> None:
    with pytest.raises(NodeListError):
        parse_nodes(text)


def test_hostfile(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text(
        "# the cluster\n\nnode01:7001   # first\nnode02 slots=8\n   gpu[1-2]:7009\n[::1]:7010\n"
    )
    assert read_hostfile(path, default_port=7000) == [
        Node("node01", 7001),
        Node("node02", 7000),
        Node("gpu1", 7009),
        Node("gpu2", 7009),
        Node("::1", 7010),
    ]


def test_hostfile_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("ok\nbad:port\n")
    with pytest.raises(NodeListError, match="line 2"):
        read_hostfile(path)
    with pytest.raises(NodeListError, match="cannot read"):
        read_hostfile(tmp_path / "missing")
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(NodeListError, match="no nodes"):
        read_hostfile(tmp_path / "empty")


def test_resolve_nodes_sources(tmp_path: Path) -> None:
    env = {"SLURM_JOB_NODELIST": "node[1-3]"}
    assert resolve_nodes(environ=env, default_port=9) == [
        Node("node1", 9),
        Node("node2", 9),
        Node("node3", 9),
    ]
    assert resolve_nodes(nodes="x:1", environ=env) == [Node("x", 1)]
    (tmp_path / "h").write_text("y:2\n")
    assert resolve_nodes(hostfile=tmp_path / "h", environ=env) == [Node("y", 2)]
    with pytest.raises(NodeListError, match="SLURM_JOB_NODELIST"):
        resolve_nodes(environ={})
    with pytest.raises(NodeListError, match="not both"):
        resolve_nodes(nodes="a", hostfile=tmp_path / "h")
