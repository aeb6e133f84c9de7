"""Counters the worker keeps for itself (logs, the demo summary, tests) and OpenTelemetry.

OpenTelemetry is used through its API only: spans and metrics cost next to nothing until the
process installs an SDK provider with an exporter (e.g. ``opentelemetry-instrument``).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class Telemetry:
    """Worker statistics plus OpenTelemetry instruments (``rsafe.stream`` meter and tracer)."""

    def __init__(self, worker_id: str):
        from opentelemetry import metrics, trace

        self.worker_id = worker_id
        self.tracer = trace.get_tracer("rsafe.stream")
        meter = metrics.get_meter("rsafe.stream")
        self._events = meter.create_counter("rsafe.stream.events", unit="1",
                                            description="Events consumed from input topics")
        self._verdicts = meter.create_counter("rsafe.stream.verdicts", unit="1",
                                              description="Verdicts published, by label and topic")
        self._dlq = meter.create_counter("rsafe.stream.dlq", unit="1",
                                         description="Events dead-lettered, by reason")
        self._engine_failures = meter.create_counter("rsafe.stream.engine_failures", unit="1",
                                                     description="Failed engine calls (before retry)")
        self._batch_ms = meter.create_histogram("rsafe.stream.batch_duration", unit="ms",
                                                description="Batch consumed → published")
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()
        self.dlq_reasons: Counter[str] = Counter()
        self.inflight_events = 0
        self.max_inflight_events = 0
        self.max_inflight_batches = 0
        self.inflight_batches = 0
        self.policy_reloads = 0

    def batch_started(self, n: int) -> None:
        with self._lock:
            self.counts["batches"] += 1
            self.counts["events"] += n
            self.inflight_events += n
            self.inflight_batches += 1
            self.max_inflight_events = max(self.max_inflight_events, self.inflight_events)
            self.max_inflight_batches = max(self.max_inflight_batches, self.inflight_batches)
        self._events.add(n)

    def batch_finished(self, n: int, duration_ms: float) -> None:
        with self._lock:
            self.inflight_events -= n
            self.inflight_batches -= 1
        self._batch_ms.record(duration_ms)

    def verdict(self, label: str, topic: str, fallback: bool) -> None:
        with self._lock:
            self.labels[label] += 1
            self.counts["verdicts"] += 1
            if fallback:
                self.counts["fallbacks"] += 1
        self._verdicts.add(1, {"label": label, "topic": topic, "fallback": fallback})

    def dead_letter(self, reason: str, topic: str) -> None:
        with self._lock:
            self.dlq_reasons[reason] += 1
            self.counts["dlq"] += 1
        self._dlq.add(1, {"reason": reason, "topic": topic})

    def engine_failure(self) -> None:
        with self._lock:
            self.counts["engine_failures"] += 1
        self._engine_failures.add(1)

    def publish_failure(self) -> None:
        with self._lock:
            self.counts["publish_failures"] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "worker_id": self.worker_id,
                **dict(self.counts),
                "labels": dict(self.labels),
                "dlq_reasons": dict(self.dlq_reasons),
                "max_inflight_events": self.max_inflight_events,
                "max_inflight_batches": self.max_inflight_batches,
                "policy_reloads": self.policy_reloads,
            }
