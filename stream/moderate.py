"""One micro-batch of consumed messages → the records to publish. No Kafka in here.

The steps read as a chain: ``decode`` (bytes → ``ChatEvent`` or DLQ) → ``route`` (topic → policy,
level, adapter; checks the guard would refuse) → ``judge`` (one engine call for the batch, bounded
retries with backoff, then the topic's ``on_error``) → ``records`` (verdict + audit, or DLQ).
Every message gets exactly one outcome; nothing here raises except cancellation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Sequence

from rsafe.models.engines import EngineError
from rsafe.models.guard import Guard, GuardRequest, Prepared
from rsafe.models.prompt import resolve_level
from rsafe.models.verdict import TOO_LARGE, Label, Verdict
from rsafe.policies import Level
from rsafe.schemas.feedback import ModelRef, ReviewItem, ReviewReason
from rsafe.stream.config import InputTopic, OnError, StreamConfig
from rsafe.stream.context import CONTROL_HEADER, FORGET, ContextError, ContextUse, ConversationContext
from rsafe.schemas.common import SCHEMA_VERSION, utcnow
from rsafe.schemas.records import (
    AuditRecord,
    ChatEvent,
    ContentMode,
    DLQReason,
    DLQRecord,
    SourceRef,
    VerdictRecord,
    b64,
    sha256_text,
)
from rsafe.stream.records import Rejected, decode_event, dumps, encode
from rsafe.stream.redaction import ContentHasher, content_hasher
from rsafe.stream.telemetry import Telemetry

log = logging.getLogger("rsafe.stream.moderate")

VerdictFields = dict[str, Any]
"""A verdict as the dict of its ``Verdict`` fields (``Guard.aclassify_prepared(as_dicts=True)``)."""


@dataclass
class Incoming:
    """A consumed message and where it came from."""

    value: bytes | None
    key: bytes | None
    source: SourceRef
    arrived: float = field(default_factory=time.perf_counter)
    """``time.perf_counter()`` when consumed."""
    consumed_at: datetime = field(default_factory=utcnow)
    handle: Any = None
    """The Faust event (acked once the outcome is published)."""
    headers: Any = None
    """The record's Kafka headers (W3C trace context is read from them)."""


@dataclass
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    """None: a tombstone (a context changelog erasure)."""
    headers: list[tuple[str, bytes]] | None = None
    """Kafka headers (the event span's trace context)."""
    partition: int | None = None
    """Set for table changelog records (the input partition); else the producer's partitioner picks."""


@dataclass
class Outcome:
    incoming: Incoming
    kind: Literal["verdict", "dlq", "control"]
    records: list[OutRecord]
    verdict_fields: dict[str, Any] | None = None
    """The verdict record as written (the wire dict of ``VerdictRecord``)."""
    audit_fields: dict[str, Any] | None = None
    """The audit record as written (the wire dict of ``AuditRecord``)."""
    dlq: DLQRecord | None = None

    @property
    def verdict(self) -> VerdictRecord | None:
        """The verdict record as a validated model (built on first use; not on the hot path)."""
        return self._validated("_verdict", self.verdict_fields, VerdictRecord)

    @property
    def audit(self) -> AuditRecord | None:
        """The audit record as a validated model (built on first use)."""
        return self._validated("_audit", self.audit_fields, AuditRecord)

    def _validated(self, slot: str, fields: dict[str, Any] | None, model: Any) -> Any:
        if fields is None:
            return None
        if slot not in self.__dict__:
            self.__dict__[slot] = model.model_validate(fields)
        return self.__dict__[slot]


@dataclass
class _Routed:
    incoming: Incoming
    event: ChatEvent
    topic: InputTopic
    prepared: Prepared
    """Validated once; its windows go to the engine as they are (none when ``too_large``)."""
    too_large: str | None = None
    """Set, to the detail, when the event is over a size limit: no part of it is judged."""
    context: ContextUse = field(default_factory=ContextUse)
    """The conversation context shown (and the changelog records of the table update)."""

    @property
    def request(self) -> GuardRequest:
        return self.prepared.request


def summarize(reasoning: str | None, limit: int) -> str | None:
    """The first ``limit`` characters of the reasoning, whitespace collapsed, cut at a word."""
    if not reasoning or limit <= 0:
        return None
    text = " ".join(reasoning.split())  # whitespace runs collapsed (str.split splits on what \s matches)
    if len(text) <= limit:
        return text or None
    cut = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return cut.rstrip(" ,;:") + "…"


class Moderator:
    """Turns batches of ``Incoming`` into ``Outcome``s with one engine call per batch."""

    def __init__(self, cfg: StreamConfig, guard: Guard, *, worker_id: str, telemetry: Telemetry,
                 model_version: str | None = None, adapter_versions: dict[str, str | None] | None = None,
                 hasher: ContentHasher | None = None, context: ConversationContext | None = None):
        self.cfg = cfg
        self.context = context or ConversationContext(cfg, {})
        """The conversation tables (none: context is off on every topic, or a unit test)."""
        self.hasher = hasher or content_hasher(cfg.audit.content)
        """Keyed digests for ``audit.content: hash`` (``HashKeyError`` without a key)."""
        self.guard = guard
        self.worker_id = worker_id
        self.telemetry = telemetry
        self.model_version = model_version
        self.adapter_versions = adapter_versions or {}
        self.sampling = dataclasses.asdict(guard.generation)
        self._content_mode = ContentMode(cfg.audit.content)
        self.consecutive_failures = 0

    # ------------------------------------------------------------------ decode + route

    def route(self, inc: Incoming) -> _Routed | Outcome:
        """Decode and route one message, or raise ``Rejected`` (→ DLQ). A message over a size limit
        comes back with ``too_large`` set: it gets the topic's ``on_error`` verdict, not the DLQ alone.
        A control record (``rsafe-control`` header) is applied here and comes back as its outcome."""
        if inc.headers and (control := _header(inc.headers, CONTROL_HEADER)) is not None:
            return self._control(inc, control)
        too_large: str | None = None
        try:
            event = decode_event(inc.value, max_bytes=self.cfg.max_event_bytes)
        except Rejected as rej:
            if rej.reason != DLQReason.TOO_LARGE or inc.value is None:
                raise
            try:  # an event all the same: it gets its verdict (on_error), not the DLQ alone
                event = decode_event(inc.value, max_bytes=len(inc.value))
            except Rejected:
                raise rej from None
            too_large = f"{rej.detail} (max_event_bytes); nothing of the message was judged"
        try:
            topic = self.cfg.input(inc.source.topic)
        except KeyError:
            raise Rejected(DLQReason.INTERNAL, f"no input configured for topic {inc.source.topic!r}",
                           event.id) from None
        policy = topic.policy
        if event.policy is not None and event.policy != topic.policy:
            if not topic.allow_policy_override:
                raise Rejected(DLQReason.POLICY_OVERRIDE_DISABLED,
                               f"event asks for policy {event.policy!r} but topic {topic.topic!r} "
                               f"judges with {topic.policy!r} and does not allow overrides", event.id)
            policy = event.policy
        if policy not in self.guard.policies:
            raise Rejected(DLQReason.UNKNOWN_POLICY, f"unknown policy {policy!r}; known: "
                           f"{', '.join(self.guard.policies.names())}", event.id)
        level: Level | None = None
        if topic.level == Level.PROMPT:
            level = Level.PROMPT
        elif topic.level == Level.RESPONSE:
            if event.response is None:
                raise Rejected(DLQReason.SCHEMA, f"topic {topic.topic!r} judges responses but the event "
                               "has no response", event.id)
            level = Level.RESPONSE
        request = GuardRequest(prompt=event.prompt,
                               response=event.response if level != Level.PROMPT else None,
                               id=event.id, policy=policy, level=level, adapter=topic.adapter)
        if too_large is not None:
            return self._refused(inc, event, topic, request, too_large)
        context = self._context(inc, event, topic)
        if context.turns:
            request = request.model_copy(update={"context": context.turns, "judge": topic.context.judge,
                                                 "max_context_tokens": topic.context.max_context_tokens})
        prepared = self.guard.prepare(request, arrived=inc.arrived)
        if isinstance(prepared, Verdict):
            if context.undo is not None:  # a message that is not judged does not join its conversation
                context.undo()
            if prepared.error_reason == TOO_LARGE:
                return self._refused(inc, event, topic, request, prepared.error_detail or TOO_LARGE)
            raise Rejected(DLQReason.INVALID_CONTENT, prepared.error_reason or "rejected by the guard", event.id)
        return _Routed(inc, event, topic, prepared, context=context)

    def _context(self, inc: Incoming, event: ChatEvent, topic: InputTopic) -> ContextUse:
        """The event's own history (``messages``), else its conversation's turns from the table
        (which the event joins); plus the partition's expiry sweep, due at most once a minute."""
        conv = event.conversation()
        if conv is not None:
            return ContextUse(list(conv.context), source="event", skipped="messages")
        src = inc.source
        use = self.context.use(topic, inc.key, src.partition, event.id, event.conversation_id,
                               event.prompt, event.response)
        use.changelog += self.context.sweep(topic, src.partition)
        return use

    def _control(self, inc: Incoming, control: bytes) -> Outcome:
        """A control record on an input topic: ``context-forget`` (``rsafe.stream.context``)."""
        src = inc.source
        if control != FORGET:
            raise Rejected(DLQReason.SCHEMA, f"unknown control record {CONTROL_HEADER}: {control!r}")
        try:
            topic = self.cfg.input(src.topic)
            records = self.context.forget(topic, inc.key, src.partition, inc.value)
        except KeyError:
            raise Rejected(DLQReason.INTERNAL, f"no input configured for topic {src.topic!r}") from None
        except ContextError as err:
            raise Rejected(DLQReason.SCHEMA, f"context-forget: {err}") from None
        if not records:
            log.warning("context-forget on %s ignored: context is off on that topic", src.topic)
        else:
            log.info("context-forget applied on %s[%d] (%d changelog records)", src.topic, src.partition, len(records))
        return Outcome(inc, "control", [OutRecord(t, k, v, partition=p) for t, p, k, v in records])

    def _refused(self, inc: Incoming, event: ChatEvent, topic: InputTopic, request: GuardRequest,
                 detail: str) -> _Routed:
        """A routed event that is not judged (over a size limit): no windows, ``too_large`` set."""
        policy = self.guard.policies.get(request.policy or self.guard.default_policy)
        try:
            level = resolve_level(policy, request.response, request.level)
        except ValueError:
            level = Level.PROMPT
        prepared = Prepared(request, policy, level, [], False, inc.arrived)
        return _Routed(inc, event, topic, prepared, too_large=detail)

    # ------------------------------------------------------------------ judge

    async def _call(self, routed: Sequence[_Routed]) -> list[VerdictFields]:
        """One engine call for ``routed``, bounded by ``health.batch_timeout_s``: each message's
        verdict as the dict of its ``Verdict`` fields (``Guard.aclassify_prepared(as_dicts=True)``)."""
        prepared = [r.prepared for r in routed]
        try:
            return await asyncio.wait_for(
                self.guard.aclassify_prepared(prepared, max_sequences=self.cfg.batch.size, raise_engine_errors=True,
                                              as_dicts=True),
                timeout=self.cfg.health.batch_timeout_s)
        except asyncio.TimeoutError:
            raise EngineError(f"the engine did not answer within {self.cfg.health.batch_timeout_s:g} s "
                              "(health.batch_timeout_s)") from None

    async def judge(self, routed: Sequence[_Routed], attempts: int | None = None,
                    ) -> tuple[list[VerdictFields] | None, int, str | None]:
        """The engine call for the batch, retried with backoff. (verdicts or None, attempts, error)."""
        if not routed:
            return [], 0, None
        retry = self.cfg.retry
        attempts = retry.attempts if attempts is None else attempts
        error: str | None = None
        for attempt in range(1, attempts + 1):
            try:
                return await self._call(routed), attempt, None
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - EngineError or anything the engine raised
                error = f"{type(err).__name__}: {err}"
                self.telemetry.engine_failure()
                if attempt < attempts:
                    delay = min(retry.backoff_ms * 2 ** (attempt - 1), retry.max_backoff_ms) / 1e3
                    log.warning("engine call for %d events failed (attempt %d/%d): %s; retrying in %.2f s",
                                len(routed), attempt, attempts, error, delay)
                    await asyncio.sleep(delay)
        return None, attempts, error

    async def probe(self) -> str | None:
        """Send the engine one known-good request; None when it answers, else why not."""
        request = GuardRequest(prompt="Hello, how are you today?", id="rsafe-health-probe",
                               policy=self.guard.default_policy)
        try:
            [v] = await asyncio.wait_for(self.guard.aclassify([request], raise_engine_errors=True),
                                         timeout=self.cfg.health.probe_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001
            return f"{type(err).__name__}: {err}"
        return v.error_reason if v.label == Label.ERROR else None

    async def _isolate(self, routed: list[_Routed], poison: list[tuple[_Routed, str]]
                       ) -> list[tuple[_Routed, VerdictFields]]:
        """Split a batch that crashes the engine until the events that do it are alone: those go to
        ``poison``; the others are judged. Raises ``EngineDead`` past ``health.max_poison_events``."""
        verdicts, _, error = await self.judge(routed, attempts=1)
        if verdicts is not None:
            return list(zip(routed, verdicts))
        if len(routed) == 1:
            poison.append((routed[0], error or "engine failure"))
            if len(poison) > self.cfg.health.max_poison_events:
                raise EngineDead(f"{len(poison)} events of one batch crash the engine one by one: the engine "
                                 f"is broken, not the events (last: {error})")
            return []
        mid = len(routed) // 2
        return await self._isolate(routed[:mid], poison) + await self._isolate(routed[mid:], poison)

    # ------------------------------------------------------------------ records

    def _content(self, event: ChatEvent, omitted: str | None = None) -> dict[str, Any]:
        """``AuditContent`` as a wire dict: what the privacy setting (``audit.content``) allows.
        ``omitted``: why the text is left out even in ``full`` mode (an event over ``max_event_bytes``)."""
        mode = self._content_mode
        full = mode == ContentMode.FULL and omitted is None
        keyed = self.hasher if mode == ContentMode.HASH else None
        return {"mode": mode.value, "prompt": event.prompt if full else None,
                "response": event.response if full else None,
                "prompt_sha256": sha256_text(event.prompt) if full else None,
                "response_sha256": sha256_text(event.response) if full else None,
                "prompt_hmac": keyed.digest(event.prompt) if keyed else None,
                "response_hmac": keyed.digest(event.response) if keyed else None,
                "hash_key_id": keyed.key_id if keyed else None,
                "prompt_chars": len(event.prompt),
                "response_chars": None if event.response is None else len(event.response),
                "metadata": event.metadata if full else None,
                "omitted": omitted if mode == ContentMode.FULL else None}

    def verdict_outcome(self, r: _Routed, v: VerdictFields | None, *, attempts: int, batch_size: int,
                        engine_error: str | None, started: float, engine_ms: float) -> Outcome:
        """The verdict and audit records of one judged message, as wire dicts encoded once (and,
        for a message judged in part or not at all, its review item).

        This is the hot path of the worker (one call per event): the guard's verdict comes as the
        dict of its ``Verdict`` fields, and the records are plain dicts in the shapes of
        ``VerdictRecord`` and ``AuditRecord`` (every field, in declaration order), encoded with
        msgspec. Building the pydantic models and dumping them cost ~110 µs per event, most of the
        worker's own CPU (bench/cpu_stages.py); ``tests/test_stream_unit.py`` validates the bytes
        against the models."""
        inc, event, topic = r.incoming, r.event, r.topic
        now = time.perf_counter()
        decided = utcnow()
        prepared = r.prepared
        f = v or {}
        failed = v is None or f["label"] == Label.ERROR
        detail = f.get("error_detail")
        if failed:
            reason = f.get("error_reason") or engine_error or "engine failure"
            on_error = topic.on_error
            label = on_error.value
            fallback = True
            policy_name = f.get("policy") or prepared.policy.name
            policy_version = f.get("policy_version") or prepared.policy.version
            unsafe_p, categories = None, []
            if on_error != OnError.ERROR:
                if reason == TOO_LARGE:  # a code stays a code; the detail says what was applied
                    detail = f"{detail or reason} (on_error: {on_error.value})"
                else:
                    reason = f"{reason} (on_error: {on_error.value})"
        else:
            reason, label, fallback = None, f["label"].value, False
            policy_name, policy_version = f.get("policy"), f.get("policy_version")
            unsafe_p, categories = f.get("unsafe_probability"), list(f.get("categories", ()))
        review = (ReviewReason.TOO_LARGE if r.too_large is not None
                  else ReviewReason.TRUNCATED if prepared.truncated else None)
        level = f.get("level") or prepared.level.value
        adapter = r.request.adapter
        adapter_version = (f.get("adapter_version") or self.adapter_versions.get(adapter)) if adapter else None
        conversation_id = self.conversation_id(inc, event)
        src = inc.source
        source = {"topic": src.topic, "partition": src.partition, "offset": src.offset,
                  "timestamp_ms": src.timestamp_ms}
        timings = {"queued_ms": (started - inc.arrived) * 1e3, "engine_ms": engine_ms,
                   "total_ms": (now - inc.arrived) * 1e3, "batch_size": batch_size, "attempts": attempts}
        windows = len(prepared.windows)
        window = f.get("window", 0)
        context_turns = f.get("context_turns", 0)
        context_tokens = f.get("context_tokens", 0)
        shown = r.context.event_ids[len(r.context.event_ids) - context_turns:] if context_turns else []
        forced = bool(f.get("answer_forced"))
        kept = self.cfg.audit.reasoning
        summary = None if failed or kept == "none" else summarize(
            f.get("reasoning"), self.cfg.outputs.reasoning_summary_chars)
        judged = {  # JudgedBy, in its field order (tests/test_stream_unit.py checks both records' shapes)
            "model": self.guard.model_id, "model_version": self.model_version, "adapter": adapter,
            "adapter_version": adapter_version, "level": level, "policy": policy_name,
            "policy_version": policy_version, "windows": windows, "window": window,
        }
        verdict = {
            "schema_version": SCHEMA_VERSION, **judged, "id": event.id, "conversation_id": conversation_id,
            "label": label, "unsafe_probability": unsafe_p, "categories": categories, "reasoning_summary": summary,
            "error_reason": reason, "error_detail": detail, "fallback": fallback,
            "truncated_input": prepared.truncated, "answer_forced": forced,
            "context_turns": context_turns, "context_tokens": context_tokens, "source": source,
            "worker_id": self.worker_id, "decided_at": decided, "timings": timings,
        }
        full_content = self._content_mode == ContentMode.FULL
        omitted = r.too_large if r.too_large is not None and len(inc.value or b"") > self.cfg.max_event_bytes else None
        audit = {
            "schema_version": SCHEMA_VERSION, **judged, "event_id": event.id, "conversation_id": conversation_id,
            "label": label, "model_label": None if failed else f["label"].value,
            "unsafe_probability": unsafe_p, "unsafe_threshold": prepared.policy.unsafe_threshold,
            "categories": categories, "fallback": fallback, "error_reason": reason, "error_detail": detail,
            "reasoning": f.get("reasoning") if kept == "full" else None,
            "raw_output": f.get("raw_output") if kept == "full" else None,
            "reasoning_summary": summary if kept == "summary" else None, "reasoning_kept": kept,
            "format_ok": bool(f.get("format_ok")), "finish_reason": f.get("finish_reason"),
            "truncated_input": prepared.truncated,
            "unjudged_ranges": [u.model_dump() for u in prepared.unjudged],
            "review_reason": review.value if review else None, "window_field": f.get("window_field"),
            "window_span": list(f["window_span"]) if f.get("window_span") else None,
            "answer_forced": forced, "context_turns": context_turns, "context_tokens": context_tokens,
            "context_source": r.context.source if context_turns else None, "context_event_ids": shown,
            "content": self._content(event, omitted),
            "rendered_prompt_sha256": f.get("prompt_hash") if full_content else None,
            "prompt_tokens": f.get("prompt_tokens", 0), "completion_tokens": f.get("completion_tokens", 0),
            "sampling": self.sampling, "source": source,
            "worker_id": self.worker_id, "processing_guarantee": self.cfg.processing_guarantee,
            "event_created_at": event.created_at, "consumed_at": inc.consumed_at, "decided_at": decided,
            "timings": timings,
        }
        key = (conversation_id or event.id).encode("utf-8", "surrogatepass")
        records = [OutRecord(self.cfg.verdicts_topic(topic), key, encode(verdict)),
                   OutRecord(self.cfg.outputs.audit_topic, event.id.encode("utf-8", "surrogatepass"), encode(audit))]
        if review is not None:
            records.append(self._review_record(event.id, review, verdict, audit, prepared))
        records += [OutRecord(t, k, v, partition=p) for t, p, k, v in r.context.changelog]
        return Outcome(inc, "verdict", records, verdict_fields=verdict, audit_fields=audit)

    def _review_record(self, event_id: str, reason: ReviewReason, verdict: dict[str, Any],
                       audit: dict[str, Any], prepared: Prepared) -> OutRecord:
        """The review item the worker queues itself (whether or not the feedback loop runs)."""
        if reason == ReviewReason.TOO_LARGE:
            detail = f"not judged: {verdict['error_detail'] or TOO_LARGE}"
        else:
            ranges = ", ".join(f"{u.field}[{u.start}:{u.end}]" for u in prepared.unjudged)
            detail = (f"judged in part (limits.on_oversize: truncate): the model never saw {ranges}; "
                      f"the verdict ({verdict['label']}) says nothing about those characters")
        item = ReviewItem(event_id=event_id, reason=reason, detail=detail, label=verdict["label"],
                          model_label=audit["model_label"], unsafe_probability=verdict["unsafe_probability"],
                          policy=verdict["policy"], policy_version=verdict["policy_version"],
                          judged_by=ModelRef(**{k: verdict[k] for k in ModelRef.model_fields}),
                          audit_ref={"topic": self.cfg.outputs.audit_topic, "key": event_id},
                          queued_at=verdict["decided_at"])
        self.telemetry.review_queued(reason.value, verdict["source"]["topic"])
        return OutRecord(self.cfg.feedback.review_topic, event_id.encode("utf-8", "surrogatepass"), dumps(item))

    def refused_outcome(self, r: _Routed) -> Outcome:
        """A message over a size limit: the topic's ``on_error`` verdict (``too_large``, fallback),
        its audit record, a DLQ record and a review item — a person sees it, nothing is judged in part."""
        started = time.perf_counter()
        v = {"label": Label.ERROR, "error_reason": TOO_LARGE, "error_detail": r.too_large,
             "policy": r.prepared.policy.name, "policy_version": r.prepared.policy.version,
             "level": r.prepared.level.value}
        out = self.verdict_outcome(r, v, attempts=0, batch_size=0, engine_error=None, started=started, engine_ms=0.0)
        dlq = self.dlq_outcome(r.incoming, DLQReason.TOO_LARGE, r.too_large or TOO_LARGE, r.event.id)
        out.records += dlq.records
        out.dlq = dlq.dlq
        return out

    @staticmethod
    def conversation_id(inc: Incoming, event: ChatEvent) -> str | None:
        if event.conversation_id:
            return event.conversation_id
        if inc.key:
            return inc.key.decode("utf-8", "replace")
        return None

    def dlq_outcome(self, inc: Incoming, reason: DLQReason, detail: str, event_id: str | None) -> Outcome:
        cap = self.cfg.max_event_bytes  # a too-large input must not make a too-large DLQ record
        value = inc.value
        redacted = self.cfg.dlq_content == "redacted" and value is not None
        truncated = not redacted and value is not None and len(value) > cap
        kept = None if redacted else value[:cap] if truncated else value  # type: ignore[index]
        rec = DLQRecord(reason=reason, detail=detail, event_id=event_id, original_b64=b64(kept),
                        original_truncated=truncated, original_redacted=redacted,
                        original_bytes=len(value or b""), key_b64=b64(inc.key), source=inc.source,
                        worker_id=self.worker_id, dead_lettered_at=utcnow())
        self.telemetry.dead_letter(reason.value, inc.source.topic)
        log.info("dead-lettered %s[%d]@%d: %s: %s", inc.source.topic, inc.source.partition,
                 inc.source.offset, reason.value, detail)
        return Outcome(inc, "dlq", [OutRecord(self.cfg.outputs.dlq_topic, inc.key, dumps(rec))], dlq=rec)

    # ------------------------------------------------------------------ the batch

    async def moderate(self, batch: Sequence[Incoming]) -> list[Outcome]:
        """Exactly one outcome per message, in input order."""
        outcomes: list[Outcome | None] = [None] * len(batch)
        routed: list[tuple[int, _Routed]] = []
        for i, inc in enumerate(batch):
            try:
                r = self.route(inc)
                if isinstance(r, Outcome):
                    outcomes[i] = r
                elif r.too_large is None:
                    routed.append((i, r))
                else:
                    outcomes[i] = self.refused_outcome(r)
            except Rejected as rej:
                outcomes[i] = self.dlq_outcome(inc, rej.reason, rej.detail, rej.event_id)
            except Exception as err:  # noqa: BLE001 - a bug must not lose the message
                log.exception("routing failed for %s", inc.source)
                outcomes[i] = self.dlq_outcome(inc, DLQReason.INTERNAL, f"{type(err).__name__}: {err}", None)
        if any(r.topic.context.enabled or r.context.source for _, r in routed):
            self.telemetry.context_events(Counter((r.incoming.source.topic, _context_kind(r.context))
                                                  for _, r in routed))
        started = time.perf_counter()
        with self.telemetry.tracer.start_as_current_span("rsafe.engine_call") as span:
            span.set_attribute("rsafe.batch_size", len(routed))
            verdicts, attempts, error = await self.judge([r for _, r in routed])
            span.set_attribute("rsafe.attempts", attempts)
            if attempts > 1:
                span.add_event("retry", {"rsafe.attempts": attempts, "rsafe.error": (error or "")[:200]})
        if verdicts:
            self.telemetry.engine_call((time.perf_counter() - started) * 1e3,
                                       sum(v.get("prompt_tokens", 0) for v in verdicts),
                                       sum(v.get("completion_tokens", 0) for v in verdicts))
        judged: dict[int, VerdictFields | None] = {}
        if verdicts is not None:
            self.consecutive_failures = 0
            judged = {i: v for (i, _), v in zip(routed, verdicts)}
        elif routed:
            judged = await self._after_failure(routed, outcomes, error)
        engine_ms = (time.perf_counter() - started) * 1e3
        for i, r in routed:
            if outcomes[i] is not None:  # dead-lettered as a poison event
                continue
            v = judged.get(i)
            try:
                outcomes[i] = self.verdict_outcome(r, v, attempts=attempts, batch_size=len(routed),
                                                   engine_error=error, started=started, engine_ms=engine_ms)
            except Exception as err:  # noqa: BLE001
                log.exception("building the verdict failed for %s", r.incoming.source)
                outcomes[i] = self.dlq_outcome(r.incoming, DLQReason.INTERNAL,
                                               f"{type(err).__name__}: {err}", r.event.id)
        done = [o for o in outcomes if o is not None]
        self.telemetry.verdicts((v["label"], o.incoming.source.topic, v["fallback"], v["policy"], v["categories"])
                                for o in done if (v := o.verdict_fields) is not None)
        return done

    async def _after_failure(self, routed: list[tuple[int, _Routed]], outcomes: list[Outcome | None],
                             error: str | None) -> dict[int, VerdictFields | None]:
        """A batch failed every attempt: the engine is dead (raise ``EngineDead``), or the batch is
        poison (isolate the events that crash the engine → DLQ), or — without a probe — judge it
        by ``on_error`` until ``max_consecutive_failures`` batches failed in a row."""
        health = self.cfg.health
        if not health.probe:
            self.consecutive_failures += 1
            if self.consecutive_failures >= health.max_consecutive_failures:
                raise EngineDead(f"{self.consecutive_failures} batches in a row failed every attempt: {error}")
            log.error("engine call for %d events failed %d times, applying on_error: %s",
                      len(routed), self.cfg.retry.attempts, error)
            return {}
        why = await self.probe()
        if why is not None:
            raise EngineDead(f"the batch failed every attempt ({error}) and the health probe failed too ({why})")
        log.warning("the engine answers the health probe but fails this batch of %d (%s): isolating the "
                    "events that crash it", len(routed), error)
        index = {id(r): i for i, r in routed}
        poison: list[tuple[_Routed, str]] = []
        judged = await self._isolate([r for _, r in routed], poison)
        for r, why in poison:
            outcomes[index[id(r)]] = self.dlq_outcome(r.incoming, DLQReason.ENGINE_CRASH,
                                                      f"the event crashes the engine: {why}", r.event.id)
        self.consecutive_failures = 0
        return {index[id(r)]: v for r, v in judged}


def _context_kind(use: ContextUse) -> str:
    """How an event's context is counted (``rsafe.context.events``)."""
    if use.source == "event":
        return "event"
    if use.skipped in ("no_key", "key_mismatch"):
        return use.skipped
    return "table" if use.turns else "none"


def _header(headers: Any, name: str) -> bytes | None:
    """A Kafka header's value (headers as a list of (key, value) pairs or a mapping)."""
    items = headers.items() if isinstance(headers, dict) else headers
    for k, v in items:
        if (k.decode("latin-1") if isinstance(k, bytes) else k) == name:
            return v if isinstance(v, bytes) or v is None else str(v).encode()
    return None


class EngineDead(Exception):
    """The engine cannot judge anything: the worker must stop (exit 4), leaving the batch unacked."""

