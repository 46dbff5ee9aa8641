"""Ray Serve deployments: NUMA-pinned PARD replicas behind an OpenAI-compatible router."""

# Set to 1 in the environment Ray starts from (`python -m cluster.start_node` does it;
# `RAY_SERVE_PROXY_USE_GRPC=1 serve run serve_config.yaml` otherwise), Serve's HTTP
# proxy hands each streamed message to the router over gRPC instead of Ray's object
# transport: measured HTTP TPOT overhead +4..10% instead of +11..12% (README, Serving).
PROXY_GRPC_ENV = "RAY_SERVE_PROXY_USE_GRPC"
