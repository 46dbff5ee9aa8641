"""Prometheus metrics of the router, exposed by ``prometheus_client`` (a dependency of
Ray Serve) from a registry of the router's own: Prometheus' text format by default,
OpenMetrics when the scraper asks for it (``Accept: application/openmetrics-text``)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.in_flight = 0
        self.running_capacity = 1
        self._steps = 0
        self._tokens = 0
        r, m = self.registry, ["model"]

        def counter(name, help_, labels=()):
            return Counter(name, help_, m + list(labels), registry=r)

        def histogram(name, help_):
            return Histogram(name, help_, m, buckets=LATENCY_BUCKETS, registry=r).labels(model_name)

        def gauge(name, help_, fn):
            Gauge(name, help_, m, registry=r).labels(model_name).set_function(fn)

        self._requests = counter("pace_requests", "Requests by route and HTTP status.", ("route", "status"))
        self.model = model_name
        self._generated = counter("pace_generation_tokens", "Tokens generated.").labels(model_name)
        self._prompt = counter("pace_prompt_tokens", "Prompt tokens processed.").labels(model_name)
        self._decode_steps = counter("pace_decode_steps", "Decode steps (one target forward each).").labels(model_name)
        self._stream_errors = counter("pace_stream_errors", "Streams ended by a server fault after their first "
                                                            "chunk (an SSE error event).").labels(model_name)
        self.ttft = histogram("pace_time_to_first_token_seconds", "Time to first token.")
        self.itl = histogram("pace_inter_token_latency_seconds", "Inter-token latency (per request mean, per token).")
        self.e2e = histogram("pace_e2e_request_latency_seconds", "End-to-end request latency.")
        gauge("pace_mean_accepted_tokens_per_step", "Mean tokens emitted per decode step (accepted drafts + 1), "
              "since start.", lambda: self._tokens / self._steps if self._steps else 0.0)
        gauge("pace_requests_in_flight", "Requests being generated or waiting.", lambda: self.in_flight)
        gauge("pace_queue_depth", "Requests waiting for a free replica.", lambda: self.queue_depth)

    def request_done(self, route: str, status: int) -> None:
        self._requests.labels(self.model, route, str(status)).inc()

    def stream_error(self) -> None:
        self._stream_errors.inc()

    def generation_done(self, prompt_tokens: int, tokens: int, stats: dict | None, ttft: float | None,
                        e2e: float) -> None:
        self._prompt.inc(prompt_tokens)
        self._generated.inc(tokens)
        self._tokens += tokens
        steps = (stats or {}).get("steps", 0)
        self._decode_steps.inc(steps)
        self._steps += steps
        if ttft is not None:
            self.ttft.observe(ttft)
            if tokens > 1:
                per_token = (e2e - ttft) / (tokens - 1)
                for _ in range(tokens - 1):
                    self.itl.observe(per_token)
        self.e2e.observe(e2e)

    @property
    def queue_depth(self) -> int:
        return max(0, self.in_flight - self.running_capacity)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition the ``Accept`` header asks for, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
