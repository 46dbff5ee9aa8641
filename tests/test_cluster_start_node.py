"""cluster.start_node: slot resources, the ray start command, and multi-node placement
by the slot resource with ray.cluster_utils.Cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import start_node
from pace_core.numa import NODE_ENV, SLOT_RESOURCE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def two_slot_topology(monkeypatch):
    monkeypatch.setenv("PACE_TOPOLOGY", "0-0;1-1")
    monkeypatch.delenv("PACE_CORES_PER_SLOT", raising=False)


def test_placement_names_come_from_numa_and_import_is_cheap():
    assert start_node.SLOT_RESOURCE is SLOT_RESOURCE and start_node.NODE_ENV is NODE_ENV
    # cluster never imports deployments (nor, through it, Ray or torch)
    r = subprocess.run([sys.executable, "-c", "import sys, cluster.start_node; "
                        "print(sorted(m for m in ('deployments', 'ray', 'torch') if m in sys.modules))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_node_resources(two_slot_topology, monkeypatch):
    assert start_node.node_resources() == {SLOT_RESOURCE: 2}
    assert start_node.node_resources(slots=0) == {SLOT_RESOURCE: 0}
    monkeypatch.setenv("PACE_TOPOLOGY", "0-63;64-127")
    assert start_node.node_resources() == {SLOT_RESOURCE: 2}
    assert start_node.node_resources(16) == {SLOT_RESOURCE: 8}
    assert start_node.node_resources(48) == {SLOT_RESOURCE: 2}  # 16 CPUs/node unused
    monkeypatch.setenv("PACE_CORES_PER_SLOT", "32")
    assert start_node.node_resources() == {SLOT_RESOURCE: 4}
    monkeypatch.delenv("PACE_TOPOLOGY")
    monkeypatch.delenv("PACE_CORES_PER_SLOT")
    assert start_node.node_resources()[SLOT_RESOURCE] >= 1  # the real host
    assert start_node.node_num_cpus() == len(os.sched_getaffinity(0))


def test_ray_start_command(two_slot_topology):
    cmd = start_node.ray_start_command(head=True, num_cpus=2)
    assert cmd[:3] == ["ray", "start", "--head"]
    assert "--port=6379" in cmd and "--include-dashboard=false" in cmd and "--num-cpus=2" in cmd
    res = [a for a in cmd if a.startswith("--resources=")]
    assert len(res) == 1 and json.loads(res[0].split("=", 1)[1]) == {SLOT_RESOURCE: 2}
    w = start_node.ray_start_command(address="10.0.0.1", cores_per_slot=None, extra=["--block"])
    assert "--address=10.0.0.1:6379" in w and "--head" not in w and w[-1] == "--block"
    assert "--include-dashboard=false" not in w
    assert start_node.ray_start_command(address="h:7000")[2] == "--address=h:7000"
    with pytest.raises(ValueError):
        start_node.ray_start_command(head=True, address="x")
    with pytest.raises(ValueError):
        start_node.ray_start_command()


def _cli(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACE_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "cluster.start_node", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_dry_run_and_show():
    r = _cli("--head", "--dry-run", "--cores-per-slot", "1", "--topology", "0-3;4-7",
             "--num-cpus", "8", "--", "--node-ip-address=127.0.0.1")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line == ("PACE_CORES_PER_SLOT=1 PACE_TOPOLOGY='0-3;4-7' RAY_SERVE_PROXY_USE_GRPC=1 "
                    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.proxy.proxy_middlewares ray start --head --port=6379 "
                    f"--include-dashboard=false --num-cpus=8 '--resources={json.dumps({SLOT_RESOURCE: 8})}' "
                    "--disable-usage-stats --node-ip-address=127.0.0.1")
    assert "2 NUMA node(s), 8 slot(s)" in r.stderr
    r = _cli("--address", "10.1.2.3:6380", "--dry-run", env_extra={"PACE_TOPOLOGY": "0-3;4-7"})
    assert r.returncode == 0, r.stderr
    assert "ray start --address=10.1.2.3:6380" in r.stdout
    assert f"'--resources={json.dumps({SLOT_RESOURCE: 2})}'" in r.stdout
    r = _cli("--show", "--cores-per-slot", "2", env_extra={"PACE_TOPOLOGY": "0-3;4-7"})
    info = json.loads(r.stdout)
    assert info["resources"] == {SLOT_RESOURCE: 4}
    assert info["numa_nodes"] == {"0": "0-3", "1": "4-7"}
    assert [s["cpus"] for s in info["slots"]] == ["0-1", "2-3", "4-5", "6-7"]
    r = _cli("--dry-run")  # no role
    assert r.returncode != 0 and "--head" in r.stderr


@pytest.fixture
def two_node_cluster(two_slot_topology, monkeypatch):
    """Two Ray nodes on this machine, each advertising one slot (as start_node would
    for a 1-slot host)."""
    import ray
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # Cluster() writes its address to /tmp/ray/ray_current_cluster, where any other
    # process's bare ray.init() on this shared machine would find and join it (and
    # shutdown deletes that file, whoever wrote it): keep this cluster private.
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)

    per_node = start_node.node_resources(slots=1)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": per_node, "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources=per_node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_actors_needing_a_slot_land_on_different_nodes_third_pending(two_node_cluster):
    import ray

    assert ray.cluster_resources().get(SLOT_RESOURCE) == 2

    @ray.remote(num_cpus=0, resources={SLOT_RESOURCE: 1})
    class Replica:
        def node(self):
            return ray.get_runtime_context().get_node_id()

    a, b = Replica.remote(), Replica.remote()
    nodes = ray.get([a.node.remote(), b.node.remote()], timeout=60)
    assert len(set(nodes)) == 2  # one per node: never two on a 1-slot node
    c = Replica.remote()
    ready, _ = ray.wait([c.node.remote()], timeout=3)
    assert not ready  # pending: no node has a free slot
    assert ray.available_resources().get(SLOT_RESOURCE, 0) == 0
    ray.kill(a)  # a slot frees up: the pending one is placed on a's node
    assert ray.get(c.node.remote(), timeout=60) == nodes[0]


def test_cli_status_shows_holders(two_slot_topology, tmp_path, monkeypatch):
    from pace_core import numa

    monkeypatch.setenv("PACE_SLOT_DIR", str(tmp_path))
    with numa.claim_slot(wait_s=0) as claim:
        assert claim.slot.index == 0
        r = _cli("--status", env_extra={"PACE_TOPOLOGY": "0-0;1-1", "PACE_SLOT_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines.pop(0) == f"locks in {tmp_path}"
    assert lines[0].startswith("slot 0  node 0  cpus 0") and f"pid={os.getpid()}" in lines[0]
    assert lines[1].startswith("slot 1  node 1  cpus 1") and lines[1].endswith("free")
