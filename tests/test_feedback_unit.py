"""The feedback join's logic with plain dict tables (no Kafka): ``rsafe.stream.feedback.FeedbackJoin``."""

from __future__ import annotations

import asyncio
import hmac
import json
from datetime import datetime, timedelta, timezone

import pytest

from rsafe.schemas.feedback import DisagreementRecord, FeedbackEvent, ReviewItem
from rsafe.stream.config import load_config
from rsafe.stream.feedback import TABLES, FeedbackJoin, partition_of, topic_specs
from rsafe.schemas.records import DLQRecord, SourceRef, sha256_text
from rsafe.stream.redaction import ContentHasher

CFG = load_config(data={"inputs": [{"topic": "chat", "policy": "rsafe-default"}], "group_id": "g",
                        "feedback": {"enabled": True, "hold_max_events": 3, "hold_max_age_s": 60}}, env={})
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self):
        self.t = T0

    def __call__(self):
        return self.t


HASHER = ContentHasher.from_env({"RSAFE_AUDIT_HASH_KEY": "current-key-" + "x" * 32, "RSAFE_AUDIT_HASH_KEY_ID": "k2",
                                  "RSAFE_AUDIT_HASH_PREVIOUS_KEYS": "k1=previous-key-" + "y" * 32})
"""The join's key for ``audit.content: hash`` (current k2, previous k1)."""


def audit(event_id: str, label="unsafe", model_label="unsafe", p=0.95, mode="full", prompt="how to build a bomb",
          fallback=False, key_id="k2", **extra) -> dict:
    keys = {"k2": HASHER.key, **HASHER.previous, "k0": b"a key the join never held"}
    content = {"mode": mode, "prompt": prompt if mode == "full" else None, "response": None,
               "prompt_sha256": sha256_text(prompt) if mode == "full" else None, "prompt_chars": len(prompt)}
    if mode == "hash":
        content |= {"prompt_hmac": hmac.new(keys[key_id], prompt.encode(), "sha256").hexdigest(), "hash_key_id": key_id}
    if mode == "legacy-hash":  # written before keyed digests: a plain sha256
        content |= {"mode": "hash", "prompt_sha256": sha256_text(prompt)}
    return {"event_id": event_id, "label": label, "model_label": model_label, "unsafe_probability": p,
            "unsafe_threshold": 0.5, "fallback": fallback, "policy": "rsafe-default", "policy_version": "v1",
            "level": "prompt", "model": "m", "model_version": "mv", "adapter": None, "adapter_version": None,
            "reasoning": "It asks for a weapon. U2.", "decided_at": T0.isoformat(), "content": content, **extra}


class Harness:
    def __init__(self, cfg=CFG):
        self.tables = {name: {} for name in TABLES}
        self.audits: dict[int, dict] = {}
        self.clock = Clock()
        self.join = FeedbackJoin(cfg, self.tables, self.fetch, worker_id="w", now=self.clock, hasher=HASHER)
        self.offset = 0

    async def fetch(self, ptr):
        return self.audits.get(ptr["offset"])

    def src(self, topic: str) -> SourceRef:
        self.offset += 1
        return SourceRef(topic=topic, partition=0, offset=self.offset)

    def decide(self, rec: dict) -> list:
        src = self.src("rsafe.audit")
        self.audits[src.offset] = rec
        return asyncio.run(self.join.on_decision(rec["event_id"].encode(), json.dumps(rec).encode(), src))

    def feedback(self, trusted=True, raw: bytes | None = None, **fields) -> list:
        body = {"feedback_id": f"f{self.offset}", "source": "reviewer" if trusted else "user_report", **fields}
        value = raw if raw is not None else json.dumps(body).encode()
        topic = "rsafe.feedback" if trusted else "rsafe.reports"
        return asyncio.run(self.join.on_feedback(str(fields.get("event_id", "")).encode(), value, self.src(topic),
                                                 trusted_topic=trusted))


def kinds(outs) -> list[tuple[str, str]]:
    out = []
    for o in outs:
        if o.value is None:
            out.append((o.topic, "tombstone"))
            continue
        rec = json.loads(o.value)
        out.append((o.topic, rec.get("reason") or ("disagreement" if "human_label" in rec else "?")))
    return out


def test_disagreement_after_the_decision_carries_content_versions_and_reasoning():
    h = Harness()
    assert h.decide(audit("e1")) == []
    outs = h.feedback(event_id="e1", label="safe", reviewer="ann", note="educational", feedback_id="fb1")
    assert kinds(outs) == [("rsafe.disagreements", "disagreement")]
    rec = DisagreementRecord.model_validate_json(outs[0].value)
    assert outs[0].key == b"e1/fb1" and rec.prompt == "how to build a bomb" and rec.content_missing is None
    assert (rec.model_label, rec.human_label, rec.policy_version, rec.reviewer) == ("unsafe", "safe", "v1", "ann")
    assert rec.judged_by.model_version == "mv" and rec.model_reasoning.startswith("It asks")
    # a replay of the same feedback is handled once
    assert h.feedback(event_id="e1", label="safe", feedback_id="fb1") == []
    assert h.tables["stats"]["0|rsafe-default@v1|m@mv|None@None"] == {"trusted": 1, "agree": 0, "disagree": 1}


def test_feedback_before_its_decision_is_held_then_joined():
    h = Harness()
    assert h.feedback(event_id="e2", label="safe", feedback_id="early") == []
    assert "e2" in h.tables["pending"]
    outs = h.decide(audit("e2"))
    assert kinds(outs) == [("rsafe.disagreements", "disagreement")] and "e2" not in h.tables["pending"]


def test_agreement_counts_and_emits_nothing():
    h = Harness()
    h.decide(audit("e3", label="safe", model_label="safe", p=0.05))
    assert h.feedback(event_id="e3", label="safe") == []
    assert h.tables["stats"]["0|rsafe-default@v1|m@mv|None@None"]["agree"] == 1


def test_untrusted_feedback_goes_to_review_never_to_disagreements():
    h = Harness()
    h.decide(audit("e4", label="safe", model_label="safe", p=0.05))
    outs = h.feedback(trusted=False, event_id="e4", label="unsafe")
    assert kinds(outs) == [("rsafe.review", "untrusted_contradicts")]
    item = ReviewItem.model_validate_json(outs[0].value)
    assert item.feedback[0].source.value == "user_report"
    assert h.feedback(trusted=False, event_id="e4", label="safe") == []  # agrees: nothing to review


def test_trust_comes_from_the_topic():
    h = Harness()
    h.decide(audit("e5"))
    outs = h.feedback(trusted=False, event_id="e5", label="safe", source="reviewer")
    assert kinds(outs) == [("rsafe.dlq", "untrusted_source")]
    outs = h.feedback(trusted=True, event_id="e5", label="safe", source="user_report")
    assert kinds(outs) == [("rsafe.dlq", "untrusted_source")]


def test_hash_mode_with_and_without_attached_content():
    h = Harness()
    h.decide(audit("e6", mode="hash"))
    rec = DisagreementRecord.model_validate_json(h.feedback(event_id="e6", label="safe")[0].value)
    assert rec.prompt is None and "only the content's hash" in rec.content_missing
    h.decide(audit("e7", mode="hash"))
    rec = DisagreementRecord.model_validate_json(
        h.feedback(event_id="e7", label="safe", content={"prompt": "how to build a bomb"})[0].value)
    assert rec.prompt == "how to build a bomb" and rec.content_missing is None
    h.decide(audit("e8", mode="hash"))
    rec = DisagreementRecord.model_validate_json(
        h.feedback(event_id="e8", label="safe", content={"prompt": "something else"})[0].value)
    assert rec.prompt is None and "does not match" in rec.content_missing


def test_attached_content_is_checked_with_the_key_that_made_the_digest():
    h = Harness()
    for event_id, kind, key_id in (("r1", "hash", "k1"), ("r2", "hash", "k0"), ("r3", "legacy-hash", None),
                                   ("r4", "redacted", None)):
        h.decide(audit(event_id, mode=kind, key_id=key_id or "k2"))

    def attach(event_id: str, prompt: str = "how to build a bomb") -> DisagreementRecord:
        return DisagreementRecord.model_validate_json(
            h.feedback(event_id=event_id, label="safe", content={"prompt": prompt})[0].value)

    assert attach("r1").prompt == "how to build a bomb"  # a rotated-out key still verifies
    rec = attach("r2")  # a key this worker never held: not verifiable, not used
    assert rec.prompt is None and "'k0'" in rec.content_missing and "PREVIOUS_KEYS" in rec.content_missing
    assert attach("r3").prompt == "how to build a bomb"  # a record from before keyed digests
    # redacted: nothing to check against; the reviewer's choice (documented)
    assert attach("r4", "whatever the reviewer sent").prompt == "whatever the reviewer sent"


def test_contradicting_trusted_labels_go_to_review_and_retract_the_disagreement():
    h = Harness()
    h.decide(audit("e9"))
    first = h.feedback(event_id="e9", label="safe", feedback_id="a")
    assert kinds(first) == [("rsafe.disagreements", "disagreement")]
    outs = h.feedback(event_id="e9", label="unsafe", feedback_id="b")
    assert kinds(outs) == [("rsafe.review", "trusted_conflict"), ("rsafe.disagreements", "tombstone"),
                           ("rsafe.disagreements", "tombstone")]
    assert {o.key for o in outs[1:]} == {b"e9/a", b"e9/b"}


def test_fallback_and_near_threshold_decisions_go_to_review():
    h = Harness()
    assert kinds(h.decide(audit("f1", label="safe", model_label=None, fallback=True))) == [("rsafe.review", "fallback")]
    assert kinds(h.decide(audit("f2", label="unknown", model_label="unknown", p=None))) == [("rsafe.review", "unknown")]
    assert kinds(h.decide(audit("f3", p=0.55))) == [("rsafe.review", "near_threshold")]
    assert h.decide(audit("f4", p=0.95)) == []
    assert h.decide(audit("f3", p=0.55)) == []  # a replayed decision is not queued twice
    # a trusted label for a decision the model did not make → review, not training
    assert kinds(h.feedback(event_id="f1", label="unsafe")) == [("rsafe.review", "trusted_on_fallback")]


def test_malformed_feedback_goes_to_the_dlq_with_a_reason():
    h = Harness()
    for raw, reason in ((b"{nope", "not_json"), (b"", "empty"),
                        (json.dumps({"event_id": "x", "label": "maybe", "feedback_id": "1", "source": "reviewer"}).encode(),
                         "schema")):
        outs = h.feedback(raw=raw, event_id="x")
        assert kinds(outs) == [("rsafe.dlq", reason)]
        assert DLQRecord.model_validate_json(outs[0].value).detail


def test_expiry_hold_limit_and_decision_expired():
    h = Harness()
    n = CFG.outputs.partitions
    h.feedback(event_id="late", label="safe")
    h.clock.t = T0 + timedelta(seconds=61)
    outs = h.join.on_tick(partition_of("late", n))
    assert kinds(outs) == [("rsafe.dlq", "unjoined_feedback")] and "late" not in h.tables["pending"]
    h.decide(audit("old"))
    h.clock.t = T0 + timedelta(days=8)
    h.join.on_tick(partition_of("old", n))
    assert "old" not in h.tables["decisions"] and "old" in h.tables["expired"]
    assert kinds(h.feedback(event_id="old", label="safe")) == [("rsafe.dlq", "decision_expired")]
    # the hold limit: feedback beyond hold_max_events waits no more
    for i in range(3):
        assert h.feedback(event_id=f"w{i}", label="safe") == []
    assert kinds(h.feedback(event_id="w3", label="safe")) == [("rsafe.dlq", "unjoined_feedback")]


def test_forget_erases_tables_and_tombstones_outputs():
    h = Harness()
    h.decide(audit("gone"))
    h.feedback(event_id="gone", label="safe", feedback_id="z")
    src = h.src("rsafe.audit")
    outs = asyncio.run(h.join.on_decision(b"gone", None, src))
    assert kinds(outs) == [("rsafe.disagreements", "tombstone"), ("rsafe.review", "tombstone")]
    assert all("gone" not in h.tables[t] for t in ("decisions", "labels", "pending"))


def test_windowed_decision_trains_on_the_deciding_window():
    h = Harness()
    text = "filler " * 100 + "how to build a bomb" + " filler" * 100
    start = text.index("how")
    h.decide(audit("w", prompt=text, window_field="prompt", window_span=[start - 7, start + 19]))
    rec = DisagreementRecord.model_validate_json(h.feedback(event_id="w", label="safe")[0].value)
    assert rec.prompt == text[start - 7: start + 19] and rec.window_span == [start - 7, start + 19]


def test_topics_and_changelogs_are_co_partitioned():
    specs = {name: (parts, conf) for name, parts, conf in topic_specs(CFG)}
    assert {parts for parts, _ in specs.values()} == {CFG.outputs.partitions}
    assert specs["g-decisions-changelog"][1] == {"cleanup.policy": "compact"}
    assert "rsafe.feedback" in specs and "rsafe.reports" in specs and "rsafe.review" in specs


def test_feedback_event_schema():
    fb = FeedbackEvent.model_validate({"event_id": 12, "feedback_id": 3, "label": "unsafe", "source": "appeal"})
    assert fb.event_id == "12" and fb.source.trusted
    with pytest.raises(ValueError):
        FeedbackEvent.model_validate({"event_id": "x", "feedback_id": "1", "label": "unsafe", "source": "admin"})
