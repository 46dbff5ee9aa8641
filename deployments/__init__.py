"""Ray Serve deployments: NUMA-pinned PARD replicas behind an OpenAI-compatible router."""

# Set to 1 in the environment Ray starts from (`python -m cluster.start_node` does it;
# `RAY_SERVE_PROXY_USE_GRPC=1 serve run serve_config.yaml` otherwise), Serve's HTTP
# proxy hands each streamed message to the router over gRPC instead of Ray's object
# transport: measured HTTP TPOT overhead +4..10% instead of +11..12% (README, Serving).
PROXY_GRPC_ENV = "RAY_SERVE_PROXY_USE_GRPC"

# Serve runs a replica's user code and its outgoing handle calls on event loops of their
# own threads by default; both our deployments are fully async, so they run on the
# replica's main loop instead (two of the settings of Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED).
# One thread hop fewer per streamed chunk in each replica: replica + router CPU per
# chunk -20..25% (README, Serving). Set on our replicas by ``build_app``; a value in the
# deploying environment wins.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
