"""Start a Ray node that advertises this host's NUMA slots.

    python -m cluster.start_node --head                      # head node (port 6379)
    python -m cluster.start_node --address HEAD_IP:6379      # worker node
    python -m cluster.start_node --head --cores-per-slot 16 --dry-run
    python -m cluster.start_node --show                      # topology and slots only
    python -m cluster.start_node --status                    # which process holds which slot

Runs ``ray start`` with ``--resources`` giving N units of the slot resource (N = slots
of this host: NUMA nodes, or node slices of ``--cores-per-slot`` cores), ``--num-cpus``
(the CPUs this process may use) and no dashboard unless ``--dashboard`` (the head needs
it for ``serve deploy``/``serve status``). ``PACE_CORES_PER_SLOT`` (and
``PACE_TOPOLOGY`` / ``PACE_SLOT_DIR`` if given) are exported to ``ray start``, so the
replicas Ray starts on this node split the host exactly as it was counted here, and so
is the node environment (a value already set wins). The resource's name and the node
environment are placement's (``pace_core.numa``; printed below).
Arguments after ``--`` go to ``ray start`` unchanged.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

from pace_core.numa import (
    CORES_PER_SLOT_ENV,
    NODE_ENV,
    SLOT_DIR_ENV,
    SLOT_RESOURCE,
    TOPOLOGY_ENV,
    describe,
    discover_numa_nodes,
    format_cpulist,
    process_allowed_cpus,
    resolve_cores_per_slot,
    slot_dir,
    slot_status,
    split_slots,
)

DEFAULT_PORT = 6379


def slot_count(cores_per_slot: int | None = None) -> int:
    """Slots of this host (honors PACE_TOPOLOGY and PACE_CORES_PER_SLOT)."""
    return len(split_slots(discover_numa_nodes(), resolve_cores_per_slot(cores_per_slot)))


def node_resources(cores_per_slot: int | None = None, slots: int | None = None) -> dict[str, float]:
    """Ray custom resources for this host: ``{SLOT_RESOURCE: N}``; usable as
    ``ray.init(resources=...)`` or ``Cluster.add_node(resources=...)``."""
    n = slot_count(cores_per_slot) if slots is None else slots
    return {SLOT_RESOURCE: n}


def node_num_cpus() -> int:
    """CPUs Ray should advertise: the CPUs this process may run on."""
    allowed = process_allowed_cpus()
    return len(allowed) if allowed else (os.cpu_count() or 1)


def ray_start_command(*, head: bool = False, address: str | None = None, port: int = DEFAULT_PORT,
                      cores_per_slot: int | None = None, slots: int | None = None,
                      num_cpus: int | None = None, block: bool = False,
                      dashboard: bool = False, extra: list[str] | None = None) -> list[str]:
    if head == (address is not None):
        raise ValueError("give exactly one of head=True or address='HEAD:PORT'")
    resources = node_resources(cores_per_slot, slots)
    cmd = ["ray", "start"]
    if head:
        cmd += ["--head", f"--port={port}", f"--include-dashboard={str(dashboard).lower()}"]
    else:
        if ":" not in address:
            address = f"{address}:{DEFAULT_PORT}"
        cmd += [f"--address={address}"]
    cmd += [f"--num-cpus={num_cpus if num_cpus is not None else node_num_cpus()}",
            f"--resources={json.dumps(resources)}", "--disable-usage-stats"]
    if block:
        cmd.append("--block")
    return cmd + list(extra or [])


def node_env(cores_per_slot: int | None = None) -> dict[str, str]:
    """Environment exported to ``ray start`` (and so to the replicas of this node)."""
    env = {}
    cps = resolve_cores_per_slot(cores_per_slot)
    env[CORES_PER_SLOT_ENV] = str(cps) if cps else "0"
    for var in (TOPOLOGY_ENV, SLOT_DIR_ENV):
        if os.environ.get(var):
            env[var] = os.environ[var]
    # Serve's HTTP proxy talks to the router over gRPC (pace_core.numa.NODE_ENV)
    env.update({k: os.environ.get(k, v) for k, v in NODE_ENV.items()})
    return env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m cluster.start_node", description=__doc__,
                                epilog=f"slot resource: {SLOT_RESOURCE}; node environment: "
                                       + " ".join(f"{k}={v}" for k, v in NODE_ENV.items()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    role = p.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true", help="start the head node")
    role.add_argument("--address", help="join the cluster whose head is HEAD_IP[:PORT]")
    role.add_argument("--show", action="store_true",
                      help="print this host's topology, slots and resources as JSON and exit")
    role.add_argument("--status", action="store_true",
                      help="print which slots of this host are held, and by which process")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="head port (default 6379)")
    p.add_argument("--cores-per-slot", type=int, default=None,
                   help="split NUMA nodes into slots of this many CPUs (default: "
                        "$PACE_CORES_PER_SLOT, else one slot per NUMA node)")
    p.add_argument("--slots", type=int, default=None,
                   help="advertise this many slots instead of the computed count "
                        "(e.g. 0 for a head that should host no replica)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPU resource to advertise (default: CPUs this process may use)")
    p.add_argument("--topology", default=None,
                   help="simulate a topology (sets PACE_TOPOLOGY, e.g. '0-31;32-63')")
    p.add_argument("--dashboard", action="store_true",
                   help="head only: start the dashboard (needed by `serve deploy`, "
                        "`serve status` and KubeRay; off by default)")
    p.add_argument("--block", action="store_true", help="pass --block to ray start")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    args = p.parse_args(argv)
    if args.topology:
        os.environ[TOPOLOGY_ENV] = args.topology

    nodes = discover_numa_nodes()
    slots = split_slots(nodes, resolve_cores_per_slot(args.cores_per_slot))
    if args.show:
        print(json.dumps({
            "numa_nodes": {str(n.id): format_cpulist(n.cpus) for n in nodes},
            "slots": [{"index": s.index, "numa_node": s.numa_node,
                       "cpus": format_cpulist(s.cpus)} for s in slots],
            "resources": node_resources(args.cores_per_slot, args.slots),
            "num_cpus": args.num_cpus if args.num_cpus is not None else node_num_cpus(),
        }, indent=2))
        return 0
    if args.status:
        print(f"locks in {slot_dir()}")
        for st in slot_status(slots):
            who = ", ".join(st["held_by"]) if st["held_by"] else "free"
            print(f"slot {st['index']}  node {st['numa_node']}  cpus {st['cpulist']:<12} {who}")
        return 0
    print(describe(nodes, slots), file=sys.stderr)
    cmd = ray_start_command(head=args.head, address=args.address, port=args.port,
                            cores_per_slot=args.cores_per_slot, slots=args.slots,
                            num_cpus=args.num_cpus, block=args.block,
                            dashboard=args.dashboard, extra=extra)
    env = node_env(args.cores_per_slot)
    line = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(cmd)
    if args.dry_run:
        print(line)
        return 0
    print(f"running: {line}", file=sys.stderr, flush=True)
    return subprocess.call(cmd, env={**os.environ, **env})


if __name__ == "__main__":
    sys.exit(main())
