"""Observability: spans per event across Kafka, metrics per label, /metrics, OTLP export, the shipped
dashboard and alert rules (real broker, in-process worker with the null engine; in-memory exporters)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from rsafe.stream.broker import ensure_topics
from rsafe.stream.clients import Message, read_all
from rsafe.stream.config import load_config
from rsafe.stream.telemetry import providers
from rsafe.stream.worker import GuardWorker, topic_specs
from streamkit import kafka, progress, worker_config  # noqa: F401 - fixture

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


def produce_with_headers(bootstrap: str, messages: list[tuple[str, bytes, list]]) -> None:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=[bootstrap], acks="all")
    for topic, value, headers in messages:
        p.send(topic, value=value, headers=headers)
    p.flush()
    p.close()


class WeaponsBackend:
    """unsafe (naming U2) when a prompt mentions a weapon, else safe; answers at once."""

    model_id = "scripted"
    token_counter = None

    def _one(self, turn: str):
        from rsafe.models.engines import Completion

        label = "unsafe" if "weapon" in turn.split("<BEGIN CONVERSATION>")[1] else "safe"
        other = "safe" if label == "unsafe" else "unsafe"
        return Completion(text=f"<think>This falls under U2 - Weapons.</think>\\boxed{{{label}}}",
                          token_texts=["<think>This falls under U2 - Weapons.</think>\\boxed{", label, "}"],
                          candidates=[[("x", 0.0)], [(label, 0.0), (other, -9.0)], [("}", 0.0)]], prompt=turn,
                          prompt_tokens=300, completion_tokens=12, finish_reason="stop")

    async def agenerate(self, turns, gen, adapters):
        return [self._one(t) for t in turns]

    def generate(self, turns, gen, adapters):
        return [self._one(t) for t in turns]

    def close(self):
        pass


def run_worker(cfg, prov, n_verdicts: int, on_ready=None) -> GuardWorker:
    async def run() -> GuardWorker:
        worker = GuardWorker(cfg, backend=WeaponsBackend(), providers=prov)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 60)
        if on_ready is not None:
            await on_ready(worker)
        await progress(lambda: worker.telemetry.counts["verdicts"] + worker.telemetry.counts["dlq"], n_verdicts,
                       what="verdicts and DLQ records")
        worker.request_stop()
        assert await task == 0
        return worker

    return asyncio.run(run())


def test_spans_context_propagation_and_metrics_with_in_memory_exporters(kafka):
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    prefix = f"tel{uuid.uuid4().hex[:6]}"
    cfg = load_config(data=worker_config(kafka, prefix, telemetry={"sampling_ratio": 1.0}), env={})
    ensure_topics([kafka], topic_specs(cfg))
    spans, metrics = InMemorySpanExporter(), InMemoryMetricReader()
    prov = providers(cfg.telemetry, {"rsafe.worker.id": "w"}, span_exporter=spans, metric_reader=metrics)
    topic = cfg.inputs[0].topic
    traceparent = f"00-{TRACE_ID}-{PARENT_SPAN}-01".encode()
    produce_with_headers(kafka, [
        (topic, json.dumps({"id": f"{prefix}-1", "prompt": "hello there"}).encode(), [("traceparent", traceparent)]),
        (topic, json.dumps({"id": f"{prefix}-2", "prompt": "no trace context"}).encode(), []),
        (topic, b"{not json", []),
    ])
    run_worker(cfg, prov, 3)
    prov.tracer_provider.force_flush()
    finished = spans.get_finished_spans()
    events = [s for s in finished if s.name == "rsafe.moderate"]
    batches = {s.context.span_id: s for s in finished if s.name == "rsafe.batch"}
    engine = [s for s in finished if s.name == "rsafe.engine_call"]
    assert len(events) == 3 and batches and engine
    assert all(e.parent.span_id in batches for e in engine)  # engine call: child of its batch
    for e in events:
        assert e.kind.name == "CONSUMER" and [ln.context.span_id for ln in e.links][0] in batches
        assert e.attributes["messaging.system"] == "kafka" and e.attributes["messaging.destination.name"] == topic
        assert "messaging.kafka.offset" in e.attributes and e.attributes["messaging.consumer.group.name"]
        assert "hello" not in json.dumps(dict(e.attributes))  # no content in spans
    traced = [e for e in events if f"{e.context.trace_id:032x}" == TRACE_ID]
    assert len(traced) == 1 and f"{traced[0].parent.span_id:016x}" == PARENT_SPAN  # the producer's trace
    assert traced[0].attributes["rsafe.label"] == "safe" and traced[0].attributes["gen_ai.request.model"]
    dead = [e for e in events if any(ev.name == "dead_letter" for ev in e.events)]
    assert len(dead) == 1
    # the verdict and the audit record carry the event span's context downstream
    out = read_all([kafka], [cfg.verdicts_topic(cfg.inputs[0]), cfg.outputs.audit_topic])
    mine = [r for r in out if json.loads(r.value).get("id", json.loads(r.value).get("event_id")) == f"{prefix}-1"]
    assert len(mine) == 2
    for r in mine:
        header = dict(r.headers)["traceparent"].decode()
        assert header.split("-")[1] == TRACE_ID and header.split("-")[2] == f"{traced[0].context.span_id:016x}"
    # metrics, per label
    data = metrics.get_metrics_data()
    points = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                points[m.name] = list(m.data.data_points)
    verdicts = {(dict(p.attributes)["label"], dict(p.attributes)["messaging.destination.name"]): p.value
                for p in points["rsafe.verdicts"]}
    assert verdicts == {("safe", topic): 2}
    assert {dict(p.attributes)["reason"]: p.value for p in points["rsafe.dlq"]} == {"not_json": 1}
    assert sum(p.value for p in points["rsafe.events"]) == 3
    assert sum(p.count for p in points["rsafe.e2e.latency"]) == 3 and sum(p.count for p in points["rsafe.batch.size"])
    for m in ("rsafe.engine.latency", "rsafe.tokens.input", "rsafe.batches.inflight"):
        assert m in points, m
    ids = {f"{prefix}-1", f"{prefix}-2"}
    for pts in points.values():  # no unbounded label (event ids) in any metric
        for p in pts:
            assert not ids & {str(v) for v in dict(p.attributes).values()}


def _referenced_metrics() -> set[str]:
    import yaml

    names: set[str] = set()
    dash = json.loads((ROOT / "infra" / "grafana" / "rsafe-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    rules = yaml.safe_load((ROOT / "infra" / "prometheus" / "alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    for e in exprs:
        names |= set(re.findall(r"\b(rsafe_[a-z0-9_]+)", e))
    return names


def test_prometheus_endpoint_serves_every_metric_the_dashboard_and_alerts_use(kafka):
    prefix = f"prom{uuid.uuid4().hex[:6]}"
    raw = worker_config(kafka, prefix, telemetry={"prometheus": True, "sampling_ratio": 1.0},
                        inputs=[{"topic": f"{prefix}.in", "policy": "rsafe-default", "on_error": "safe"}],
                        faults={"request_error_marker": "BAD"}, feedback={"enabled": True, "expiry_interval_s": 1})
    cfg = load_config(data=raw, env={})
    ensure_topics([kafka], topic_specs(cfg))
    topic = cfg.inputs[0].topic
    prov = providers(cfg.telemetry, {"rsafe.worker.id": "w"})
    scraped: dict[str, str] = {}

    async def scrape(worker: GuardWorker) -> None:
        from rsafe.stream.clients import produce

        await asyncio.to_thread(produce, [kafka], [
            Message(topic, None, json.dumps({"id": f"{prefix}-1", "prompt": "hello"}).encode()),
            Message(topic, None, json.dumps({"id": f"{prefix}-2", "prompt": "BAD request"}).encode()),
            Message(topic, None, json.dumps({"id": f"{prefix}-3", "prompt": "build a weapon"}).encode()),
            Message(topic, None, b"not json"),
            Message(cfg.feedback.trusted_topic, f"{prefix}-1".encode(),
                    json.dumps({"event_id": f"{prefix}-1", "feedback_id": "f1", "label": "safe",
                                "source": "reviewer"}).encode()),
        ])
        await progress(lambda: worker.telemetry.counts["verdicts"], 3, what="verdicts")
        worker.request_reload()
        await asyncio.sleep(3)  # the feedback join, the reload
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{worker.http.port}/metrics")
            scraped["metrics"] = r.text
            scraped["ready"] = (await client.get(f"http://127.0.0.1:{worker.http.port}/readyz")).status_code
            scraped["health"] = (await client.get(f"http://127.0.0.1:{worker.http.port}/healthz")).status_code

    run_worker(cfg, prov, 4, on_ready=scrape)
    text = scraped["metrics"]
    assert scraped["health"] == 200 and scraped["ready"] in (200, 503)
    served = set(re.findall(r"^(rsafe_[a-z0-9_]+)", text, re.M))
    missing = {m for m in _referenced_metrics() if m not in served}
    assert not missing, f"the dashboard/alerts use metrics the worker does not serve: {sorted(missing)}"
    assert 'label="safe"' in text and 'category="U2"' in text and "rsafe_consumer_lag" in text
    assert 'reason="not_json"' in text and "rsafe_fallbacks_total" in text


class _Receiver(BaseHTTPRequestHandler):
    received: list[bytes] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            _Receiver.received.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_otlp_http_receiver_gets_the_spans(kafka):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        prefix = f"otlp{uuid.uuid4().hex[:6]}"
        raw = worker_config(kafka, prefix, telemetry={
            "exporter": "otlp", "otlp": {"endpoint": f"http://127.0.0.1:{server.server_port}"},
            "metric_export_interval_s": 1, "sampling_ratio": 1.0})
        cfg = load_config(data=raw, env={})
        ensure_topics([kafka], topic_specs(cfg))
        from rsafe.stream.clients import produce

        produce([kafka], [Message(cfg.inputs[0].topic, None, json.dumps({"id": f"{prefix}-{i}", "prompt": "hi"}).encode())
                          for i in range(3)])
        run_worker(cfg, None, 3)  # providers from the config; flushed at the worker's exit
    finally:
        server.shutdown()
    names = set()
    for body in _Receiver.received:
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                names |= {s.name for s in ss.spans}
    assert {"rsafe.moderate", "rsafe.batch", "rsafe.engine_call"} <= names


def test_default_sampling_traces_a_share_of_new_traces_and_every_sampled_producer_trace(monkeypatch):
    """Default: parent-based, 5 % of events without trace context; an event whose producer sampled
    its trace is always traced, and every event (sampled or not) passes its context downstream."""
    from types import SimpleNamespace

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from rsafe.stream.config import DEFAULT_SAMPLING_RATIO, Telemetry as TelemetrySettings
    from rsafe.schemas.records import SourceRef
    from rsafe.stream.telemetry import Telemetry, inject_headers

    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    spans = InMemorySpanExporter()
    prov = providers(TelemetrySettings(), {}, span_exporter=spans)
    assert prov.tracer_provider.sampler.get_description().startswith(
        f"ParentBased{{root:TraceIdRatioBased{{{DEFAULT_SAMPLING_RATIO}}},remoteParentSampled:AlwaysOnSampler,"
        "remoteParentNotSampled:AlwaysOffSampler")
    tel = Telemetry("w", prov)

    def outcome(i: int, headers: list | None) -> SimpleNamespace:
        from rsafe.stream.moderate import Incoming

        inc = Incoming(value=b"{}", key=None, source=SourceRef(topic="t", partition=0, offset=i), headers=headers)
        return SimpleNamespace(incoming=inc, verdict_fields=None, audit_fields=None, dlq=None)

    sampled = [("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN}-01".encode())]
    fresh = [outcome(i, None) for i in range(2000)]
    continued = [outcome(i, sampled) for i in range(20)]
    made = tel.event_spans(fresh + continued, None)
    headers = [inject_headers(s) for s in made]
    for s in made:
        s.end()
    traced = spans.get_finished_spans()
    from_producer = [s for s in traced if f"{s.context.trace_id:032x}" == TRACE_ID]
    assert len(from_producer) == 20  # every event of a sampled producer trace
    assert 30 <= len(traced) - 20 <= 200  # ~5 % of 2000 new traces (binomial: 100 ± 30)
    assert all(h and h[0][0] == "traceparent" for h in headers)  # sampled or not, the context goes on
    assert {int(h[0][1][-2:], 16) & 1 for h in headers} == {0, 1}  # the sampled flag, both ways
    prov.shutdown()

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")  # the standard variable still wins over the default
    assert "AlwaysOn" in providers(TelemetrySettings(), {}, span_exporter=spans).tracer_provider.sampler.get_description()
    assert "0.5" in providers(TelemetrySettings(sampling_ratio=0.5), {}, span_exporter=spans).tracer_provider.sampler.get_description()


def test_metrics_are_served_by_default_without_tracing(kafka):
    """``/metrics`` answers whenever the HTTP server runs (``telemetry.prometheus`` defaults on); on its
    own it makes no spans (no tracer provider); ``prometheus: false`` answers 404."""
    prefix = f"defm{uuid.uuid4().hex[:6]}"
    cfg = load_config(data=worker_config(kafka, prefix), env={})
    assert cfg.telemetry.prometheus and cfg.http.enabled
    prov = providers(cfg.telemetry, {"rsafe.worker.id": "w"})
    assert prov.tracer_provider is None and prov.meter_provider is not None
    got: dict[str, int | str] = {}

    async def scrape(worker: GuardWorker) -> None:
        from rsafe.stream.clients import produce

        await asyncio.to_thread(produce, [kafka], [Message(cfg.inputs[0].topic, None,
                                                           json.dumps({"id": f"{prefix}-1", "prompt": "hi"}).encode())])
        await progress(lambda: worker.telemetry.counts["verdicts"], 1, what="verdicts")
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{worker.http.port}/metrics")
            got["status"], got["text"] = r.status_code, r.text

    worker = run_worker(cfg, prov, 1, on_ready=scrape)
    assert got["status"] == 200 and "rsafe_verdicts_total" in got["text"] and not worker.telemetry.tracing
    off = load_config(data=worker_config(kafka, f"{prefix}x", telemetry={"prometheus": False}), env={})
    assert providers(off.telemetry, {}).meter_provider is None  # nothing configured: no SDK at all
