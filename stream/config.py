"""Worker configuration: one YAML file, validated by pydantic, environment variables on top.

Environment overrides use the prefix ``RSAFE_`` and ``__`` between nested fields; values are read
as YAML scalars (``RSAFE_BATCH__SIZE=32``, ``RSAFE_BATCH__LINGER_MS=50``). Two short forms exist
for what operators change most: ``RSAFE_BROKER`` (broker URL(s)) and ``RSAFE_GROUP_ID``. Only
variables whose first part names a top-level field are read (``RSAFE_DEMO_MODEL`` is left alone).

Only the CLI and the stream wiring read this; ``rsafe.models`` receives ``EngineConfig`` objects.
"""

from __future__ import annotations

import os
import socket
import ssl
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rsafe.models.config import EngineConfig
from rsafe.policies import Level
from rsafe.schemas.topics import (  # re-exported: the worker config's defaults
    AUDIT_TOPIC,
    DISAGREEMENTS_TOPIC,
    DLQ_TOPIC,
    FEEDBACK_TOPIC,
    MODELS_TOPIC,
    POLICIES_TOPIC,
    REPORTS_TOPIC,
    REVIEW_TOPIC,
    VERDICTS_SUFFIX,
)

ENV_PREFIX = "RSAFE_"
DEFAULT_BROKER = "kafka://127.0.0.1:9092"
TOPIC_RE = r"^[A-Za-z0-9._-]{1,249}$"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the field."""


class OnError(str, Enum):
    """What a topic publishes when the engine cannot judge an event (after retries)."""

    ERROR = "error"
    """An ``error`` verdict that says why (default): downstream decides."""
    UNSAFE = "unsafe"
    """Fail closed: an ``unsafe`` verdict, marked ``fallback: true``."""
    SAFE = "safe"
    """Fail open: a ``safe`` verdict, marked ``fallback: true``."""

    @classmethod
    def _missing_(cls, value: object) -> OnError | None:
        aliases = {"fail_closed": cls.UNSAFE, "fail-closed": cls.UNSAFE,
                   "fail_open": cls.SAFE, "fail-open": cls.SAFE}
        return aliases.get(str(value).lower()) if isinstance(value, str) else None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> Any:
    """Seconds from a number or a string with a unit: ``90``, ``"90s"``, ``"30m"``, ``"24h"``, ``"7d"``."""
    if isinstance(value, str):
        text = value.strip().lower()
        unit = _DURATION_UNITS.get(text[-1:]) if text else None
        try:
            return float(text[:-1]) * unit if unit else float(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a duration (a number of seconds, or e.g. 90s, 30m, 24h, 7d)") from None
    return value


class ConversationContextSettings(_Strict):
    """``inputs[].context``: judge each event with the earlier turns of its conversation
    (``rsafe.stream.context``; docs/STREAM.md, "Conversation context")."""

    enabled: bool = False
    max_turns: Annotated[int, Field(ge=1, le=1000)] = 10
    """Earlier turns kept per conversation (a turn is one prompt or one response)."""
    max_context_tokens: Annotated[int | None, Field(ge=0)] = None
    """Most prompt tokens the earlier turns may take; default what the model's context leaves once
    the judged message is in (turns are dropped oldest first; the judged message is always whole)."""
    ttl: Annotated[float, Field(gt=0)] = 86_400.0
    """Idle conversations expire after this long (seconds, or 30m / 24h / 7d): never shown again,
    tombstoned in the changelog, deleted by its retention."""
    judge: Literal["last", "all"] = "last"
    """last: the model is told to judge only the last message; all: the reference wording."""
    max_turn_chars: Annotated[int, Field(ge=1)] = 8_000
    """Longest turn stored (its last characters are kept); bounds the table's size."""
    max_compaction_lag_s: Annotated[float, Field(gt=0)] = 3_600.0
    """The changelog's ``max.compaction.lag.ms``: how long a replaced or erased conversation's text
    can stay in the changelog topic on the broker."""
    store_text: bool = False
    """Required under ``audit.content: hash | redacted``: the table holds message text by necessity."""

    @field_validator("ttl", "max_compaction_lag_s", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value)


class InputTopic(_Strict):
    """One input topic and how its events are judged."""

    topic: Annotated[str, Field(pattern=TOPIC_RE)]
    policy: str
    """Policy name (bundled, or from ``policy_dirs``)."""
    level: Level = Level.BOTH
    """The policies' vocabulary: ``prompt`` judges the user's prompt (a response, if present, is
    ignored); ``response`` judges the assistant's response (events without one go to the DLQ);
    ``both`` (or ``auto``) judges the response when the event has one, else the prompt."""
    allow_policy_override: bool = False
    """Events may name another policy in their ``policy`` field. When false, an event that names a
    different policy goes to the DLQ (``policy_override_disabled``)."""
    on_error: OnError = OnError.ERROR
    adapter: str | None = None
    """LoRA adapter (``engine.lora_adapters`` name) used for this topic's events."""
    verdicts_topic: Annotated[str | None, Field(pattern=TOPIC_RE)] = None
    """Default ``<topic>.verdicts``."""
    partitions: Annotated[int, Field(ge=1)] = 3
    """Used when the worker creates the topic (``create_topics``), and for its context changelog."""
    context: ConversationContextSettings = Field(default_factory=ConversationContextSettings)
    """Judge each event with the earlier turns of its conversation (default off)."""


class Outputs(_Strict):
    audit_topic: Annotated[str, Field(pattern=TOPIC_RE)] = AUDIT_TOPIC
    dlq_topic: Annotated[str, Field(pattern=TOPIC_RE)] = DLQ_TOPIC
    policies_topic: Annotated[str, Field(pattern=TOPIC_RE)] = POLICIES_TOPIC
    """The policy store: every policy version the worker loads, key ``name@version`` (compacted)."""
    verdicts_suffix: str = VERDICTS_SUFFIX
    partitions: Annotated[int, Field(ge=1)] = 3
    """Partitions of the output topics when the worker creates them."""
    reasoning_summary_chars: Annotated[int, Field(ge=0)] = 200
    """Length of the reasoning summary in verdict records (0: none; the audit keeps it all)."""


class Batching(_Strict):
    size: Annotated[int, Field(ge=1, le=4096)] = 16
    """Most events per micro-batch, and most engine sequences per engine call: a long message
    judged in several token windows counts once per window (its windows always share one call;
    a message with more windows than ``size`` gets a call of its own)."""
    linger_ms: Annotated[float, Field(ge=1)] = 100
    """Longest wait for a batch to fill once its first event arrived."""
    max_inflight: Annotated[int, Field(ge=1, le=64)] = 2
    """Batches in the engine at once (default 2; 1 under ``exactly_once``, which allows no other).
    The consumer stops fetching when all slots are busy and ``buffer`` events wait.
    ``size × max_inflight`` is the engine's concurrency; docs/BENCHMARKS.md has the measurement
    behind the defaults."""
    buffer: Annotated[int | None, Field(ge=1)] = None
    """Events buffered between the consumer and the agent before delivery pauses (default
    ``2 * size``). The Kafka client then stops fetching once its own prefetch buffer is full."""

    @property
    def intake_size(self) -> int:
        """``buffer``, or ``2 * size`` when unset."""
        return self.buffer or 2 * self.size


class Retry(_Strict):
    attempts: Annotated[int, Field(ge=1, le=20)] = 3
    """Engine calls per batch before ``on_error`` applies."""
    backoff_ms: Annotated[float, Field(ge=0)] = 200
    """First wait between attempts; doubled each time up to ``max_backoff_ms``."""
    max_backoff_ms: Annotated[float, Field(ge=0)] = 5_000


class Audit(_Strict):
    """What the audit trail keeps of each message and of the model's reasoning (docs/STREAM.md,
    "What each privacy mode keeps", lists every field)."""

    content: Literal["full", "hash", "redacted"] = "full"
    """full: prompt/response text, metadata and their plain sha256; hash: an HMAC-SHA-256 of each
    text under a secret key (``RSAFE_AUDIT_HASH_KEY``; the worker refuses to start without it);
    redacted: lengths only, nothing computed from the text."""
    reasoning: Literal["full", "summary", "none"] = "full"
    """full: the reasoning and the raw output in the audit record, a summary in the verdict record;
    summary: the summary only (verdict and audit); none: no reasoning anywhere. The model's
    reasoning often quotes the message: ``content: redacted`` with ``reasoning: full`` can still
    carry fragments of the content."""


class DeadLetters(_Strict):
    content: Literal["full", "redacted"] | None = None
    """full: DLQ records keep the original bytes (base64); redacted: the reason, source coordinates
    and length only. Default: ``full`` under ``audit.content: full``, else ``redacted``."""


class Security(_Strict):
    """Client security, passed through to the Kafka clients (Faust, aiokafka, kafka-python)."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True

    @model_validator(mode="after")
    def _check(self) -> Security:
        if self.protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"protocol {self.protocol} needs sasl_username and sasl_password "
                             "(e.g. RSAFE_SECURITY__SASL_PASSWORD)")
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        if "SSL" not in self.protocol:
            return None
        ctx = ssl.create_default_context(cafile=self.ssl_cafile)
        ctx.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile:
            ctx.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return ctx

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka and kafka-python clients."""
        if self.protocol == "PLAINTEXT":
            return {}
        kw: dict[str, Any] = {"security_protocol": self.protocol}
        ctx = self.ssl_context()
        if ctx is not None:
            kw["ssl_context"] = ctx
        if self.protocol.startswith("SASL"):
            kw.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                      sasl_plain_password=self.sasl_password)
        return kw

    def faust_credentials(self) -> Any:
        import faust

        if self.protocol == "PLAINTEXT":
            return None
        if self.protocol == "SSL":
            return faust.SSLCredentials(self.ssl_context())
        return faust.SASLCredentials(username=self.sasl_username, password=self.sasl_password,
                                     mechanism=self.sasl_mechanism, ssl_context=self.ssl_context())


class EmbeddedBroker(_Strict):
    """The development broker started when no broker is configured and none is reachable."""

    enabled: bool = True
    data_dir: str = ".cache/broker"
    port: Annotated[int, Field(ge=0, le=65535)] = 9092


class PolicyReload(_Strict):
    watch: bool = True
    """Reload policies when a policy file changes (polled) and on SIGHUP."""
    interval_s: Annotated[float, Field(gt=0)] = 2.0


class EngineHealth(_Strict):
    """When the engine, not an event, is the problem: stop (exit 4) instead of judging by fallback."""

    probe: bool = True
    """After a batch failed every attempt, send the engine one known-good request. It fails → the
    engine is dead: the worker stops taking events, leaves the batch unacknowledged and exits with
    status 4 (its orchestrator restarts it; nothing is judged by fallback). It answers → the batch
    is a poison batch: it is split to find the events that crash the engine (→ DLQ
    ``engine_crash``); the rest are judged."""
    probe_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    max_poison_events: Annotated[int, Field(ge=1)] = 2
    """More events than this crashing the engine one by one in a batch means the engine is broken,
    not the events: exit 4 instead of dead-lettering the whole batch."""
    max_consecutive_failures: Annotated[int, Field(ge=1)] = 3
    """Without ``probe``: batches that failed every attempt get their topic's ``on_error``
    verdicts until this many fail in a row; then the worker exits with status 4."""
    batch_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    """One engine call longer than this counts as a failed attempt (a hung engine)."""


class Feedback(_Strict):
    """The feedback loop, stream side: human labels joined to the guard's decisions.

    Trust comes from the topic: ``trusted_topic`` carries reviewer and appeal labels (restrict who
    may write it with Kafka ACLs), ``reports_topic`` untrusted signals (user reports, other
    models). Both are keyed by event id and created with ``outputs.partitions`` partitions, like
    the audit topic, so the join is co-partitioned."""

    enabled: bool = False
    trusted_topic: Annotated[str, Field(pattern=TOPIC_RE)] = FEEDBACK_TOPIC
    reports_topic: Annotated[str, Field(pattern=TOPIC_RE)] = REPORTS_TOPIC
    disagreements_topic: Annotated[str, Field(pattern=TOPIC_RE)] = DISAGREEMENTS_TOPIC
    """Trusted labels that differ from the model's: what the retraining job trains on."""
    review_topic: Annotated[str, Field(pattern=TOPIC_RE)] = REVIEW_TOPIC
    """Decisions a person should look at (the queue humans work from). Written whether or not the
    feedback loop is enabled: the worker itself queues messages over the size limit (``too_large``)
    and messages judged in part (``truncated``)."""
    retention_days: Annotated[float, Field(gt=0)] = 7.0
    """How long a decision stays joinable. Feedback for an older decision goes to the DLQ
    (``decision_expired``)."""
    hold_max_events: Annotated[int, Field(ge=0)] = 10_000
    """Feedback that arrives before its decision is held (per partition) up to this many ..."""
    hold_max_age_s: Annotated[float, Field(gt=0)] = 3600.0
    """... and this long; then it goes to the DLQ (``unjoined_feedback``)."""
    review_margin: Annotated[float, Field(ge=0, le=1)] = 0.1
    """Decisions with P(unsafe) within this distance of the policy's threshold go to review."""
    review_decisions: bool = True
    """Send near-threshold, unknown, error and fallback decisions to the review topic."""
    store: str = "memory://"
    """Faust table store: ``memory://`` (tables rebuilt from their changelog topics at start) or
    ``rocksdb://`` (on local disk; for large tables). docs/STREAM.md has the sizing."""
    expiry_interval_s: Annotated[float, Field(gt=0)] = 60.0
    """How often held feedback and expired decisions are swept."""


DEFAULT_SAMPLING_RATIO = 0.05
"""``telemetry.sampling_ratio`` when neither the config nor ``OTEL_TRACES_SAMPLER`` sets one."""


class Otlp(_Strict):
    endpoint: str | None = None
    """Collector URL; default the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (else the exporter's own
    default, ``http://localhost:4318`` for http/protobuf, ``localhost:4317`` for grpc)."""
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    headers: dict[str, str] = {}
    """e.g. an API key header of a hosted collector (``RSAFE_TELEMETRY__OTLP__HEADERS``)."""


class Telemetry(_Strict):
    """OpenTelemetry traces and metrics, exported as configured (the SDK and official exporters).

    The standard ``OTEL_*`` variables keep working (``OTEL_EXPORTER_OTLP_ENDPOINT``,
    ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``...); the settings
    here win where both are given."""

    exporter: Literal["none", "console", "otlp"] = "none"
    """Where traces and metrics go. ``none`` (default) installs no SDK: near-zero cost."""
    otlp: Otlp = Field(default_factory=Otlp)
    prometheus: bool = True
    """Serve the metrics as Prometheus text on the worker's HTTP server (``/metrics``) whenever it
    runs (``http.enabled``). On by default: operators expect ``/metrics`` next to ``/healthz``.
    Alone (``exporter: none``) it records metrics with the SDK but makes no spans; its cost with
    the null engine is in docs/BENCHMARKS.md "Pipeline ceiling" (``bench/pipeline.py``). ``false``:
    no SDK at all unless an exporter is set, and ``/metrics`` answers 404."""
    service_name: str = "rsafe-worker"
    resource_attributes: dict[str, str] = {}
    """Added to the resource (worker id, group, model version are added by the worker)."""
    sampling_ratio: Annotated[float | None, Field(ge=0, le=1)] = None
    """Share of events traced that arrive without a sampling decision (parent-based: an event whose
    producer sampled its trace is always traced, one whose producer did not never is). Default:
    ``OTEL_TRACES_SAMPLER``/``_ARG`` if set, else ``DEFAULT_SAMPLING_RATIO`` (5 %): a sampled event
    costs ~150 µs of the worker's CPU (its span, attributes and the OTLP encoding), an unsampled one
    ~15 µs (docs/BENCHMARKS.md). 1.0 traces every event."""
    metric_export_interval_s: Annotated[float, Field(gt=0)] = 15.0
    json_logs: bool = False
    """Log lines as JSON carrying the trace and span ids (message content is never logged at INFO
    or above)."""


class Models(_Strict):
    """Hot swap: the worker follows the model control topic and serves what was promoted."""

    control_topic: Annotated[str, Field(pattern=TOPIC_RE)] = MODELS_TOPIC
    """Compacted; key = adapter (or model) name, value a ``ModelControlRecord``."""
    follow: bool = True
    """Read the control topic at start (the current versions) and apply every promotion after."""
    model_name: str | None = None
    """The registered name of this worker's base model: a promoted full-weights version of it is
    loaded at start, and while running it makes the worker report "restart required" (readiness)."""
    registry: str | None = None
    """The registry (a directory or fsspec URL) for ``rsafe models`` and ``rsafe train promote``."""
    cache_dir: str = ".cache/registry"
    """Where artifacts from a remote registry are copied (engines load from local paths)."""
    require_approver: bool = False
    """``rsafe train promote`` needs ``--approver NAME``."""


class Http(_Strict):
    """The worker's one HTTP server: ``/healthz`` (liveness), ``/readyz`` (engine loaded, partitions
    assigned, no restart required) and ``/metrics`` (Prometheus, when telemetry exports it)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    """Bind address; ``0.0.0.0`` inside a container or pod (127.0.0.1 is unreachable from probes)."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8088
    """0: any free port (logged)."""


class Faults(_Strict):
    """Test hooks. Off unless set; never set them in production."""

    engine_fail_marker: str | None = None
    """A batch holding an event whose text contains this marker fails in the engine, every attempt
    (a poison batch)."""
    request_error_marker: str | None = None
    """A request whose text contains this marker gets a per-request engine error (the others of the
    batch are judged)."""
    engine_dead_file: str | None = None
    """While this file exists, every engine call fails (a dead engine)."""
    engine_hang_marker: str | None = None
    """A batch holding this marker never returns from the engine (a hung engine)."""
    consumer_crash_marker: str | None = None
    """An input event whose raw value contains this marker raises inside the Faust consumer's
    delivery, where no guard catches it: the Faust app crashes (exit status 3)."""


def parse_brokers(value: str | list[str]) -> list[str] | None:
    """``kafka://h1:9092;kafka://h2:9092``, ``h1:9092,h2:9092`` or a list → ``[host:port, ...]``."""
    items = value.replace(";", ",").split(",") if isinstance(value, str) else list(value)
    out = []
    for url in items:
        url = str(url).strip()
        if not url:
            continue
        host_port = url.split("://", 1)[-1].rstrip("/")
        host, sep, port = host_port.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"broker {url!r}: expected host:port or kafka://host:port")
        out.append(host_port)
    return out or None


class Gc(_Strict):
    """Python's garbage collector in the worker process.

    The hot path allocates a few dozen short-lived containers per event; with Python's default
    generation-0 threshold (700) the collector runs every ~20 events and walks the in-flight
    batches and the young heap each time: ~30 % of the worker's CPU with a fast engine
    (``bench/pipeline.py``, docs/BENCHMARKS.md). Reference counting frees almost all of it; the
    collector is only for cycles."""

    gen0_threshold: Annotated[int, Field(ge=0)] = 50_000
    """Allocations (net) between young-generation collections; 0 keeps Python's default (700).
    Cyclic garbage waits at most this many allocations: a few MB."""
    freeze: bool = True
    """After start-up (engine loaded, Kafka clients started) move every object alive to the
    permanent generation (``gc.freeze``): full collections no longer walk the engine's and the
    libraries' objects."""


class StreamConfig(_Strict):
    broker: list[str] | None = None
    """Broker URL(s): ``kafka://h1:9092;kafka://h2:9092``, ``h1:9092,h2:9092`` or a list.
    Unset: ``kafka://127.0.0.1:9092`` if it answers, else the embedded broker."""
    security: Security = Field(default_factory=Security)
    group_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,200}$")] = "rsafe-guard"
    """Consumer group; also the Faust app id."""
    worker_id: str | None = None
    """Reported in audit records; default ``<hostname>-<pid>``."""
    static_membership: bool = True
    """Join the consumer group as a static member (Kafka ``group.instance.id``): a worker restarted
    with the same id takes its partitions back at once, without a rebalance of the whole group
    (and, on the embedded broker, at all: it never expires a dead member)."""
    group_instance_id: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = None
    """The static member id (``RSAFE_GROUP_INSTANCE_ID``); default the host name, which is the pod
    name under Kubernetes. Two workers of one group on one host must set distinct ids: a second
    worker with an id in use on this host refuses to start, and a worker fenced by another member
    with its id exits with status 5."""
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    """Where a new consumer group starts: earliest (moderate the retained history) or latest."""
    inputs: Annotated[list[InputTopic], Field(min_length=1)]
    outputs: Outputs = Field(default_factory=Outputs)
    batch: Batching = Field(default_factory=Batching)
    retry: Retry = Field(default_factory=Retry)
    audit: Audit = Field(default_factory=Audit)
    dlq: DeadLetters = Field(default_factory=DeadLetters)
    engine: EngineConfig | None = None
    """Engine settings (``rsafe.models.EngineConfig``); ``--model`` fills ``engine.model``."""
    policy_dirs: list[str] = []
    """Extra directories of policy YAML files (the bundled policies are always there)."""
    default_policy: str = "rsafe-default"
    policy_reload: PolicyReload = Field(default_factory=PolicyReload)
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    """exactly_once: verdict, audit and DLQ records and the input offsets commit in one Kafka
    transaction per input partition (consumers read with ``isolation_level=read_committed``)."""
    create_topics: bool = True
    """Create missing input and output topics at start (the audit topic compacted)."""
    max_event_bytes: Annotated[int, Field(gt=0)] = 256_000
    """Events larger than this go to the DLQ (``too_large``, first ``max_event_bytes`` kept) without
    being parsed. Keep it under a third of the broker's ``message.max.bytes``: the audit record
    carries the content next to the reasoning."""
    commit_interval_s: Annotated[float, Field(gt=0)] = 2.0
    shutdown_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    embedded_broker: EmbeddedBroker = Field(default_factory=EmbeddedBroker)
    feedback: Feedback = Field(default_factory=Feedback)
    health: EngineHealth = Field(default_factory=EngineHealth)
    http: Http = Field(default_factory=Http)
    telemetry: Telemetry = Field(default_factory=Telemetry)
    models: Models = Field(default_factory=Models)
    faults: Faults = Field(default_factory=Faults)
    gc: Gc = Field(default_factory=Gc)

    @field_validator("broker", mode="before")
    @classmethod
    def _parse_broker(cls, value: Any) -> Any:
        return parse_brokers(value) if isinstance(value, (str, list)) else value

    @model_validator(mode="after")
    def _check(self) -> StreamConfig:
        topics = [t.topic for t in self.inputs]
        dupes = sorted({t for t in topics if topics.count(t) > 1})
        if dupes:
            raise ValueError(f"inputs: topic {dupes[0]!r} is listed twice")
        outputs = {self.outputs.audit_topic, self.outputs.dlq_topic, self.outputs.policies_topic,
                   self.models.control_topic, self.feedback.review_topic, *self.verdict_topics().values()}
        if self.feedback.enabled:
            fb = self.feedback
            outputs |= {fb.trusted_topic, fb.reports_topic, fb.disagreements_topic}
        clash = outputs & set(topics)
        if clash:
            raise ValueError(f"inputs: topic {sorted(clash)[0]!r} is also an output topic")
        if self.audit.content != "full":
            for t in self.inputs:
                if t.context.enabled and not t.context.store_text:
                    raise ValueError(
                        f"inputs: topic {t.topic!r}: context.enabled keeps message text in a table and its "
                        f"changelog topic, which audit.content {self.audit.content!r} promises not to store: "
                        "set context.store_text: true to accept that (docs/STREAM.md, 'Conversation context', "
                        "says what is stored, where and for how long), or turn context off")
        if self.processing_guarantee == "exactly_once":
            # One open transaction per input partition: a second batch in flight would publish
            # into the transaction that commits the first one's offsets.
            if "max_inflight" in self.batch.model_fields_set and self.batch.max_inflight != 1:
                raise ValueError(f"batch.max_inflight: {self.batch.max_inflight} is not possible with "
                                 "processing_guarantee exactly_once (one open transaction per input "
                                 "partition); remove it (the default is 1 under exactly_once) or set 1")
            self.batch = self.batch.model_copy(update={"max_inflight": 1})
        return self

    # ------------------------------------------------------------------ derived

    @property
    def dlq_content(self) -> Literal["full", "redacted"]:
        """``dlq.content``, or what the audit mode implies (full → full, else redacted)."""
        if self.dlq.content is not None:
            return self.dlq.content
        return "full" if self.audit.content == "full" else "redacted"

    def verdicts_topic(self, inp: InputTopic) -> str:
        return inp.verdicts_topic or f"{inp.topic}{self.outputs.verdicts_suffix}"

    def verdict_topics(self) -> dict[str, str]:
        return {t.topic: self.verdicts_topic(t) for t in self.inputs}

    def input(self, topic: str) -> InputTopic:
        for t in self.inputs:
            if t.topic == topic:
                return t
        raise KeyError(topic)

    @property
    def bootstrap(self) -> list[str]:
        """``host:port`` list (for aiokafka / kafka-python)."""
        return list(self.broker or [DEFAULT_BROKER.split("://", 1)[1]])

    @property
    def faust_broker(self) -> str:
        return ";".join(f"kafka://{b}" for b in self.bootstrap)

    @property
    def resolved_worker_id(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def resolved_group_instance_id(self) -> str | None:
        """The static member id, or None without static membership."""
        if not self.static_membership:
            return None
        return self.group_instance_id or socket.gethostname()

    @property
    def stream_buffer(self) -> int:
        return self.batch.intake_size


# --------------------------------------------------------------------------- loading


def _set_path(data: dict, path: list[str], value: Any) -> None:
    node = data
    for key in path[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[path[-1]] = value


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """``RSAFE_*`` variables that name a config field, as a nested dict."""
    fields = set(StreamConfig.model_fields)
    out: dict[str, Any] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if path[0] not in fields:
            continue
        raw = env[name]
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if path == ["broker"] and value is not None:
            value = str(raw)
        _set_path(out, path, value)
    return out


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _format(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in err.errors())


def load_config(path: str | Path | None = None, *, data: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> StreamConfig:
    """YAML file (or ``data``) ← environment (``RSAFE_*``) ← ``overrides`` (CLI flags)."""
    source = str(path) if path else "<config>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"{source}: cannot read config: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the config must be a mapping, got {type(loaded).__name__}")
        raw = loaded or {}
    if data is not None:
        raw = _merge(raw, data)
    raw = _merge(raw, env_overrides(os.environ if env is None else env))
    if overrides:
        raw = _merge(raw, overrides)
    try:
        return StreamConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format(err)}") from None
