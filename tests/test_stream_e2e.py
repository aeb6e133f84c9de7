"""The streaming worker end to end: real embedded broker, real worker, real vLLM engine on the demo model.

Engine starts are the cost here (30-60 s each on a 2-core CPU), so: one worker *subprocess*
(``rsafe worker``, stopped with SIGTERM) and otherwise in-process workers that share the session's
``vllm_guard`` engine.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml

from rsafe.policies import PolicyRegistry
from rsafe.stream.broker import EmbeddedBroker, ensure_topics
from rsafe.stream.clients import Message, committed_offsets, end_offsets, produce, read_all
from streamkit import ENGINE_STALL_S, STALL_S, caught_up, own, wait_progress
from rsafe.stream.config import load_config
from rsafe.stream.worker import GuardWorker, serve, topic_specs

pytestmark = pytest.mark.slow

MARKER = "__RSAFE_FAIL__"
"""Crashes the engine for any batch holding it (a poison event: isolated and dead-lettered)."""
ERR_MARKER = "__RSAFE_BAD_REQUEST__"
"""A per-request engine error (the topic's on_error verdict)."""
POLICIES = PolicyRegistry.from_dirs()
VERSION = {name: POLICIES.get(name).version for name in POLICIES.names()}


@pytest.fixture(scope="module")
def kafka(tmp_path_factory):
    with EmbeddedBroker(tmp_path_factory.mktemp("broker"), port=0) as broker:
        yield broker.bootstrap


def engine_section(model_dir: Path) -> dict:
    """The demo engine (machine defaults from ``local_engine_config``)."""
    return {"backend": "vllm", "model": str(model_dir), "model_id": "rsafe-demo", "generation": {"max_tokens": 128},
            "limits": {"max_window_tokens": 128}}


def stream_config(bootstrap: str, prefix: str, model_dir: Path, **over) -> dict:
    cfg = {
        "broker": bootstrap,
        "group_id": f"{prefix}-group",
        "inputs": [
            {"topic": f"{prefix}.general", "policy": "rsafe-default", "allow_policy_override": True,
             "on_error": "error", "partitions": 3},
            {"topic": f"{prefix}.kids", "policy": "kids-platform", "on_error": "unsafe", "partitions": 2},
        ],
        "outputs": {"audit_topic": f"{prefix}.audit", "dlq_topic": f"{prefix}.dlq",
                    "policies_topic": f"{prefix}.policies", "partitions": 2},
        "batch": {"size": 8, "linger_ms": 50, "max_inflight": 2},
        "retry": {"attempts": 2, "backoff_ms": 20},
        "audit": {"content": "hash"},
        "dlq": {"content": "full"},
        "engine": engine_section(model_dir),
        "policy_reload": {"watch": False},
        "faults": {"engine_fail_marker": MARKER, "request_error_marker": ERR_MARKER},
        "commit_interval_s": 0.5,
        "http": {"port": 0},
    }
    cfg.update(over)
    if cfg.get("processing_guarantee") == "exactly_once":
        cfg["batch"] = {"size": 8, "linger_ms": 50}  # one open transaction per partition: in-flight 1
    return cfg


def make_events(prefix: str, n_valid: int, seed: int) -> tuple[list[Message], dict[str, dict], list[Message]]:
    """Valid events over two topics (a few with the failure marker) + malformed messages."""
    from rsafe.demo.corpus import synthetic_examples

    general, kids = f"{prefix}.general", f"{prefix}.kids"
    msgs, meta = [], {}
    for i, ex in enumerate(synthetic_examples(n_valid, seed=seed)):
        topic = kids if ex.policy == "kids-platform" else general
        event = {"id": f"{prefix}-{i:03d}", "conversation_id": f"conv-{i % 37}", "prompt": ex.prompt,
                 "created_at": "2026-11-25T12:00:00Z", "metadata": {"n": i}}
        if ex.response is not None:
            event["response"] = ex.response
        policy = ex.policy if topic == kids else "rsafe-default"
        if ex.policy == "financial-advice":
            event["policy"] = policy = "financial-advice"  # an allowed override
        if i in (15, 110):
            event["prompt"] += f" {MARKER}"
        if i in (61, 150):
            event["prompt"] += f" {ERR_MARKER}"
        meta[event["id"]] = {"topic": topic, "policy": policy, "prompt": event["prompt"],
                             "poison": MARKER in event["prompt"], "fail": ERR_MARKER in event["prompt"]}
        msgs.append(Message(topic, event["conversation_id"].encode(), json.dumps(event).encode()))
    bad = [
        Message(general, None, b"{this is not json"),
        Message(kids, None, b"\xff\xfe\x00binary"),
        Message(general, b"k", json.dumps({"conversation_id": "c", "prompt": "no id"}).encode()),
        Message(kids, None, json.dumps([1, 2, 3]).encode()),
        Message(general, None, json.dumps({"id": f"{prefix}-bad-pol", "prompt": "hi", "policy": "nope"}).encode()),
        Message(kids, None, json.dumps({"id": f"{prefix}-bad-ovr", "prompt": "hi",
                                        "policy": "rsafe-default"}).encode()),
        Message(general, None, json.dumps({"id": f"{prefix}-bad-empty", "prompt": "  "}).encode()),
        Message(kids, None, json.dumps({"id": f"{prefix}-bad-type", "prompt": ["a"]}).encode()),
        Message(general, None, b""),
        Message(kids, None, json.dumps({"id": 5.5, "prompt": "float id"}).encode()),
    ]
    return msgs, meta, bad


class Outputs:
    """Everything the worker wrote for one test's topics."""

    def __init__(self, bootstrap: str, cfg, read_committed: bool = False):
        topics = [*cfg.verdict_topics().values(), cfg.outputs.audit_topic, cfg.outputs.dlq_topic]
        self.verdicts: dict[str, list[dict]] = defaultdict(list)
        self.audit: dict[str, list[dict]] = defaultdict(list)
        self.dlq: list[dict] = []
        self.keys: dict[str, bytes] = {}
        for r in read_all([bootstrap], topics, idle_timeout_s=1.0, read_committed=read_committed):
            rec = json.loads(r.value)
            if r.topic == cfg.outputs.audit_topic:
                assert r.key == rec["event_id"].encode()
                self.audit[rec["event_id"]].append(rec)
            elif r.topic == cfg.outputs.dlq_topic:
                self.dlq.append(rec)
            else:
                assert r.topic == cfg.verdicts_topic(cfg.input(rec["source"]["topic"]))
                self.keys[rec["id"]] = r.key
                self.verdicts[rec["id"]].append(rec)

    def accounted(self) -> int:
        return len(self.verdicts) + len({(d["source"]["topic"], d["source"]["partition"], d["source"]["offset"])
                                         for d in self.dlq})


def wait_until(predicate, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


async def run_worker_until(cfg, backend, done, timeout: float = 180.0, signals: bool = False,
                           progress=None) -> tuple[int, dict]:
    """Run an in-process worker until ``done()`` (checked in a thread) is true; returns (exit code, stats).
    With ``progress`` (a count), ``timeout`` is how long the count may stand still, not a deadline."""
    worker = GuardWorker(cfg, backend=backend) if not signals else None
    holder: dict = {}
    if signals:
        task = asyncio.create_task(serve(cfg, backend=backend, on_ready=lambda w: holder.setdefault("w", w)))
    else:
        task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline and not task.done():
        if await asyncio.to_thread(done):
            break
        if progress is not None and (now := await asyncio.to_thread(progress)) != last:
            last, deadline = now, time.monotonic() + timeout
        await asyncio.sleep(0.5)
    w = holder.get("w", worker)
    if signals:
        os.kill(os.getpid(), signal.SIGTERM)  # the real signal path: serve() installed the handler
    else:
        w.request_stop()
    code = await asyncio.wait_for(task, timeout=90)
    return code, (w.stats() if w is not None else {})


# --------------------------------------------------------------------------- the main scenario


AUDIT_KEY = "e2e-audit-key-" + "0123456789abcdef" * 2
"""``RSAFE_AUDIT_HASH_KEY`` of this module's workers (``audit.content: hash`` needs one)."""


@pytest.fixture(autouse=True)
def _audit_hash_key(monkeypatch):
    """Every worker here, in a process or in-process, hashes audit content with ``AUDIT_KEY``."""
    monkeypatch.setenv("RSAFE_AUDIT_HASH_KEY", AUDIT_KEY)


def test_two_topics_dlq_engine_failure_sigterm_and_restart(kafka, tmp_path, demo_model_dir, vllm_guard):
    """200 events over two topics/policies → one verdict per id (after dedup) with the topic's policy
    version and one audit record; malformed ones in the DLQ; a poison batch is split and its poison
    events dead-lettered (``engine_crash``) while the rest are judged; a per-request engine error
    becomes the topic's on_error verdict; SIGTERM mid-stream and restart lose nothing."""
    prefix = f"e2e{uuid.uuid4().hex[:6]}"
    raw = stream_config(kafka, prefix, demo_model_dir)
    cfg_path = tmp_path / "worker.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path, env={})
    ensure_topics([kafka], topic_specs(cfg))
    msgs, meta, bad = make_events(prefix, 190, seed=11)
    first, second = msgs[:120] + bad[:5], msgs[120:] + bad[5:]
    produce([kafka], first)

    # 1. A worker process; SIGTERM once it is moderating.
    log_path = tmp_path / "worker1.log"
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rsafe.cli", "worker", "-c", str(cfg_path),
                                 "--log-level", "INFO"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_progress(lambda: len(Outputs(kafka, cfg).verdicts), 24, stall_s=ENGINE_STALL_S, interval=0.5,
                      what="verdicts", alive=[proc], log=log_path)  # quiet while vLLM starts
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert rc == 0, text[-3000:]
    assert "stopping: no more fetching" in text and "stopped in" in text
    stats1 = json.loads(text.split("stats ", 1)[1].splitlines()[0])
    print("worker 1:", [ln for ln in text.splitlines() if "rsafe.stream.worker" in ln])

    # Offsets are committed only for published work: below each committed offset, every input
    # message has its verdict or DLQ record already.
    out1 = Outputs(kafka, cfg)
    inputs = [t.topic for t in cfg.inputs]
    committed = committed_offsets([kafka], cfg.group_id, inputs)
    done_offsets = {(v[0]["source"]["topic"], v[0]["source"]["partition"], v[0]["source"]["offset"])
                    for v in out1.verdicts.values()}
    done_offsets |= {(d["source"]["topic"], d["source"]["partition"], d["source"]["offset"]) for d in out1.dlq}
    for (topic, part), off in committed.items():
        for o in range(off or 0):
            assert (topic, part, o) in done_offsets, f"{topic}[{part}]@{o} committed but not published"
    assert sum(o or 0 for o in committed.values()) > 0 and stats1["verdicts"] > 0

    # 2. More events arrive while no worker runs; a new worker (same group) finishes the stream.
    produce([kafka], second)
    total = len(msgs) + len(bad)
    code, stats2 = asyncio.run(run_worker_until(
        load_config(cfg_path, env={}), vllm_guard.backend,
        lambda: Outputs(kafka, cfg).accounted() >= total, timeout=STALL_S,
        progress=lambda: Outputs(kafka, cfg).accounted()))
    assert code == 0
    assert stats2["events"] >= len(second)
    # backpressure: bounded in-flight work, and Faust paused fetching while the pipeline was full
    assert stats2["max_inflight_batches"] <= cfg.batch.max_inflight
    assert stats2["max_inflight_events"] <= cfg.batch.size * cfg.batch.max_inflight
    assert stats2["fetch_pauses"] > 0

    out = Outputs(kafka, cfg)
    # every valid id: exactly one verdict after deduplication, one audit record, right policy version;
    # the poison events: the DLQ (engine_crash), the rest of their batches judged
    poison = {eid for eid, m in meta.items() if m["poison"]}
    assert len(poison) == 2 and set(out.verdicts) == set(meta) - poison
    dupes = sum(len(v) - 1 for v in out.verdicts.values())
    print(f"worker 2: {stats2}; duplicates after restart: {dupes}")
    assert dupes <= cfg.batch.size * cfg.batch.max_inflight, dupes  # at-least-once replays only
    for eid, m in meta.items():
        if m["poison"]:
            continue
        v = out.verdicts[eid][-1]
        assert v["source"]["topic"] == m["topic"] and v["policy"] == m["policy"]
        assert v["policy_version"] == VERSION[m["policy"]]
        assert v["model"] == "rsafe-demo" and v["model_version"] and v["worker_id"]
        assert out.keys[eid] == v["conversation_id"].encode()
        assert eid in out.audit
        a = out.audit[eid][-1]
        assert a["policy_version"] == v["policy_version"] and a["content"]["mode"] == "hash"
        assert a["content"]["prompt"] is None and a["content"]["prompt_sha256"] is None  # no unkeyed digest
        assert a["content"]["prompt_hmac"] == hmac.new(AUDIT_KEY.encode(), m["prompt"].encode(), "sha256").hexdigest()
        assert a["sampling"]["max_tokens"] == 128 and a["worker_id"]
        if m["fail"]:
            assert v["fallback"] and ERR_MARKER in v["error_reason"]
            assert v["label"] == ("unsafe" if m["topic"].endswith(".kids") else "error")
        elif not v["fallback"]:
            assert v["label"] in ("safe", "unsafe", "unknown")
            assert a["raw_output"] and a["rendered_prompt_sha256"] is None and v["timings"]["engine_ms"] > 0
    real = [eid for eid, m in meta.items() if eid not in poison and not out.verdicts[eid][-1]["fallback"]]
    assert len(real) == len(meta) - 4  # only the two request errors fell back
    # the stream went on after the failures: events after the last marker got real verdicts
    assert any(not out.verdicts[f"{prefix}-{i:03d}"][-1]["fallback"] for i in range(151, 190))

    # malformed messages and poison events: DLQ with a reason and the original bytes
    assert len(out.dlq) >= len(bad) + len(poison)
    by_source = {}
    for d in out.dlq:
        by_source[(d["source"]["topic"], d["source"]["partition"], d["source"]["offset"])] = d
    assert len(by_source) == len(bad) + len(poison)
    reasons = Counter(d["reason"] for d in by_source.values())
    assert reasons == {"not_json": 2, "schema": 4, "unknown_policy": 1, "policy_override_disabled": 1,
                       "invalid_content": 1, "empty": 1, "engine_crash": 2}, reasons
    assert {d["event_id"] for d in by_source.values() if d["reason"] == "engine_crash"} == poison
    originals = {(d["original_b64"] or "") for d in by_source.values()}
    assert {base64.b64encode(m.value).decode() for m in bad if m.value} <= originals
    assert all(d["detail"] for d in by_source.values())

    # everything consumed was committed
    ends = end_offsets([kafka], inputs)
    assert committed_offsets([kafka], cfg.group_id, inputs) == ends


# --------------------------------------------------------------------------- exactly-once


def test_exactly_once_mode(kafka, demo_model_dir, vllm_guard):
    """Faust's exactly_once: records and offsets commit in one transaction per input partition;
    a read_committed consumer sees each verdict once."""
    prefix = f"eos{uuid.uuid4().hex[:6]}"
    cfg = load_config(data=stream_config(kafka, prefix, demo_model_dir, processing_guarantee="exactly_once",
                                         faults={}), env={})
    assert cfg.batch.max_inflight == 1
    ensure_topics([kafka], topic_specs(cfg))
    msgs, meta, bad = make_events(prefix, 40, seed=3)
    produce([kafka], msgs + bad[:3])
    total = len(msgs) + 3
    code, stats = asyncio.run(run_worker_until(
        cfg, vllm_guard.backend, lambda: Outputs(kafka, cfg, read_committed=True).accounted() >= total))
    assert code == 0
    out = Outputs(kafka, cfg, read_committed=True)
    assert set(out.verdicts) == set(meta)
    assert all(len(v) == 1 for v in out.verdicts.values()), "duplicates under exactly_once"
    assert all(len(a) == 1 for a in out.audit.values()) and set(out.audit) == set(meta)
    assert len(out.dlq) == 3
    assert all(out.audit[e][0]["processing_guarantee"] == "exactly_once" for e in meta)
    inputs = [t.topic for t in cfg.inputs]
    assert caught_up(kafka, cfg.group_id, inputs)


# --------------------------------------------------------------------------- policy hot reload


def test_policy_hot_reload_on_sighup(kafka, tmp_path, demo_model_dir, vllm_guard):
    """A changed policy file is picked up on SIGHUP; verdicts carry the version that judged them;
    an invalid edit is rejected and the running policy stays."""
    prefix = f"hot{uuid.uuid4().hex[:6]}"
    pdir = tmp_path / "policies"
    pdir.mkdir()
    bundled = Path(__file__).resolve().parents[1] / "policies" / "bundled"
    kids = yaml.safe_load((bundled / "kids-platform.yaml").read_text())
    kids["name"] = "kids-custom"
    (pdir / "kids-custom.yaml").write_text(yaml.safe_dump(kids))
    raw = stream_config(kafka, prefix, demo_model_dir, policy_dirs=[str(pdir)], faults={},
                        audit={"content": "full"})  # the rendered prompt's digest: kept next to the text only
    raw["inputs"][1]["policy"] = "kids-custom"
    cfg = load_config(data=raw, env={})
    ensure_topics([kafka], topic_specs(cfg))
    kids_topic = cfg.inputs[1].topic

    def event(i: int) -> Message:
        body = {"id": f"{prefix}-{i}", "prompt": "What school do you go to?"}
        return Message(kids_topic, None, json.dumps(body).encode())

    v1 = PolicyRegistry.from_dirs(pdir).get("kids-custom").version

    async def scenario():
        holder = {}
        task = asyncio.create_task(serve(cfg, backend=vllm_guard.backend, on_ready=lambda w: holder.setdefault("w", w)))

        async def verdicts_for(ids):
            def read():
                out = Outputs(kafka, cfg)
                return {i: out.verdicts[i][-1]["policy_version"] for i in ids if i in out.verdicts}
            for _ in range(120):
                got = await asyncio.to_thread(read)
                if len(got) == len(ids):
                    return got
                await asyncio.sleep(0.5)
            return got

        while "w" not in holder and not task.done():
            await asyncio.sleep(0.2)
        await asyncio.to_thread(produce, [kafka], [event(i) for i in range(3)])
        before = await verdicts_for([f"{prefix}-{i}" for i in range(3)])
        # edit the policy, then SIGHUP
        kids["unsafe_threshold"] = 0.9
        (pdir / "kids-custom.yaml").write_text(yaml.safe_dump(kids))
        v2 = PolicyRegistry.from_dirs(pdir).get("kids-custom").version
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(50):
            if holder["w"].telemetry.policy_reloads >= 1:
                break
            await asyncio.sleep(0.1)
        await asyncio.to_thread(produce, [kafka], [event(i) for i in range(3, 6)])
        after = await verdicts_for([f"{prefix}-{i}" for i in range(3, 6)])
        # an invalid edit is rejected: the running version stays
        (pdir / "kids-custom.yaml").write_text("name: kids-custom\ncategories: []\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(1)
        await asyncio.to_thread(produce, [kafka], [event(6)])
        kept = await verdicts_for([f"{prefix}-6"])
        os.kill(os.getpid(), signal.SIGTERM)
        code = await asyncio.wait_for(task, timeout=90)
        return code, before, after, kept, holder["w"].telemetry.policy_reloads, v2

    code, before, after, kept, reloads, v2 = asyncio.run(scenario())
    assert code == 0 and reloads == 1
    assert set(before.values()) == {v1}
    assert set(after.values()) == {v2} and v2 != v1
    assert set(kept.values()) == {v2}
    # the policy store holds both versions; the old one is retrievable after the file changed, and
    # rendering it reproduces the exact prompt hash the audit record of an old verdict names
    from rsafe.models.prompt import build_user_turn, prompt_hash, render_prompt
    from rsafe.schemas.kafka import read_policy_store

    store = read_policy_store([kafka], cfg.outputs.policies_topic, strict=False)
    assert [r.version for r in store.history("kids-custom")] == [v1, v2]
    old = store.get("kids-custom", v1)
    assert old.unsafe_threshold == 0.3 and store.get("kids-custom", v2).unsafe_threshold == 0.9
    audit = Outputs(kafka, cfg).audit[f"{prefix}-0"][-1]
    rendered = render_prompt(vllm_guard.backend.tokenizer, build_user_turn(old, "What school do you go to?"))
    assert audit["policy_version"] == v1 and audit["rendered_prompt_sha256"] == prompt_hash(rendered)


# --------------------------------------------------------------------------- developer commands


def test_broker_produce_tail_commands(tmp_path):
    """`rsafe broker`, `rsafe produce FILE --topic T`, `rsafe tail T` round trip."""
    from rsafe.stream.broker import free_port, port_open

    port = free_port()
    broker = own(subprocess.Popen([sys.executable, "-m", "rsafe.cli", "broker", "--data-dir", str(tmp_path / "b"),
                                   "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        assert wait_until(lambda: port_open("127.0.0.1", port), timeout=30, interval=0.2)
        events = tmp_path / "events.jsonl"
        events.write_text('{"id": "a", "conversation_id": "c1", "prompt": "hi"}\nnot json\n\n'
                          '{"id": "b", "prompt": "yo"}\n')
        env = {**os.environ, "RSAFE_BROKER": f"127.0.0.1:{port}"}
        r = subprocess.run([sys.executable, "-m", "rsafe.cli", "produce", str(events), "--topic", "cli.in"],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0 and "produced 3 messages" in r.stderr, r.stderr
        r = subprocess.run([sys.executable, "-m", "rsafe.cli", "tail", "cli.in", "--timeout", "2"],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ['{"id": "a", "conversation_id": "c1", "prompt": "hi"}', "not json",
                                         '{"id": "b", "prompt": "yo"}']
    finally:
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(timeout=30) == 0
    assert not port_open("127.0.0.1", port)


def test_worker_defaults_to_the_embedded_broker(tmp_path):
    """No broker configured and none on 127.0.0.1:9092 → the worker starts the embedded one."""
    from rsafe.stream.broker import free_port, port_open, reachable

    if reachable(["127.0.0.1:9092"]):
        pytest.skip("a broker answers on 127.0.0.1:9092; the worker would use it")
    port = free_port()
    cfg = load_config(data={"inputs": [{"topic": "t", "policy": "rsafe-default"}], "http": {"port": 0},
                            "embedded_broker": {"data_dir": str(tmp_path / "b"), "port": port}}, env={})
    assert cfg.broker is None
    worker = GuardWorker(cfg)
    worker._resolve_broker()
    try:
        assert worker.cfg.bootstrap == [f"127.0.0.1:{port}"] and port_open("127.0.0.1", port)
        created = ensure_topics(worker.cfg.bootstrap, topic_specs(worker.cfg))
        assert created == ["t", "t.verdicts", "rsafe.audit", "rsafe.dlq", "rsafe.policies", "rsafe.models",
                           "rsafe.review"]
    finally:
        worker.broker.stop()
    assert not port_open("127.0.0.1", port)
