"""Telemetry: the worker's own counters, OpenTelemetry traces and metrics, and their exporters.

``providers(settings, resource)`` builds the OpenTelemetry SDK as configured (``telemetry:``):
exporter ``none`` (default: no SDK at all, near-zero cost), ``console`` or ``otlp``
(http/protobuf or grpc), plus a Prometheus reader whose text ``/metrics`` serves. ``Telemetry``
holds the instruments and the tracing helpers the pipeline calls.

Traces: a span per event (``rsafe.moderate``, kind CONSUMER) from *consumed* to *published*,
child of the producer's trace when the input record carries W3C trace context in its Kafka
headers, linked to its batch span (``rsafe.batch`` → ``rsafe.engine_call``); its context is written
into the headers of the verdict and audit records, so a downstream consumer continues the trace.
Span events mark retries and dead letters. Sampling is parent-based, by default 5 % of the events
that arrive without trace context (``DEFAULT_SAMPLING_RATIO``); attributes and events are built
only for recording spans. Attributes follow the ``messaging.*`` and ``gen_ai.*``
semantic conventions plus ``rsafe.*`` (policy, label, fallback, windows). Message content and
reasoning never go into spans, attributes or metric labels, and unbounded values (ids) never
become metric labels.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind

from rsafe.stream.config import DEFAULT_SAMPLING_RATIO

log = logging.getLogger("rsafe.stream.telemetry")

#: Histogram buckets in milliseconds (latencies from ~1 ms to ~2 min).
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Providers:
    """The OpenTelemetry providers of one worker (None: the API's no-op ones)."""

    tracer_provider: Any = None
    meter_provider: Any = None
    prometheus_registry: Any = None
    """A private ``prometheus_client`` registry (``/metrics``), when ``telemetry.prometheus``."""

    def metrics_text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.prometheus_registry)

    def shutdown(self) -> None:
        for p in (self.tracer_provider, self.meter_provider):
            if p is not None:
                try:
                    p.shutdown()
                except Exception:  # noqa: BLE001 - an exporter that cannot flush must not block the exit
                    log.debug("telemetry shutdown failed", exc_info=True)


def providers(settings: Any, resource_attributes: dict[str, str], *, span_exporter: Any = None,
              metric_reader: Any = None) -> Providers:
    """The SDK for ``settings`` (``StreamConfig.telemetry``). ``span_exporter`` / ``metric_reader``
    add an in-memory exporter (tests)."""
    wants_sdk = settings.exporter != "none" or settings.prometheus or span_exporter or metric_reader
    if not wants_sdk:
        return Providers()
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({"service.name": settings.service_name, **resource_attributes,
                                **settings.resource_attributes})
    sampler = None
    ratio = settings.sampling_ratio
    if ratio is None and not os.environ.get("OTEL_TRACES_SAMPLER"):
        ratio = DEFAULT_SAMPLING_RATIO
    if ratio is not None:
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        sampler = ParentBased(TraceIdRatioBased(ratio))
    tp = TracerProvider(resource=resource, **({"sampler": sampler} if sampler else {}))
    readers = []
    registry = None
    interval = int(settings.metric_export_interval_s * 1000)
    if settings.exporter == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        tp.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=interval))
    elif settings.exporter == "otlp":
        span_exp, metric_exp = _otlp(settings.otlp)
        tp.add_span_processor(BatchSpanProcessor(span_exp))
        readers.append(PeriodicExportingMetricReader(metric_exp, export_interval_millis=interval))
    if span_exporter is not None:
        tp.add_span_processor(SimpleSpanProcessor(span_exporter))
    if metric_reader is not None:
        readers.append(metric_reader)
    if settings.prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=True)
        readers.append(PrometheusMetricReader(registry=registry))
    mp = MeterProvider(resource=resource, metric_readers=readers)
    traced = settings.exporter != "none" or span_exporter is not None
    return Providers(tp if traced else None, mp, registry)  # /metrics alone: no spans made


def _otlp(o: Any) -> tuple[Any, Any]:
    kw: dict[str, Any] = {}
    if o.headers:
        kw["headers"] = dict(o.headers)
    if o.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        if o.endpoint:
            kw["endpoint"] = o.endpoint
        return OTLPSpanExporter(**kw), OTLPMetricExporter(**kw)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    base = (o.endpoint or "").rstrip("/")
    return (OTLPSpanExporter(**kw, **({"endpoint": f"{base}/v1/traces"} if base else {})),
            OTLPMetricExporter(**kw, **({"endpoint": f"{base}/v1/metrics"} if base else {})))


# --------------------------------------------------------------------------- context propagation

def extract_context(headers: Any) -> Any:
    """The W3C trace context carried by Kafka headers (list of (key, bytes) or a mapping)."""
    if not headers:
        return None
    items = headers.items() if isinstance(headers, dict) else headers
    carrier = {}
    for k, v in items:
        if isinstance(k, bytes):
            k = k.decode("latin-1")
        if k.lower() in ("traceparent", "tracestate", "baggage") and v is not None:
            carrier[k.lower()] = v.decode("latin-1") if isinstance(v, bytes) else str(v)
    return propagate.extract(carrier) if carrier else None


def inject_headers(span: Any) -> list[tuple[str, bytes]]:
    """Kafka headers carrying ``span``'s context (empty for a no-op span)."""
    if span is None or not span.get_span_context().is_valid:
        return []
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return [(k, v.encode("latin-1")) for k, v in carrier.items()]


# --------------------------------------------------------------------------- the worker's telemetry

class Telemetry:
    """Worker statistics (logs, the demo, tests) plus the OpenTelemetry instruments."""

    def __init__(self, worker_id: str, prov: Providers | None = None, *, group_id: str | None = None):
        from opentelemetry import metrics, trace

        self.worker_id = worker_id
        self.group_id = group_id
        self.providers = prov or Providers()
        tp = self.providers.tracer_provider or trace.get_tracer_provider()
        mp = self.providers.meter_provider or metrics.get_meter_provider()
        self.tracer = tp.get_tracer("rsafe.stream")
        self.tracing = self.providers.tracer_provider is not None
        """Per-event spans are made only with an SDK tracer (not for the no-op one)."""
        meter = mp.get_meter("rsafe.stream")
        self._events = meter.create_counter("rsafe.events", unit="1", description="Events consumed from input topics")
        self._verdicts = meter.create_counter("rsafe.verdicts", unit="1",
                                              description="Verdicts published, by label, policy, topic, fallback")
        self._categories = meter.create_counter("rsafe.verdict.categories", unit="1",
                                                description="Categories named in unsafe verdicts")
        self._fallbacks = meter.create_counter("rsafe.fallbacks", unit="1",
                                               description="Verdicts whose label came from the topic's on_error")
        self._dlq = meter.create_counter("rsafe.dlq", unit="1", description="Events dead-lettered, by reason")
        self._review = meter.create_counter("rsafe.review.queued", unit="1",
                                            description="Decisions the worker queued for review itself, by reason "
                                                        "(too_large, truncated)")
        self._engine_failures = meter.create_counter("rsafe.engine.failures", unit="1",
                                                     description="Failed engine calls (before retry)")
        self._publish_failures = meter.create_counter("rsafe.publish.failures", unit="1",
                                                      description="Failed publish attempts (retried)")
        self._batch_size = meter.create_histogram("rsafe.batch.size", unit="1", description="Events per micro-batch",
                                                  explicit_bucket_boundaries_advisory=BATCH_BUCKETS)
        self._batch_ms = meter.create_histogram("rsafe.batch.duration", unit="ms",
                                                description="Batch consumed → published",
                                                explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS)
        self._engine_ms = meter.create_histogram("rsafe.engine.latency", unit="ms",
                                                 description="One engine call (a batch)",
                                                 explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS)
        self._e2e_ms = meter.create_histogram("rsafe.e2e.latency", unit="ms",
                                              description="Event consumed → its records published",
                                              explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS)
        self._tokens_in = meter.create_counter("rsafe.tokens.input", unit="{token}", description="Prompt tokens")
        self._tokens_out = meter.create_counter("rsafe.tokens.output", unit="{token}", description="Generated tokens")
        self._reloads = meter.create_counter("rsafe.policy.reloads", unit="1", description="Policy reloads applied")
        self._context = meter.create_counter(
            "rsafe.context.events", unit="1",
            description="Judged events by where their conversation context came from: table, event (its own "
                        "messages), none (first turn), no_key, key_mismatch (conversation_id differs from the key: "
                        "judged without context)")
        self._feedback = meter.create_counter("rsafe.feedback.trusted", unit="1",
                                              description="Trusted feedback joined, by agreement and versions")
        meter.create_observable_gauge("rsafe.batches.inflight", callbacks=[self._observe_inflight], unit="1",
                                      description="Batches in the engine now")
        meter.create_observable_gauge("rsafe.consumer.lag", callbacks=[self._observe_lag], unit="1",
                                      description="Records not yet consumed, per input partition")
        for counter in (self._engine_failures, self._publish_failures, self._reloads):
            counter.add(0)  # the series exist from the start: rate() and alerts see 0, not nothing
        self.lag_source: Callable[[], Iterable[tuple[str, int, int]]] | None = None
        """(topic, partition, lag) of the input partitions, set by the worker."""
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()
        self.dlq_reasons: Counter[str] = Counter()
        self.inflight_events = 0
        self.max_inflight_events = 0
        self.max_inflight_batches = 0
        self.inflight_batches = 0
        self.policy_reloads = 0

    # ------------------------------------------------------------------ observable callbacks

    def _observe_inflight(self, options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        return [Observation(self.inflight_batches)]

    def _observe_lag(self, options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        if self.lag_source is None:
            return []
        try:
            return [Observation(lag, {"messaging.destination.name": topic, "messaging.destination.partition.id": str(p)})
                    for topic, p, lag in self.lag_source()]
        except Exception:  # noqa: BLE001 - a consumer not started yet
            return []

    # ------------------------------------------------------------------ counters

    def batch_started(self, n: int) -> None:
        with self._lock:
            self.counts["batches"] += 1
            self.counts["events"] += n
            self.inflight_events += n
            self.inflight_batches += 1
            self.max_inflight_events = max(self.max_inflight_events, self.inflight_events)
            self.max_inflight_batches = max(self.max_inflight_batches, self.inflight_batches)
        self._batch_size.record(n)

    def consumed(self, topic: str, n: int = 1) -> None:
        self._events.add(n, {"messaging.destination.name": topic})

    def batch_finished(self, n: int, duration_ms: float) -> None:
        with self._lock:
            self.inflight_events -= n
            self.inflight_batches -= 1
        self._batch_ms.record(duration_ms)

    def engine_call(self, duration_ms: float, tokens_in: int, tokens_out: int) -> None:
        self._engine_ms.record(duration_ms)
        if tokens_in:
            self._tokens_in.add(tokens_in)
        if tokens_out:
            self._tokens_out.add(tokens_out)

    def verdicts(self, decided: Iterable[tuple[str, str, bool, str | None, Sequence[str]]]) -> None:
        """Count a batch's verdicts: (label, topic, fallback, policy, categories) each. One
        instrument call per distinct label set, not per verdict (~7 µs each in the SDK)."""
        by_labels: Counter[tuple[str, str, bool, str]] = Counter()
        by_category: Counter[tuple[str, str]] = Counter()
        for label, topic, fallback, policy, categories in decided:
            by_labels[label, topic, fallback, policy or ""] += 1
            for c in categories:
                by_category[c, policy or ""] += 1
        fallbacks: Counter[str] = Counter()
        with self._lock:
            for (label, topic, fallback, _), n in by_labels.items():
                self.labels[label] += n
                self.counts["verdicts"] += n
                if fallback:
                    self.counts["fallbacks"] += n
                    fallbacks[topic] += n
        for (label, topic, fallback, policy), n in by_labels.items():
            self._verdicts.add(n, {"label": label, "policy": policy, "messaging.destination.name": topic,
                                   "fallback": fallback})
        for topic, n in fallbacks.items():
            self._fallbacks.add(n, {"messaging.destination.name": topic})
        for (c, policy), n in by_category.items():
            self._categories.add(n, {"category": c, "policy": policy})

    def context_events(self, counts: Mapping[tuple[str, str], int]) -> None:
        """A batch's judged events per (topic, context source) (one instrument call per pair)."""
        with self._lock:
            for (_, how), n in counts.items():
                self.counts[f"context_{how}"] += n
        for (topic, how), n in counts.items():
            self._context.add(n, {"messaging.destination.name": topic, "context": how})

    def published(self, latency_ms: float) -> None:
        self._e2e_ms.record(latency_ms)

    def dead_letter(self, reason: str, topic: str) -> None:
        with self._lock:
            self.dlq_reasons[reason] += 1
            self.counts["dlq"] += 1
        self._dlq.add(1, {"reason": reason, "messaging.destination.name": topic})

    def review_queued(self, reason: str, topic: str) -> None:
        with self._lock:
            self.counts["review_queued"] += 1
        self._review.add(1, {"reason": reason, "messaging.destination.name": topic})

    def engine_failure(self) -> None:
        with self._lock:
            self.counts["engine_failures"] += 1
        self._engine_failures.add(1)

    def publish_failure(self) -> None:
        with self._lock:
            self.counts["publish_failures"] += 1
        self._publish_failures.add(1)

    def policy_reload(self) -> None:
        with self._lock:
            self.policy_reloads += 1
        self._reloads.add(1)

    def feedback(self, agree: bool, policy_version: str | None, model_version: str | None) -> None:
        self._feedback.add(1, {"agreement": "agree" if agree else "disagree",
                               "policy_version": policy_version or "", "model_version": model_version or ""})

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

    # ------------------------------------------------------------------ per-event spans

    def event_spans(self, outcomes: Sequence[Any], batch_span: Any, consumer_group: str | None = None) -> list[Any]:
        """One CONSUMER span per outcome, started when its event was consumed, child of the
        producer's trace (input headers) and linked to the batch span. None each when not tracing."""
        if not self.tracing:
            return [None] * len(outcomes)
        links = [Link(batch_span.get_span_context())] if batch_span is not None else []
        spans = []
        start_span = self.tracer.start_span
        for o in outcomes:
            inc = o.incoming
            span = start_span("rsafe.moderate", context=extract_context(inc.headers), kind=SpanKind.CONSUMER,
                              links=links, start_time=int(inc.consumed_at.timestamp() * 1e9))
            spans.append(span)
            if not span.is_recording():  # sampled out: no attributes, no events (most events at the default ratio)
                continue
            attrs: dict[str, Any] = {
                "messaging.system": "kafka", "messaging.operation.type": "process",
                "messaging.destination.name": inc.source.topic,
                "messaging.destination.partition.id": str(inc.source.partition),
                "messaging.kafka.offset": inc.source.offset,
            }
            if consumer_group:
                attrs["messaging.consumer.group.name"] = consumer_group
            v, a = o.verdict_fields, o.audit_fields
            if v is not None:
                attrs.update({"gen_ai.request.model": v["model"] or "", "rsafe.policy": v["policy"] or "",
                              "rsafe.policy_version": v["policy_version"] or "", "rsafe.label": v["label"],
                              "rsafe.fallback": v["fallback"], "rsafe.windows": v["windows"]})
                if a is not None:
                    attrs["gen_ai.usage.input_tokens"] = a["prompt_tokens"]
                    attrs["gen_ai.usage.output_tokens"] = a["completion_tokens"]
            span.set_attributes(attrs)
            if v is not None and v["timings"]["attempts"] > 1:
                span.add_event("retry", {"rsafe.attempts": v["timings"]["attempts"]})
            if o.dlq is not None:
                span.add_event("dead_letter", {"rsafe.dlq.reason": o.dlq.reason.value})
        return spans
