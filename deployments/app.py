"""The typed application builder: `serve run serve_config.yaml` (or `serve deploy`)
calls ``build_app(args)``; Serve validates the args dict into :class:`AppArgs`, so a bad
argument fails at deploy time with a message naming the field.

    from deployments.app import build_app
    model = ModelConfig(model_name_or_path="models/demo-target", dtype="float32",
                        pard_config=PardSpecDecodeConfig(model_name_or_path="models/demo-draft"))
    serve.run(build_app(AppArgs(model=model, num_replicas=2)), name="pace")

The replicas receive the validated AppArgs, with the model's paths resolved, and hand
``args.model`` (the ModelConfig itself) to their engine processes.
"""
import logging
import os

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from pace_core.configs import ModelConfig
from pace_core.loading import ModelLoadError, context_length, resolve_model_path
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


def _resolved(model: ModelConfig) -> ModelConfig:
    """``model`` with its paths resolved now: a typo fails the deploy, not every replica start."""
    def resolve(field: str, value: str) -> str:
        try:
            return resolve_model_path(value)
        except ModelLoadError as err:
            raise ValueError(f"model.{field}: {err}") from None

    update: dict = {"model_name_or_path": resolve("model_name_or_path", model.model_name_or_path)}
    if model.tokenizer_name_or_path:
        update["tokenizer_name_or_path"] = resolve("tokenizer_name_or_path", model.tokenizer_name_or_path)
    if model.pard_config is not None:
        draft = resolve("pard_config.model_name_or_path", model.pard_config.model_name_or_path)
        update["pard_config"] = model.pard_config.model_copy(update={"model_name_or_path": draft})
    return model.model_copy(update=update)


def build_app(args: AppArgs) -> Application:
    if not isinstance(args, AppArgs):
        args = AppArgs(**(args or {}))
    args.resolved_api_key()  # an unreadable api_key_file fails the deploy (the router reads it again)
    # the replicas' arguments: the same AppArgs, paths resolved (the key file is the router's)
    replica_args = args.model_copy(update={"model": _resolved(args.model), "api_key_file": None})

    runtime_env = {"env_vars": {k: os.environ.get(k, v) for k, v in REPLICA_ENV.items()}}
    actor_options: dict = {"num_cpus": args.cores_per_slot or 1, "runtime_env": runtime_env}
    if _slot_resource_wanted(args):
        actor_options["resources"] = {SLOT_RESOURCE: 1}
    else:
        logger.warning("the cluster advertises no '%s' resource (start nodes with `python -m cluster.start_node`): "
                       "replicas are placed by CPU count only; each still claims a slot on its host", SLOT_RESOURCE)
    if args.autoscaling:
        autoscaling = args.autoscaling
        if "target_ongoing_requests" not in autoscaling.model_fields_set:  # a replica takes one at a time
            autoscaling = autoscaling.model_copy(update={"target_ongoing_requests": 1})
        scaling = {"autoscaling_config": autoscaling.model_dump(exclude_unset=False)}
    else:
        scaling = {"num_replicas": args.num_replicas}
    routing = {}  # power_of_two: Serve's default request router
    if args.routing == "cache_aware":  # the Router's handle sends requests where their prefix is cached
        routing["request_router_config"] = RequestRouterConfig(
            request_router_class="deployments.routing.CacheAwareRouter",
            request_router_kwargs={"affinity_wait_s": args.affinity_wait_s})
    # Serve's request router queues what the replicas cannot take yet; the Router admits
    # at most max_queued_requests waiting (Router._admit)
    replica = LLMReplica.options(ray_actor_options=actor_options, **scaling, **routing).bind(replica_args)
    router = Router.options(num_replicas=args.router_replicas,
                            ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env})
    return router.bind(replica, args.model_dump(), model_card(replica_args.model))


def model_card(model: ModelConfig) -> dict:
    """What /v1/models says of the model, known at deploy time (no replica is asked): the
    context length (the shorter of target's and draft's) and K."""
    from transformers import AutoConfig

    def context(path: str) -> int | None:
        return context_length(AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code))

    contexts = [context(model.model_name_or_path)]
    if model.pard_config is not None:
        contexts.append(context(model.pard_config.model_name_or_path))
    known = [c for c in contexts if c]
    return {"max_context": min(known) if known else None,
            "num_speculative_tokens": model.pard_config.num_speculative_tokens if model.pard_config else None}


app = build_app  # `serve run deployments.app:app model.model_name_or_path=... model.pard_config=null` also works
