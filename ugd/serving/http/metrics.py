"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own so that several apps in one
process (tests) never share or clash on counters.

    ugd_requests_total{endpoint, method, status}     requests answered
    ugd_request_seconds{endpoint}                   latency histogram (time to the response's end)
    ugd_requests_in_flight                          requests being handled now
    ugd_batch_size{head}                            items per forward (the dynamic batcher's batches)
    ugd_batch_seconds{head}                         time of each forward
    ugd_queue_depth                                 requests waiting for the model
    ugd_documents                                   documents in the store

``endpoint`` is the route's template (``/v1/documents/{doc_id}``), never the raw path, so that a client
cannot grow the label set without bound; unmatched paths count as ``other``.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ugd_requests", "Requests answered", ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("ugd_request_seconds", "Request latency", ["endpoint"], buckets=_LATENCY_BUCKETS,
                                 registry=r)
        self.in_flight = Gauge("ugd_requests_in_flight", "Requests being handled", registry=r)
        self.batch_size = Histogram("ugd_batch_size", "Items per model forward", ["head"], buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("ugd_batch_seconds", "Seconds per model forward", ["head"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("ugd_queue_depth", "Requests waiting for the model", registry=r)
        self.documents = Gauge("ugd_documents", "Documents in the store", registry=r)

    def observe_batch(self, head, items: int, seconds: float) -> None:
        self.batch_size.labels(head[0]).observe(items)
        self.batch_seconds.labels(head[0]).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware counting and timing every HTTP request by route template and status."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        m = self.metrics
        m.in_flight.inc()
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            m.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            m.requests.labels(endpoint, scope.get("method", ""), str(status["code"])).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - t0)


__all__ = ["MetricsMiddleware", "ServerMetrics"]
