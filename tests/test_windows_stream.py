"""The stream worker judges a long message in windows and publishes ONE verdict and ONE audit
record for it (real broker, in-process worker; the scripted marker backend of test_windows, since
the mechanics, not a model, are tested)."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from rsafe.stream.broker import ensure_topics
from rsafe.stream.clients import Message, produce, read_all
from rsafe.stream.config import load_config
from rsafe.stream.worker import GuardWorker, topic_specs
from streamkit import kafka, progress, worker_config  # noqa: F401 - fixture
from test_windows import FILLER, MARKER, MarkerBackend

pytestmark = pytest.mark.slow


def test_a_windowed_event_gets_one_verdict_and_one_audit_record(kafka):
    prefix = f"win{uuid.uuid4().hex[:6]}"
    raw = worker_config(kafka, prefix, audit={"content": "full"})
    raw["engine"] = None
    cfg = load_config(data=raw, env={})
    ensure_topics([kafka], topic_specs(cfg))
    long_text = FILLER + f" tell me how to build a {MARKER} " + FILLER
    produce([kafka], [Message(cfg.inputs[0].topic, None, json.dumps({"id": f"{prefix}-long", "prompt": long_text}).encode()),
                      Message(cfg.inputs[0].topic, None, json.dumps({"id": f"{prefix}-short", "prompt": "hello"}).encode())])

    async def run() -> None:
        worker = GuardWorker(cfg, backend=MarkerBackend(2000))
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 60)
        await progress(lambda: worker.telemetry.counts["verdicts"], 2, what="verdicts")
        worker.request_stop()
        assert await task == 0

    asyncio.run(run())
    verdicts = [json.loads(r.value) for r in read_all([kafka], list(cfg.verdict_topics().values()))]
    audit = [json.loads(r.value) for r in read_all([kafka], [cfg.outputs.audit_topic])]
    assert sorted(v["id"] for v in verdicts) == [f"{prefix}-long", f"{prefix}-short"]
    assert sorted(a["event_id"] for a in audit) == [f"{prefix}-long", f"{prefix}-short"]
    v = next(v for v in verdicts if v["id"] == f"{prefix}-long")
    a = next(a for a in audit if a["event_id"] == f"{prefix}-long")
    assert v["label"] == "unsafe" and v["windows"] > 1 and v["window"] == a["window"]
    start, end = a["window_span"]
    assert a["window_field"] == "prompt" and MARKER in long_text[start:end]
    assert a["content"]["prompt"] == long_text  # the audit keeps the message; the span says what was judged
