"""The feedback loop, stream side: human labels joined to the guard's decisions by event id.

One Faust agent (``stream/app.py``) reads, co-partitioned by event id: the audit topic (the
guard's decisions), the trusted feedback topic (reviewers, appeals), the reports topic (user
reports, other models) and a private tick topic (one tick per partition every
``feedback.expiry_interval_s``, so expiry runs inside the partition, where table writes belong).
State lives in Faust tables with changelog topics, so a restart loses nothing:

* ``decisions``  event id → compact summary of the decision (labels, P(unsafe), threshold,
  policy/model/adapter versions, window, pointer to the audit record); kept ``retention_days``.
* ``pending``    event id → feedback that arrived before its decision (bounded count and age).
* ``labels``     event id → feedback ids already handled, with their trusted labels (dedupe,
  contradiction detection, erasure).
* ``stats``      ``partition|policy@version|model@version|adapter@version`` → trusted feedback
  counts (agreements, disagreements); ``rsafe feedback stats`` sums them.
* ``expired``    event id → when an expired decision was made (``decision_expired``).

Out: ``DisagreementRecord`` (key ``event_id/feedback_id``) on the disagreements topic, ``ReviewItem``
(key event id) on the review topic, ``DLQRecord`` for malformed or unjoinable feedback. The content
of a disagreement is read back from the audit record (by the pointer) only when one is needed.

``FeedbackJoin`` holds the logic and takes the tables as plain mappings, so it is tested without
Kafka; the agent only feeds it records and publishes what it returns.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable, MutableMapping

from pydantic import ValidationError

from rsafe.schemas.feedback import (
    DisagreementRecord,
    FeedbackEvent,
    ModelRef,
    ReviewItem,
    ReviewReason,
)
from rsafe.stream.config import StreamConfig
from rsafe.schemas.common import utcnow
from rsafe.schemas.records import DLQReason, DLQRecord, SourceRef, b64, sha256_text
from rsafe.stream.records import dumps
from rsafe.stream.redaction import ContentHasher, content_hasher

log = logging.getLogger("rsafe.stream.feedback")

TABLES = ("decisions", "pending", "labels", "stats", "expired")
TICK_SUFFIX = "feedback-ticks"


def changelog_topic(cfg: StreamConfig, table: str) -> str:
    """Faust's changelog topic name for one of the feedback tables."""
    return f"{cfg.group_id}-{table}-changelog"


def tick_topic(cfg: StreamConfig) -> str:
    return f"{cfg.group_id}-{TICK_SUFFIX}"


def topic_specs(cfg: StreamConfig) -> list[tuple[str, int, dict[str, str]]]:
    """The feedback topics, the tick topic and the table changelogs, all co-partitioned with the
    audit topic (``outputs.partitions``); changelogs compacted."""
    if not cfg.feedback.enabled:
        return []
    n, fb = cfg.outputs.partitions, cfg.feedback
    # disagreements: retractions and erasures are tombstones, so compaction must apply there too
    specs = [(fb.trusted_topic, n, {}), (fb.reports_topic, n, {}),
             (fb.disagreements_topic, n, {"cleanup.policy": "compact,delete"}),
             (fb.review_topic, n, {}), (tick_topic(cfg), n, {"retention.ms": "3600000"})]
    specs += [(changelog_topic(cfg, t), n, {"cleanup.policy": "compact"}) for t in TABLES]
    return specs


@dataclass
class Out:
    """A record to publish (``value`` None: a tombstone)."""

    topic: str
    key: bytes | None
    value: bytes | None


AuditFetch = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]
"""Reads an audit record back by its pointer ``{"topic", "partition", "offset"}``."""


def partition_of(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` (murmur2), as for every keyed topic
    here: a table key is only ever written while a record of that partition is processed."""
    from kafka.partitioner.default import murmur2

    return (murmur2(key.encode("utf-8", "surrogatepass")) & 0x7FFFFFFF) % partitions


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat()


def _parse_time(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def summary(audit: dict[str, Any], source: SourceRef) -> dict[str, Any]:
    """The compact decision kept in the ``decisions`` table (no content, no reasoning)."""
    content = audit.get("content") or {}
    return {
        "label": audit.get("label"), "model_label": audit.get("model_label"),
        "p": audit.get("unsafe_probability"), "threshold": audit.get("unsafe_threshold"),
        "fallback": bool(audit.get("fallback")), "policy": audit.get("policy"),
        "policy_version": audit.get("policy_version"), "level": audit.get("level"),
        **{k: audit.get(k) for k in ModelRef.model_fields}, "decided_at": audit.get("decided_at"), "content_mode": content.get("mode"),
        "queued": audit.get("review_reason"),
        "audit": {"topic": source.topic, "partition": source.partition, "offset": source.offset},
    }


class FeedbackJoin:
    """Joins feedback to decisions; returns the records to publish. One instance per worker."""

    def __init__(self, cfg: StreamConfig, tables: dict[str, MutableMapping[str, Any]], fetch_audit: AuditFetch,
                 *, worker_id: str, now: Callable[[], datetime] = utcnow,
                 on_trusted: Callable[[bool, dict[str, Any]], None] | None = None,
                 hasher: ContentHasher | None = None):
        self.cfg = cfg
        self.hasher = hasher or content_hasher(cfg.audit.content)
        """Verifies reviewers' attached content against ``hash``-mode audit records."""
        self.keep_bytes = cfg.dlq_content == "full"
        """``dlq.content``: whether DLQ records (and feedback held for its decision) keep the original bytes."""
        self.on_trusted = on_trusted
        """Called with (agreement, decision summary) per trusted label joined (metrics)."""
        self.fb = cfg.feedback
        self.t = tables
        self.fetch_audit = fetch_audit
        self.worker_id = worker_id
        self.now = now

    # ------------------------------------------------------------------ helpers

    def _dlq(self, reason: DLQReason, detail: str, value: bytes | None, key: bytes | None, source: SourceRef,
             event_id: str | None, size: int | None = None) -> Out:
        """A DLQ record for feedback; ``size``: the original's length when its bytes were not kept."""
        size = len(value) if value is not None else size or 0
        redacted = not self.keep_bytes and size > 0
        rec = DLQRecord(reason=reason, detail=detail, event_id=event_id,
                        original_b64=None if redacted else b64(value), original_redacted=redacted,
                        original_bytes=size, key_b64=b64(key), source=source,
                        worker_id=self.worker_id, dead_lettered_at=self.now())
        log.info("feedback dead-lettered (%s): %s", reason.value, detail)
        return Out(self.cfg.outputs.dlq_topic, key, dumps(rec))

    def _review(self, event_id: str, reason: ReviewReason, detail: str, d: dict[str, Any] | None,
                feedback: list[FeedbackEvent] = ()) -> Out:
        d = d or {}
        item = ReviewItem(event_id=event_id, reason=reason, detail=detail, label=d.get("label"),
                          model_label=d.get("model_label"), unsafe_probability=d.get("p"), policy=d.get("policy"),
                          policy_version=d.get("policy_version"), judged_by=self._ref(d), feedback=list(feedback),
                          audit_ref=d.get("audit"), queued_at=self.now())
        return Out(self.fb.review_topic, event_id.encode("utf-8", "surrogatepass"), dumps(item))

    @staticmethod
    def _ref(d: dict[str, Any]) -> ModelRef:
        return ModelRef(**{k: d.get(k) for k in ModelRef.model_fields})

    def _count(self, d: dict[str, Any], partition: int, agree: bool) -> None:
        key = (f"{partition}|{d.get('policy')}@{d.get('policy_version')}|{d.get('model')}@{d.get('model_version')}"
               f"|{d.get('adapter')}@{d.get('adapter_version')}")
        row = dict(self.t["stats"].get(key) or {"trusted": 0, "agree": 0, "disagree": 0})
        row["trusted"] += 1
        row["agree" if agree else "disagree"] += 1
        self.t["stats"][key] = row
        if self.on_trusted is not None:
            self.on_trusted(agree, d)

    # ------------------------------------------------------------------ decisions

    async def on_decision(self, key: bytes | None, value: bytes | None, source: SourceRef) -> list[Out]:
        """An audit record (the guard's decision); a tombstone erases the event."""
        event_id = key.decode("utf-8", "surrogatepass") if key else None
        if value is None:
            return self.forget(event_id, source.partition) if event_id else []
        try:
            audit = json.loads(value)
            event_id = str(audit["event_id"])
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable audit record at %s[%d]@%d: skipped", source.topic, source.partition, source.offset)
            return []
        known = event_id in self.t["decisions"]
        d = summary(audit, source)
        self.t["decisions"][event_id] = d
        out: list[Out] = []
        if not known and self.fb.review_decisions:
            out += self._decision_review(event_id, d)
        held = self.t["pending"].get(event_id)
        if held:
            del self.t["pending"][event_id]
            for item in held:
                src = SourceRef(**item["source"])
                out += await self._apply(FeedbackEvent.model_validate(item["feedback"]), d, src)
        return out

    def _decision_review(self, event_id: str, d: dict[str, Any]) -> list[Out]:
        if d.get("queued"):  # the worker queued it itself (too_large, truncated)
            return []
        if d["fallback"]:
            return [self._review(event_id, ReviewReason.FALLBACK, "the label came from the topic's on_error", d)]
        if d["label"] in ("unknown", "error"):
            reason = ReviewReason.UNKNOWN if d["label"] == "unknown" else ReviewReason.ERROR
            return [self._review(event_id, reason, f"the guard's decision is {d['label']}", d)]
        p, threshold = d.get("p"), d.get("threshold")
        if p is not None and threshold is not None and abs(p - threshold) <= self.fb.review_margin:
            return [self._review(event_id, ReviewReason.NEAR_THRESHOLD,
                                 f"P(unsafe) {p:.3f} within {self.fb.review_margin:g} of the threshold {threshold:g}", d)]
        return []

    # ------------------------------------------------------------------ feedback

    async def on_feedback(self, key: bytes | None, value: bytes | None, source: SourceRef,
                          trusted_topic: bool) -> list[Out]:
        """A feedback event from the trusted (``trusted_topic``) or the reports topic."""
        raw_id = key.decode("utf-8", "replace") if key else None
        if not value or not value.strip():
            return [self._dlq(DLQReason.EMPTY, "empty feedback message", value, key, source, raw_id)]
        try:
            fb = FeedbackEvent.model_validate_json(value)
        except ValidationError as err:
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'feedback'}: {e['msg']}" for e in err.errors())
            reason = DLQReason.NOT_JSON if any(e["type"] == "json_invalid" for e in err.errors()) else DLQReason.SCHEMA
            return [self._dlq(reason, f"invalid feedback: {detail}", value, key, source, raw_id)]
        if fb.source.trusted != trusted_topic:
            where = "the trusted feedback topic" if trusted_topic else "the reports topic"
            return [self._dlq(DLQReason.UNTRUSTED_SOURCE, f"source {fb.source.value!r} does not belong on {where} "
                              f"({source.topic}); trust comes from the topic", value, key, source, fb.event_id)]
        d = self.t["decisions"].get(fb.event_id)
        if d is not None:
            return await self._apply(fb, d, source)
        if fb.event_id in self.t["expired"]:
            return [self._dlq(DLQReason.DECISION_EXPIRED, f"the decision on {fb.event_id!r} is older than the "
                              f"retention of {self.fb.retention_days:g} days", value, key, source, fb.event_id)]
        if len(self.t["pending"]) >= self.fb.hold_max_events:
            return [self._dlq(DLQReason.UNJOINED_FEEDBACK, f"no decision for {fb.event_id!r} yet and "
                              f"{self.fb.hold_max_events} feedback events are already waiting for theirs "
                              "(feedback.hold_max_events)", value, key, source, fb.event_id)]
        held = list(self.t["pending"].get(fb.event_id) or [])
        held.append({"feedback": fb.model_dump(mode="json"), "source": source.model_dump(),
                     "raw": b64(value) if self.keep_bytes else None, "bytes": len(value),
                     "key": b64(key), "held_at": _iso(self.now())})
        self.t["pending"][fb.event_id] = held
        return []

    async def _apply(self, fb: FeedbackEvent, d: dict[str, Any], source: SourceRef) -> list[Out]:
        """Feedback ``fb`` meets its decision ``d``."""
        labels = dict(self.t["labels"].get(fb.event_id) or {"seen": [], "trusted": {}})
        if fb.feedback_id in labels["seen"]:
            return []  # a replay: handled already
        labels["seen"] = [*labels["seen"], fb.feedback_id]
        model_label = d.get("model_label") if d.get("model_label") in ("safe", "unsafe") and not d["fallback"] else None
        out: list[Out] = []
        if not fb.source.trusted:
            self.t["labels"][fb.event_id] = labels
            if model_label != fb.label:
                out.append(self._review(fb.event_id, ReviewReason.UNTRUSTED_CONTRADICTS,
                                        f"{fb.source.value} says {fb.label}, the guard said {model_label or d['label']}",
                                        d, [fb]))
            return out
        others = {fid: lab for fid, lab in labels["trusted"].items() if lab != fb.label}
        labels["trusted"] = {**labels["trusted"], fb.feedback_id: fb.label}
        self.t["labels"][fb.event_id] = labels  # before publishing: a replay after a crash skips it
        if others:
            detail = f"trusted labels contradict each other: {fb.label} ({fb.feedback_id}) vs " + ", ".join(
                f"{lab} ({fid})" for fid, lab in others.items())
            out.append(self._review(fb.event_id, ReviewReason.TRUSTED_CONFLICT, detail, d, [fb]))
            # none of this event's labels may train a model now
            out += [Out(self.fb.disagreements_topic, f"{fb.event_id}/{fid}".encode("utf-8", "surrogatepass"), None)
                    for fid in labels["trusted"]]
            return out
        if model_label is None:
            out.append(self._review(fb.event_id, ReviewReason.TRUSTED_ON_FALLBACK,
                                    f"a trusted label ({fb.label}) for a decision the model did not make "
                                    f"({d['label']}{', fallback' if d['fallback'] else ''})", d, [fb]))
            return out
        self._count(d, source.partition, agree=model_label == fb.label)
        if model_label == fb.label:
            return out
        record = await self._disagreement(fb, d, model_label)
        out.append(Out(self.fb.disagreements_topic, record.key.encode("utf-8", "surrogatepass"), dumps(record)))
        return out

    async def _disagreement(self, fb: FeedbackEvent, d: dict[str, Any], model_label: str) -> DisagreementRecord:
        audit = await self.fetch_audit(d["audit"]) if d.get("audit") else None
        prompt, response, missing, reasoning = None, None, None, None
        window_field = window_span = None
        if audit is None:
            missing = "the audit record could not be read back (erased or compacted away)"
        else:
            reasoning = audit.get("reasoning")
            window_field, window_span = audit.get("window_field"), audit.get("window_span")
            c = audit.get("content") or {}
            if c.get("prompt") is not None:
                prompt, response = c.get("prompt"), c.get("response")
            elif fb.content is not None:
                missing = self._content_mismatch(fb, c)
                if missing is None:
                    prompt, response = fb.content.prompt, fb.content.response
            else:
                missing = (f"the audit kept only the content's {c.get('mode') or 'hash'} and the feedback "
                           "attached no content")
        if prompt is not None and window_field and window_span:
            start, end = window_span
            if window_field == "prompt":
                prompt = prompt[start:end]
            elif response is not None:
                response = response[start:end]
        return DisagreementRecord(
            event_id=fb.event_id, feedback_id=fb.feedback_id, prompt=prompt, response=response,
            content_missing=missing, window_field=window_field, window_span=window_span,
            policy=d.get("policy") or "", policy_version=d.get("policy_version") or "", level=d.get("level") or "prompt",
            judged_by=self._ref(d), model_reasoning=reasoning, model_label=model_label, unsafe_probability=d.get("p"),
            human_label=fb.label, source=fb.source, reviewer=fb.reviewer, note=fb.note,
            decided_at=_parse_time(d.get("decided_at")), feedback_at=fb.created_at, recorded_at=self.now())

    def _content_mismatch(self, fb: FeedbackEvent, c: dict[str, Any]) -> str | None:
        """Why the reviewer's attached content cannot be used (it does not match what was judged),
        or None. ``hash`` mode: the keyed digest; ``redacted``: nothing to check against (the
        reviewer's choice); records written before keyed digests: their plain sha256."""
        assert fb.content is not None
        digest = c.get("prompt_hmac")
        if digest:
            if self.hasher is None:
                return "the audit kept a keyed hash but this worker has no key to check the attached content"
            ok = self.hasher.verify(fb.content.prompt, digest, c.get("hash_key_id"))
            if ok is None:
                return (f"the audit's content hash was made with key {c.get('hash_key_id')!r}, which this "
                        f"worker does not hold (RSAFE_AUDIT_HASH_PREVIOUS_KEYS)")
            return None if ok else "the content attached to the feedback does not match the judged content's hash"
        if c.get("prompt_sha256") and sha256_text(fb.content.prompt) != c["prompt_sha256"]:
            return "the content attached to the feedback does not match the judged content's hash"
        return None

    # ------------------------------------------------------------------ erasure and expiry

    def forget(self, event_id: str, partition: int) -> list[Out]:
        """Erase what the tables hold of an event and tombstone its feedback outputs."""
        labels = self.t["labels"].get(event_id) or {}
        for table in ("decisions", "pending", "labels", "expired"):
            if event_id in self.t[table]:
                del self.t[table][event_id]
        key = event_id.encode("utf-8", "surrogatepass")
        out = [Out(self.fb.disagreements_topic, f"{event_id}/{fid}".encode("utf-8", "surrogatepass"), None)
               for fid in labels.get("trusted", {})]
        out.append(Out(self.fb.review_topic, key, None))
        log.info("erased event %s from the feedback tables (%d outputs tombstoned)", event_id, len(out))
        return out

    def on_tick(self, partition: int) -> list[Out]:
        """The periodic sweep of one partition (a tick record on it): expiry and the hold limit."""
        n = self.cfg.outputs.partitions
        keys = {k for table in ("decisions", "pending", "expired") for k in list(self.t[table].keys())
                if partition_of(k, n) == partition}
        out = self.sweep(sorted(keys))
        held = [(k, v) for k in keys if (v := self.t["pending"].get(k))]
        count = sum(len(v) for _, v in held)
        if count > self.fb.hold_max_events:
            oldest = [k for k, v in sorted(held, key=lambda kv: kv[1][0]["held_at"])]
            out += self.over_hold_limit(count, oldest)
        return out

    def sweep(self, partition_keys: list[str]) -> list[Out]:
        """Expire old decisions and held feedback among ``partition_keys`` (the keys of the
        tables in the ticked partition)."""
        now = self.now()
        keep = timedelta(days=self.fb.retention_days)
        out: list[Out] = []
        for event_id in partition_keys:
            d = self.t["decisions"].get(event_id)
            decided = _parse_time(d.get("decided_at")) if d else None
            if decided is not None and now - decided > keep:
                del self.t["decisions"][event_id]
                self.t["expired"][event_id] = d["decided_at"]
            gone = self.t["expired"].get(event_id)
            if gone is not None and (_parse_time(gone) or now) < now - 2 * keep:
                del self.t["expired"][event_id]
            held = self.t["pending"].get(event_id)
            if held:
                fresh = []
                for item in held:
                    age = (now - (_parse_time(item["held_at"]) or now)).total_seconds()
                    if age > self.fb.hold_max_age_s:
                        out.append(self._unjoined(item, f"no decision for {event_id!r} arrived within "
                                                        f"{self.fb.hold_max_age_s:g} s"))
                    else:
                        fresh.append(item)
                if len(fresh) != len(held):
                    if fresh:
                        self.t["pending"][event_id] = fresh
                    else:
                        del self.t["pending"][event_id]
        return out

    def over_hold_limit(self, held_count: int, oldest: list[str]) -> list[Out]:
        """Dead-letter the oldest held feedback beyond ``hold_max_events``."""
        out: list[Out] = []
        excess = held_count - self.fb.hold_max_events
        for event_id in oldest:
            if excess <= 0:
                break
            held = list(self.t["pending"].get(event_id) or [])
            while held and excess > 0:
                out.append(self._unjoined(held.pop(0), f"more than {self.fb.hold_max_events} feedback events "
                                                       "were waiting for their decisions"))
                excess -= 1
            if held:
                self.t["pending"][event_id] = held
            elif event_id in self.t["pending"]:
                del self.t["pending"][event_id]
        return out

    def _unjoined(self, item: dict[str, Any], detail: str) -> Out:
        import base64

        raw = base64.b64decode(item["raw"]) if item.get("raw") else None
        key = base64.b64decode(item["key"]) if item.get("key") else None
        return self._dlq(DLQReason.UNJOINED_FEEDBACK, detail, raw, key, SourceRef(**item["source"]),
                         item["feedback"].get("event_id"), size=item.get("bytes"))
