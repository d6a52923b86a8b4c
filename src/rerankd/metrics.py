"""Prometheus metrics of one server (its own registry, so several apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.process_collector import ProcessCollector

from rerankd.engine.models import ServedModels
from rerankd.engine.scheduler import BatchObserver, BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PAIR_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
disable_created_metrics()  # `*_created` series only add noise to a scrape


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "rerankd_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "rerankd_request_duration_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_pairs = Histogram(
            "rerankd_batch_pairs",
            "pairs per forward pass",
            ["model"],
            buckets=PAIR_BUCKETS,
            registry=self.registry,
        )
        self.batch_tokens = Histogram(
            "rerankd_batch_tokens",
            "real tokens per forward pass",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.padding_ratio = Histogram(
            "rerankd_batch_padding_ratio",
            "share of a forward pass's padded tokens that are padding",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=self.registry,
        )
        self.forward_seconds = Histogram(
            "rerankd_forward_seconds",
            "forward pass time",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queued_pairs = Gauge(
            "rerankd_queued_pairs", "pairs waiting per model", ["model"], registry=self.registry
        )
        self.model_ready = Gauge(
            "rerankd_model_ready", "1 when the model serves", ["model"], registry=self.registry
        )
        self.model_load_seconds = Gauge(
            "rerankd_model_load_seconds",
            "time to load and warm up the model",
            ["model"],
            registry=self.registry,
        )

    def batch_observer(self, model: str) -> BatchObserver:
        def observe(stats: BatchStats) -> None:
            self.batch_pairs.labels(model).observe(stats.pairs)
            self.batch_tokens.labels(model).observe(stats.tokens)
            self.padding_ratio.labels(model).observe(1 - stats.tokens / max(stats.padded_tokens, 1))
            self.forward_seconds.labels(model).observe(stats.seconds)

        return observe

    def render(self, models: ServedModels) -> bytes:
        """The exposition text, with the model gauges read now."""
        for slot in models.slots():
            self.model_ready.labels(slot.name).set(1 if slot.state == "ready" else 0)
            if slot.load_seconds is not None:
                self.model_load_seconds.labels(slot.name).set(slot.load_seconds)
            if slot.engine is not None:
                self.queued_pairs.labels(slot.name).set(slot.engine.scheduler.queued_pairs)
        return generate_latest(self.registry)
