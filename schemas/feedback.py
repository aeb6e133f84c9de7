"""Feedback records: human labels in, disagreements and review items out.

* ``FeedbackEvent``     ``rsafe.feedback`` (trusted: reviewers, appeals) and ``rsafe.reports``
                        (untrusted: user reports, other models), key = event id
* ``DisagreementRecord`` ``rsafe.disagreements``, key = event id — a trusted label that differs
                        from the model's own label; what the retraining job trains on
* ``ReviewItem``        ``rsafe.review``, key = event id — decisions a person should look at

Trust comes from the topic a feedback event arrives on, never from a field: ``source`` says what
kind of feedback it is, and the worker rejects a ``source`` that does not belong on its topic.
All are JSON on the wire (UTF-8) with ``schema_version``; new optional fields keep the version.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rsafe.models.verdict import ModelRef
from rsafe.schemas.common import SCHEMA_VERSION, utcnow

class FeedbackSource(str, Enum):
    REVIEWER = "reviewer"
    """A moderator's judgement (trusted topic)."""
    APPEAL = "appeal"
    """The outcome of an appeal (trusted topic)."""
    USER_REPORT = "user_report"
    """A user flagged the content (untrusted topic)."""
    EXTERNAL_MODEL = "external_model"
    """Another model's opinion (untrusted topic)."""

    @property
    def trusted(self) -> bool:
        return self in (FeedbackSource.REVIEWER, FeedbackSource.APPEAL)


class FeedbackContent(BaseModel):
    """The judged content, attached by a reviewer who saw it (when the audit kept only a hash, or
    nothing). It is what the reviewer chose to send: the worker copies it into the disagreement
    record (the training data) whatever the audit mode, after checking it against the audit's
    keyed digest in ``hash`` mode; there is nothing to check it against in ``redacted`` mode."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    response: str | None = None


class FeedbackEvent(BaseModel):
    """A label for one judged event (by its ``event_id``). Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Annotated[str, Field(min_length=1, max_length=512)]
    """The ``id`` of the chat event (= the verdict's ``id``, the audit record's key)."""
    feedback_id: Annotated[str, Field(min_length=1, max_length=512)]
    """Unique per feedback; a replayed feedback event with the same id is counted once."""
    label: Literal["safe", "unsafe"]
    categories: list[str] = []
    """Category codes the reviewer saw (optional)."""
    source: FeedbackSource
    reviewer: Annotated[str | None, Field(max_length=256)] = None
    """Who (a reviewer id, a model name, a reporting user's pseudonym)."""
    note: Annotated[str | None, Field(max_length=4000)] = None
    created_at: datetime = Field(default_factory=utcnow)
    content: FeedbackContent | None = None
    """The content as the reviewer saw it; used when the audit record kept only a hash."""

    @field_validator("event_id", "feedback_id", mode="before")
    @classmethod
    def _int_ids(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class DisagreementRecord(BaseModel):
    """A trusted human label that differs from the model's own label: a training example.

    ``prompt``/``response`` are what the model judged — for a message judged in windows, the
    deciding window's text (``window_field``/``window_span`` say where it came from) — or null
    with ``content_missing`` saying why (the audit kept only a hash and the feedback attached
    nothing). One record per (event id, feedback id).
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str
    feedback_id: str
    prompt: str | None = None
    response: str | None = None
    content_missing: str | None = None
    """Why ``prompt`` is null (e.g. ``audit content mode hash, no content attached``)."""
    window_field: str | None = None
    window_span: list[int] | None = None
    policy: str
    policy_version: str
    level: str
    """prompt or response: the template the decision used."""
    judged_by: ModelRef
    model_reasoning: str | None = None
    model_label: Literal["safe", "unsafe"]
    unsafe_probability: float | None = None
    human_label: Literal["safe", "unsafe"]
    source: FeedbackSource
    reviewer: str | None = None
    note: str | None = None
    decided_at: datetime | None = None
    """When the guard decided."""
    feedback_at: datetime
    recorded_at: datetime = Field(default_factory=utcnow)

    @property
    def key(self) -> str:
        """Deduplication key of the record: (event id, feedback id)."""
        return f"{self.event_id}/{self.feedback_id}"


class ReviewReason(str, Enum):
    NEAR_THRESHOLD = "near_threshold"
    """P(unsafe) within ``feedback.review_margin`` of the policy's threshold."""
    UNKNOWN = "unknown"
    ERROR = "error"
    FALLBACK = "fallback"
    """The label came from the topic's ``on_error``, not from the model."""
    UNTRUSTED_CONTRADICTS = "untrusted_contradicts"
    """A user report or another model contradicts the guard: a reviewer must confirm it."""
    TRUSTED_CONFLICT = "trusted_conflict"
    """Two trusted labels for one event contradict each other: not used for training."""
    TRUSTED_ON_FALLBACK = "trusted_on_fallback"
    """A trusted label for a decision the model did not make (fallback, error, unknown)."""
    TOO_LARGE = "too_large"
    """Over the size limit: nothing of the message was judged (queued by the worker itself)."""
    TRUNCATED = "truncated"
    """Judged in part (``on_oversize: truncate``): the audit names the characters never seen."""


class ReviewItem(BaseModel):
    """A decision a person should look at, with enough to find and judge it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str
    reason: ReviewReason
    detail: str = ""
    label: str | None = None
    """The published label."""
    model_label: str | None = None
    unsafe_probability: float | None = None
    policy: str | None = None
    policy_version: str | None = None
    judged_by: ModelRef = ModelRef()
    feedback: list[FeedbackEvent] = []
    """The feedback that caused the item (reports, conflicting labels)."""
    audit_ref: dict[str, Any] | None = None
    """Where the full decision is: ``{"topic", "partition", "offset"}`` of the audit record, or
    ``{"topic", "key"}`` (the audit topic is compacted by event id) for items the worker queues
    together with the audit record."""
    queued_at: datetime = Field(default_factory=utcnow)
