"""Ray Serve deployments: NUMA-pinned PARD replicas behind an OpenAI-compatible router."""
