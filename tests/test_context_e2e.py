"""Conversation context on the real broker and worker (null engine: the model is not what is tested).

One worker judges conversations on three topics: the third turn with the two before it, turns sent
together, the same conversation id on two topics kept apart, ``messages`` used as given, events
without a key or with a mismatched ``conversation_id`` judged alone, ``rsafe context forget`` and
``rsafe feedback forget``, and an expired conversation. A second test kills an exactly-once worker
with SIGKILL and checks that its successor restores the context from the changelog, no turn twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest

from rsafe.models.prompt import build_user_turn, prompt_hash
from rsafe.models.conversation import Turn
from rsafe.policies import PolicyRegistry
from rsafe.stream.broker import ensure_topics
from rsafe.stream.clients import Message, produce, read_all
from rsafe.stream.config import load_config
from rsafe.stream.context import changelog_topic
from rsafe.stream.worker import topic_specs
from streamkit import kafka, kill_group, start_worker, wait_logged, wait_progress, worker_config  # noqa: F401

POLICY = PolicyRegistry.from_dirs().get("rsafe-default")


def config(kafka, prefix, **over):
    ctx = {"enabled": True}
    raw = worker_config(kafka, prefix, inputs=[
        {"topic": f"{prefix}.a", "policy": "rsafe-default", "partitions": 3, "context": ctx},
        {"topic": f"{prefix}.b", "policy": "rsafe-default", "partitions": 2, "context": ctx},
        {"topic": f"{prefix}.short", "policy": "rsafe-default", "partitions": 1,
         "context": {"enabled": True, "ttl": "2s"}}], **over)
    return raw, load_config(data=raw, env={})


def send(kafka, topic, key, event, headers=None):
    produce([kafka], [Message(topic, key.encode() if key else None, json.dumps(event).encode(), headers)])


class Records:
    """The verdict and audit records published so far, by event id (read_committed)."""

    def __init__(self, kafka, cfg):
        self.kafka, self.cfg = kafka, cfg

    def read(self, topics):
        out = {}
        for r in read_all([self.kafka], topics, idle_timeout_s=0.5, read_committed=True):
            if r.value is not None:
                d = json.loads(r.value)
                out[d.get("id") or d.get("event_id")] = d
        return out

    def wait(self, ids, proc, log):
        """The verdict and audit record of each of ``ids`` (waits while the worker makes progress)."""
        topics = [*self.cfg.verdict_topics().values(), self.cfg.outputs.audit_topic]
        seen: dict = {}

        def count():
            seen.update(self.read(topics))
            return sum(1 for i in ids if i in seen)

        wait_progress(count, len(ids), what=f"records of {ids}", alive=[proc], log=log)
        verdicts = self.read(list(self.cfg.verdict_topics().values()))
        audits = self.read([self.cfg.outputs.audit_topic])
        return {i: (verdicts[i], audits[i]) for i in ids}


def ctx_of(records, i):
    v, a = records[i]
    assert v["context_turns"] == a["context_turns"] == len(a["context_event_ids"]) or a["context_source"] == "event"
    return a["context_event_ids"]


def rsafe(*args):
    return subprocess.run([sys.executable, "-m", "rsafe.cli", *args], capture_output=True, text=True, timeout=120)


def test_conversations_are_judged_with_their_context(kafka, tmp_path):
    prefix = f"cx{uuid.uuid4().hex[:6]}"
    raw, cfg = config(kafka, prefix)
    a, b, short = (t.topic for t in cfg.inputs)
    w = start_worker(tmp_path, raw, "w")
    log = tmp_path / "w.log"
    rec = Records(kafka, cfg)
    wait_logged(tmp_path, "w", "consuming", w)

    for i in (1, 2):
        send(kafka, a, "conv-1", {"id": f"e{i}", "conversation_id": "conv-1", "prompt": f"turn {i}"})
        rec.wait([f"e{i}"], w, log)
    send(kafka, a, "conv-1", {"id": "e3", "prompt": "turn 3"})
    send(kafka, a, "conv-2", {"id": "t1", "prompt": "together 1"})  # two turns sent together
    send(kafka, a, "conv-2", {"id": "t2", "prompt": "together 2"})
    send(kafka, b, "conv-1", {"id": "b1", "prompt": "same id, other topic"})
    msgs = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "reply"},
            {"role": "user", "content": "judged"}]
    send(kafka, a, "conv-3", {"id": "m1", "messages": msgs})
    send(kafka, a, None, {"id": "nokey", "prompt": "no conversation"})
    send(kafka, a, "conv-1", {"id": "mismatch", "conversation_id": "conv-9", "prompt": "not this conversation"})
    send(kafka, short, "s", {"id": "s1", "prompt": "soon forgotten"})
    r = rec.wait(["e3", "t1", "t2", "b1", "m1", "nokey", "mismatch", "s1"], w, log)

    assert ctx_of(r, "e3") == ["e1", "e2"]
    history = [Turn(role="user", content="turn 1"), Turn(role="user", content="turn 2")]
    assert r["e3"][1]["rendered_prompt_sha256"] == prompt_hash(build_user_turn(POLICY, "turn 3", context=history))
    assert ctx_of(r, "t1") == [] and ctx_of(r, "t2") == ["t1"]
    assert ctx_of(r, "b1") == []
    assert (r["m1"][0]["context_turns"], r["m1"][1]["context_source"]) == (2, "event")
    assert r["nokey"][0]["context_turns"] == 0 and r["mismatch"][0]["context_turns"] == 0

    send(kafka, a, "conv-3", {"id": "m2", "prompt": "after messages"})  # messages left the table alone
    assert ctx_of(rec.wait(["m2"], w, log), "m2") == []

    # Erasure: the whole conversation, then one event of another one.
    done = rsafe("context", "forget", "conv-1", "--topic", a, "--broker", kafka)
    assert done.returncode == 0, done.stderr
    send(kafka, a, "conv-1", {"id": "e4", "prompt": "turn 4"})
    for i in (1, 2):
        send(kafka, a, "conv-5", {"id": f"f{i}", "prompt": f"f turn {i}"})
    r = rec.wait(["e4", "f1", "f2"], w, log)
    assert ctx_of(r, "e4") == []
    cfg_path = tmp_path / "w.yaml"
    done = rsafe("feedback", "forget", "f1", "-c", str(cfg_path))
    assert done.returncode == 0 and "remove 1 of them from their conversations' context" in done.stderr, done.stderr
    send(kafka, a, "conv-5", {"id": "f3", "prompt": "f turn 3"})
    assert ctx_of(rec.wait(["f3"], w, log), "f3") == ["f2"]

    time.sleep(2.5)  # the short topic's ttl is 2 s
    send(kafka, short, "s", {"id": "s2", "prompt": "after the ttl"})
    assert ctx_of(rec.wait(["s2"], w, log), "s2") == []

    w.terminate()
    assert w.wait(timeout=60) == 0
    stats = json.loads(log.read_text().rsplit("stats ", 1)[1].splitlines()[0])
    assert stats["context_no_key"] == 1 and stats["context_key_mismatch"] == 1 and stats["context_event"] == 1
    erased = [rec for rec in read_all([kafka], [changelog_topic(cfg, a)], idle_timeout_s=0.5)
              if rec.key == b"conv-1" and rec.value is None]
    assert erased, "the forgotten conversation was tombstoned in the changelog"


@pytest.mark.reliability  # `make test-reliability`: intermittent on the embedded broker (below)
def test_after_sigkill_the_context_comes_back_from_the_changelog_no_turn_twice(kafka, tmp_path):
    """Intermittent on noida-db (2 of 7 runs on 2026-12-08, one of them on a quiet machine): the
    restarted static member (same ``group_instance_id``) joins, logs that it consumes, and is never
    assigned a partition — no recovery, no event, until the test gives up; its log and the killed
    worker's show nothing else. Not seen against Kafka's static-member replacement; kept out of
    ``make test`` until the cause is found, run by ``make test-reliability`` and against
    ``RSAFE_TEST_BROKER``."""
    prefix = f"ck{uuid.uuid4().hex[:6]}"
    raw, cfg = config(kafka, prefix, processing_guarantee="exactly_once", group_instance_id=f"{prefix}-w",
                      batch={"max_inflight": 1})
    a = cfg.inputs[0].topic
    ensure_topics([kafka], topic_specs(cfg))
    rec = Records(kafka, cfg)
    w = start_worker(tmp_path, raw, "w1")
    for i in (1, 2):
        send(kafka, a, "conv-k", {"id": f"k{i}", "prompt": f"turn {i}"})
    r = rec.wait(["k1", "k2"], w, tmp_path / "w1.log")
    assert ctx_of(r, "k2") == ["k1"]
    kill_group(w)
    w.wait(timeout=10)

    w2 = start_worker(tmp_path, raw, "w2")
    send(kafka, a, "conv-k", {"id": "k3", "prompt": "turn 3"})
    r = rec.wait(["k3"], w2, tmp_path / "w2.log")
    assert ctx_of(r, "k3") == ["k1", "k2"]
    w2.terminate()
    assert w2.wait(timeout=60) == 0
    for record in read_all([kafka], [changelog_topic(cfg, a)], idle_timeout_s=0.5, read_committed=True):
        turns = [t["e"] for t in json.loads(record.value)["turns"]]
        assert len(turns) == len(set(turns)), turns
