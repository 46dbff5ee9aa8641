"""NUMA topology discovery and slot splitting, on sample sysfs trees built in tmp dirs."""
from __future__ import annotations

import json

import pytest

from pace_core.topology import (
    NumaNode,
    Slot,
    TopologyError,
    discover_numa_nodes,
    format_cpulist,
    host_slots,
    parse_cpulist,
    parse_topology_override,
    read_sysfs_nodes,
    resolve_cores_per_slot,
    split_slots,
)


def make_sysfs(root, nodes: dict[int, str], online: str | None = None,
               smt_pairs: int | None = None, extra_node_files=True):
    """A minimal /sys tree: node<N>/cpulist for each node, cpu/online, and (with
    smt_pairs=S) thread_siblings_list pairing cpu i with cpu i+S."""
    node_root = root / "devices" / "system" / "node"
    cpu_root = root / "devices" / "system" / "cpu"
    node_root.mkdir(parents=True)
    cpu_root.mkdir(parents=True)
    for n, cpulist in nodes.items():
        d = node_root / f"node{n}"
        d.mkdir()
        (d / "cpulist").write_text(cpulist + "\n")
        if extra_node_files:
            (d / "meminfo").write_text("Node 0 MemTotal: 1 kB\n")
    (node_root / "online").write_text(",".join(str(n) for n in nodes) + "\n")
    if online is not None:
        (cpu_root / "online").write_text(online + "\n")
    if smt_pairs:
        for c in range(2 * smt_pairs):
            t = cpu_root / f"cpu{c}" / "topology"
            t.mkdir(parents=True)
            core = c % smt_pairs
            (t / "thread_siblings_list").write_text(f"{core},{core + smt_pairs}\n")
    return root


# ------------------------------------------------------------------ cpulist

@pytest.mark.parametrize("text,cpus", [
    ("0", [0]),
    ("0-3", [0, 1, 2, 3]),
    ("0-3,8-9,12", [0, 1, 2, 3, 8, 9, 12]),
    ("0-10:5", [0, 5, 10]),
    ("", []),
    ("\n", []),
    ("3,1,2", [1, 2, 3]),
])
def test_parse_cpulist(text, cpus):
    assert parse_cpulist(text) == cpus


@pytest.mark.parametrize("bad", ["a", "3-1", "1-", "0-4:0", "-1"])
def test_parse_cpulist_rejects_garbage(bad):
    with pytest.raises(TopologyError):
        parse_cpulist(bad)


def test_format_cpulist_roundtrip():
    for cpus in ([0], [0, 1, 2, 5], [0, 2, 4], list(range(64)) + [100]):
        assert parse_cpulist(format_cpulist(cpus)) == cpus
    assert format_cpulist([5, 0, 1, 2]) == "0-2,5"
    assert format_cpulist([]) == ""


# ------------------------------------------------------------------ sysfs trees

def test_one_node(tmp_path):
    root = make_sysfs(tmp_path, {0: "0-1"}, online="0-1")
    assert discover_numa_nodes(root, use_env=False) == [NumaNode(0, (0, 1))]
    assert split_slots(discover_numa_nodes(root, use_env=False)) == [Slot(0, 0, (0, 1))]
    assert split_slots(discover_numa_nodes(root, use_env=False), 1) == [
        Slot(0, 0, (0,)), Slot(1, 0, (1,))]


def test_two_sockets_with_smt_slices_keep_whole_cores(tmp_path):
    # 2 sockets x 32 cores x 2 threads: node0 = cores 0-31 + siblings 64-95
    root = make_sysfs(tmp_path, {0: "0-31,64-95", 1: "32-63,96-127"}, online="0-127",
                      smt_pairs=64)
    nodes = discover_numa_nodes(root, use_env=False)
    assert [n.id for n in nodes] == [0, 1]
    assert nodes[0].cpus[:4] == (0, 64, 1, 65)  # siblings adjacent
    assert sorted(nodes[1].cpus) == list(range(32, 64)) + list(range(96, 128))
    whole = split_slots(nodes)
    assert [(s.index, s.numa_node, len(s.cpus)) for s in whole] == [(0, 0, 64), (1, 1, 64)]
    slots = split_slots(nodes, 16)
    assert len(slots) == 8 and [s.numa_node for s in slots] == [0] * 4 + [1] * 4
    assert [s.index for s in slots] == list(range(8))
    # each slot = 8 whole physical cores (cpu c and c+64 together), none shared
    for s in slots:
        assert {c % 64 for c in s.cpus} == {c for c in s.cpus if c < 64}
        assert len({c % 64 for c in s.cpus}) == 8
    all_cpus = [c for s in slots for c in s.cpus]
    assert len(all_cpus) == len(set(all_cpus)) == 128
    assert format_cpulist(slots[0].cpus) == "0-7,64-71"


def test_uneven_nodes_and_leftover_cores(tmp_path):
    root = make_sysfs(tmp_path, {0: "0-5", 1: "6-9"})
    nodes = discover_numa_nodes(root, use_env=False)
    assert [len(n.cpus) for n in nodes] == [6, 4]
    assert split_slots(nodes, 4) == [Slot(0, 0, (0, 1, 2, 3)), Slot(1, 1, (6, 7, 8, 9))]
    assert split_slots(nodes, 3) == [Slot(0, 0, (0, 1, 2)), Slot(1, 0, (3, 4, 5)),
                                     Slot(2, 1, (6, 7, 8))]
    # a node smaller than a slot gives none
    assert split_slots(nodes, 5) == [Slot(0, 0, (0, 1, 2, 3, 4))]
    assert split_slots(nodes, 7) == []


def test_offline_cpus_and_memory_only_nodes_are_dropped(tmp_path):
    root = make_sysfs(tmp_path, {0: "0-3", 1: "4-7", 2: ""}, online="0-2,4-7")
    nodes = discover_numa_nodes(root, use_env=False)
    assert nodes == [NumaNode(0, (0, 1, 2)), NumaNode(1, (4, 5, 6, 7))]


def test_allowed_cpus_restrict_nodes(tmp_path):
    # e.g. a container whose cpuset covers node 1 and half of node 0
    root = make_sysfs(tmp_path, {0: "0-3", 1: "4-7"}, online="0-7")
    nodes = discover_numa_nodes(root, allowed_cpus={2, 3, 4, 5, 6, 7}, use_env=False)
    assert nodes == [NumaNode(0, (2, 3)), NumaNode(1, (4, 5, 6, 7))]
    assert discover_numa_nodes(root, allowed_cpus={5}, use_env=False) == [NumaNode(1, (5,))]


def test_non_contiguous_node_ids(tmp_path):
    root = make_sysfs(tmp_path, {0: "0-1", 2: "2-3"})
    assert [n.id for n in discover_numa_nodes(root, use_env=False)] == [0, 2]
    assert [s.numa_node for s in split_slots(discover_numa_nodes(root, use_env=False))] == [0, 2]


def test_no_numa_info_falls_back_to_one_node(tmp_path):
    (tmp_path / "devices" / "system").mkdir(parents=True)
    assert read_sysfs_nodes(tmp_path) is None
    assert discover_numa_nodes(tmp_path, allowed_cpus={0, 1, 2}, use_env=False) == [
        NumaNode(0, (0, 1, 2))]
    nodes = discover_numa_nodes(tmp_path, use_env=False)  # psutil/affinity fallback
    assert len(nodes) == 1 and nodes[0].id == 0 and len(nodes[0].cpus) >= 1


def test_real_host():
    nodes = discover_numa_nodes(use_env=False)
    assert nodes and all(n.cpus for n in nodes)
    slots = split_slots(nodes)
    assert len(slots) == len(nodes)


# ------------------------------------------------------------------ override

def test_override_inline_json_and_file(tmp_path, monkeypatch):
    assert parse_topology_override("0-0;1-1") == [NumaNode(0, (0,)), NumaNode(1, (1,))]
    assert parse_topology_override("0-31;32-63")[1].cpus == tuple(range(32, 64))
    assert parse_topology_override("[[0,1],[2,3]]") == [NumaNode(0, (0, 1)), NumaNode(1, (2, 3))]
    f = tmp_path / "topo.json"
    f.write_text(json.dumps({"nodes": {"0": "0-3", "1": [4, 5, 6, 7]}}))
    assert parse_topology_override(str(f)) == [NumaNode(0, (0, 1, 2, 3)), NumaNode(1, (4, 5, 6, 7))]
    # the env var wins over sysfs
    monkeypatch.setenv("PACE_TOPOLOGY", "0-0;1-1")
    assert discover_numa_nodes() == [NumaNode(0, (0,)), NumaNode(1, (1,))]
    assert host_slots() == [Slot(0, 0, (0,)), Slot(1, 1, (1,))]
    monkeypatch.setenv("PACE_TOPOLOGY", "0-127")
    monkeypatch.setenv("PACE_CORES_PER_SLOT", "32")
    assert [s.cpus[0] for s in host_slots()] == [0, 32, 64, 96]  # 4 slots of 32 cores
    assert len(host_slots(64)) == 2  # explicit argument beats the env var


@pytest.mark.parametrize("bad", ["0-1;1-2", "0;;1", "[[0],[]]", '{"x": 1}', "0-a", "/nonexistent.json"])
def test_override_errors(bad):
    with pytest.raises((TopologyError, ValueError, OSError)):
        parse_topology_override(bad)


def test_override_single_cpu_is_not_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "7").write_text("not json")
    assert parse_topology_override("7") == [NumaNode(0, (7,))]


def test_resolve_cores_per_slot(monkeypatch):
    monkeypatch.delenv("PACE_CORES_PER_SLOT", raising=False)
    assert resolve_cores_per_slot(None) is None
    assert resolve_cores_per_slot(4) == 4
    assert resolve_cores_per_slot(0) is None
    monkeypatch.setenv("PACE_CORES_PER_SLOT", "8")
    assert resolve_cores_per_slot(None) == 8
    assert resolve_cores_per_slot(2) == 2
