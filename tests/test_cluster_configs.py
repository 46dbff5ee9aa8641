"""cluster/ configs: the Ray cluster launcher YAMLs (Ray's own schema and defaults) and
the KubeRay RayService (serveConfigV2 with Ray Serve's ServeDeploySchema, in step
with serve_config.yaml)."""
from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_YAMLS = ["ray-cluster.aws.yaml", "ray-cluster.local.yaml"]
# serveConfigV2 may differ from serve_config.yaml only in these application args:
# replica bounds (a cluster has more slots than the demo machine) and the slot size
# (on Kubernetes a worker pod is a slot).
K8S_ARGS_ALLOWED_TO_DIFFER = {"cores_per_slot", "num_replicas", "autoscaling"}


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def kuberay_resources(value: str) -> dict:
    """rayStartParams.resources: KubeRay pastes it into a shell command line
    (`--resources=<value>`), so it is a double-quoted, backslash-escaped JSON object."""
    assert value.startswith('"') and value.endswith('"'), value
    (word,) = shlex.split(value)
    return json.loads(word)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_is_valid_for_ray(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(name)
    full = prepare_config(copy.deepcopy(cfg))  # fills the provider's defaults
    validate_config(full)  # Ray's ray-schema.json + consistency checks
    # every node is started through cluster.start_node (which advertises the slot resource)
    head_cmd = " ".join(cfg["head_start_ray_commands"])
    worker_cmd = " ".join(cfg["worker_start_ray_commands"])
    assert "python -m cluster.start_node --head --dashboard" in head_cmd
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_cmd
    assert "python -m cluster.start_node --address=$RAY_HEAD_IP:6379" in worker_cmd
    assert any("pip install torch==2.13.0" in c for c in cfg["setup_commands"])


def test_aws_launcher_has_slot_worker_type():
    from pace_core.numa import SLOT_RESOURCE

    cfg = load("ray-cluster.aws.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert head["resources"][SLOT_RESOURCE] == 0
    assert "--slots 0" in " ".join(cfg["head_start_ray_commands"])
    assert workers
    for t in workers.values():
        assert t["resources"][SLOT_RESOURCE] >= 1 and t["resources"]["CPU"] >= 1
        assert t["max_workers"] >= 1 and t.get("min_workers", 0) == 0  # scales from zero


@pytest.fixture(scope="module")
def rayservice():
    return load("kuberay-rayservice.yaml")


def test_rayservice_shape(rayservice):
    from pace_core.numa import SLOT_RESOURCE

    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    rc = rayservice["spec"]["rayClusterConfig"]
    tested = next(line.split("==")[1].strip() for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
                  if line.startswith("ray=="))
    assert rc["rayVersion"] == tested  # the image's Ray: the newest version CI runs the suite on
    assert rc["enableInTreeAutoscaling"] is True
    head = rc["headGroupSpec"]
    assert kuberay_resources(head["rayStartParams"]["resources"]) == {SLOT_RESOURCE: 0}
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    (group,) = rc["workerGroupSpecs"]
    assert kuberay_resources(group["rayStartParams"]["resources"]) == {SLOT_RESOURCE: 1}
    assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (container,) = group["template"]["spec"]["containers"]
    res = container["resources"]
    # Guaranteed QoS with whole CPUs (static CPU manager gives exclusive cores)
    assert res["requests"] == res["limits"]
    assert str(int(res["limits"]["cpu"])) == res["limits"]["cpu"]
    assert group["rayStartParams"]["num-cpus"] == res["limits"]["cpu"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PACE_CORES_PER_SLOT"] == "0"
    head_env = {e["name"]: e["value"] for e in head["template"]["spec"]["containers"][0]["env"]}
    from pace_core.numa import NODE_ENV

    assert all(env[k] == head_env[k] == v for k, v in NODE_ENV.items())


def _serve_app(rayservice):
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(cfg)  # Ray Serve's own config schema
    (app,) = schema.applications
    return cfg, app


def test_rayservice_serve_config_validates(rayservice):
    cfg, app = _serve_app(rayservice)
    assert app.import_path == "deployments.app:build_app"
    args = app.args
    assert args["cores_per_slot"] is None  # the pod's cpuset is the slot
    # Serve autoscaling on ongoing requests, bounded by the cluster's slots
    auto = args["autoscaling"]
    assert auto["target_ongoing_requests"] == 1
    group = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    from pace_core.numa import SLOT_RESOURCE

    slots_per_pod = kuberay_resources(group["rayStartParams"]["resources"])[SLOT_RESOURCE]
    assert 1 <= auto["min_replicas"] <= auto["max_replicas"] <= group["maxReplicas"] * slots_per_pod
    assert cfg["http_options"]["host"] == "0.0.0.0"


def test_rayservice_args_are_valid_app_args(rayservice):
    """The application's own argument model accepts serveConfigV2's args."""
    app_args = pytest.importorskip("deployments.args")
    _, app = _serve_app(rayservice)
    parsed = app_args.AppArgs(**app.args)
    assert parsed.cores_per_slot is None and parsed.autoscaling.max_replicas == 8


def _applications(cfg: dict) -> list[dict]:
    return cfg["applications"] if "applications" in cfg else [cfg]


def test_rayservice_matches_serve_config_yaml(rayservice):
    path = ROOT / "serve_config.yaml"
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    local = yaml.safe_load(path.read_text())
    if "applications" in local:
        ServeDeploySchema.model_validate(local)
    (local_app,) = _applications(local)
    ServeApplicationSchema.model_validate(local_app)
    k8s_cfg, _ = _serve_app(rayservice)
    (k8s_app,) = _applications(k8s_cfg)
    for key in ("import_path", "route_prefix", "name"):
        if key in local_app:
            assert k8s_app.get(key) == local_app[key], key
    la, ka = dict(local_app.get("args") or {}), dict(k8s_app.get("args") or {})
    for k in K8S_ARGS_ALLOWED_TO_DIFFER:
        la.pop(k, None)
        ka.pop(k, None)
    assert ka == la, "update serveConfigV2 in cluster/kuberay-rayservice.yaml"
    # deployment overrides (if any) must agree except for replica counts
    strip = lambda ds: [{k: v for k, v in d.items()  # noqa: E731
                         if k not in ("num_replicas", "autoscaling_config")} for d in ds]
    assert strip(k8s_app.get("deployments", [])) == strip(local_app.get("deployments", []))
