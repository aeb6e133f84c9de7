"""Wire records of the stream worker: the chat event read from input topics and the three
records it writes. All are JSON on the wire (UTF-8). docs/STREAM.md shows an example of each.

* ``ChatEvent``      input topics, key = conversation id
* ``VerdictRecord``  ``<input-topic>.verdicts``, key = conversation id (else event id)
* ``AuditRecord``    ``rsafe.audit``, key = event id (a compacted topic keeps the last decision)
* ``DLQRecord``      ``rsafe.dlq``, key = the original key

"Who judged it" (``JudgedBy``: policy, model and adapter with their versions, windows) is declared
once, in ``rsafe.models.verdict``, and inherited by ``Verdict``, ``VerdictRecord`` and ``AuditRecord``.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rsafe.models.conversation import MAX_MESSAGES, Conversation, Turn, split_messages
from rsafe.models.verdict import CharRange, JudgedBy
from rsafe.schemas.common import Versioned


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# --------------------------------------------------------------------------- in


class ChatEvent(BaseModel):
    """One chat message to moderate. ``response`` present → response-level moderation (on
    ``auto`` topics). Unknown fields are ignored (producers may add fields)."""

    model_config = ConfigDict(extra="ignore")

    id: Annotated[str, Field(min_length=1, max_length=512)]
    """Unique per message; a replay carries the same id so consumers can deduplicate."""
    conversation_id: Annotated[str | None, Field(max_length=512)] = None
    """Also the Kafka key (so a conversation stays on one partition, in order)."""
    prompt: str = None  # type: ignore[assignment] - required unless ``messages`` is given (checked below)
    response: str | None = None
    messages: Annotated[list[Turn] | None, Field(max_length=MAX_MESSAGES)] = None
    """The conversation in the OpenAI chat format, the judged turn last: then ``prompt`` /
    ``response`` come from it and the earlier messages are the context (the worker's conversation
    table is not used). Give either ``messages`` or ``prompt`` (and ``response``)."""
    policy: str | None = None
    """Another policy for this event; only on topics with ``allow_policy_override``."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None

    @field_validator("id", "conversation_id", mode="before")
    @classmethod
    def _int_ids(cls, value: Any) -> Any:
        # Integer ids are common in producers' JSON; booleans are not ids.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _judged_turn(self) -> ChatEvent:
        if self.messages is None:
            if self.prompt is None:
                raise ValueError("prompt is required (or messages, the conversation with the judged turn last)")
            return self
        if self.prompt is not None or self.response is not None:
            raise ValueError("give either messages or prompt/response, not both")
        conv = split_messages(self.messages)
        self.prompt, self.response = conv.prompt, conv.response
        return self

    def conversation(self) -> Conversation | None:
        """The judged turn and its context when the event carries ``messages``."""
        return None if self.messages is None else split_messages(self.messages)


# --------------------------------------------------------------------------- out


class SourceRef(BaseModel):
    """Where an event was read: enough to find the original message again."""

    model_config = ConfigDict(extra="forbid")

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None
    """The Kafka record timestamp."""


class StreamTimings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queued_ms: float = 0.0
    """Consumed → engine call started (batching linger and waiting for an engine slot)."""
    engine_ms: float = 0.0
    """The (last) engine call for this event's batch."""
    total_ms: float = 0.0
    """Consumed → verdict ready (publishing not included)."""
    batch_size: int = 0
    attempts: int = 0
    """Engine calls made for the batch (1 = no retry)."""


class VerdictRecord(JudgedBy, Versioned):
    """The decision on one event: what a downstream service acts on."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    id: str
    conversation_id: str | None = None
    label: Literal["safe", "unsafe", "unknown", "error"]
    unsafe_probability: float | None = None
    categories: list[str] = []
    reasoning_summary: str | None = None
    error_reason: str | None = None
    """Why the model gave no answer; ``too_large``: the message is over the size limit and no part
    of it was judged."""
    error_detail: str | None = None
    """More about a coded ``error_reason`` (``too_large``: which field, how long, the limit)."""
    fallback: bool = False
    """True when ``label`` comes from the topic's ``on_error`` setting, not from the model."""
    truncated_input: bool = False
    """The message was over ``max_chars`` and ``on_oversize: truncate`` is set: only its head and
    tail were judged (the audit record names the unjudged ranges)."""
    answer_forced: bool = False
    """The reasoning ran out of tokens and the answer was forced after it."""
    context_turns: int = 0
    """Earlier turns of the conversation the message was judged with (``inputs[].context``, or the
    event's own ``messages``)."""
    context_tokens: int | None = 0
    """Prompt tokens those turns took (None: the engine counts no tokens)."""
    source: SourceRef
    worker_id: str
    decided_at: datetime
    timings: StreamTimings = StreamTimings()


class ContentMode(str, Enum):
    FULL = "full"
    HASH = "hash"
    REDACTED = "redacted"


class AuditContent(BaseModel):
    """The judged content, as the privacy setting (``audit.content``) allows.

    * ``full``: the texts, their plain sha256 and the metadata.
    * ``hash``: no text; an HMAC-SHA-256 of each under a secret key (``RSAFE_AUDIT_HASH_KEY``,
      ``hash_key_id`` names it), so only a holder of the key can confirm a guess.
    * ``redacted``: no text and nothing computed from it; the lengths only.
    """

    model_config = ConfigDict(extra="forbid")

    mode: ContentMode
    prompt: str | None = None
    """full: the text; hash / redacted: absent."""
    response: str | None = None
    prompt_sha256: str | None = None
    """full only: plain sha256 of the text (anyone can confirm a guess with it: never without the text)."""
    response_sha256: str | None = None
    prompt_hmac: str | None = None
    """hash only: HMAC-SHA-256 of the text under the key ``hash_key_id``."""
    response_hmac: str | None = None
    hash_key_id: str | None = None
    """hash only: which key made ``prompt_hmac`` / ``response_hmac`` (keys rotate)."""
    prompt_chars: int = 0
    response_chars: int | None = None
    metadata: dict[str, Any] | None = None
    """full only (metadata can hold personal data)."""
    omitted: str | None = None
    """Why the text is absent in ``full`` mode (an event over ``max_event_bytes``)."""


class AuditRecord(JudgedBy, Versioned):
    """Everything needed to reproduce and review one decision."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    event_id: str
    conversation_id: str | None = None
    label: Literal["safe", "unsafe", "unknown", "error"]
    model_label: str | None = None
    """What the model said (None when it said nothing); differs from ``label`` on fallbacks."""
    unsafe_probability: float | None = None
    unsafe_threshold: float | None = None
    """The policy's threshold the label was decided with."""
    categories: list[str] = []
    fallback: bool = False
    error_reason: str | None = None
    error_detail: str | None = None
    reasoning: str | None = None
    """The model's reasoning (``audit.reasoning: full``; it can quote the message)."""
    raw_output: str | None = None
    """The whole generation (``audit.reasoning: full``)."""
    reasoning_summary: str | None = None
    """``audit.reasoning: summary``: the verdict record's summary instead of the reasoning."""
    reasoning_kept: Literal["full", "summary", "none"] = "full"
    """What of the reasoning this record keeps (``audit.reasoning``)."""
    format_ok: bool = False
    finish_reason: str | None = None
    truncated_input: bool = False
    unjudged_ranges: list[CharRange] = []
    """``[{field, start, end}]``: the characters the model never saw (``on_oversize: truncate``)."""
    review_reason: str | None = None
    """The worker queued this decision on the review topic itself (``too_large``, ``truncated``),
    whether or not the feedback loop runs."""
    window_field: str | None = None
    """prompt or response: the field judged in windows (None when the message was judged whole)."""
    window_span: list[int] | None = None
    """``[start, end)`` character span of ``window_field`` that the deciding window showed: the part
    of a long message that was judged (and that retraining uses)."""
    answer_forced: bool = False
    context_turns: int = 0
    context_tokens: int | None = 0
    context_source: Literal["table", "event"] | None = None
    """Where the earlier turns came from: the worker's conversation table, or the event's ``messages``."""
    context_event_ids: list[str] = []
    """``table``: the events whose texts were shown as context, oldest first (the texts themselves
    are in those events' audit records, not repeated here)."""
    content: AuditContent
    rendered_prompt_sha256: str | None = None
    """``audit.content: full`` only: sha256 of the exact prompt the engine received (chat template
    applied; it contains the message, so ``hash`` and ``redacted`` leave it out)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    sampling: dict[str, Any] = {}
    source: SourceRef
    worker_id: str
    processing_guarantee: str
    event_created_at: datetime | None = None
    consumed_at: datetime
    decided_at: datetime
    timings: StreamTimings = StreamTimings()


class DLQReason(str, Enum):
    EMPTY = "empty"
    TOO_LARGE = "too_large"
    NOT_JSON = "not_json"
    SCHEMA = "schema"
    UNKNOWN_POLICY = "unknown_policy"
    POLICY_OVERRIDE_DISABLED = "policy_override_disabled"
    INVALID_CONTENT = "invalid_content"
    ENGINE_CRASH = "engine_crash"
    UNTRUSTED_SOURCE = "untrusted_source"
    """Feedback whose ``source`` does not belong on the topic it came from (a user report on the
    trusted topic, or a reviewer label on the reports topic)."""
    UNJOINED_FEEDBACK = "unjoined_feedback"
    """Feedback held for its decision longer than ``feedback.hold_max_age_s`` (or over the hold limit)."""
    DECISION_EXPIRED = "decision_expired"
    """Feedback for a decision older than ``feedback.retention_days``."""
    INTERNAL = "internal"


class DLQRecord(Versioned):
    """An event that could not be moderated, with the reason and the original bytes
    (``dlq.content: full``) or without them (``redacted``: reason, coordinates and length only)."""

    model_config = ConfigDict(extra="forbid")

    reason: DLQReason
    detail: str
    event_id: str | None = None
    """When the bytes were JSON with a string id."""
    original_b64: str | None = None
    original_bytes: int = 0
    """Size of the original message; ``original_b64`` holds at most ``max_event_bytes`` of it."""
    original_truncated: bool = False
    original_redacted: bool = False
    """``dlq.content: redacted``: the bytes were not kept (``original_bytes`` still says how many)."""
    key_b64: str | None = None
    source: SourceRef
    worker_id: str
    dead_lettered_at: datetime

    def original(self) -> bytes | None:
        return None if self.original_b64 is None else base64.b64decode(self.original_b64)


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")
