"""``rsafe train promote`` and ``rsafe models list|show`` on the demo model (transformers engine,
structured decoding off, the real gate): an adapter trained on flipped labels is rejected and kept;
the demo corpus adapter, measured against it on an operator's promotion set, is accepted and
published; rollback publishes an earlier promoted version again.

(Acceptance is shown against a worse current version, on a promotion set given with
``--promotion-set``: 180 rows instead of the demo set's 460, so both gates take half the time; the
demo set itself is checked in ``test_the_demo_promotion_set``, and gated end to end by
``make loop-demo``.)"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from rsafe.training.registry import Registry
from streamkit import kafka  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


def rsafe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rsafe.cli", *args], capture_output=True, text=True, timeout=900)


def test_promote_gates_publishes_and_rolls_back(tmp_path, kafka, demo_model_dir, demo_lora_dir, flipped_lora):  # noqa: F811
    from rsafe.demo.benchmarks import demo_examples
    from rsafe.stream.clients import read_all
    from rsafe.training.promote import PromotionSet, save_promotion_set

    reg = tmp_path / "registry"
    topic = f"models-{uuid.uuid4().hex[:6]}"
    # the demo adapters come from the demo build, not from a `train dataset` set: nothing to check overlap against
    common = ["--registry", str(reg), "--model", str(demo_model_dir), "--engine", "transformers",
              "--max-tokens", "96", "--broker", kafka, "--control-topic", topic, "--skip-overlap-check"]
    pset = save_promotion_set(PromotionSet(demo_examples("rsafe-default", n=60), "rsafe-default",
                                           demo_examples("kids-platform", n=50), "kids-platform"), tmp_path / "pset")

    # 1. flipped labels vs the base model: rejected, kept, marked, nothing published
    bad = rsafe("train", "promote", str(flipped_lora), "--promotion-set", str(pset), *common)
    assert bad.returncode == 3, bad.stderr[-3000:]
    rejected = json.loads(bad.stdout)
    assert rejected["status"] == "rejected" and not rejected["accepted"]
    assert any(r.startswith("FAIL general F1") for r in rejected["reasons"]), rejected["reasons"]

    # 2. the corpus adapter against that worse version, on an operator's promotion set: accepted, published
    good = rsafe("train", "promote", str(demo_lora_dir), "--against", rejected["ref"], "--promotion-set", str(pset),
                 "--approver", "ann", *common)
    assert good.returncode == 0, good.stderr[-3000:]
    promoted = json.loads(good.stdout)
    assert promoted["status"] == "promoted" and promoted["accepted"], promoted
    assert all(r.startswith(("PASS", "INFO")) for r in promoted["reasons"]), promoted["reasons"]

    # the registry: both kept, one current, the gate's figures on the cards
    listed = [json.loads(line) for line in rsafe("models", "list", "--registry", str(reg), "--json").stdout.splitlines()]
    by_status = {r["status"]: r for r in listed}
    assert set(by_status) == {"promoted", "rejected"} and by_status["promoted"]["current"]
    shown = json.loads(rsafe("models", "show", "guard", "--registry", str(reg)).stdout)
    assert shown["version"] == promoted["ref"].split("@")[1] and shown["promoted_by"] == "ann"
    gate = shown["gate"]
    assert gate["accepted"] and gate["against"] == rejected["ref"]
    assert gate["candidate_metrics"]["slice_accuracy"] >= gate["current_metrics"]["slice_accuracy"] + 10
    assert gate["settings"]["promotion_set"]["slice_policy"] == "kids-platform"
    table = rsafe("models", "list", "--registry", str(reg)).stdout
    assert "rejected" in table and "promoted*" in table

    # 3. a rejected version cannot be rolled back to; the promoted one can (no gate, a control record)
    no = rsafe("train", "promote", rejected["ref"], "--rollback", *common)
    assert no.returncode == 1 and "never promoted" in no.stderr
    back = rsafe("train", "promote", promoted["ref"], "--rollback", "--approver", "bob", *common)
    assert back.returncode == 0, back.stderr[-2000:]
    version = promoted["ref"].split("@")[1]
    records = [json.loads(r.value) for r in read_all([kafka], [topic])]
    assert [(r["version"], r["rollback"]) for r in records] == [(version, False), (version, True)]
    assert Registry(reg).current_version("guard") == version


def test_the_demo_promotion_set():
    """The gate's default set: the registered ``demo`` general set under rsafe-default and ≥ 50 held-out
    drift messages under medical-platform (safe there), sharing no row."""
    from rsafe.demo.benchmarks import demo_examples
    from rsafe.demo.drift import demo_promotion_set

    pset = demo_promotion_set()
    assert (pset.general_policy, pset.slice_policy) == ("rsafe-default", "medical-platform")
    assert [e.content_hash for e in pset.general] == [e.content_hash for e in demo_examples("rsafe-default")]
    assert len(pset.slice) >= 50 and {e.label for e in pset.slice} == {"safe"}
    assert not {e.content_hash for e in pset.general} & {e.content_hash for e in pset.slice}


def test_promote_refuses_the_demo_set_for_a_model_that_is_not_the_demo_model(tmp_path, demo_model_dir):
    """Toy data stays off production paths: without ``--promotion-set`` only the demo model is gated
    (on the demo's synthetic set); a real model is refused before any engine starts."""
    from rsafe.demo.build import is_demo_model

    real = tmp_path / "real-model"
    real.mkdir()
    (real / "config.json").write_text("{}")
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    common = ("--registry", str(tmp_path / "registry"), "--no-publish", "--engine", "transformers")
    out = rsafe("train", "promote", str(candidate), "--model", str(real), *common)
    assert out.returncode == 2, out.stderr
    assert "is not the demo model" in out.stderr and "--promotion-set DIR" in out.stderr
    assert "docs/TRAINING.md" in out.stderr
    # a candidate trained on a real model is refused too, even when the gate's base is the demo model
    (candidate / "training_summary.json").write_text(json.dumps({"base_model": str(real)}))
    out = rsafe("train", "promote", str(candidate), "--model", str(demo_model_dir), *common)
    assert out.returncode == 2 and str(real) in out.stderr
    assert is_demo_model(demo_model_dir) and not is_demo_model(real)


def test_the_gate_resolves_policies_as_the_dataset_does(tmp_path):
    """A promotion set under a team's own policy: without ``--policy-dir`` (and no store to read) it is
    refused before any engine starts; with it, the gate's policies hold it."""
    import argparse

    import yaml

    from rsafe.evaluation.benchmarks import Example
    from rsafe.policies import BUNDLED_DIR
    from rsafe.training.cli import _gate_policies
    from rsafe.training.promote import PromotionSet, save_promotion_set

    brand = yaml.safe_load((BUNDLED_DIR / "rsafe-default.yaml").read_text())
    brand["name"] = "brand-platform"
    brand["categories"].append({"code": "U19", "name": "Competitor Promotion"})
    folder = tmp_path / "team-policies"
    folder.mkdir()
    (folder / "brand.yaml").write_text(yaml.safe_dump(brand, allow_unicode=True))
    rows = [Example(id=f"s{i}", prompt=f"try the competitor's shop {i}", label="unsafe") for i in range(3)]
    pset = save_promotion_set(PromotionSet(rows, "rsafe-default", rows, "brand-platform"), tmp_path / "pset")
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    common = ("--registry", str(tmp_path / "registry"), "--no-publish", "--engine", "transformers",
              "--model", str(tmp_path / "base"), "--promotion-set", str(pset))
    out = rsafe("train", "promote", str(candidate), *common)
    assert out.returncode == 2 and "unknown policy 'brand-platform' in the promotion set" in out.stderr, out.stderr
    assert "--policy-dir" in out.stderr
    args = argparse.Namespace(policy_dir=[str(folder)], policies_topic="rsafe.policies")
    assert _gate_policies(args, None, {"rsafe-default", "brand-platform"}).get("brand-platform").name == "brand-platform"


def test_promotion_set_command_holds_out_by_message(tmp_path):
    """``rsafe train promotion-set``: slice rows from disagreement records, general rows from a
    registered set; a message of a named training set is left out, and the set's message hashes are
    written for ``train dataset --exclude-hashes``."""
    from datetime import datetime, timezone

    from rsafe.evaluation.benchmarks import Example
    from rsafe.schemas.feedback import DisagreementRecord, FeedbackSource, ModelRef
    from rsafe.training.promote import load_promotion_set

    def rec(i: int) -> DisagreementRecord:
        return DisagreementRecord(event_id=f"e{i}", feedback_id="f", prompt=f"shop at our rival's store {i}",
                                  policy="brand-platform", policy_version="0" * 12, level="prompt",
                                  judged_by=ModelRef(model="m"), model_label="safe", human_label="unsafe",
                                  source=FeedbackSource.REVIEWER, feedback_at=datetime(2026, 12, 1, tzinfo=timezone.utc))

    slice_file = tmp_path / "held-out.jsonl"
    slice_file.write_text("".join(rec(i).model_dump_json() + "\n" for i in range(6)))
    trained = tmp_path / "dataset"
    trained.mkdir()
    taken = Example(id="x", prompt="shop at our rival's store 0", label="unsafe").content_hash
    (trained / "manifest.json").write_text(json.dumps({"rows": [{"message_hash": taken}]}))
    out = tmp_path / "pset"
    res = rsafe("train", "promotion-set", "--slice", str(slice_file), "--general", "demo",
                "--exclude-dataset", str(trained), "--out", str(out))
    assert res.returncode == 0, res.stderr
    pset = load_promotion_set(out)
    assert pset.slice_policy == "brand-platform" and pset.general_policy == "rsafe-default"
    assert len(pset.slice) == 5 and taken not in pset.hashes()
    counts = json.loads((out / "promotion_set.json").read_text())["counts"]
    assert counts["left_out"]["slice_in_training_set"] == 1
    assert len(pset.general) + counts["left_out"]["general_duplicate_or_in_slice"] == 400  # one message, once
    assert "the gate needs --min-slice 50" in res.stderr
    assert set((out / "message_hashes.txt").read_text().split()) == pset.hashes()
    again = rsafe("train", "promotion-set", "--slice", str(slice_file), "--general", "demo", "--out", str(out))
    assert again.returncode == 2 and "already holds a promotion set" in again.stderr
