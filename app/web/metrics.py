"""The node's Prometheus metrics, with ``prometheus_client``: read from the node's state at each scrape.

Why a custom collector and not ``Counter.inc()`` calls across the code: the numbers already live in
the database (they survive restarts and are the ones ``hyperct status`` prints) or in the receiver's
counters; a collector reads them when Prometheus asks, so the metrics can never drift from the
state. The names are the ones the node has always exported (docs/node.md, "Health and logs").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.exposition import choose_encoder

logger = logging.getLogger(__name__)

__all__ = ["NodeCollector", "metrics_registry", "metrics_text"]


class NodeCollector:
    """Yields the node's metrics from ``counts()`` (:meth:`NodeStore.counts`) and ``counters()``
    (the receiver's counters since start)."""

    def __init__(self, counts: Callable[[], Mapping[str, Any]], counters: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        counts, counters = self._counts(), self._counters()
        jobs: Mapping[str, int] = counts.get("jobs", {})
        yield _counter("hyperct_instances_received", "Instances acknowledged (all time, from the state).",
                       counts.get("instances", 0))  # fmt: skip
        yield _counter("hyperct_instances_failed", "C-STORE and STOW-RS instances answered with a failure since start.",
                       counters.get("instances_failed", 0))  # fmt: skip
        yield _counter("hyperct_associations_rejected",
                       "Associations (and STOW-RS requests) rejected by called AE or allow-list since start.",
                       counters.get("associations_rejected", 0))  # fmt: skip
        for name, key, text in (("hyperct_studies", "studies", "Studies by state."),
                                ("hyperct_jobs", "jobs", "Jobs by state."),
                                ("hyperct_outbox", "outbox", "Outbox rows by state.")):  # fmt: skip
            family = GaugeMetricFamily(name, text, labels=["state"])
            for state, value in sorted(counts.get(key, {}).items()):
                family.add_metric([state], value)
            yield family
        yield _counter("hyperct_studies_processed", "Jobs finished with results.", jobs.get("done", 0))
        yield _counter("hyperct_failures", "Errors recorded (receive, job, send).", counts.get("errors", 0))
        yield GaugeMetricFamily("hyperct_queue_depth", "Jobs queued or running.",
                                value=jobs.get("queued", 0) + jobs.get("running", 0))  # fmt: skip
        yield SummaryMetricFamily("hyperct_processing_seconds", "Pipeline run time per job.",
                                  count_value=counts.get("processing_count", 0),
                                  sum_value=counts.get("processing_seconds", 0.0))  # fmt: skip


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    """A counter family; ``prometheus_client`` adds the ``_total`` suffix to the sample."""
    return CounterMetricFamily(name, text, value=value)


def metrics_registry(counts: Callable[[], Mapping[str, Any]], counters: Callable[[], Mapping[str, int]]) -> CollectorRegistry:
    """A registry of its own (not the process-wide default): two nodes in one test process, or a
    restart, never register twice."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(counts, counters))
    return registry


def metrics_text(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """The exposition and its media type, negotiated on ``accept`` as ``prometheus_client``'s own
    exporters do: the Prometheus text format, or OpenMetrics when the scraper asks for it."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
