"""Model registry and the promotion gate's logic (fast: a scripted guard, local registry)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsafe.evaluation.benchmarks import Example
from rsafe.models import Guard
from rsafe.models.engines import Completion
from rsafe.schemas.models import ModelControlRecord
from rsafe.training.promote import GateSettings, Promotion, PromotionSet, gate, no_overlap
from rsafe.training.registry import Registry, RegistryError


def make_adapter(path: Path, seed: str) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "seed": seed}))
    (path / "adapter_model.safetensors").write_bytes(seed.encode() * 100)
    return path


def test_register_is_content_versioned_and_idempotent(tmp_path):
    reg = Registry(tmp_path / "reg")
    a = reg.register(make_adapter(tmp_path / "a", "one"), "guard", kind="lora", base_model="/m")
    again = reg.register(tmp_path / "a", "guard", kind="lora", base_model="/m")
    assert again.version == a.version and len(reg.cards("guard")) == 1
    b = reg.register(make_adapter(tmp_path / "b", "two"), "guard", kind="lora", parent_version=a.version)
    assert b.version != a.version and [c.version for c in reg.cards("guard")] == [a.version, b.version]
    assert (Path(reg.artifact_uri("guard", a.version)) / "adapter_config.json").is_file()
    with pytest.raises(RegistryError, match="not a lora artifact"):
        reg.register(tmp_path, "guard", kind="lora")
    with pytest.raises(RegistryError, match="no promoted version"):
        reg.resolve("guard")
    reg.set_current(a, "ann")
    assert reg.resolve("guard").version == a.version and reg.card("guard", a.version).status == "promoted"
    reg.set_current(b, "bob")
    assert reg.card("guard", a.version).status == "retired" and reg.resolve("guard@current").version == b.version
    reg.set_current(reg.card("guard", a.version), "ann", rollback=True)
    state = json.loads((tmp_path / "reg" / "guard" / "current.json").read_text())
    assert [h["version"] for h in state["history"]] == [a.version, b.version, a.version] and state["history"][-1]["rollback"]
    assert reg.names() == ["guard"]


BASE = {"general_f1": 90.0, "general_accuracy": 90.0, "slice_accuracy": 5.0, "slice_n": 60,
        "category_recall": {"U1": 100.0, "U2": 90.0}, "format_rate": 100.0, "unknown_rate": 0.0, "n": 460}


@pytest.mark.parametrize("change, accepted, failing", [
    ({"slice_accuracy": 40.0}, True, None),
    ({"slice_accuracy": 40.0, "general_f1": 88.5}, False, "general F1"),
    ({"slice_accuracy": 40.0, "general_f1": 89.2}, True, None),
    ({"slice_accuracy": 12.0}, False, "disagreement slice accuracy"),
    ({"slice_accuracy": 40.0, "slice_n": 30}, False, "slice has 30"),
    ({"slice_accuracy": 40.0, "category_recall": {"U1": 95.0, "U2": 90.0}}, False, "category recall drop 5.0"),
    ({"slice_accuracy": 40.0, "format_rate": 99.0}, False, "format rate"),
])
def test_gate_table(change, accepted, failing):
    ok, reasons = gate({**BASE, **change}, BASE, GateSettings())
    assert ok is accepted
    failed = [r for r in reasons if r.startswith("FAIL")]
    assert (failing is None and not failed) or any(failing in r for r in failed), reasons
    assert len(reasons) == 5


def test_gate_lists_the_examples_that_changed():
    ok, reasons = gate({**BASE, "slice_accuracy": 40.0, "wrong": ["a", "c", "d"]}, {**BASE, "wrong": ["a", "b"]},
                       GateSettings())
    assert ok and reasons[-1] == "INFO 1 examples fixed, 2 newly wrong: c, d"


class Scripted:
    """A guard backend: 'candidate' answers every drift message safe; otherwise by the gold hint."""

    model_id = "scripted"
    token_counter = None

    def __init__(self, better: bool = True, weights: bool = False):
        self.better = better
        self.weights = weights  # other full weights: better on every request, no adapter needed

    def generate(self, turns, gen, adapters):
        out = []
        for turn, adapter in zip(turns, adapters):
            text = turn.split("<BEGIN CONVERSATION>")[1]
            unsafe = "[U]" in text
            if self.better and (adapter == "candidate" or self.weights) and "medication" in text.lower():
                unsafe = False
            label = "unsafe" if unsafe else "safe"
            out.append(Completion(text=f"<think>x</think>\\boxed{{{label}}}", prompt=turn, finish_reason="stop"))
        return out

    async def agenerate(self, turns, gen, adapters):
        return self.generate(turns, gen, adapters)

    def close(self):
        pass


def tiny_set() -> PromotionSet:
    general = [Example(id=f"g{i}", prompt=f"message {i}" + (" [U]" if i % 2 else ""), label="unsafe" if i % 2 else "safe",
                       categories=["U1"] if i % 2 else []) for i in range(20)]
    drift = [Example(id=f"d{i}", prompt=f"which medication dose {i} [U]", label="safe") for i in range(60)]
    return PromotionSet(general, "rsafe-default", drift, "medical-platform", {"general": "tiny", "slice": "tiny"})


def trained_on_nothing_overlapping(run: Path, kind: str = "lora") -> Path:
    """A run's training_summary.json naming a dataset whose manifest shares no row with the set."""
    ds = run.parent / f"{run.name}-dataset"
    ds.mkdir()
    (ds / "manifest.json").write_text(json.dumps({"rows": [{"message_hash": "not-in-the-promotion-set"}]}))
    (run / "training_summary.json").write_text(json.dumps({"kind": kind, "base_model": "/base", "dataset": str(ds)}))
    return run


def test_promotion_accepts_a_better_candidate_publishes_and_rolls_back(tmp_path):
    from rsafe.policies import PolicyRegistry

    reg = Registry(tmp_path / "reg")
    published: list[ModelControlRecord] = []

    def factory(adapters):
        return Guard(Scripted(better=True), policies=PolicyRegistry.from_dirs())

    promo = Promotion(reg, "guard", "/base", factory, promotion_set=tiny_set, log=lambda m: None)
    out = trained_on_nothing_overlapping(make_adapter(tmp_path / "run1", "better"))
    card = promo.run(str(out), approver="ann", publish=published.append)
    assert card.status == "promoted" and card.gate.accepted and card.promoted_by == "ann"
    assert card.gate.candidate_metrics["slice_accuracy"] == 100.0 and card.gate.current_metrics["slice_accuracy"] == 0.0
    assert published[-1].name == "guard" and published[-1].version == card.version and not published[-1].rollback
    # a candidate no better on the slice is rejected, kept and marked; nothing is published
    worse = make_adapter(tmp_path / "run2", "same")

    def same_factory(adapters):
        return Guard(Scripted(better=False), policies=PolicyRegistry.from_dirs())

    promo.guard_factory = same_factory
    rejected = promo.run(str(worse), publish=published.append)
    assert rejected.status == "rejected" and not rejected.gate.accepted and len(published) == 1
    assert reg.card("guard", rejected.version).status == "rejected"
    # rollback: an earlier promoted version again, no gate, recorded and published
    rolled = promo.run(f"guard@{card.version}", rollback=True, publish=published.append, approver="bob")
    assert published[-1].rollback and rolled.history[-1]["event"] == "rolled back to"
    with pytest.raises(RegistryError, match="never promoted"):
        promo.run(f"guard@{rejected.version}", rollback=True)


def test_a_full_weights_candidate_is_gated_on_an_engine_of_its_own(tmp_path):
    from rsafe.policies import PolicyRegistry

    reg = Registry(tmp_path / "reg")
    started: list[str] = []

    def on_weights(path):
        started.append(path)
        return Guard(Scripted(better=True, weights=True), policies=PolicyRegistry.from_dirs())

    def base(adapters):
        assert "candidate" not in adapters  # full weights are not an adapter
        return Guard(Scripted(better=False), policies=PolicyRegistry.from_dirs())

    full = tmp_path / "run-full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    (full / "model.safetensors").write_bytes(b"w" * 100)
    trained_on_nothing_overlapping(full, kind="full")
    promo = Promotion(reg, "base", "/base", base, promotion_set=tiny_set, log=lambda m: None,
                      model_guard_factory=on_weights)
    card = promo.run(str(full), approver="ann")
    assert card.kind == "full" and card.status == "promoted" and len(started) == 1
    assert (Path(started[0]) / "model.safetensors").exists()
    promo.model_guard_factory = None
    other = tmp_path / "run-full-2"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "model.safetensors").write_bytes(b"v" * 100)
    with pytest.raises(RegistryError, match="engine on its weights"):
        promo.run(str(other))


def test_overlap_with_a_training_set_rejects(tmp_path):
    pset = tiny_set()
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "manifest.json").write_text(json.dumps({"rows": [{"message_hash": pset.slice[0].content_hash}]}))
    from rsafe.training.registry import ModelCard

    card = ModelCard(name="g", version="v", kind="lora", training={"dataset": str(ds)})
    assert "1 promotion-set examples" in no_overlap(card, pset)
    (ds / "manifest.json").write_text(json.dumps({"rows": [{"message_hash": "nothing"}]}))
    assert no_overlap(card, pset) is None
    # a bare checkpoint (no summary naming its dataset) cannot be proven unseen: refused, unless skipped
    bare = ModelCard(name="g", version="v", kind="lora", training={})
    assert "names no training dataset" in no_overlap(bare, pset)


def test_a_candidate_whose_overlap_cannot_be_checked_is_refused_unless_told(tmp_path):
    from rsafe.policies import PolicyRegistry

    def factory(adapters):
        return Guard(Scripted(better=True), policies=PolicyRegistry.from_dirs())

    promo = Promotion(Registry(tmp_path / "reg"), "guard", "/base", factory, promotion_set=tiny_set, log=lambda m: None)
    refused = promo.run(str(make_adapter(tmp_path / "checkpoint-40", "better")))
    assert refused.status == "rejected" and any("names no training dataset" in r for r in refused.gate.reasons)
    promo.skip_overlap_check = True
    assert promo.run(str(make_adapter(tmp_path / "checkpoint-80", "better"))).status == "promoted"


def test_extract_lora_recovers_a_low_rank_weight_change(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rsafe.training.lora_extract import extract_lora

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64)
    base = Qwen2ForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    tuned = Qwen2ForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        for layer in tuned.model.layers:
            for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
                lin.weight += torch.randn(lin.weight.shape[0], 2) @ torch.randn(2, lin.weight.shape[1]) * 0.05
        tuned.model.norm.weight += 0.01  # outside the targeted layers: reported, not carried
    tuned.save_pretrained(tmp_path / "tuned")
    report = extract_lora(tmp_path / "base", tmp_path / "tuned", tmp_path / "lora", rank=4)
    assert report["layers"] == 4 and report["min_energy_kept"] > 0.999
    assert report["untargeted_changed"] == ["model.norm.weight"]
    adapter = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "lora")
    tuned.model.norm.weight.data -= 0.01
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(adapter(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-4)


def test_promote_needs_an_approver_when_configured(tmp_path):
    import subprocess
    import sys

    def rsafe(*args):
        return subprocess.run([sys.executable, "-m", "rsafe.cli", *args], capture_output=True, text=True, timeout=120)

    cfg = tmp_path / "worker.yaml"
    cfg.write_text(f"models:\n  registry: {tmp_path / 'reg'}\n  require_approver: true\n")
    out = rsafe("train", "promote", str(tmp_path), "--config", str(cfg), "--model", str(tmp_path), "--engine", "transformers")
    assert out.returncode == 2 and "approver" in out.stderr
    missing = rsafe("models", "list")
    assert missing.returncode == 2 and "registry" in missing.stderr
