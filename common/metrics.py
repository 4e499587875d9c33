"""Prometheus metrics of psgrid processes, each on its own registry.

A process exposes its registry with :func:`serve` (``--metrics-port``); the
metric objects are cheap to update, so they are always kept.
"""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from psgrid.portfile import write_port_file
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """What a parameter server counts: traffic, updates, rejections, staleness."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.pushes = Counter("psgrid_pushes_total", "Gradient pushes applied or accumulated", ["job"], registry=r)
        self.duplicates = Counter("psgrid_duplicate_pushes_total", "Retried pushes acknowledged, not applied",
                                  ["job"], registry=r)
        self.pulls = Counter("psgrid_pulls_total", "Parameter pulls served", ["job"], registry=r)
        self.bytes_in = Counter("psgrid_bytes_received_total", "Payload bytes received by pushes", registry=r)
        self.bytes_out = Counter("psgrid_bytes_sent_total", "Payload bytes sent by pulls and fetches", registry=r)
        self.apply_seconds = Histogram("psgrid_apply_seconds", "Time to apply or accumulate one gradient",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.staleness = Histogram("psgrid_update_staleness_steps",
                                   "Steps between a gradient's weights and its own step", buckets=STALENESS_BUCKETS,
                                   registry=r)
        self.rejected = Counter("psgrid_rejected_updates_total", "Pushes refused, by reason", ["reason"], registry=r)
        self.workers = Gauge("psgrid_workers", "Registered workers", registry=r)
        self.jobs = Gauge("psgrid_jobs", "Jobs by state", ["state"], registry=r)
        self.rows_pulled = Counter("psgrid_table_rows_pulled_total", "Embedding-table rows read by workers",
                                   ["job"], registry=r)
        self.rows_pushed = Counter("psgrid_table_rows_pushed_total",
                                   "Embedding-table row gradients staged by workers", ["job"], registry=r)


class WorkerMetrics:
    """What a worker counts: steps, and how long each part of a step takes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.steps = Counter("psgrid_worker_steps_total", "Gradient steps computed and pushed", registry=r)
        self.samples = Counter("psgrid_worker_samples_total", "Training examples processed", registry=r)
        self.seconds = Histogram("psgrid_worker_phase_seconds", "Time per step phase", ["phase"],
                                 buckets=LATENCY_BUCKETS, registry=r)


class PipelineCollector:
    """Reads an inference pipeline's stats at scrape time: queue depths, batches, sizes."""

    def __init__(self, stats):
        self._stats = stats

    def collect(self):
        stats = self._stats()
        depth = GaugeMetricFamily("psgrid_inference_queue_depth", "Requests waiting, by stage", labels=["stage"])
        for stage, waiting in stats.waiting.items():
            depth.add_metric([stage], waiting)
        yield depth
        b = stats.batches
        for name, value, help_text in (
            ("batches", b.batches, "Model calls (batches) run"),
            ("examples", b.examples, "Examples run through the model"),
            ("requests", b.requests, "Requests answered"),
            ("rejected", stats.rejected, "Requests refused with RESOURCE_EXHAUSTED"),
            ("dropped", stats.dropped, "Requests dropped (cancelled or past their deadline)"),
        ):
            yield CounterMetricFamily(f"psgrid_inference_{name}", help_text, value=value)
        mean = GaugeMetricFamily("psgrid_inference_mean_batch_size", "Examples per batch since start")
        mean.add_metric([], b.examples / b.batches if b.batches else 0.0)
        yield mean
        largest = GaugeMetricFamily("psgrid_inference_max_batch_size", "Largest batch run since start")
        largest.add_metric([], b.max_batch_examples)
        yield largest


class NodesCollector:
    """Reads a supervisor's nodes at scrape time: restarts and whether each runs."""

    def __init__(self, nodes):
        self._nodes = nodes

    def collect(self):
        restarts = CounterMetricFamily("psgrid_node_restarts", "Restarts of each supervised node",
                                       labels=["node", "role"])
        up = GaugeMetricFamily("psgrid_node_up", "1 while the node's process runs", labels=["node", "role"])
        for n in self._nodes():
            restarts.add_metric([n.name, n.role.value], n.restarts)
            up.add_metric([n.name, n.role.value], 1 if n.pid else 0)
        yield restarts
        yield up


def nodes_registry(nodes) -> CollectorRegistry:
    """A registry exposing a supervisor's ``nodes()``."""
    registry = CollectorRegistry()
    registry.register(NodesCollector(nodes))
    return registry


def inference_registry(stats) -> CollectorRegistry:
    """A registry exposing an inference pipeline's ``stats()``."""
    registry = CollectorRegistry()
    registry.register(PipelineCollector(stats))
    return registry


def serve(registry: CollectorRegistry, host: str, port: int, port_file: str | None = None) -> int:
    """Expose ``registry`` over HTTP on ``host:port`` (0: any free port); return the bound port."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    bound = server.server_port
    if port_file:
        write_port_file(port_file, bound)
    logger.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
