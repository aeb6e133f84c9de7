"""Process faults against real processes: the embedded broker and worker subprocesses.

The engine is not the subject here, so workers run the null engine (answers at once). Long runs
(soak, the reliability report's scenarios with the real engine) are behind ``make
test-reliability`` (marker ``reliability``); their figures are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml

from rsafe.stream.broker import EmbeddedBroker, ensure_topics
from rsafe.stream.clients import Message, committed_offsets, end_offsets, produce, read_all
from rsafe.stream.config import load_config
from rsafe.stream.worker import topic_specs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kafka(tmp_path_factory):
    with EmbeddedBroker(tmp_path_factory.mktemp("broker"), port=0) as broker:
        yield broker.bootstrap


def worker_config(bootstrap: str, prefix: str, **over) -> dict:
    cfg = {
        "broker": bootstrap, "group_id": f"{prefix}-group",
        "inputs": [{"topic": f"{prefix}.in", "policy": "rsafe-default", "partitions": 3}],
        "outputs": {"audit_topic": f"{prefix}.audit", "dlq_topic": f"{prefix}.dlq",
                    "policies_topic": f"{prefix}.policies", "partitions": 3},
        "batch": {"size": 16, "linger_ms": 20, "max_inflight": 2},
        "engine": {"backend": "null", "model": "null-engine"},
        "policy_reload": {"watch": False}, "commit_interval_s": 0.5, "shutdown_timeout_s": 20,
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def start_worker(tmp_path: Path, raw: dict, name: str, env: dict | None = None) -> subprocess.Popen:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "rsafe.cli", "worker", "-c", str(path)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def wait_until(pred, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def logged(tmp_path: Path, name: str, text: str) -> bool:
    return text in (tmp_path / f"{name}.log").read_text(errors="replace")


def events(topic: str, prefix: str, n: int, start: int = 0) -> list[Message]:
    return [Message(topic, f"c{i % 11}".encode(), json.dumps({"id": f"{prefix}-{i}", "prompt": f"message {i}"}).encode())
            for i in range(start, start + n)]


def published(bootstrap: str, cfg) -> int:
    """Verdict records on the broker (end offsets: cheap to poll)."""
    return sum(end_offsets([bootstrap], list(cfg.verdict_topics().values())).values())


def verdict_ids(bootstrap: str, cfg) -> Counter:
    return Counter(json.loads(r.value)["id"] for r in read_all([bootstrap], list(cfg.verdict_topics().values()),
                                                                idle_timeout_s=1.0))


def test_kill9_and_restart_with_the_same_instance_id_takes_over_at_once(kafka, tmp_path):
    """Scenario 1 on the null engine: SIGKILL mid-stream, restart → 0 lost, duplicates in bound."""
    prefix = f"k9{uuid.uuid4().hex[:6]}"
    raw = worker_config(kafka, prefix, group_instance_id=f"{prefix}-w0")
    cfg = load_config(data=raw, env={})
    ensure_topics([kafka], topic_specs(cfg))
    n = 8000
    produce([kafka], events(cfg.inputs[0].topic, prefix, n))
    w = start_worker(tmp_path, raw, "w1")
    try:
        assert wait_until(lambda: published(kafka, cfg) > 500, timeout=90, interval=0.05), "no progress"
    finally:
        w.send_signal(signal.SIGKILL)
        w.wait(timeout=10)
    assert published(kafka, cfg) < n, "killed too late to be mid-stream"
    started = time.monotonic()
    w2 = start_worker(tmp_path, raw, "w2")
    try:
        assert wait_until(lambda: len(verdict_ids(kafka, cfg)) == n, timeout=120), (
            (tmp_path / "w2.log").read_text()[-3000:])
        recovery_s = time.monotonic() - started
    finally:
        w2.send_signal(signal.SIGTERM)
        assert w2.wait(timeout=60) == 0
    got = verdict_ids(kafka, cfg)
    assert set(got) == {f"{prefix}-{i}" for i in range(n)}  # 0 lost
    duplicates = sum(got.values()) - n
    bound = cfg.batch.size * cfg.batch.max_inflight + 1000  # in flight + acked since the last commit (0.5 s)
    assert duplicates <= bound, duplicates
    assert recovery_s < 60  # static membership: no waiting for a dead member to expire
    inputs = [t.topic for t in cfg.inputs]
    assert committed_offsets([kafka], cfg.group_id, inputs) == end_offsets([kafka], inputs)


def test_a_second_worker_with_the_same_instance_id_on_this_host_refuses_to_start(kafka, tmp_path):
    prefix = f"dup{uuid.uuid4().hex[:6]}"
    raw = worker_config(kafka, prefix, group_instance_id=f"{prefix}-same")
    cfg = load_config(data=raw, env={})
    ensure_topics([kafka], topic_specs(cfg))
    a = start_worker(tmp_path, raw, "a")
    try:
        produce([kafka], events(cfg.inputs[0].topic, prefix, 20))
        assert wait_until(lambda: len(verdict_ids(kafka, cfg)) == 20, timeout=90)
        b = start_worker(tmp_path, raw, "b")
        assert b.wait(timeout=90) == 1
        log = (tmp_path / "b.log").read_text()
        assert "group_instance_id" in log and "distinct ids" in log and str(a.pid) in log
        assert a.poll() is None  # the first worker keeps running
        # with distinct ids both run side by side
        c = start_worker(tmp_path, raw, "c", env={"RSAFE_GROUP_INSTANCE_ID": f"{prefix}-other"})
        assert wait_until(lambda: logged(tmp_path, "c", f"static member {prefix}-other"), timeout=90)
        produce([kafka], events(cfg.inputs[0].topic, prefix, 20, start=20))
        assert wait_until(lambda: len(verdict_ids(kafka, cfg)) == 40, timeout=90)
        c.send_signal(signal.SIGTERM)
        assert c.wait(timeout=60) == 0
    finally:
        a.send_signal(signal.SIGTERM)
        assert a.wait(timeout=60) == 0


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
        assert wait_until(lambda: len(verdict_ids(kafka, cfg)) == 10, timeout=90)
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
    ghost = subprocess.Popen([sys.executable, "-c", ghost_code], stdout=subprocess.PIPE, text=True)
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
