"""Process faults against real processes: the embedded broker and worker subprocesses.

The engine is not the subject here, so workers run the null engine (answers at once). Long runs
(soak, the reliability report's scenarios with the real engine) are behind ``make
test-reliability`` (marker ``reliability``); their figures are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest

from rsafe.stream.broker import ensure_topics
from rsafe.stream.clients import Message, committed_offsets, end_offsets, produce, read_all
from rsafe.stream.config import load_config
from rsafe.stream.worker import topic_specs
from streamkit import (STALL_S, caught_up, events, kafka, own, published, start_worker,  # noqa: F401
                       verdict_ids, wait_logged, wait_progress, worker_config)

pytestmark = pytest.mark.slow

FAUST_SESSION_TIMEOUT_S = 60.0
"""Faust's ``broker_session_timeout`` (the worker keeps the default): how long a dynamic member's
partitions would wait for a dead member to expire."""


def throughput(samples: list[tuple[float, int]], window_s: float) -> float:
    """Peak events/s over ``window_s`` in ``(time, count)`` samples: the highest rate of any stretch
    of at least ``window_s`` (a commit interval's worth of work)."""
    best = 0.0
    for i, (t0, n0) in enumerate(samples):
        later = [(t, n) for t, n in samples[i + 1:] if t - t0 >= window_s]
        if later:
            t1, n1 = later[0]
            best = max(best, (n1 - n0) / (t1 - t0))
    return best


def test_kill9_and_restart_with_the_same_instance_id_takes_over_at_once(kafka, tmp_path):
    """Scenario 1 on the null engine: SIGKILL mid-stream, restart → 0 lost, duplicates within the
    bound of docs/STREAM.md (*Delivery guarantees*): ``size × max_inflight + commit_interval_s ×
    events/s``, the throughput measured on this run right before the kill."""
    prefix = f"k9{uuid.uuid4().hex[:6]}"
    raw = worker_config(kafka, prefix, group_instance_id=f"{prefix}-w0")
    cfg = load_config(data=raw, env={})
    ensure_topics([kafka], topic_specs(cfg))
    n = 8000
    produce([kafka], events(cfg.inputs[0].topic, prefix, n))
    w = start_worker(tmp_path, raw, "w1")
    samples: list[tuple[float, int]] = []

    def sampled() -> int:
        samples.append((time.monotonic(), published(kafka, cfg)))
        return samples[-1][1]

    try:
        wait_progress(sampled, 1, stall_s=STALL_S, interval=0.05, what="first verdicts", alive=[w],
                      log=tmp_path / "w1.log")
        samples.clear()  # the throughput once it runs, not its start
        wait_progress(sampled, 1500, interval=0.05, what="verdicts before the kill", alive=[w],
                      log=tmp_path / "w1.log")
    finally:
        w.send_signal(signal.SIGKILL)
        w.wait(timeout=10)
    at_kill = published(kafka, cfg)
    assert at_kill < n, "killed too late to be mid-stream"
    events_per_s = throughput(samples, cfg.commit_interval_s)
    w2 = start_worker(tmp_path, raw, "w2")
    try:
        ready = wait_logged(tmp_path, "w2", "engine ready", w2)  # then it joins the group
        wait_progress(lambda: published(kafka, cfg), at_kill + 1, stall_s=STALL_S, interval=0.05,
                      what="verdicts after the restart", alive=[w2], log=tmp_path / "w2.log")
        takeover_s = time.monotonic() - ready
        wait_progress(lambda: len(verdict_ids(kafka, cfg)), n, what="distinct verdicts", alive=[w2],
                      log=tmp_path / "w2.log")
    finally:
        w2.send_signal(signal.SIGTERM)
        assert w2.wait(timeout=60) == 0
    got = verdict_ids(kafka, cfg)
    assert set(got) == {f"{prefix}-{i}" for i in range(n)}  # 0 lost
    duplicates = sum(got.values()) - n
    bound = cfg.batch.size * cfg.batch.max_inflight + cfg.commit_interval_s * events_per_s
    print(f"killed at {at_kill} verdicts, {events_per_s:.0f} events/s: {duplicates} duplicates, bound {bound:.0f}; "
          f"takeover {takeover_s:.1f} s")
    assert duplicates <= bound, f"{duplicates} duplicates, bound {bound:.0f} at {events_per_s:.0f} events/s"
    # static membership: the restarted worker takes its partitions back at its first join, without
    # waiting for the dead member to expire (timed from its engine start, so a slow start does not count)
    assert takeover_s < FAUST_SESSION_TIMEOUT_S, takeover_s
    inputs = [t.topic for t in cfg.inputs]
    assert caught_up(kafka, cfg.group_id, inputs)


def test_a_second_worker_with_the_same_instance_id_on_this_host_refuses_to_start(kafka, tmp_path):
    prefix = f"dup{uuid.uuid4().hex[:6]}"
    raw = worker_config(kafka, prefix, group_instance_id=f"{prefix}-same")
    cfg = load_config(data=raw, env={})
    ensure_topics([kafka], topic_specs(cfg))
    a = start_worker(tmp_path, raw, "a")
    produce([kafka], events(cfg.inputs[0].topic, prefix, 20))
    wait_progress(lambda: len(verdict_ids(kafka, cfg)), 20, stall_s=STALL_S, what="verdicts of a", alive=[a],
                  log=tmp_path / "a.log")
    b = start_worker(tmp_path, raw, "b")
    wait_logged(tmp_path, "b", "distinct ids", b)
    assert b.wait(timeout=60) == 1
    log = (tmp_path / "b.log").read_text()
    assert "group_instance_id" in log and "distinct ids" in log and str(a.pid) in log
    assert a.poll() is None  # the first worker keeps running
    # with distinct ids both run side by side
    c = start_worker(tmp_path, raw, "c", env={"RSAFE_GROUP_INSTANCE_ID": f"{prefix}-other"})
    wait_logged(tmp_path, "c", f"static member {prefix}-other", c)
    produce([kafka], events(cfg.inputs[0].topic, prefix, 20, start=20))
    # a rebalance (a rejoins for c) is a quiet phase: STALL_S covers it
    wait_progress(lambda: len(verdict_ids(kafka, cfg)), 40, stall_s=STALL_S, what="verdicts of a and c",
                  alive=[a, c], log=[tmp_path / "a.log", tmp_path / "c.log"])
    for w in (c, a):
        w.send_signal(signal.SIGTERM)
    assert (c.wait(timeout=60), a.wait(timeout=60)) == (0, 0)


def test_a_fenced_worker_exits_with_status_5(kafka, tmp_path):
    """Another member (here a plain consumer, as from another host) joins with our instance id."""
    import asyncio

    from aiokafka import AIOKafkaConsumer

    prefix = f"fen{uuid.uuid4().hex[:6]}"
    raw = worker_config(kafka, prefix, group_instance_id=f"{prefix}-id")
    cfg = load_config(data=raw, env={})
    ensure_topics([kafka], topic_specs(cfg))
    w = start_worker(tmp_path, raw, "w")
    try:
        produce([kafka], events(cfg.inputs[0].topic, prefix, 10))
        wait_progress(lambda: len(verdict_ids(kafka, cfg)), 10, stall_s=STALL_S, what="verdicts", alive=[w],
                      log=tmp_path / "w.log")
        time.sleep(2)  # armed once it holds partitions (checked every second)

        async def intruder() -> None:
            c = AIOKafkaConsumer(cfg.inputs[0].topic, bootstrap_servers=kafka, group_id=cfg.group_id,
                                 group_instance_id=f"{prefix}-id", enable_auto_commit=False)
            await c.start()
            await asyncio.sleep(8)
            await c.stop()

        asyncio.run(intruder())
        assert w.wait(timeout=30) == 5
        assert "fenced" in (tmp_path / "w.log").read_text()
    finally:
        if w.poll() is None:
            w.kill()


def test_an_error_no_guard_catches_crashes_the_faust_app_and_the_worker_exits_with_status_3(kafka, tmp_path):
    """An exception inside Faust's fetch loop (the consumer's delivery, outside the pipeline's
    guards; injected with ``faults.consumer_crash_marker``) crashes the Faust app: the worker stops
    with ``EXIT_CRASHED``, the event that crashed it stays uncommitted, and a restart without the
    fault judges it (nothing lost)."""
    from rsafe.stream.exit_codes import EXIT_CRASHED

    prefix = f"crash{uuid.uuid4().hex[:6]}"
    raw = worker_config(kafka, prefix, group_instance_id=f"{prefix}-w", faults={"consumer_crash_marker": "CRASH-ME"})
    cfg = load_config(data=raw, env={})
    ensure_topics([kafka], topic_specs(cfg))
    topic = cfg.inputs[0].topic
    produce([kafka], events(topic, prefix, 20))
    w = start_worker(tmp_path, raw, "w1")
    wait_progress(lambda: len(verdict_ids(kafka, cfg)), 20, stall_s=STALL_S, what="verdicts", alive=[w],
                  log=tmp_path / "w1.log")
    produce([kafka], [Message(topic, b"c0", json.dumps({"id": f"{prefix}-crash", "prompt": "CRASH-ME"}).encode())])
    assert w.wait(timeout=STALL_S) == EXIT_CRASHED == 3
    log = (tmp_path / "w1.log").read_text()
    assert "the Faust app crashed" in log and "injected consumer crash" in log
    inputs = [t.topic for t in cfg.inputs]
    assert not caught_up(kafka, cfg.group_id, inputs)  # the crashing event was not committed
    assert f"{prefix}-crash" not in verdict_ids(kafka, cfg)
    w2 = start_worker(tmp_path, {**raw, "faults": {}}, "w2")
    wait_progress(lambda: len(verdict_ids(kafka, cfg)), 21, stall_s=STALL_S, what="verdicts after the restart",
                  alive=[w2], log=tmp_path / "w2.log")
    assert f"{prefix}-crash" in verdict_ids(kafka, cfg)
    w2.send_signal(signal.SIGTERM)
    assert w2.wait(timeout=60) == 0


def test_sigterm_while_waiting_for_partitions_exits_promptly(kafka, tmp_path):
    """The embedded broker never expires a dead member: a worker joining a group whose dead member
    holds another id waits for partitions forever. SIGTERM must still stop it at once."""
    prefix = f"stk{uuid.uuid4().hex[:6]}"
    raw = worker_config(kafka, prefix, group_instance_id=f"{prefix}-new")
    cfg = load_config(data=raw, env={})
    ensure_topics([kafka], topic_specs(cfg))
    ghost_code = (
        "import asyncio, sys\n"
        "from aiokafka import AIOKafkaConsumer\n"
        "async def main():\n"
        f"    c = AIOKafkaConsumer({cfg.inputs[0].topic!r}, bootstrap_servers={kafka!r}, group_id={cfg.group_id!r},\n"
        f"                         group_instance_id={prefix + '-ghost'!r}, enable_auto_commit=False)\n"
        "    await c.start()\n"
        "    await c.getmany(timeout_ms=1000)\n"
        "    print('joined', flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    ghost = own(subprocess.Popen([sys.executable, "-c", ghost_code], stdout=subprocess.PIPE, text=True))
    assert ghost.stdout.readline().strip() == "joined"
    ghost.send_signal(signal.SIGKILL)  # a dead member the embedded broker keeps forever
    ghost.wait(timeout=10)
    w = start_worker(tmp_path, raw, "w")
    try:
        time.sleep(15)  # started, engine ready, waiting for partitions
        assert w.poll() is None
        stopped = time.monotonic()
        w.send_signal(signal.SIGTERM)
        assert w.wait(timeout=30) == 0
        assert time.monotonic() - stopped < 15
    finally:
        if w.poll() is None:
            w.kill()


def test_dead_engine_stops_the_worker_with_status_4_and_nothing_is_judged_by_fallback(kafka, tmp_path):
    """Scenario 5: the engine dies; the batch stays unacked, the worker exits 4, a restart with a
    working engine judges everything (no fallback verdict anywhere)."""
    prefix = f"dead{uuid.uuid4().hex[:6]}"
    dead = tmp_path / "engine-is-dead"
    raw = worker_config(kafka, prefix, faults={"engine_dead_file": str(dead)},
                        inputs=[{"topic": f"{prefix}.in", "policy": "rsafe-default", "partitions": 3,
                                 "on_error": "safe"}],
                        retry={"attempts": 2, "backoff_ms": 10})
    cfg = load_config(data=raw, env={})
    ensure_topics([kafka], topic_specs(cfg))
    produce([kafka], events(cfg.inputs[0].topic, prefix, 50))
    w = start_worker(tmp_path, raw, "w1")
    try:
        wait_progress(lambda: len(verdict_ids(kafka, cfg)), 50, stall_s=STALL_S, what="verdicts", alive=[w],
                      log=tmp_path / "w1.log")
        dead.touch()
        produce([kafka], events(cfg.inputs[0].topic, prefix, 50, start=50))
        assert w.wait(timeout=60) == 4
    finally:
        if w.poll() is None:
            w.kill()
    log = (tmp_path / "w1.log").read_text()
    assert "engine dead" in log and "health probe failed" in log
    assert len(verdict_ids(kafka, cfg)) == 50  # the failed work was not judged by on_error: safe
    inputs = [t.topic for t in cfg.inputs]
    assert sum((o or 0) for o in committed_offsets([kafka], cfg.group_id, inputs).values()) < 100
    dead.unlink()
    w2 = start_worker(tmp_path, raw, "w2")
    try:
        wait_progress(lambda: len(verdict_ids(kafka, cfg)), 100, stall_s=STALL_S, what="verdicts after the restart",
                      alive=[w2], log=tmp_path / "w2.log")
    finally:
        w2.send_signal(signal.SIGTERM)
        assert w2.wait(timeout=60) == 0
    records = read_all([kafka], list(cfg.verdict_topics().values()))
    assert not any(json.loads(r.value)["fallback"] for r in records)


def test_hung_engine_times_out_and_the_hanging_event_is_isolated(kafka, tmp_path):
    """Scenario 6: a batch whose engine call never returns times out (health.batch_timeout_s); the
    engine answers the probe, so the batch is split and the event that hangs it is dead-lettered."""
    prefix = f"hang{uuid.uuid4().hex[:6]}"
    raw = worker_config(kafka, prefix, faults={"engine_hang_marker": "HANG-ME"},
                        health={"batch_timeout_s": 1.0}, retry={"attempts": 2, "backoff_ms": 10})
    cfg = load_config(data=raw, env={})
    ensure_topics([kafka], topic_specs(cfg))
    msgs = events(cfg.inputs[0].topic, prefix, 40)
    msgs[17] = Message(cfg.inputs[0].topic, b"c", json.dumps({"id": f"{prefix}-17", "prompt": "HANG-ME please"}).encode())
    produce([kafka], msgs)
    w = start_worker(tmp_path, raw, "w")
    try:
        wait_progress(lambda: len(verdict_ids(kafka, cfg)), 39, stall_s=STALL_S, what="verdicts", alive=[w],
                      log=tmp_path / "w.log")
        wait_progress(lambda: len(read_all([kafka], [cfg.outputs.dlq_topic])), 1, stall_s=STALL_S,
                      what="DLQ records", alive=[w], log=tmp_path / "w.log")
        dlq = [json.loads(r.value) for r in read_all([kafka], [cfg.outputs.dlq_topic])]
        assert [(d["event_id"], d["reason"]) for d in dlq] == [(f"{prefix}-17", "engine_crash")]
        assert "did not answer within 1 s" in dlq[0]["detail"]
    finally:
        w.send_signal(signal.SIGTERM)
        assert w.wait(timeout=60) == 0


def test_bad_input_at_volume_every_offset_is_accounted_for(kafka, tmp_path):
    """Scenario 8: 1,000 malformed events interleaved with valid ones → a verdict or a DLQ record
    with a reason for every input offset, and no crash."""
    import random

    prefix = f"bad{uuid.uuid4().hex[:6]}"
    raw = worker_config(kafka, prefix, max_event_bytes=256_000)
    cfg = load_config(data=raw, env={})
    ensure_topics([kafka], topic_specs(cfg))
    topic = cfg.inputs[0].topic
    rng = random.Random(5)
    kinds = [
        lambda i: b"{not json " + str(i).encode(),
        lambda i: json.dumps({"id": f"{prefix}-b{i}", "prompt": 12345}).encode(),
        lambda i: b'{"id": "x' + str(i).encode() + b'", "prompt": "\xff\xfe broken utf-8"}',
        lambda i: json.dumps({"id": f"{prefix}-b{i}", "prompt": "y" * 1_000_000}).encode(),
        lambda i: json.dumps({"prompt": "no id at all"}).encode(),
        lambda i: json.dumps({"id": f"{prefix}-dup", "prompt": f"duplicate id {i}"}).encode(),
        lambda i: b"",
        lambda i: json.dumps([i]).encode(),
    ]
    msgs = []
    for i in range(2000):
        if i % 2:
            msgs.append(Message(topic, None, kinds[rng.randrange(len(kinds))](i)))
        else:
            msgs.append(Message(topic, None, json.dumps({"id": f"{prefix}-{i}", "prompt": f"valid {i}"}).encode()))
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=[kafka], acks="all", max_request_size=4_000_000)
    for m in msgs:
        producer.send(topic, key=m.key, value=m.value)
    producer.flush()
    producer.close()
    w = start_worker(tmp_path, raw, "w")
    inputs = [t.topic for t in cfg.inputs]
    total = sum(end_offsets([kafka], inputs).values())

    def committed() -> int:
        return sum((o or 0) for o in committed_offsets([kafka], cfg.group_id, inputs).values())

    try:
        wait_progress(committed, total, stall_s=STALL_S, interval=1.0, what="committed input offsets", alive=[w],
                      log=tmp_path / "w.log")
        assert caught_up(kafka, cfg.group_id, inputs)
        assert w.poll() is None  # no crash
    finally:
        w.send_signal(signal.SIGTERM)
        assert w.wait(timeout=60) == 0
    seen = set()
    reasons = Counter()
    for r in read_all([kafka], list(cfg.verdict_topics().values()) + [cfg.outputs.dlq_topic]):
        rec = json.loads(r.value)
        src = rec["source"]
        seen.add((src["partition"], src["offset"]))
        if "reason" in rec:
            reasons[rec["reason"]] += 1
            assert rec["detail"]
    ends = end_offsets([kafka], inputs)
    assert seen == {(p, o) for (_, p), end in ends.items() for o in range(end)}  # every offset
    assert {"not_json", "schema", "too_large", "empty"} <= set(reasons)
