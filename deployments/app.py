"""The typed application builder: `serve run serve_config.yaml` (or `serve deploy`)
calls ``build_app(args)``; Serve validates the args dict into :class:`AppArgs`, so a bad
argument fails at deploy time with a message naming the field.

    from deployments.app import build_app
    serve.run(build_app(AppArgs(target="models/demo-target", num_replicas=2)), name="pace")
"""
import logging
import os

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from pace_core.loading import ModelLoadError, resolve_model_path
from pace_core.numa import SLOT_RESOURCE

from . import REPLICA_ENV
from .args import AppArgs
from .replica import LLMReplica
from .router import Router

logger = logging.getLogger("ray.serve")


def _slot_resource_wanted(args: AppArgs) -> bool:
    if args.slot_resource != "auto":
        return args.slot_resource == "always"
    try:
        import ray

        return ray.is_initialized() and ray.cluster_resources().get(SLOT_RESOURCE, 0) > 0
    except Exception:
        return False


def build_app(args: AppArgs) -> Application:
    if not isinstance(args, AppArgs):
        args = AppArgs(**(args or {}))
    # check the paths now: a typo fails the deploy, not every replica start
    resolved = {}
    for field in ("target", "draft", "tokenizer"):
        value = getattr(args, field)
        if value:
            try:
                resolved[field] = resolve_model_path(value)
            except ModelLoadError as err:
                raise ValueError(f"{field}: {err}") from None
    args.resolved_api_key()  # an unreadable api_key_file fails the deploy (the router reads it again)
    replica_args = {**args.model_dump(exclude={"api_key_file", "autoscaling"}), **resolved}

    runtime_env = {"env_vars": {k: os.environ.get(k, v) for k, v in REPLICA_ENV.items()}}
    actor_options: dict = {"num_cpus": args.cores_per_slot or 1, "runtime_env": runtime_env}
    if _slot_resource_wanted(args):
        actor_options["resources"] = {SLOT_RESOURCE: 1}
    else:
        logger.warning("the cluster advertises no '%s' resource (start nodes with `python -m cluster.start_node`): "
                       "replicas are placed by CPU count only; each still claims a slot on its host", SLOT_RESOURCE)
    if args.autoscaling:
        scaling = {"autoscaling_config": args.autoscaling.model_dump()}
    else:
        scaling = {"num_replicas": args.num_replicas}
    routing = {}  # power_of_two: Serve's default request router
    if args.routing == "cache_aware":  # the Router's handle sends requests where their prefix is cached
        routing["request_router_config"] = RequestRouterConfig(
            request_router_class="deployments.routing.CacheAwareRouter",
            request_router_kwargs={"affinity_wait_s": args.affinity_wait_s})
    replica = LLMReplica.options(ray_actor_options=actor_options, **scaling, **routing).bind(replica_args)
    router = Router.options(ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env})
    return router.bind(replica, args.model_dump())


app = build_app  # `serve run deployments.app:app target=...` also works
