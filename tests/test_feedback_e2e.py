"""The feedback loop on the real broker with real worker processes (null engine: the engine is not
the subject; it answers ``safe`` to everything, so a trusted ``unsafe`` label is a disagreement)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid

import pytest

from rsafe.stream.clients import Message, produce, read_all
from rsafe.stream.config import load_config
from rsafe.stream.worker import topic_specs
from streamkit import STALL_S, kafka, start_worker, wait_progress, worker_config  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


def feedback(event_id: str, label: str, fid: str, source: str = "reviewer", **extra) -> bytes:
    return json.dumps({"event_id": event_id, "feedback_id": fid, "label": label, "source": source,
                       "reviewer": "ann", **extra}).encode()


def records(bootstrap: str, topic: str) -> list:
    return read_all([bootstrap], [topic], idle_timeout_s=1.0)


def cli(*args: str, bootstrap: str, cfg_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rsafe.cli", *args, "-c", str(cfg_path), "--broker", bootstrap],
                          capture_output=True, text=True, timeout=120)


def test_feedback_join_end_to_end_with_a_kill9_restart(kafka, tmp_path):
    prefix = f"fb{uuid.uuid4().hex[:6]}"
    fb_topics = {"trusted_topic": f"{prefix}.feedback", "reports_topic": f"{prefix}.reports",
                 "disagreements_topic": f"{prefix}.disagreements", "review_topic": f"{prefix}.review"}
    raw = worker_config(kafka, prefix, group_instance_id=f"{prefix}-w",
                        audit={"content": "full"},
                        feedback={"enabled": True, "expiry_interval_s": 1.0, "hold_max_age_s": 4, **fb_topics})
    cfg = load_config(data=raw, env={})
    cfg_path = tmp_path / "w.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(raw))
    from rsafe.stream.broker import ensure_topics

    ensure_topics([kafka], topic_specs(cfg))
    inp, fbt, rep = cfg.inputs[0].topic, cfg.feedback.trusted_topic, cfg.feedback.reports_topic

    def event(i: int, topic: str = inp) -> Message:  # noqa: D401
        return Message(topic, None, json.dumps({"id": f"{prefix}-{i}", "prompt": f"message number {i}"}).encode())

    def fbmsg(topic: str, event_id: str, value: bytes) -> Message:
        return Message(topic, event_id.encode(), value)

    e = [f"{prefix}-{i}" for i in range(10)]
    # feedback before its decision (held, joined when the decision arrives)
    produce([kafka], [fbmsg(fbt, e[0], feedback(e[0], "unsafe", "early"))])
    w = start_worker(tmp_path, raw, "w1")
    try:
        produce([kafka], [event(i) for i in range(6)])
        wait_progress(lambda: len(records(kafka, cfg.outputs.audit_topic)), 6, stall_s=STALL_S, what="audit records",
                      alive=[w])
        produce([kafka], [
            fbmsg(fbt, e[1], feedback(e[1], "unsafe", "late")),                 # after: disagreement
            fbmsg(fbt, e[2], feedback(e[2], "safe", "agree")),                  # agreement: counted
            fbmsg(rep, e[3], feedback(e[3], "unsafe", "rep", source="user_report")),   # report → review
            fbmsg(fbt, e[4], feedback(e[4], "unsafe", "c1")),                   # two trusted labels that
            fbmsg(fbt, e[4], feedback(e[4], "safe", "c2")),                     # contradict → review
            fbmsg(fbt, e[5], b"{malformed"),                                    # → DLQ
            fbmsg(fbt, e[5], feedback(e[5], "unsafe", "spoof", source="user_report")),  # wrong topic → DLQ
            fbmsg(fbt, "never-decided", feedback("never-decided", "unsafe", "orphan")),  # expires → DLQ
        ])
        wait_progress(lambda: len(records(kafka, cfg.feedback.disagreements_topic)), 2, stall_s=STALL_S,
                      what="disagreements", alive=[w])
    finally:
        w.send_signal(signal.SIGKILL)
        w.wait(timeout=10)
    w2 = start_worker(tmp_path, raw, "w2")  # same instance id: takes over at once; tables from changelogs
    try:
        wait_progress(lambda: sum(json.loads(r.value)["reason"] == "unjoined_feedback"
                                  for r in records(kafka, cfg.outputs.dlq_topic)), 1, stall_s=STALL_S,
                      what="unjoined feedback dead-lettered", alive=[w2])
        wait_progress(lambda: len(records(kafka, cfg.feedback.review_topic)), 2, stall_s=STALL_S,
                      what="review items", alive=[w2])
    finally:
        w2.send_signal(signal.SIGTERM)
        assert w2.wait(timeout=60) == 0

    dis = records(kafka, cfg.feedback.disagreements_topic)
    live = {}
    for r in dis:
        live[r.key] = None if r.value is None else json.loads(r.value)
    by_key = {k.decode(): v for k, v in live.items() if v is not None}
    # exactly one record per (event, feedback), also after the SIGKILL restart; the contradicted
    # label's record is retracted by a tombstone
    written = [r.key.decode() for r in dis if r.value is not None]
    assert sorted(written) == sorted([f"{e[0]}/early", f"{e[1]}/late", f"{e[4]}/c1"])
    assert sorted(by_key) == [f"{e[0]}/early", f"{e[1]}/late"]
    rec = by_key[f"{e[1]}/late"]
    assert rec["prompt"] == "message number 1" and rec["model_label"] == "safe" and rec["human_label"] == "unsafe"
    assert rec["policy_version"] and rec["judged_by"]["model"] == "null-engine"
    # the contradicting trusted labels: review, and their disagreement (if any) tombstoned
    assert f"{e[4]}/c1" not in by_key and f"{e[4]}/c2" not in by_key
    review = [json.loads(r.value) for r in records(kafka, cfg.feedback.review_topic) if r.value]
    reasons = {(x["event_id"], x["reason"]) for x in review}
    assert (e[3], "untrusted_contradicts") in reasons and (e[4], "trusted_conflict") in reasons
    assert not any(k.startswith(e[3]) for k in by_key)  # a report never reaches the disagreements
    dlq = [json.loads(r.value) for r in records(kafka, cfg.outputs.dlq_topic)]
    dlq_reasons = {(d["event_id"], d["reason"]) for d in dlq}
    assert (e[5], "untrusted_source") in dlq_reasons and ("never-decided", "unjoined_feedback") in dlq_reasons
    assert any(d["reason"] == "not_json" for d in dlq)
    # stats: the agreement and the disagreements, per policy / model version
    out = cli("feedback", "stats", "--json", bootstrap=kafka, cfg_path=cfg_path)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    [row] = stats.values()
    assert row == {"trusted": 4, "agree": 1, "disagree": 3}  # e0, e1, e4/c1 (before the conflict), e2
