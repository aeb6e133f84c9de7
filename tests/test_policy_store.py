"""The policy store: every version that judged anything stays retrievable by name@version."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest
import yaml

from rsafe.policies import (
    PolicyError,
    PolicyIntegrityError,
    PolicyRegistry,
    PolicyStore,
    StoredPolicy,
    UnknownPolicyError,
    parse_key,
)

REGISTRY = PolicyRegistry.from_dirs()


def test_parse_key():
    assert parse_key("kids-platform@abc123") == ("kids-platform", "abc123")
    assert parse_key("kids-platform") == ("kids-platform", None)
    for bad in ("@abc", "name@", ""):
        with pytest.raises(PolicyError):
            parse_key(bad)


def test_store_keeps_versions_and_checks_their_content():
    kids = REGISTRY.get("kids-platform")
    stricter = kids.model_copy(update={"unsafe_threshold": 0.1})
    first, second = StoredPolicy.of(kids, "w1"), StoredPolicy.of(stricter, "w2")
    store = PolicyStore([first, second])
    assert store.get("kids-platform", kids.version) == kids
    assert store.get("kids-platform", stricter.version).unsafe_threshold == 0.1
    assert [r.version for r in store.history("kids-platform")] == [kids.version, stricter.version]
    assert not store.add(StoredPolicy.of(kids, "w3"))  # the first record of a key is kept
    assert store.record("kids-platform", kids.version).published_by == "w1"
    with pytest.raises(UnknownPolicyError, match="stored versions of 'kids-platform'"):
        store.get("kids-platform", "000000000000")
    # a round trip through the wire format
    again = StoredPolicy.from_json(first.to_json())
    assert again.load() == kids and again.first_seen_at == first.first_seen_at


def test_tampered_content_is_detected():
    kids = REGISTRY.get("kids-platform")
    record = json.loads(StoredPolicy.of(kids).to_json())
    record["policy"]["unsafe_threshold"] = 0.99  # the text changed, the version did not
    tampered = StoredPolicy.model_validate(record)
    with pytest.raises(PolicyIntegrityError, match="hashes to"):
        PolicyStore([tampered]).get("kids-platform", kids.version)
    record["policy"] = {"name": "kids-platform"}  # not a policy at all
    with pytest.raises(PolicyIntegrityError, match="not a valid policy"):
        StoredPolicy.model_validate(record).load()
    with pytest.raises(PolicyIntegrityError):
        StoredPolicy.from_json(b"{not json")
    # only the description is outside the version: changing it keeps the version valid
    record = json.loads(StoredPolicy.of(kids).to_json())
    record["policy"]["description"] = "edited description"
    assert StoredPolicy.model_validate(record).load().version == kids.version


def test_store_from_topic_values_names_an_unreadable_record_or_hands_it_over():
    kids = REGISTRY.get("kids-platform")
    first, again = StoredPolicy.of(kids, "w1"), StoredPolicy.of(kids, "w2")
    values = [("p[0]@0", first.to_json()), ("p[0]@1", None), ("p[0]@2", b"{not json"), ("p[0]@3", again.to_json())]
    with pytest.raises(PolicyIntegrityError, match=r"p\[0\]@2: unreadable"):
        PolicyStore.from_topic_values(values)
    skipped: list[str] = []
    store = PolicyStore.from_topic_values(values, on_unreadable=lambda where, err: skipped.append(where))
    assert skipped == ["p[0]@2"] and len(store) == 1  # the tombstone ignored, the first record kept
    assert store.record("kids-platform", kids.version).published_by == "w1"


@pytest.mark.slow
def test_worker_publishes_on_start_and_reload_and_the_cli_reads_the_store(tmp_path):
    from rsafe.models.config import local_engine_config
    from rsafe.models.engines import make_backend
    from rsafe.schemas.kafka import read_policy_store
    from rsafe.stream.broker import EmbeddedBroker
    from rsafe.stream.clients import produce, read_all
    from rsafe.stream.config import load_config
    from rsafe.stream.policy_store import PolicyPublisher
    from rsafe.stream.worker import GuardWorker

    prefix = f"ps{uuid.uuid4().hex[:6]}"
    pdir = tmp_path / "policies"
    pdir.mkdir()
    custom = yaml.safe_load(yaml.safe_dump(REGISTRY.get("kids-platform").model_dump(mode="json")))
    custom["name"] = "custom"
    (pdir / "custom.yaml").write_text(yaml.safe_dump(custom))
    v1 = PolicyRegistry.from_dirs(pdir).get("custom").version
    with EmbeddedBroker(tmp_path / "broker", port=0) as broker:
        cfg = load_config(data={
            "broker": broker.bootstrap, "group_id": prefix, "policy_dirs": [str(pdir)],
            "inputs": [{"topic": f"{prefix}.in", "policy": "custom"}],
            "outputs": {"audit_topic": f"{prefix}.audit", "dlq_topic": f"{prefix}.dlq",
                        "policies_topic": f"{prefix}.policies"},
            "policy_reload": {"watch": False}, "http": {"port": 0},
        }, env={})
        backend = make_backend(local_engine_config("null-engine", "null"))

        async def run() -> int:
            worker = GuardWorker(cfg, backend=backend)
            task = asyncio.create_task(worker.run())
            await asyncio.wait_for(worker.ready.wait(), 60)
            custom["unsafe_threshold"] = 0.77
            (pdir / "custom.yaml").write_text(yaml.safe_dump(custom))
            worker.request_reload()
            for _ in range(100):
                if worker.telemetry.policy_reloads:
                    break
                await asyncio.sleep(0.1)
            worker.request_stop()
            return await task

        assert asyncio.run(run()) == 0
        v2 = PolicyRegistry.from_dirs(pdir).get("custom").version
        store = read_policy_store([broker.bootstrap], cfg.outputs.policies_topic, strict=False)
        assert {"rsafe-default", "kids-platform", "custom", "medical-platform"} <= set(store.names())
        assert [r.version for r in store.history("custom")] == [v1, v2]
        assert store.get("custom", v1).unsafe_threshold == 0.3  # the old text, after the file changed
        # idempotent: a second publisher (another worker) adds nothing for the same versions
        records = read_all([broker.bootstrap], [cfg.outputs.policies_topic])
        again = PolicyPublisher([broker.bootstrap], cfg.outputs.policies_topic, "w2")
        assert again.publish(PolicyRegistry.from_dirs(pdir)) == []
        assert len(read_all([broker.bootstrap], [cfg.outputs.policies_topic])) == len(records)

        # the CLI: show NAME@VERSION prints the stored prompt text; history lists the versions
        env_args = ["--broker", broker.bootstrap, "--topic", cfg.outputs.policies_topic]
        out = subprocess.run([sys.executable, "-m", "rsafe.cli", "policy", "show", f"custom@{v1}", *env_args,
                              "--prompt", "hello"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        from rsafe.models.prompt import build_user_turn

        assert out.stdout == build_user_turn(store.get("custom", v1), "hello")
        out = subprocess.run([sys.executable, "-m", "rsafe.cli", "policy", "history", "custom", *env_args,
                              "--policy-dir", str(pdir)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert [ln.split("\t")[0] for ln in lines] == [f"custom@{v1}", f"custom@{v2}"]
        assert "(current file)" in lines[1] and "first seen" in lines[0]
        out = subprocess.run([sys.executable, "-m", "rsafe.cli", "policy", "show", "custom@000000000000",
                              *env_args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "not in the store" in out.stderr
        # a tampered record on the topic is detected when read
        kids = REGISTRY.get("kids-platform")
        bad = json.loads(StoredPolicy.of(kids).to_json())
        bad.update(name="evil", policy={**bad["policy"], "name": "evil"})
        from rsafe.stream.clients import Message

        produce([broker.bootstrap], [Message(cfg.outputs.policies_topic, f"evil@{kids.version}".encode(),
                                             json.dumps(bad).encode())])
        with pytest.raises(PolicyIntegrityError):
            read_policy_store([broker.bootstrap], cfg.outputs.policies_topic, strict=False).get("evil", kids.version)
        # an unreadable record: the worker and the CLI skip it, the retraining job (strict) stops on it
        produce([broker.bootstrap], [Message(cfg.outputs.policies_topic, b"junk@1", b"not json")])
        assert "custom" in read_policy_store([broker.bootstrap], cfg.outputs.policies_topic, strict=False).names()
        with pytest.raises(PolicyIntegrityError, match=rf"{cfg.outputs.policies_topic}\[0\]@\d+: unreadable"):
            read_policy_store([broker.bootstrap], cfg.outputs.policies_topic, strict=True)
