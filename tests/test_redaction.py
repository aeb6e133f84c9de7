"""Redaction that holds: per ``audit.content`` mode, no record the worker writes carries the
content or an unkeyed digest of it (with ``audit.reasoning: none``).

A real worker on the real broker, with the feedback loop on, judges messages that carry a secret
phrase — a normal one, one over the size limit, one the schema rejects, one before which feedback
arrives and one never decided — and a reviewer's label contradicts a decision (a disagreement).
Then every topic of the run (verdicts, audit, DLQ, review, disagreements, policy store, the
feedback tables' changelogs) is read back and searched for the phrase, the messages, and the plain
sha256 of each message and of each rendered prompt. The engine here quotes the message in its
reasoning, as real models often do, so ``reasoning: full`` visibly leaks it (the documented limit).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid

import pytest

from rsafe.models.engines import Completion
from rsafe.stream.clients import Message, produce, read_all
from rsafe.stream.config import load_config
from streamkit import kafka, worker_config  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

SECRET = "violet-elephant-4471"
KEY = "0123456789abcdef" * 4


class Quoting:
    """A backend whose reasoning quotes the whole prompt it was given (the message included)."""

    model_id = "quoting"

    def __init__(self):
        self.rendered: list[str] = []
        self.cfg = None

    def _one(self, turn: str) -> Completion:
        self.rendered.append(turn)
        return Completion(text=f"<think>The user wrote: {turn}</think>\n\\boxed{{safe}}", prompt=turn,
                          finish_reason="stop")

    def generate(self, turns, gen, adapters):
        return [self._one(t) for t in turns]

    async def agenerate(self, turns, gen, adapters):
        return [self._one(t) for t in turns]

    def close(self):
        pass


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def all_topics(bootstrap: str, prefix: str) -> list[str]:
    from kafka import KafkaConsumer

    c = KafkaConsumer(bootstrap_servers=[bootstrap])
    try:
        return sorted(t for t in c.topics() if t.startswith(prefix))
    finally:
        c.close()


def run_worker(bootstrap: str, prefix: str, content: str, reasoning: str) -> tuple[dict, Quoting, dict[str, list]]:
    from rsafe.stream.worker import GuardWorker

    topics = {"trusted_topic": f"{prefix}.feedback", "reports_topic": f"{prefix}.reports",
              "disagreements_topic": f"{prefix}.disagreements", "review_topic": f"{prefix}.review"}
    raw = worker_config(bootstrap, prefix, audit={"content": content, "reasoning": reasoning},
                        engine={"backend": "null", "model": "quoting", "limits": {"max_chars": 300}},
                        feedback={"enabled": True, "expiry_interval_s": 1.0, "hold_max_age_s": 2, **topics})
    cfg = load_config(data=raw, env={})
    backend = Quoting()
    messages = {f"{prefix}-ok": f"my secret is {SECRET}, keep it",
                f"{prefix}-big": f"{SECRET} " * 60,
                f"{prefix}-held": f"held {SECRET}"}
    ok, big, held = messages
    inp, fb = cfg.inputs[0].topic, cfg.feedback.trusted_topic

    def label(event_id: str, fid: str) -> Message:
        return Message(fb, event_id.encode(), json.dumps({"event_id": event_id, "feedback_id": fid, "label": "unsafe",
                                                          "source": "reviewer", "reviewer": "ann"}).encode())

    async def scenario() -> None:
        worker = GuardWorker(cfg, backend=backend)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 120)
        produce([bootstrap], [label(held, "early"), label(f"{prefix}-never", "orphan")])
        produce([bootstrap], [Message(inp, b"conv-1", json.dumps({"id": i, "prompt": p, "metadata": {"note": SECRET}}
                                                                 ).encode()) for i, p in messages.items()]
                + [Message(inp, b"conv-1", json.dumps({"id": f"{prefix}-bad", "prompt": SECRET, "response": 7}).encode())])
        for _ in range(600):
            if worker.telemetry.counts["verdicts"] >= 3:
                break
            await asyncio.sleep(0.1)
        produce([bootstrap], [label(ok, "late")])
        for _ in range(600):  # the disagreement of "late", the orphan dead-lettered
            done = read_all([bootstrap], [cfg.feedback.disagreements_topic, cfg.outputs.dlq_topic], idle_timeout_s=0.5)
            if sum(r.topic == cfg.feedback.disagreements_topic for r in done) >= 2 and \
                    any(b"unjoined_feedback" in (r.value or b"") for r in done):
                break
            await asyncio.sleep(0.2)
        worker.request_stop()
        assert await task == 0

    asyncio.run(scenario())
    written = [t for t in all_topics(bootstrap, prefix) if t not in (inp, fb)]  # what the worker writes
    records = {t: read_all([bootstrap], [t], idle_timeout_s=0.5) for t in written}
    return messages, backend, records


def leaks(records: dict[str, list], needles: dict[str, str]) -> list[str]:
    """Where any needle occurs in any record (key or value) of any topic."""
    found = []
    for topic, recs in records.items():
        for r in recs:
            blob = (r.key or b"").decode("utf-8", "replace") + " " + (r.value or b"").decode("utf-8", "replace")
            found += [f"{name} in {topic}" for name, needle in needles.items() if needle in blob]
    return found


@pytest.mark.parametrize("content", ["hash", "redacted"])
def test_no_content_and_no_unkeyed_digest_in_any_record(kafka, content, monkeypatch):
    monkeypatch.setenv("RSAFE_AUDIT_HASH_KEY", KEY)
    prefix = f"red{content[:3]}{uuid.uuid4().hex[:6]}"
    messages, backend, records = run_worker(kafka, prefix, content, reasoning="none")
    assert {f"{prefix}.in.verdicts", f"{prefix}.audit", f"{prefix}.dlq", f"{prefix}.review",
            f"{prefix}.disagreements", f"{prefix}-group-decisions-changelog",
            f"{prefix}-group-pending-changelog", f"{prefix}-group-labels-changelog"} <= set(records)
    needles = {"the secret": SECRET, **{f"sha256({i})": sha(m) for i, m in messages.items()},
               **{f"sha256(rendered {n})": sha(t) for n, t in enumerate(backend.rendered)}}
    assert backend.rendered and not leaks(records, needles)
    audits = {json.loads(r.value)["event_id"]: json.loads(r.value) for r in records[f"{prefix}.audit"]}
    ok = audits[f"{prefix}-ok"]
    assert ok["reasoning"] is None and ok["raw_output"] is None and ok["reasoning_kept"] == "none"
    if content == "hash":  # the keyed digest is there, under the key's id
        digest = hmac.new(KEY.encode(), messages[f"{prefix}-ok"].encode(), hashlib.sha256).hexdigest()
        assert ok["content"]["prompt_hmac"] == digest and ok["content"]["hash_key_id"]
    dlq = [json.loads(r.value) for r in records[f"{prefix}.dlq"]]
    assert {d["reason"] for d in dlq} == {"too_large", "schema", "unjoined_feedback"}
    assert all(d["original_b64"] is None and d["original_redacted"] and d["original_bytes"] > 0 for d in dlq)
    [dis] = [json.loads(r.value) for r in records[f"{prefix}.disagreements"] if r.value and b"/late" in r.key]
    assert dis["prompt"] is None and dis["content_missing"] and dis["model_reasoning"] is None
    review = {json.loads(r.value)["reason"] for r in records[f"{prefix}.review"] if r.value}
    assert "too_large" in review


def test_redacted_content_with_full_reasoning_still_carries_fragments(kafka, monkeypatch):
    """The documented limit: the reasoning quotes the message whatever ``audit.content`` says."""
    prefix = f"redfull{uuid.uuid4().hex[:6]}"
    messages, backend, records = run_worker(kafka, prefix, "redacted", reasoning="full")
    assert f"the secret in {prefix}.audit" in leaks(records, {"the secret": SECRET})
    audits = [json.loads(r.value) for r in records[f"{prefix}.audit"]]
    assert all(a["content"]["prompt"] is None and a["content"]["prompt_sha256"] is None for a in audits)


def test_hash_mode_refuses_to_start_without_a_key(kafka, monkeypatch, caplog):
    from rsafe.stream.exit_codes import EXIT_FAILED
    from rsafe.stream.worker import GuardWorker

    monkeypatch.delenv("RSAFE_AUDIT_HASH_KEY", raising=False)
    cfg = load_config(data=worker_config(kafka, f"nokey{uuid.uuid4().hex[:6]}", audit={"content": "hash"}), env={})
    with caplog.at_level("ERROR"):
        assert asyncio.run(GuardWorker(cfg).run()) == EXIT_FAILED
    assert "RSAFE_AUDIT_HASH_KEY is not set" in caplog.text and "openssl rand -hex 32" in caplog.text
