"""Prometheus metrics of the embedding service, per mode, exported through Ray's metrics endpoint.

Ray prefixes every name with ``ray_`` and adds the deployment, replica and application tags, so a
dashboard can sum over replicas or split by one. What an operator needs to see a problem coming:
traffic and errors (requests by status), work (items, rewrite tokens), speed (request latency), how
well batching works (batch size) and whether a replica falls behind (queue depth).
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class ServiceMetrics:
    """The replica's metric objects; one instance per replica."""

    def __init__(self) -> None:
        self.requests = Counter(
            "rime_embedding_requests", description="embedding requests by mode and HTTP status", tag_keys=("mode", "status")
        )
        self.items = Counter("rime_embedding_items", description="items embedded", tag_keys=("mode",))
        self.latency = Histogram(
            "rime_embedding_request_latency_s",
            description="time from a request's arrival to its answer, in seconds",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("mode",),
        )
        self.batch_size = Histogram(
            "rime_embedding_batch_size",
            description="items per model batch",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("mode",),
        )
        self.queue_depth = Gauge(
            "rime_embedding_queue_depth", description="items waiting in the mode's batch queue", tag_keys=("mode",)
        )
        self.rewrite_tokens = Counter(
            "rime_embedding_rewrite_tokens", description="tokens generated for gen-mode rewrites", tag_keys=("mode",)
        )

    def answered(self, mode: str, status: int, latency_s: float, items: int = 0) -> None:
        self.requests.inc(tags={"mode": mode, "status": str(status)})
        self.latency.observe(latency_s, tags={"mode": mode})
        if status == 200 and items:
            self.items.inc(items, tags={"mode": mode})
