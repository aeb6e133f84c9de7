"""Stream worker pieces without a broker or a model: config, wire schemas, routing, records, pipeline.

The engine stand-ins here are tiny backends that fail or return fixed text; the integration tests
(test_stream_e2e.py) run the real broker, worker and engine.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from rsafe.models.engines import Completion, EngineError
from rsafe.models.guard import Guard
from rsafe.policies import PolicyRegistry
from rsafe.stream.config import ConfigError, OnError, load_config
from rsafe.stream.moderate import Incoming, Moderator, Outcome, OutRecord, summarize
from rsafe.stream.pipeline import BatchPipeline, LeftForRedelivery
from rsafe.schemas.records import DLQReason, SourceRef, sha256_text
from rsafe.stream.records import Rejected, decode_event
from rsafe.stream.telemetry import Telemetry

STREAM = Path(__file__).resolve().parents[1] / "stream"

BASE = {
    "broker": "127.0.0.1:1",
    "inputs": [
        {"topic": "chat.general", "policy": "rsafe-default", "allow_policy_override": True},
        {"topic": "chat.kids", "policy": "kids-platform", "on_error": "unsafe"},
        {"topic": "chat.answers", "policy": "rsafe-default", "level": "response", "on_error": "fail_open"},
    ],
    "retry": {"attempts": 2, "backoff_ms": 0},
}


def cfg_of(**over):
    data = json.loads(json.dumps(BASE))
    data.update(over)
    return load_config(data=data, env={})


# --------------------------------------------------------------------------- config


def test_bundled_demo_config_and_env_overrides():
    env = {"RSAFE_BROKER": "kafka://k1:9092;kafka://k2:9093", "RSAFE_BATCH__SIZE": "8",
           "RSAFE_GROUP_ID": "g2", "RSAFE_DEMO_MODEL": "ignored: not a config field"}
    cfg = load_config(STREAM / "demo.yaml", env=env)
    assert cfg.bootstrap == ["k1:9092", "k2:9093"]
    assert cfg.faust_broker == "kafka://k1:9092;kafka://k2:9093"
    assert cfg.batch.size == 8 and cfg.group_id == "g2"
    assert [t.topic for t in cfg.inputs] == ["chat.general", "chat.kids"]
    assert {t.policy for t in cfg.inputs} == {"rsafe-default", "kids-platform"}
    assert cfg.verdict_topics() == {"chat.general": "chat.general.verdicts", "chat.kids": "chat.kids.verdicts"}
    assert cfg.outputs.audit_topic == "rsafe.audit" and cfg.outputs.dlq_topic == "rsafe.dlq"
    assert cfg.engine.generation.max_tokens == 128
    # flags win over the environment
    assert load_config(STREAM / "demo.yaml", env=env, overrides={"broker": "h:1"}).bootstrap == ["h:1"]


@pytest.mark.parametrize("over, needle", [
    ({"inputs": []}, "inputs"),
    ({"batch": {"size": 0}}, "batch.size"),
    ({"broker": "no-port"}, "host:port"),
    ({"inputs": [{"topic": "a", "policy": "p", "on_error": "maybe"}]}, "on_error"),
    ({"inputs": [{"topic": "a", "policy": "p"}, {"topic": "a", "policy": "p"}]}, "listed twice"),
    ({"inputs": [{"topic": "rsafe.audit", "policy": "p"}]}, "output topic"),
    ({"security": {"protocol": "SASL_SSL"}}, "sasl_password"),
    ({"surprise": 1}, "surprise"),
])
def test_config_errors_name_the_field(over, needle):
    with pytest.raises(ConfigError, match=needle):
        cfg_of(**over)


def test_config_defaults_and_aliases(tmp_path):
    cfg = cfg_of()
    assert cfg.inputs[1].on_error == OnError.UNSAFE and cfg.inputs[2].on_error == OnError.SAFE
    assert cfg.inputs[0].on_error == OnError.ERROR  # the default
    assert cfg.stream_buffer == 2 * cfg.batch.size
    assert cfg_of(processing_guarantee="exactly_once").batch.max_inflight == 1
    sasl = cfg_of(security={"protocol": "SASL_PLAINTEXT", "sasl_username": "u", "sasl_password": "p",
                            "sasl_mechanism": "SCRAM-SHA-256"}).security
    assert sasl.client_kwargs() == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256",
                                    "sasl_plain_username": "u", "sasl_plain_password": "p"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, env={})


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("raw, reason", [
    (None, DLQReason.EMPTY),
    (b"  ", DLQReason.EMPTY),
    (b"x" * 101, DLQReason.TOO_LARGE),
    (b"{not json", DLQReason.NOT_JSON),
    (b"\xff\xfe{}", DLQReason.NOT_JSON),
    (b'["a"]', DLQReason.SCHEMA),
    (b'{"prompt": "hi"}', DLQReason.SCHEMA),
    (b'{"id": "", "prompt": "hi"}', DLQReason.SCHEMA),
    (b'{"id": "a", "prompt": 3}', DLQReason.SCHEMA),
    (b'{"id": "a", "prompt": "hi", "created_at": "yesterday"}', DLQReason.SCHEMA),
])
def test_decode_rejects_with_reason(raw, reason):
    with pytest.raises(Rejected) as exc:
        decode_event(raw, max_bytes=100)
    assert exc.value.reason == reason


def test_decode_accepts_and_ignores_unknown_fields():
    e = decode_event(b'{"id": 7, "prompt": "hi", "conversation_id": 9, "new_field": 1, '
                     b'"created_at": "2026-01-02T03:04:05Z", "metadata": {"a": 1}}', max_bytes=1000)
    assert (e.id, e.conversation_id, e.response, e.metadata) == ("7", "9", None, {"a": 1})
    assert e.created_at.year == 2026


# --------------------------------------------------------------------------- routing and records


class NoEngine:
    """A backend whose engine is down: every call fails."""

    model_id = "no-engine"

    def __init__(self):
        self.calls = 0

    async def agenerate(self, user_turns, gen, adapters):
        self.calls += 1
        raise EngineError("engine unavailable")

    def close(self):
        pass


class FixedAnswer:
    """A backend that answers every request with the same RSafe-format text."""

    model_id = "fixed"

    def __init__(self, label="unsafe"):
        self.text = f"<think>\nThe user asks for help with weapons. This falls under U2.\n</think>\n\\boxed{{{label}}}"

    async def agenerate(self, user_turns, gen, adapters):
        return [Completion(text=self.text, prompt=f"<rendered>{t}", finish_reason="stop") for t in user_turns]

    def close(self):
        pass


def inc(topic, value, offset=0, key=None):
    raw = value if isinstance(value, bytes) or value is None else json.dumps(value).encode()
    return Incoming(value=raw, key=key, source=SourceRef(topic=topic, partition=0, offset=offset))


TEST_HASH_KEY = "k" * 40
"""``RSAFE_AUDIT_HASH_KEY`` of the tests' ``audit.content: hash`` moderators."""


def moderator(backend, **over):
    from rsafe.stream.redaction import ContentHasher

    cfg = cfg_of(**over)
    guard = Guard(backend, policies=PolicyRegistry.from_dirs(),
                  **({"limits": cfg.engine.limits} if cfg.engine else {}))
    hasher = ContentHasher.from_env({"RSAFE_AUDIT_HASH_KEY": TEST_HASH_KEY}) if cfg.audit.content == "hash" else None
    return Moderator(cfg, guard, worker_id="w-test", telemetry=Telemetry("w-test"), model_version="m123",
                     hasher=hasher)


def run(coro):
    return asyncio.run(coro)


def test_routing_dead_letters_what_cannot_be_moderated():
    m = moderator(NoEngine(), engine={"model": "x", "limits": {"max_chars": 20, "on_oversize": "reject"}})
    batch = [
        inc("chat.kids", {"id": "k1", "prompt": "hi", "policy": "rsafe-default"}, 1),
        inc("chat.general", {"id": "g1", "prompt": "hi", "policy": "nope"}, 2),
        inc("chat.answers", {"id": "a1", "prompt": "hi"}, 3),
        inc("chat.general", {"id": "g2", "prompt": "x" * 21}, 4),
        inc("chat.general", {"id": "g3", "prompt": "\t"}, 5),
        inc("chat.general", b"\x00garbage", 6, key=b"conv-9"),
    ]
    out = run(m.moderate(batch))
    # over the size limit: a verdict (the topic's on_error) as well as the DLQ record (tests/test_oversize.py)
    assert [o.kind for o in out] == ["dlq", "dlq", "dlq", "verdict", "dlq", "dlq"]
    assert out[3].verdict.error_reason == "too_large" and out[3].verdict.fallback
    reasons = [o.dlq.reason for o in out]
    assert reasons == [DLQReason.POLICY_OVERRIDE_DISABLED, DLQReason.UNKNOWN_POLICY, DLQReason.SCHEMA,
                       DLQReason.TOO_LARGE, DLQReason.INVALID_CONTENT, DLQReason.NOT_JSON]
    last = out[-1]
    assert base64.b64decode(last.dlq.original_b64) == b"\x00garbage" and last.records[0].key == b"conv-9"
    assert last.records[0].topic == "rsafe.dlq" and last.dlq.source.offset == 6
    assert [o.dlq.event_id for o in out[:5]] == ["k1", "g1", "a1", "g2", "g3"]


def test_dead_engine_raises_engine_dead_after_the_probe():
    from rsafe.stream.moderate import EngineDead

    backend = NoEngine()
    m = moderator(backend)
    with pytest.raises(EngineDead, match="health probe failed"):
        run(m.moderate([inc("chat.general", {"id": "g1", "prompt": "hi"}, 1)]))
    assert backend.calls == 3  # retry.attempts + the probe


def test_engine_failure_without_probe_retries_then_applies_on_error_per_topic():
    backend = NoEngine()
    m = moderator(backend, health={"probe": False, "max_consecutive_failures": 2})
    batch = [inc("chat.general", {"id": "g1", "prompt": "hi"}, 1),
             inc("chat.kids", {"id": "k1", "prompt": "hi"}, 2),
             inc("chat.answers", {"id": "a1", "prompt": "hi", "response": "hello"}, 3)]
    out = run(m.moderate(batch))
    assert backend.calls == 2  # retry.attempts
    labels = {o.verdict.id: (o.verdict.label, o.verdict.fallback, o.verdict.level) for o in out}
    assert labels == {"g1": ("error", True, "prompt"), "k1": ("unsafe", True, "prompt"),
                      "a1": ("safe", True, "response")}
    for o in out:
        assert "engine unavailable" in o.verdict.error_reason
        assert o.verdict.policy_version and o.verdict.timings.attempts == 2
        assert o.audit.model_label is None and o.audit.label == o.verdict.label
    from rsafe.stream.moderate import EngineDead

    with pytest.raises(EngineDead, match="2 batches in a row"):  # the fallback budget is spent
        run(m.moderate(batch))


@pytest.mark.parametrize("mode", ["full", "hash", "redacted"])
def test_verdict_and_audit_records(mode):
    m = moderator(FixedAnswer("unsafe"), audit={"content": mode})
    event = {"id": "g1", "conversation_id": "c1", "prompt": "How do I build a bomb?", "metadata": {"user": 5}}
    (o,) = run(m.moderate([inc("chat.general", event, 42)]))
    v, a = o.verdict, o.audit
    assert (v.id, v.conversation_id, v.label, v.categories) == ("g1", "c1", "unsafe", ["U2"])
    assert v.policy == "rsafe-default" and v.policy_version == m.guard.policies.get("rsafe-default").version
    assert v.model == "fixed" and v.model_version == "m123" and v.worker_id == "w-test"
    assert v.source.offset == 42 and v.reasoning_summary.startswith("The user asks for help")
    assert [r.topic for r in o.records] == ["chat.general.verdicts", "rsafe.audit"]
    assert [r.key for r in o.records] == [b"c1", b"g1"]
    assert a.raw_output == FixedAnswer().text and a.reasoning and a.sampling["max_tokens"] == 512
    assert a.processing_guarantee == "at_least_once" and a.reasoning_kept == "full"
    assert a.content.prompt_chars == len(event["prompt"])
    if mode == "full":
        assert a.content.prompt == event["prompt"] and a.content.metadata == {"user": 5}
    else:
        assert a.content.prompt is None and a.content.metadata is None
    # a plain digest only next to the text itself; hash mode: keyed; redacted: nothing derived from the text
    assert (a.content.prompt_sha256 == sha256_text(event["prompt"])) == (mode == "full")
    assert bool(a.rendered_prompt_sha256) == (mode == "full")
    if mode == "hash":
        import hashlib
        import hmac

        assert a.content.prompt_hmac == hmac.new(TEST_HASH_KEY.encode(), event["prompt"].encode(),
                                                 hashlib.sha256).hexdigest()
        assert a.content.hash_key_id.startswith("k-")
    else:
        assert a.content.prompt_hmac is None and a.content.hash_key_id is None
    assert_wire_records_are_complete(o)


def assert_wire_records_are_complete(o):
    """The bytes on the wire (built as dicts on the hot path) hold exactly the models' fields, with
    the values the models write (so a consumer validating them with pydantic reads the same)."""
    from rsafe.schemas.records import AuditRecord, VerdictRecord
    from rsafe.stream.records import dumps

    for record, model in zip(o.records, (VerdictRecord, AuditRecord)):
        wire = json.loads(record.value)
        assert list(wire) == list(model.model_fields)
        assert json.loads(dumps(model.model_validate(wire))) == wire


def test_wire_records_of_fallbacks_and_odd_text():
    m = moderator(NoEngine(), health={"probe": False, "max_consecutive_failures": 99})
    (o,) = run(m.moderate([inc("chat.kids", {"id": 7, "prompt": "hi", "created_at": "2026-01-02T03:04:05+02:00"}, 1)]))
    assert o.verdict_fields["fallback"] and o.verdict.label == "unsafe"
    assert_wire_records_are_complete(o)
    assert json.loads(o.records[1].value)["event_created_at"] == "2026-01-02T03:04:05+02:00"
    m = moderator(FixedAnswer("safe"), audit={"content": "full"})
    (o,) = run(m.moderate([inc("chat.general", {"id": "s1", "prompt": "é, \u2028", "metadata": {"note": "lone \ud800"}}, 2)]))
    assert_wire_records_are_complete(o)
    content = json.loads(o.records[1].value)["content"]  # metadata is not checked by the guard: \\u-escaped
    assert content["prompt"] == "é, \u2028" and content["metadata"] == {"note": "lone \ud800"}


def test_policy_override_and_levels():
    m = moderator(FixedAnswer("safe"))
    out = run(m.moderate([
        inc("chat.general", {"id": "g1", "prompt": "hi", "policy": "financial-advice"}, 1),
        inc("chat.general", {"id": "g2", "prompt": "hi", "response": "hello"}, 2),
        inc("chat.answers", {"id": "a1", "prompt": "hi", "response": "hello"}, 3),
    ]))
    assert [o.verdict.policy for o in out] == ["financial-advice", "rsafe-default", "rsafe-default"]
    assert [o.verdict.level for o in out] == ["prompt", "response", "response"]
    assert all(o.verdict.label == "safe" and not o.verdict.fallback for o in out)


def test_summarize():
    assert summarize(None, 10) is None and summarize("abc", 0) is None
    assert summarize("  a\n b  ", 10) == "a b"
    assert summarize("one two three four", 9) == "one two…"


# --------------------------------------------------------------------------- pipeline


class MemorySink:
    def __init__(self, fail_first=0, delays=None):
        self.fail_first = fail_first
        self.written: list[str] = []
        self.delays = delays or {}

    async def write(self, outcomes):
        if self.fail_first:
            self.fail_first -= 1
            raise ConnectionError("broker away")
        self.written += [o.incoming.source.topic + ":" + str(o.incoming.source.offset) for o in outcomes]


class SlowFirstModerator:
    """Batch 0 takes longer than batch 1: publishing must still follow submission order."""

    def __init__(self):
        self.n = 0

    async def moderate(self, batch):
        self.n += 1
        await asyncio.sleep(0.2 if self.n == 1 else 0)
        return [Outcome(i, "verdict", [OutRecord("t", None, b"{}")]) for i in batch]


def test_pipeline_publishes_in_order_and_acks_only_after_publish():
    async def scenario():
        sink = MemorySink(fail_first=1)
        acked: list[str] = []

        async def ack(i):
            key = f"{i.source.topic}:{i.source.offset}"
            assert key in sink.written, "acked before its records were published"
            acked.append(key)

        t = Telemetry("w")
        p = BatchPipeline(SlowFirstModerator(), sink, ack, max_inflight=2, telemetry=t, publish_backoff_s=0.01)
        await p.submit([inc("a", None, 0), inc("a", None, 1)])
        await p.submit([inc("a", None, 2)])
        await p.drain()
        return sink.written, acked, t.snapshot()

    written, acked, stats = run(scenario())
    assert written == ["a:0", "a:1", "a:2"] and acked == written
    assert stats["publish_failures"] == 1 and stats["max_inflight_batches"] == 2


class FirstBatchFails(SlowFirstModerator):
    """Batch 0 is slow and then fails (left for redelivery); the later batches succeed."""

    async def moderate(self, batch):
        first = self.n == 0
        out = await super().moderate(batch)
        if first:
            raise LeftForRedelivery("the engine failed during shutdown")
        return out


def test_a_batch_left_unacked_holds_back_later_acks_of_its_partitions():
    """Faust commits the first run of consecutive acked offsets: acking a:2 after a:1 was left
    unacked would commit past a:1 and lose it. Later offsets of *that* partition stay unacked
    (redelivered with the hole); other partitions are acked as usual."""

    async def scenario():
        acked: list[str] = []

        async def ack(i):
            acked.append(f"{i.source.topic}:{i.source.offset}")

        p = BatchPipeline(FirstBatchFails(), MemorySink(), ack, max_inflight=2, telemetry=Telemetry("w"))
        await p.submit([inc("a", None, 0), inc("a", None, 1)])  # fails
        await p.submit([inc("a", None, 2), inc("b", None, 0)])  # published; a:2 must not be acked
        await p.drain()
        held = list(acked)
        p.partitions_reassigned([("a", 0)])  # a rebalance redelivers a from its committed offset
        await p.submit([inc("a", None, 0)])
        await p.drain()
        return held, acked

    held, acked = run(scenario())
    assert held == ["b:0"]
    assert acked == ["b:0", "a:0"]


def test_pipeline_bounds_inflight_batches():
    async def scenario():
        t = Telemetry("w")
        p = BatchPipeline(SlowFirstModerator(), MemorySink(), lambda i: asyncio.sleep(0), max_inflight=1,
                          telemetry=t)
        for k in range(4):
            await p.submit([inc("a", None, k)])
            assert p.inflight <= 1
        await p.drain()
        return t.snapshot()

    assert run(scenario())["max_inflight_batches"] == 1


# --------------------------------------------------------------------------- bundled samples, CLI


def test_bundled_samples_cover_both_topics_levels_and_malformed():
    from rsafe.stream.clients import read_messages

    msgs = read_messages(STREAM / "samples" / "demo_events.jsonl", envelope=True)
    assert 40 <= len(msgs) <= 60
    assert {m.topic for m in msgs} == {"chat.general", "chat.kids"}
    events, bad = [], 0
    for m in msgs:
        try:
            events.append(decode_event(m.value, max_bytes=100_000))
        except Rejected:
            bad += 1
    assert bad >= 3
    assert any(e.response for e in events) and any(e.response is None for e in events)
    assert {e.metadata["expected"] for e in events if "expected" in e.metadata} == {"safe", "unsafe"}
    assert len({e.id for e in events}) == len(events)


def test_cli_commands_are_registered():
    from rsafe.cli import build_parser

    parser = build_parser()
    for argv in (["broker", "--port", "1"], ["worker", "-c", "x.yaml"], ["produce", "f.jsonl", "--topic", "t"],
                 ["tail", "t1", "t2"], ["demo", "--model", "m"]):
        assert callable(parser.parse_args(argv).func)


def test_documented_examples_match_the_schemas():
    import re

    from rsafe.schemas.models import ModelControlRecord
    from rsafe.schemas.records import AuditRecord, ChatEvent, DLQRecord, VerdictRecord

    doc = (Path(__file__).resolve().parents[1] / "docs" / "STREAM.md").read_text()
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", doc, re.DOTALL)]
    models = [ChatEvent, VerdictRecord, AuditRecord, DLQRecord, ModelControlRecord]
    assert len(blocks) == len(models)
    for model, block in zip(models, blocks, strict=True):
        parsed = model.model_validate(block)
        if model is not ChatEvent:  # output examples show every field
            assert set(block) == set(model.model_fields), model.__name__
        assert parsed is not None
    dlq = DLQRecord.model_validate(blocks[3])
    assert len(dlq.original()) == dlq.original_bytes


def test_policy_watcher_reloads_changed_files_and_rejects_bad_ones(tmp_path):
    import yaml

    from rsafe.stream.policy_watch import PolicyWatcher, load_registry

    policy = {"name": "house", "categories": [{"code": "H1", "name": "Spam"}]}
    (tmp_path / "house.yaml").write_text(yaml.safe_dump(policy))
    cfg = cfg_of(policy_dirs=[str(tmp_path)], policy_reload={"interval_s": 0.05},
                 inputs=[{"topic": "t", "policy": "house"}])
    guard = Guard(NoEngine(), policies=load_registry(cfg))
    v1 = guard.policies.get("house").version

    async def scenario():
        watcher = PolicyWatcher(cfg, guard)
        task = asyncio.create_task(watcher.run())
        policy["unsafe_threshold"] = 0.8
        (tmp_path / "house.yaml").write_text(yaml.safe_dump(policy))
        for _ in range(100):
            if watcher.reloads:
                break
            await asyncio.sleep(0.02)
        v2 = guard.policies.get("house").version
        (tmp_path / "house.yaml").write_text("name: house\ncategories: []\n")  # invalid: rejected
        watcher.request_reload()
        await asyncio.sleep(0.3)
        task.cancel()
        return watcher.reloads, v2, guard.policies.get("house").version

    reloads, v2, v3 = run(scenario())
    assert reloads == 1 and v2 != v1 and v3 == v2


def test_the_app_delivers_fetched_batches_with_the_worker_consumer(tmp_path):
    """The worker's Faust app uses ``BatchDeliveryConsumer`` (one delivery task per fetched batch);
    it overrides Faust's ``_drain_messages``, so a Faust upgrade that renames it must fail here."""
    import faust.transport.consumer

    from rsafe.stream.app import build_app
    from rsafe.stream.compat.consumer import BatchDeliveryConsumer

    assert callable(getattr(faust.transport.consumer.Consumer, "_drain_messages", None))
    app = build_app(cfg_of(broker=["127.0.0.1:9"]), datadir=str(tmp_path))
    assert app.transport.Consumer is BatchDeliveryConsumer
    assert isinstance(app.consumer, BatchDeliveryConsumer)  # what the app builds (not started here)
    # exactly_once: the consumer, built early (the intake is attached to it), runs transactions
    eos = build_app(cfg_of(broker=["127.0.0.1:9"], processing_guarantee="exactly_once"), datadir=str(tmp_path))
    assert eos.consumer.in_transaction and not app.consumer.in_transaction


# --------------------------------------------------------------------------- intake


def test_intake_yields_full_batches_at_once_and_a_partial_one_after_linger():
    from rsafe.stream.intake import Intake

    async def scenario():
        intake: Intake[int] = Intake(maxsize=100)
        await intake.put_many(range(10))
        batches = intake.take(4, within=0.2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        full = [await batches.__anext__(), await batches.__anext__()]
        fast = loop.time() - t0
        t0 = loop.time()
        partial = await batches.__anext__()  # 2 left: waits for more until the linger ends
        slow = loop.time() - t0
        await batches.aclose()
        return full, fast, partial, slow

    full, fast, partial, slow = run(scenario())
    assert full == [[0, 1, 2, 3], [4, 5, 6, 7]] and fast < 0.05
    assert partial == [8, 9] and slow >= 0.15


def test_intake_delivery_waits_while_full_and_clear_drops_what_was_not_taken():
    from rsafe.stream.intake import Intake

    async def scenario():
        intake: Intake[int] = Intake(maxsize=3)
        await intake.put_many([1, 2, 3])
        blocked = asyncio.ensure_future(intake.put_many([4, 5]))
        await asyncio.sleep(0.05)
        was_blocked = not blocked.done()
        batches = intake.take(2, within=0.01)
        first = await batches.__anext__()  # frees room: the waiting delivery goes in
        await asyncio.wait_for(blocked, 1)
        after_put = len(intake)
        intake.clear()  # partitions revoked: the rest is fetched again
        await intake.put_many([9])
        second = await batches.__anext__()
        await batches.aclose()
        return was_blocked, first, after_put, second, intake.full_waits

    was_blocked, first, after_put, second, waits = run(scenario())
    assert was_blocked and first == [1, 2] and after_put == 3 and second == [9] and waits == 1


def test_gc_tuning_raises_the_young_threshold_and_freezes_the_startup_heap():
    import gc

    from rsafe.stream.config import Gc
    from rsafe.stream.worker import tune_gc, untune_gc

    before = gc.get_threshold()
    saved = tune_gc(Gc(gen0_threshold=12_345, freeze=True))
    try:
        assert saved == before and gc.get_threshold()[0] == 12_345 and gc.get_freeze_count() > 0
    finally:
        untune_gc(saved)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    assert cfg_of().gc.gen0_threshold == 50_000 and cfg_of().gc.freeze


def test_intake_never_holds_more_than_maxsize_of_a_large_fetched_batch():
    from rsafe.stream.intake import Intake

    async def scenario():
        intake: Intake[int] = Intake(maxsize=4)
        put = asyncio.ensure_future(intake.put_many(list(range(10))))
        await asyncio.sleep(0.02)
        held, taken = [len(intake)], []
        async for batch in intake.take(3, within=0.01):
            taken += batch
            await asyncio.sleep(0.01)
            held.append(len(intake))
            if len(taken) == 10:
                break
        await put
        return held, taken, intake.full_waits

    held, taken, waits = run(scenario())
    assert max(held) <= 4 and taken == list(range(10)) and waits >= 2
