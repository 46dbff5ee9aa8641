"""Ray Serve deployments: NUMA-pinned PARD replicas behind an OpenAI-compatible router."""

# NODE_ENV belongs in the environment Ray starts from: `python -m cluster.start_node`,
# the KubeRay config and the README's serve command set it (a value already in the
# environment wins). Measured in README, Serving:
# - RAY_SERVE_PROXY_USE_GRPC=1: Serve's HTTP proxy streams to the router over gRPC
#   instead of Ray's object transport (HTTP TPOT overhead +4..10% instead of +11..12%);
# - RAY_worker_niceness=0: Ray starts its workers, so our replicas and engines, at
#   normal priority instead of niceness 15, so Ray's own processes and local clients do
#   not preempt decoding (2 replicas, concurrency 2: 526 instead of 410 tokens/s).
PROXY_GRPC_ENV = "RAY_SERVE_PROXY_USE_GRPC"
NICENESS_ENV = "RAY_worker_niceness"
NODE_ENV = {PROXY_GRPC_ENV: "1", NICENESS_ENV: "0"}

# Serve runs a replica's user code and its outgoing handle calls on event loops of their
# own threads by default; both our deployments are fully async, so they run on the
# replica's main loop instead (two of the settings of Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED).
# One thread hop fewer per streamed chunk in each replica: replica + router CPU per
# chunk -20..25% (README, Serving). Set on our replicas by ``build_app``; a value in the
# deploying environment wins.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
