"""Prometheus metrics, one registry per app (so tests and several apps do not collide)."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, generate_latest


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("ryla_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.queue_depth = Gauge("ryla_queue_depth", "Generations waiting or running", registry=self.registry)
        self.generation_seconds = Histogram(
            "ryla_generation_seconds", "Time spent generating, per request", ["endpoint"],
            buckets=(0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300), registry=self.registry)
        self.queue_wait_seconds = Histogram(
            "ryla_queue_wait_seconds", "Time a request waited for the GPU", buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60),
            registry=self.registry)
        # Python's garbage collector: collections and their objects per generation (prometheus
        # client's own collector), and the objects the start froze out of them (ryla.startup).
        GCCollector(registry=self.registry)
        Gauge("ryla_gc_frozen_objects", "Objects from the server's start that garbage collections skip",
              registry=self.registry).set_function(gc.get_freeze_count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
