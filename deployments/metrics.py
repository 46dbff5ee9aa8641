"""Prometheus metrics of the router, in the text exposition format (no extra dependency)."""
from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += n
        self.sum += value * n
        self.count += n


class Metrics:
    def __init__(self, model_name: str):
        self.model = model_name
        self._lock = threading.Lock()
        self.requests = defaultdict(int)  # (route, status) -> count
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.steps = 0
        self.ttft = Histogram()
        self.itl = Histogram()
        self.e2e = Histogram()
        self.in_flight = 0
        self.running_capacity = 1

    def request_done(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[route, status] += 1

    def generation_done(self, prompt_tokens: int, tokens: int, stats: dict | None, ttft: float | None,
                        e2e: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.tokens_generated += tokens
            if stats:
                self.steps += stats.get("steps", 0)
            if ttft is not None:
                self.ttft.observe(ttft)
                if tokens > 1:
                    self.itl.observe((e2e - ttft) / (tokens - 1), tokens - 1)
            self.e2e.observe(e2e)

    @property
    def queue_depth(self) -> int:
        return max(0, self.in_flight - self.running_capacity)

    def render(self) -> str:
        m = f'model="{self.model}"'
        out = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        def hist(name, help_, h: Histogram):
            samples = [f'{name}_bucket{{{m},le="{b}"}} {c}' for b, c in zip(h.buckets, h.counts)]
            samples += [f'{name}_bucket{{{m},le="+Inf"}} {h.count}', f"{name}_sum{{{m}}} {h.sum}",
                        f"{name}_count{{{m}}} {h.count}"]
            metric(name, "histogram", help_, samples)

        with self._lock:
            metric("pace_requests_total", "counter", "Requests by route and HTTP status.",
                   [f'pace_requests_total{{{m},route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())])
            metric("pace_generation_tokens_total", "counter", "Tokens generated.",
                   [f"pace_generation_tokens_total{{{m}}} {self.tokens_generated}"])
            metric("pace_prompt_tokens_total", "counter", "Prompt tokens processed.",
                   [f"pace_prompt_tokens_total{{{m}}} {self.prompt_tokens}"])
            metric("pace_decode_steps_total", "counter", "Decode steps (one target forward each).",
                   [f"pace_decode_steps_total{{{m}}} {self.steps}"])
            mean = self.tokens_generated / self.steps if self.steps else 0.0
            metric("pace_mean_accepted_tokens_per_step", "gauge",
                   "Mean tokens emitted per decode step (accepted drafts + 1), since start.",
                   [f"pace_mean_accepted_tokens_per_step{{{m}}} {mean}"])
            hist("pace_time_to_first_token_seconds", "Time to first token.", self.ttft)
            hist("pace_inter_token_latency_seconds", "Inter-token latency (per request mean, per token).", self.itl)
            hist("pace_e2e_request_latency_seconds", "End-to-end request latency.", self.e2e)
            metric("pace_requests_in_flight", "gauge", "Requests being generated or waiting.",
                   [f"pace_requests_in_flight{{{m}}} {self.in_flight}"])
            metric("pace_queue_depth", "gauge", "Requests waiting for a free replica.",
                   [f"pace_queue_depth{{{m}}} {self.queue_depth}"])
        return "\n".join(out) + "\n"
