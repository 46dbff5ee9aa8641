"""Ray Serve deployments: NUMA-pinned PARD replicas behind an OpenAI-compatible router."""

# NODE_ENV, the environment Ray nodes start with (Serve's HTTP proxy streams to the
# router over gRPC), is placement's, shared with `cluster`: pace_core.numa
from pace_core.numa import NODE_ENV, PROXY_GRPC_ENV  # noqa: F401 - re-exported

# Ray starts its workers at niceness 15 unless Ray is started with this set; the engine
# process raises itself back to 0 when it may (deployments.engine_process.raise_priority).
NICENESS_ENV = "RAY_worker_niceness"

# Serve runs a replica's user code and its outgoing handle calls on event loops of their
# own threads by default; both our deployments are fully async, so they run on the
# replica's main loop instead (two of the settings of Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED).
# One thread hop fewer per streamed chunk in each replica: replica + router CPU per
# chunk -20..25% (README, Serving). Set on our replicas by ``build_app``; a value in the
# deploying environment wins.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
