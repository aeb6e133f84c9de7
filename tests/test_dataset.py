"""The retraining set builder: drops counted, dedupe, balance, replay, policy-version rendering,
manifest, and the topic path resuming from its consumer group (embedded broker)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from rsafe.models.prompt import build_user_turn
from rsafe.policies import PolicyRegistry
from rsafe.schemas.feedback import DisagreementRecord, FeedbackSource, ModelRef
from rsafe.training import dataset as ds
from rsafe.training.dataset import BuildSettings, ReplayExample, build

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
REG = PolicyRegistry.from_dirs()
MED = REG.get("medical-platform")
DEFAULT = REG.get("rsafe-default")


def record(i: int, prompt: str | None = "Which antibiotics should I buy online?", *, label: str = "safe",
           policy=MED, version: str | None = None, response: str | None = None, level: str = "prompt",
           minutes: int = 0) -> DisagreementRecord:
    return DisagreementRecord(
        event_id=f"e{i}", feedback_id=f"f{i}", prompt=prompt, response=response,
        content_missing=None if prompt is not None else "audit content mode hash, no content attached",
        policy=policy.name, policy_version=version or policy.version, level=level,
        judged_by=ModelRef(model="demo"), model_label="unsafe" if label == "safe" else "safe", human_label=label,
        source=FeedbackSource.REVIEWER, feedback_at=T0 + timedelta(minutes=minutes or i),
    )


def replay(n: int, label: str, start: int = 0) -> list[ReplayExample]:
    return [ReplayExample(prompt=f"replay message {label} {start + i}", label=label, policy="rsafe-default",
                          id=f"r-{label}-{start + i}") for i in range(n)]


def test_drops_are_counted_never_silent() -> None:
    records = [
        record(1),
        record(2, None),                                         # audit kept only a hash
        record(3, "hi", level="response"),                       # response level without a response
        record(4, "other", version="0123456789ab"),              # no stored text for this version
    ]
    built = build(records, settings=BuildSettings(replay_ratio=0, balance=False))
    assert [r.id for r in built.rows] == ["e1/f1"]
    assert built.counts["dropped"] == {"content_missing": 1, "response_missing": 1, "unknown_policy_version": 1}
    reasons = {d["key"]: d["reason"] for d in built.dropped.rows}
    assert reasons == {"e2/f2": "content_missing", "e3/f3": "response_missing", "e4/f4": "unknown_policy_version"}
    unknown = next(d for d in built.dropped.rows if d["reason"] == "unknown_policy_version")
    assert "medical-platform@0123456789ab" in unknown["detail"] and "--policy-dir" in unknown["detail"]


def test_invalid_lines_are_counted(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(record(1).model_dump_json() + "\nnot json\n\n" + json.dumps({"event_id": "x"}) + "\n")
    dropped = ds.Dropped()
    records = list(ds.parse_records(ds.read_file(f).lines, dropped))
    assert len(records) == 1 and dropped.counts == {"invalid_record": 2}
    assert [d["key"] for d in dropped.rows] == ["d.jsonl:2", "d.jsonl:4"]


def test_dedupe_by_content_and_policy_version() -> None:
    records = [
        record(1, "same text", minutes=1),
        record(2, "same text", minutes=5),                       # same content, same version: one row
        record(3, "same text", policy=DEFAULT, label="unsafe"),  # other policy version: its own row
        record(4, "disputed", label="safe"),
        record(5, "disputed", label="unsafe"),                   # trusted labels disagree: neither
        record(6, "same text", level="response", response="ok"),  # other level: its own row
    ]
    built = build(records, settings=BuildSettings(replay_ratio=0, balance=False))
    kept = sorted(r.id for r in built.rows)
    assert kept == ["e2/f2", "e3/f3", "e6/f6"]  # the latest feedback of the duplicates
    assert built.counts["dropped"] == {"conflicting_labels": 2, "duplicate": 1}
    assert len({r.content_hash for r in built.rows}) == 3


def test_content_hash_definition() -> None:
    a = ds.content_hash("v1", "prompt", "p", None)
    assert a == ds.content_hash("v1", "prompt", "p", "ignored at prompt level")
    assert a != ds.content_hash("v2", "prompt", "p", None)
    assert ds.content_hash("v1", "response", "p", "r") != ds.content_hash("v1", "response", "p", "r2")
    from rsafe.evaluation import Example

    ex = Example(id="x", prompt="p", response="r", label="safe", level="response")
    assert ds.message_hash("response", "p", "r") == ex.content_hash


def test_balance_with_replay() -> None:
    records = [record(i, f"medical {i}") for i in range(10)]                     # 10 safe
    pool = replay(30, "safe") + replay(30, "unsafe")
    built = build(records, replay=pool, settings=BuildSettings(replay_ratio=2.0, seed=1))
    assert built.counts["rows"] == 30 and built.counts["labels"] == {"safe": 15, "unsafe": 15}
    assert built.counts["by_source"] == {"disagreement": {"safe": 10}, "replay": {"safe": 5, "unsafe": 15}}
    again = build(records, replay=pool, settings=BuildSettings(replay_ratio=2.0, seed=1))
    assert [r.id for r in again.rows] == [r.id for r in built.rows]  # deterministic in the seed


def test_no_disagreement_is_dropped_for_balance() -> None:
    """Reviewer labels are the scarcest data: when the replay cannot balance the set, every
    disagreement stays and the counts say the balance was not met."""
    records = [record(i, f"medical {i}") for i in range(10)]
    built = build(records, replay=replay(3, "unsafe") + replay(5, "safe"), settings=BuildSettings(replay_ratio=1.0))
    assert built.counts["by_source"] == {"disagreement": {"safe": 10}, "replay": {"unsafe": 3}}
    assert built.counts["dropped"] == {} and built.counts["balance"].startswith("not met: 10 safe, 3 unsafe")


def test_disagreements_leaning_one_way_draw_more_replay_of_the_other_class() -> None:
    records = [record(i, f"medical {i}") for i in range(10)] + [record(20, "medical x", label="unsafe")]
    built = build(records, replay=replay(30, "safe") + replay(30, "unsafe"), settings=BuildSettings(replay_ratio=0.5))
    assert built.counts["labels"] == {"safe": 10, "unsafe": 10} and built.counts["balance"] == "met"
    assert built.counts["disagreements"] == 11 and built.counts["replay"] == 9  # ratio 0.5 would give 6


def test_replay_from_several_sources_by_share() -> None:
    records = [record(i, f"medical {i}", label="safe" if i % 2 else "unsafe") for i in range(10)]
    mine = ds.ReplaySource("mine.jsonl", replay(40, "safe", 0) + replay(40, "unsafe", 0), 0.75)
    other = ds.ReplaySource("demo", replay(40, "safe", 100) + replay(40, "unsafe", 100))
    built = build(records, replay=[mine, other], settings=BuildSettings(replay_ratio=2.0))
    used = {s["source"]: s["used"] for s in built.counts["replay_sources"]}
    assert used["mine.jsonl"] + used["demo"] == 20 and built.counts["labels"] == {"safe": 15, "unsafe": 15}
    assert 15 <= used["mine.jsonl"] <= 16  # 3/4 of 20, rounded per class
    assert [s["share"] for s in built.counts["replay_sources"]] == [0.75, 0.25]
    short = ds.ReplaySource("mine.jsonl", replay(2, "safe") + replay(2, "unsafe"), 0.75)  # runs short: the other fills
    built = build(records, replay=[short, other], settings=BuildSettings(replay_ratio=2.0))
    assert {s["source"]: s["used"] for s in built.counts["replay_sources"]} == {"mine.jsonl": 4, "demo": 16}
    with pytest.raises(ds.DatasetError, match="add up to at most 1"):
        build(records, replay=[ds.ReplaySource("a", [], 0.8), ds.ReplaySource("b", [], 0.5)])
    assert ds.parse_replay_arg("demo:0.3") == ("demo", 0.3) and ds.parse_replay_arg("C:/x.jsonl") == ("C:/x.jsonl", None)


def test_replay_without_a_version_uses_the_policy_dir_or_the_store(tmp_path: Path) -> None:
    from rsafe.policies import PolicyStore, StoredPolicy, load_policy

    brand = yaml.safe_load((Path(ds.BUNDLED_DIR) / "rsafe-default.yaml").read_text())
    brand["name"] = "brand-platform"
    brand["categories"].append({"code": "U19", "name": "Competitor Promotion"})
    folder = tmp_path / "team-policies"
    folder.mkdir()
    (folder / "brand.yaml").write_text(yaml.safe_dump(brand, allow_unicode=True))
    rows = [ReplayExample(prompt="buy from our competitor", label="unsafe", policy="brand-platform")]
    records = [record(1, "medical 1")]
    assert build(records, replay=rows, settings=BuildSettings(replay_ratio=1, balance=False)).counts["dropped"] == {
        "unknown_policy": 1}
    current = ds.current_policy([folder])
    built = build(records, replay=rows, settings=BuildSettings(replay_ratio=1, balance=False), current=current)
    assert built.counts["replay"] == 1 and any(r.policy.name == "brand-platform" for r in built.rows)
    stored = load_policy(folder / "brand.yaml")
    from_store = ds.current_policy([], PolicyStore([StoredPolicy.of(stored)]))
    assert from_store("brand-platform").version == stored.version


def test_replay_unbalanced_mix_and_duplicates() -> None:
    records = [record(i, f"medical {i}") for i in range(4)]
    pool = replay(10, "unsafe") + [ReplayExample(prompt="medical 0", label="safe", policy="medical-platform",
                                                 policy_version=MED.version, id="dup")]
    built = build(records, replay=pool, settings=BuildSettings(replay_ratio=0.5, balance=False))
    assert built.counts["disagreements"] == 4 and built.counts["replay"] == 2
    assert built.counts["dropped"] == {"replay_duplicate": 1}


def test_evaluation_rows_are_excluded() -> None:
    records = [record(1, "in the eval set"), record(2, "training only")]
    pool = replay(4, "unsafe")
    exclude = {ds.message_hash("prompt", "in the eval set", None), ds.message_hash("prompt", pool[0].prompt, None)}
    built = build(records, replay=pool, settings=BuildSettings(replay_ratio=1, balance=False), exclude_hashes=exclude)
    assert {r.message_hash for r in built.rows}.isdisjoint(exclude)
    assert built.counts["dropped"] == {"evaluation_overlap": 2}


def test_nothing_usable_is_an_error() -> None:
    with pytest.raises(ds.DatasetError, match=r"no usable disagreement among 1 records.*content_missing"):
        build([record(1, None)])


def _old_medical_policy(tmp_path: Path) -> Path:
    """An earlier text of medical-platform (one more category): a stored older version."""
    data = yaml.safe_load((Path(ds.BUNDLED_DIR) / "medical-platform.yaml").read_text())
    data["categories"].append({"code": "U19", "name": "Telehealth Impersonation"})
    folder = tmp_path / "old-policies"
    folder.mkdir()
    (folder / "medical-platform-v0.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    return folder


def test_rows_render_with_the_policy_version_they_were_judged_under(tmp_path: Path) -> None:
    from functools import partial

    folder = _old_medical_policy(tmp_path)
    old = ds.resolve_policy("medical-platform", _version_in(folder), policy_dirs=[folder])
    assert old.version != MED.version and old.category("U19") is not None
    records = [record(1, "judged under the old text", version=old.version),
               record(2, "judged under the current text"),
               record(3, "an agent reply", level="response", response="Take two pills.", policy=DEFAULT,
                      label="unsafe")]
    lookup = partial(ds.resolve_policy, policy_dirs=[folder])
    built = build(records, settings=BuildSettings(replay_ratio=0, balance=False), lookup=lookup)
    rows = {r.id: r.record() for r in built.rows}
    first = rows["e1/f1"]["prompt"]
    assert first == [{"role": "user", "content": build_user_turn(old, "judged under the old text", None, "prompt")}]
    assert "U19 - Telehealth Impersonation" in first[0]["content"]
    assert rows["e1/f1"]["policy_version"] == old.version
    current = rows["e2/f2"]["prompt"][0]["content"]
    assert current == build_user_turn(MED, "judged under the current text") and "U19" not in current
    assert "U13 - Unauthorized Professional Advice" not in current
    response = rows["e3/f3"]
    assert response["prompt"][0]["content"] == build_user_turn(DEFAULT, "an agent reply", "Take two pills.", "response")
    assert response["level"] == "response" and response["label"] == "unsafe"
    # without the folder, the old version is unknown: dropped with the reason, not rendered with today's text
    plain = build(records, settings=BuildSettings(replay_ratio=0, balance=False))
    assert plain.counts["dropped"] == {"unknown_policy_version": 1}


def test_the_policy_store_comes_first_and_tampered_text_is_an_error(tmp_path: Path) -> None:
    from rsafe.policies import PolicyIntegrityError, PolicyStore, StoredPolicy, load_policy

    old = load_policy(next(_old_medical_policy(tmp_path).glob("*.yaml")))
    store = PolicyStore([StoredPolicy.of(old)])
    assert ds.resolve_policy("medical-platform", old.version, store=store) == old  # no --policy-dir needed
    assert ds.resolve_policy(MED.name, MED.version, store=store) == MED  # bundled files still answer
    tampered = StoredPolicy.of(old).model_copy(deep=True)
    tampered.policy["categories"][0]["name"] += " (edited later)"
    with pytest.raises(PolicyIntegrityError, match="changed after it was published"):
        ds.resolve_policy("medical-platform", old.version, store=PolicyStore([tampered]))
    with pytest.raises(ds.PolicyVersionError, match="policies topic"):
        ds.resolve_policy("medical-platform", "0" * 12, store=store)


def _version_in(folder: Path) -> str:
    from rsafe.policies import load_policy

    return load_policy(next(folder.glob("*.yaml"))).version


def test_save_and_manifest(tmp_path: Path) -> None:
    records = [record(i, f"medical {i}") for i in range(6)] + [record(9, None)]
    built = build(records, replay=replay(20, "unsafe") + replay(20, "safe"), settings=BuildSettings(replay_ratio=1))
    out = ds.save(built, tmp_path / "set", sources=[{"kind": "file", "path": "x"}], settings=BuildSettings())
    manifest = ds.load_manifest(out)
    rows = ds.load_rows(out)
    assert len(rows) == manifest["counts"]["rows"] == 12
    assert {"prompt", "label", "policy_version", "content_hash", "message_hash"} <= set(rows.column_names)
    assert manifest["counts"]["dropped"] == {"content_missing": 1}
    assert manifest["dropped"] == [{"reason": "content_missing", "key": "e9/f9",
                                    "detail": "audit content mode hash, no content attached"}]
    assert sorted(r["content_hash"] for r in manifest["rows"]) == sorted(rows["content_hash"])
    assert manifest["policy_versions"] == {f"medical-platform@{MED.version}": 6, f"rsafe-default@{DEFAULT.version}": 6}
    assert rows[0]["prompt"][0]["role"] == "user"
    with pytest.raises(ds.DatasetError, match="already holds a dataset"):
        ds.save(built, out, sources=[], settings=BuildSettings())


@pytest.mark.slow
def test_records_render_like_inference_with_the_chat_template(demo_model_dir: Path) -> None:
    """TRL renders the conversational prompt with the model's chat template: the same text (and
    tokens) ``render_prompt`` gives the engines at inference."""
    from transformers import AutoTokenizer

    from rsafe.models.prompt import render_prompt

    tok = AutoTokenizer.from_pretrained(str(demo_model_dir))
    row = build([record(1, "Which dose of my dad's pills should I take?")],
                settings=BuildSettings(replay_ratio=0)).rows[0].record()
    text = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert text == render_prompt(tok, row["prompt"][0]["content"])
    ids = tok.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(ids) == tok.encode(text, add_special_tokens=False)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rsafe.cli", "train", "dataset", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_from_file(tmp_path: Path) -> None:
    from rsafe.demo import drift

    paths = drift.write_data(tmp_path / "drift", drift.DriftScenario(n_feedback=20, n_contrast=10, n_general=20))
    res = _cli("--from-file", str(paths["disagreements.jsonl"]), "--replay", str(paths["replay.jsonl"]),
               "--replay-ratio", "1", "--exclude-hashes", str(paths["eval_hashes.txt"]), "--out", str(tmp_path / "set"))
    assert res.returncode == 0, res.stderr
    manifest = ds.load_manifest(tmp_path / "set")
    counts = manifest["counts"]
    assert counts["dropped"]["content_missing"] == 1  # every 20th feedback row has no content
    assert counts["labels"]["safe"] == counts["labels"]["unsafe"]
    assert manifest["sources"][0]["kind"] == "file" and len(manifest["sources"][0]["sha256"]) == 64
    assert manifest["sources"][1]["sha256"]
    eval_hashes = set(paths["eval_hashes.txt"].read_text().split())
    assert not eval_hashes & {r["message_hash"] for r in manifest["rows"]}
    # the registered evaluation sets that are here (the demo sets) are never trained on, by default
    excluded = {s["name"] for s in manifest["excluded_evaluation_sets"]}
    assert {"demo", "demo_kids", "demo_financial"} <= excluded
    mixed = _cli("--from-file", str(paths["disagreements.jsonl"]), "--replay", f"{paths['replay.jsonl']}:0.5",
                 "--replay", "demo", "--replay-pool", "400", "--replay-ratio", "2", "--out", str(tmp_path / "mixed"))
    assert mixed.returncode == 0, mixed.stderr
    m = ds.load_manifest(tmp_path / "mixed")
    assert [(s["path"], s["share"]) for s in m["sources"][1:]] == [(str(paths["replay.jsonl"]), 0.5), ("demo", 0.5)]
    from rsafe.demo.benchmarks import demo_examples, register_demo_benchmarks

    register_demo_benchmarks()
    demo_hashes = {e.content_hash for e in demo_examples("rsafe-default")}
    assert not demo_hashes & {r["message_hash"] for r in m["rows"]}
    again = _cli("--from-file", str(paths["disagreements.jsonl"]), "--out", str(tmp_path / "set"))
    assert again.returncode == 2 and "already holds a dataset" in again.stderr


@pytest.mark.slow
def test_topic_resumes_from_its_consumer_group(tmp_path: Path) -> None:
    """Each run reads what arrived since the last saved dataset; a failed run commits nothing."""
    from kafka import KafkaProducer

    from rsafe.stream.broker import EmbeddedBroker

    def send(broker: EmbeddedBroker, records: list[DisagreementRecord]) -> None:
        producer = KafkaProducer(bootstrap_servers=[broker.bootstrap], acks="all")
        for r in records:
            producer.send(ds.DEFAULT_TOPIC, key=r.event_id.encode(), value=r.model_dump_json().encode())
        producer.flush()
        producer.close()

    def run(broker: EmbeddedBroker, out: str, *extra: str) -> subprocess.CompletedProcess:
        return _cli("--from-topic", "--broker", broker.bootstrap, "--out", str(tmp_path / out), *extra)

    from rsafe.policies import load_policy
    from rsafe.policies.store import StoredPolicy

    old = load_policy(next(_old_medical_policy(tmp_path).glob("*.yaml")))  # a version no file of the repo holds
    with EmbeddedBroker(tmp_path / "broker", port=0) as broker:
        producer = KafkaProducer(bootstrap_servers=[broker.bootstrap], acks="all")
        stored = StoredPolicy.of(old, published_by="worker-1")
        producer.send(ds.DEFAULT_POLICIES_TOPIC, key=stored.key.encode(), value=stored.to_json())
        producer.flush()
        producer.close()
        send(broker, [record(i, f"medical {i}") for i in range(4)] + [record(4, "medical 4", version=old.version)]
             + [record(5, None)])
        first = run(broker, "a")
        assert first.returncode == 0, first.stderr
        m1 = ds.load_manifest(tmp_path / "a")
        assert m1["sources"][0]["offsets"] == {"0": [0, 6]} and m1["counts"]["dropped"] == {"content_missing": 1}
        assert m1["counts"]["disagreements"] == 5
        # the row judged under the stored old version is rendered with that exact text (policy store)
        assert m1["policy_versions"].get(f"medical-platform@{old.version}") == 1
        rows = {r["id"]: r for r in ds.load_rows(tmp_path / "a")}
        assert rows["e4/f4"]["prompt"][0]["content"] == build_user_turn(old, "medical 4", None, "prompt")

        send(broker, [record(i, f"medical {i}") for i in range(10, 13)])
        second = run(broker, "b")
        assert second.returncode == 0, second.stderr
        m2 = ds.load_manifest(tmp_path / "b")
        assert m2["sources"][0]["offsets"] == {"0": [6, 9]} and m2["counts"]["disagreements"] == 3

        send(broker, [record(20, None)])  # nothing usable: the run fails and commits nothing
        failed = run(broker, "c")
        assert failed.returncode == 1 and "no usable disagreement" in failed.stderr
        send(broker, [record(21, "medical 21")])
        retried = run(broker, "d")
        assert retried.returncode == 0, retried.stderr
        m4 = ds.load_manifest(tmp_path / "d")
        assert m4["sources"][0]["offsets"] == {"0": [9, 11]} and m4["counts"]["dropped"] == {"content_missing": 1}

        other = run(broker, "e", "--group-id", "another-job")  # its own group: from the beginning
        assert other.returncode == 0, other.stderr
        assert ds.load_manifest(tmp_path / "e")["sources"][0]["offsets"] == {"0": [0, 11]}


# --------------------------------------------------------------------------- the drift scenario


def test_drift_scenario_data_is_template_disjoint_from_its_evaluation(tmp_path: Path) -> None:
    from rsafe.demo import drift
    from rsafe.demo.corpus import corpus

    s = drift.DriftScenario(n_feedback=40, n_contrast=40, n_general=40, n_platform=40, n_ablation=2)
    records = drift.disagreement_records(s)
    assert len(records) == 40 and sum(r.prompt is None for r in records) == 2  # every 20th: content missing
    assert {(r.policy, r.policy_version, r.human_label, r.model_label) for r in records} == {
        ("medical-platform", MED.version, "safe", "unsafe")}
    sets = drift.eval_sets(s)
    assert {k: (p, {e.label for e in rows}) for k, (p, rows) in sets.items()} == {
        "drift_heldout": ("medical-platform", {"safe"}), "contrast_heldout": ("rsafe-default", {"unsafe"}),
        "general": ("rsafe-default", {"safe", "unsafe"}), "platform_other": ("medical-platform", {"unsafe"})}
    # held-out drift messages come from templates that no training row uses
    bank = corpus().harmful["medical"]
    train_prompts = {r.prompt for r in records if r.prompt} | {e.prompt for e in drift.replay_examples(s)}
    for e in sets["drift_heldout"][1]:
        assert e.prompt not in train_prompts
    assert set(bank.heldout).isdisjoint(bank.prompts)
    # the written inputs build a set with no evaluation message in it
    paths = drift.write_data(tmp_path, s)
    assert len(list(paths["policies"].glob("*.yaml"))) == 17
    dropped = ds.Dropped()
    recs = list(ds.parse_records(ds.read_file(paths["disagreements.jsonl"]).lines, dropped))
    from functools import partial

    built = build(recs, replay=ds.read_replay(paths["replay.jsonl"]), settings=BuildSettings(replay_ratio=5),
                  lookup=partial(ds.resolve_policy, policy_dirs=[paths["policies"]]),
                  exclude_hashes=ds.read_hashes(paths["eval_hashes.txt"]), dropped=dropped)
    assert not {r.message_hash for r in built.rows} & set(drift.eval_hashes(s))
    assert "unknown_policy_version" not in built.counts["dropped"]
    versions = {r.policy.name for r in built.rows}
    assert {"medical-platform", "rsafe-default"} <= versions and any(v.startswith("rsafe-default-no-") for v in versions)


def test_paired_contrast_rows_are_the_reviewed_messages() -> None:
    from rsafe.demo import drift

    s = drift.DriftScenario(n_feedback=10, n_contrast=10, n_general=0, n_platform=0)
    reviewed = [r.prompt for r in drift.disagreement_records(s) if r.prompt]
    contrast = [e for e in drift.replay_examples(s) if e.id and e.id.startswith("contrast-")]
    assert {e.prompt for e in contrast} >= set(reviewed)
    assert {(e.policy, e.label) for e in contrast} == {("rsafe-default", "unsafe")}


def test_kept_family_rows_rehearse_every_other_category_under_both_policies() -> None:
    from collections import Counter

    from rsafe.demo import drift

    s = drift.DriftScenario(n_feedback=10, n_contrast=10, n_general=0, n_platform=0, n_kept=2)
    kept = [e for e in drift.replay_examples(s) if e.id and e.id.startswith("kept-")]
    assert {e.label for e in kept} == {"unsafe"} and {e.policy for e in kept} == {"rsafe-default", "medical-platform"}
    per_message = Counter(e.prompt for e in kept)
    assert len(per_message) == 17 * 2 and set(per_message.values()) == {2}  # 17 families (all but medical) x 2
    built = build(drift.disagreement_records(s), replay=kept, settings=BuildSettings(replay_ratio=10, balance=False,
                                                                                     pair_by_message=True))
    order = [r.prompt for r in built.rows if r.source == "replay"]
    both = [i for i in range(len(built.rows) - 1) if built.rows[i].prompt == built.rows[i + 1].prompt]
    assert len(both) == len(set(order)) and all(i % 2 == 0 for i in both)  # each message's two rows side by side


def test_targets() -> None:
    from rsafe.demo import drift

    def scores(drift_acc: float, contrast: float, general: float, fmt: float = 1.0) -> dict:
        return {k: {"accuracy": a, "format_rate": fmt} for k, a in
                (("drift_heldout", drift_acc), ("contrast_heldout", contrast), ("general", general))}

    ok = drift.targets(scores(0.0, 1.0, 0.9), scores(0.2, 0.99, 0.885))
    assert all(t["ok"] for t in ok.values()) and set(ok) == {"drift_gain", "contrast_kept", "general_kept", "format"}
    bad = drift.targets(scores(0.0, 1.0, 0.9), scores(0.1, 0.9, 0.85, fmt=0.98))
    assert not any(t["ok"] for t in bad.values())
    edge = drift.targets(scores(0.0, 1.0, 1.0), scores(1.0, 1.0, 0.98))  # 0.98 - 1.0 is -0.020000000000000018
    assert edge["general_kept"] == {"value": -0.02, "ok": True}  # "within 2 points"


def test_pair_by_message_keeps_a_message_and_its_contrast_in_one_step() -> None:
    records = [record(i, f"medical {i}") for i in range(6)]
    contrast = [ReplayExample(prompt=f"medical {i}", label="unsafe", policy="rsafe-default", id=f"c{i}")
                for i in range(6)]
    pool = contrast + replay(6, "safe") + replay(6, "unsafe")
    built = build(records, replay=pool, settings=BuildSettings(replay_ratio=3, pair_by_message=True, seed=3))
    rows = built.rows
    assert built.counts["paired_messages"] == 6 and built.counts["labels"] == {"safe": 12, "unsafe": 12}
    for i in range(0, len(rows), 2):  # units of two at even offsets: whole units in every 4-prompt step
        a, b = rows[i], rows[i + 1]
        if a.prompt.startswith("medical") or b.prompt.startswith("medical"):
            assert a.prompt == b.prompt and {a.label, b.label} == {"safe", "unsafe"}


def test_the_same_records_in_any_order_make_the_same_set() -> None:
    """Records reach the builder in whatever order the topic's partitions delivered them: the rows
    and their order (hence the GRPO run) depend on the records only."""
    import random

    records = [record(i, f"medical question {i}") for i in range(12)]
    shuffled = records[:]
    random.Random(5).shuffle(shuffled)
    pool = replay(12, "unsafe") + replay(6, "safe")
    settings = BuildSettings(replay_ratio=1.0, pair_by_message=True)
    a, b = build(records, replay=pool, settings=settings), build(shuffled, replay=pool, settings=settings)
    assert [(r.id, r.label) for r in a.rows] == [(r.id, r.label) for r in b.rows]
