"""Helpers shared by the tests that run real worker processes on the embedded broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from rsafe.stream.broker import EmbeddedBroker
from rsafe.stream.clients import Message, committed_offsets, end_offsets, read_all


REAL_KAFKA = os.environ.get("RSAFE_TEST_BROKER")
"""``host:port`` of a real Apache Kafka to run the broker tests against (else the embedded broker)."""


@pytest.fixture(scope="module")
def kafka(tmp_path_factory):
    """The broker of a test module: ``RSAFE_TEST_BROKER`` when set, else an embedded one."""
    if REAL_KAFKA:
        yield REAL_KAFKA
        return
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
        "http": {"port": 0},
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




def caught_up(bootstrap: str, group_id: str, topics: list[str]) -> bool:
    """Every partition of ``topics`` committed to its end. An empty partition (end offset 0) has
    no committed offset at all, and counts as caught up (the producer's partitioner may leave a
    partition empty: comparing ``None`` with 0 once made a finished run look stalled)."""
    committed = committed_offsets([bootstrap], group_id, topics)
    return all((committed.get(tp) or 0) >= end for tp, end in end_offsets([bootstrap], topics).items())
