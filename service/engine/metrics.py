"""Prometheus metrics of the service (served at /metrics), in a registry of their own so that several
apps in one process (tests) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("nlg_time_to_first_token_seconds", "Time to first token", buckets=LATENCY, registry=r)
        self.inter_token = Histogram(
            "nlg_inter_token_latency_seconds", "Time between tokens", buckets=LATENCY, registry=r
        )
        self.latency = Histogram("nlg_request_latency_seconds", "End-to-end latency", buckets=LATENCY, registry=r)
        self.queue = Histogram("nlg_queue_time_seconds", "Time waiting for the engine", buckets=LATENCY, registry=r)
        self.running = Gauge("nlg_running_requests", "Requests in the engine", registry=r)
        self.waiting = Gauge("nlg_waiting_requests", "Requests waiting for the engine", registry=r)
        self.prompt_tokens = Counter("nlg_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("nlg_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("nlg_requests_finished", "Finished sequences", ["finish_reason"], registry=r)
        self.quality = Histogram(
            "nlg_quality_score",
            "Reference-free quality scores of responses (nlg serve --score-traffic)",
            ["task", "metric"],
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )
        self.batch_size = Histogram(
            "nlg_batch_size", "Sequences per generation call", buckets=(1, 2, 4, 8, 16, 32), registry=r
        )
