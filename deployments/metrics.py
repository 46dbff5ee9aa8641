"""Prometheus metrics of the router, exposed by ``prometheus_client`` (a dependency of
Ray Serve) from a registry of the router's own: Prometheus' text format by default,
OpenMetrics when the scraper asks for it (``Accept: application/openmetrics-text``)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from pace_core.outputs import Final

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ACCEPTED_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)  # draft tokens; K is at most 32


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.in_flight = 0
        self.running_capacity = 1
        r, m = self.registry, ["model"]

        def counter(name, help_, labels=()):
            return Counter(name, help_, m + list(labels), registry=r)

        def histogram(name, help_, buckets=LATENCY_BUCKETS):
            return Histogram(name, help_, m, buckets=buckets, registry=r).labels(model_name)

        def gauge(name, help_, fn):
            Gauge(name, help_, m, registry=r).labels(model_name).set_function(fn)

        self._requests = counter("pace_requests", "Requests by route and HTTP status.", ("route", "status"))
        self.model = model_name
        self._generated = counter("pace_generation_tokens", "Tokens generated.").labels(model_name)
        self._prompt = counter("pace_prompt_tokens", "Prompt tokens processed.").labels(model_name)
        self._decode_steps = counter("pace_decode_steps", "Decode steps (one target forward each).").labels(model_name)
        self._proposed = counter("pace_draft_tokens_proposed", "Draft tokens proposed to the target.").labels(model_name)
        self._cache_queries = counter("pace_prefix_cache_queries", "Finished requests that looked up the prefix cache "
                                      "(none when the engines have no cache).").labels(model_name)
        self._cache_hits = counter("pace_prefix_cache_hits", "Requests that reused at least one cached prefix "
                                   "block.").labels(model_name)
        self._cached = counter("pace_prefix_cache_cached_tokens", "Prompt tokens whose KV came from the prefix "
                               "cache: prefill saved.").labels(model_name)
        self._bonus = counter("pace_bonus_tokens", "Bonus tokens: the target's own token after a step that accepted "
                                                   "every proposal (not counted as accepted).").labels(model_name)
        self._stream_errors = counter("pace_stream_errors", "Streams ended by a server fault after their first "
                                                            "chunk (an SSE error event).").labels(model_name)
        self.ttft = histogram("pace_time_to_first_token_seconds", "Time to first token.")
        self.itl = histogram("pace_inter_token_latency_seconds", "Time from each token to the next, per token (the "
                                                                 "tokens of one decode step come out together: 0).")
        self.e2e = histogram("pace_e2e_request_latency_seconds", "End-to-end request latency.")
        self.accepted = histogram("pace_accepted_draft_tokens_per_step", "Draft tokens the target accepted, per "
                                  "speculative decode step (the correction or bonus token apart).", ACCEPTED_BUCKETS)
        gauge("pace_requests_in_flight", "Requests being generated or waiting.", lambda: self.in_flight)
        gauge("pace_queue_depth", "Requests waiting for a free replica: in flight beyond the running replicas "
              "(as of this scrape).", lambda: self.queue_depth)
        gauge("pace_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens of the "
              "requests that looked it up, since the router started.", self._cache_hit_rate)
        self._cache_tokens = [0, 0]  # prompt tokens, of which cached

    def request_done(self, route: str, status: int) -> None:
        self._requests.labels(self.model, route, str(status)).inc()

    def stream_error(self) -> None:
        self._stream_errors.inc()

    def generation_done(self, final: Final | None, tokens: int, ttft: float | None, e2e: float) -> None:
        """One generation's counts: ``tokens`` generated (also of one cut short, which has
        no ``final``); from its Final, the prompt and its cached tokens (queries of the
        prefix cache only where the engine has one), the per-step acceptance and the
        per-token ITL."""
        self._generated.inc(tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        self.e2e.observe(e2e)
        if final is None:
            return
        stats, usage = final.stats, final.usage
        self._prompt.inc(usage.prompt_tokens)
        if final.engine.get("prefix_cache") is not None:
            self._cache_queries.inc()
            self._cached.inc(usage.cached_tokens)
            self._cache_tokens[0] += usage.prompt_tokens
            self._cache_tokens[1] += usage.cached_tokens
            if usage.cached_tokens:
                self._cache_hits.inc()
        self._decode_steps.inc(stats.steps)
        for proposed, accepted in zip(stats.drafts_proposed_per_step, stats.drafts_accepted_per_step):
            if proposed:
                self.accepted.observe(accepted)
                self._proposed.inc(proposed)
                if accepted == proposed:
                    self._bonus.inc()
        emitted, previous = 0, 0.0
        for end, n in zip(stats.step_end_s, stats.tokens_per_step):
            for i in range(n):
                if emitted:
                    self.itl.observe(end - previous if i == 0 else 0.0)
                emitted += 1
            if n:
                previous = end

    def _cache_hit_rate(self) -> float:
        prompt, cached = self._cache_tokens
        return cached / prompt if prompt else 0.0

    def waiting(self, more: int = 0) -> int:
        """Requests waiting for a replica (in flight beyond the running replicas) with
        ``more`` in flight; negative while replicas are free."""
        return self.in_flight + more - self.running_capacity

    @property
    def queue_depth(self) -> int:
        return max(0, self.waiting())

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition the ``Accept`` header asks for, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
