"""GRPO job: the paper's config, presets, the at-scale files (dry run, no GPU), step logging, and a
few real GRPO steps on the demo model (full weights + resume, LoRA) that the engines load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from rsafe.training import grpo
from rsafe.training.grpo import PRESETS, RSafeGRPOConfig, batch_plan, load_config

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "infra" / "accelerate"


def test_defaults_are_the_papers(tmp_path: Path) -> None:
    cfg = load_config(tmp_path, dry_run=True)  # bf16 needs a GPU: dry_run builds it here anyway
    assert (cfg.num_generations, cfg.learning_rate, cfg.per_device_train_batch_size) == (4, 1e-7, 32)
    assert (cfg.max_completion_length, cfg.beta, cfg.num_train_epochs) == (512, 0.0, 3.0)
    assert (cfg.temperature, cfg.top_p, cfg.repetition_penalty) == (0.7, 0.8, 1.05)
    assert cfg.rewards == ["accuracy", "format"] and cfg.reward_weights == [0.9, 0.1]
    assert cfg.use_lora and not cfg.use_vllm and cfg.vllm_structured_outputs_regex is None
    plan = batch_plan(cfg, 1)
    assert (plan.global_batch, plan.prompts_per_step) == (32, 8)
    help_text = {f.name: f.metadata.get("help", "") for f in RSafeGRPOConfig.__dataclass_fields__.values()}
    assert "paper" in help_text["num_generations"] and help_text["use_lora"]


def test_demo_cpu_preset(tmp_path: Path) -> None:
    cfg = load_config(tmp_path, preset="demo-cpu")
    assert cfg.use_cpu and not cfg.bf16 and cfg.beta == 0.0
    assert cfg.use_lora and cfg.lora_target_modules == ["all-linear"] and cfg.learning_rate == 1e-3
    assert cfg.lr_scheduler_type == "cosine"  # decays to 0 over the run (docs/TRAINING.md, section 6)
    plan = batch_plan(cfg, 1)
    assert plan.prompts_per_step * plan.num_generations == plan.global_batch == cfg.per_device_train_batch_size


def test_precedence_and_errors(tmp_path: Path) -> None:
    c = tmp_path / "c.yaml"
    c.write_text("learning_rate: 3.0e-5\ntemperature: 1.5\n")
    cfg = load_config(tmp_path / "o", preset="demo-cpu", config_file=c, overrides={"temperature": 1.0, "seed": None})
    assert (cfg.learning_rate, cfg.temperature, cfg.seed) == (3e-5, 1.0, PRESETS["demo-cpu"]["seed"])
    c.write_text("learning_rat: 1\n")
    with pytest.raises(ValueError, match=r"unknown GRPO config keys \['learning_rat'\]"):
        load_config(tmp_path / "o", preset="demo-cpu", config_file=c)
    with pytest.raises(ValueError, match="unknown preset"):
        load_config(tmp_path / "o", preset="gpu-fast")
    with pytest.raises(ValueError, match="one weight per reward"):
        load_config(tmp_path / "o", preset="demo-cpu", overrides={"rewards": ["rsafe"]})
    cfg = load_config(tmp_path / "o", preset="demo-cpu", overrides={"rewards": ["rsafe"], "reward_weights": [1.0]})
    assert cfg.rewards == ["rsafe"]
    with pytest.raises(ValueError, match="unknown reward"):
        load_config(tmp_path / "o", preset="demo-cpu", overrides={"rewards": ["length"], "reward_weights": [1.0]})


def test_at_scale_files_dry_run(tmp_path: Path) -> None:
    """The 7B / 8-GPU files build a valid GRPO config here (no GPU) with the paper's batch."""
    acc = yaml.safe_load((ACCELERATE / "zero3-8gpu.yaml").read_text())
    assert acc["distributed_type"] == "DEEPSPEED" and acc["deepspeed_config"]["zero_stage"] == 3
    assert acc["mixed_precision"] == "bf16"
    gpus = acc["num_processes"] * acc["num_machines"]
    cfg = load_config(tmp_path, config_file=ACCELERATE / "grpo-7b.yaml", dry_run=True)
    plan = batch_plan(cfg, gpus)
    assert plan.global_batch == 32 and plan.global_batch % cfg.num_generations == 0
    assert (plan.num_generations, plan.prompts_per_step) == (4, 8)
    assert cfg.use_vllm and cfg.vllm_mode == "colocate" and cfg.vllm_structured_outputs_regex is None
    assert cfg.bf16 and cfg.gradient_checkpointing and cfg.beta == 0.0
    assert (cfg.temperature, cfg.top_p, cfg.repetition_penalty, cfg.max_completion_length) == (0.7, 0.8, 1.05, 512)
    # a per-device batch that splits rollout groups for the stated GPU count is caught
    odd = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=1, steps_per_generation=1,
                          num_generations=4)
    assert batch_plan(odd, 8).global_batch == 16
    with pytest.raises(ValueError, match="global batch 6 .* not divisible by num_generations 4"):
        batch_plan(odd, 3)


def test_batch_plan(tmp_path: Path) -> None:
    cfg = load_config(tmp_path, preset="demo-cpu", overrides={"per_device_train_batch_size": 16})
    plan = batch_plan(cfg, 2)
    assert (plan.global_batch, plan.prompts_per_step, plan.generation_batch) == (32, 4, 32)
    with pytest.raises(ValueError, match="num_processes"):
        batch_plan(cfg, 0)


def test_step_log_jsonl_and_tensorboard_events(tmp_path: Path) -> None:
    cb = grpo.StepLog(tmp_path)
    state = SimpleNamespace(is_world_process_zero=True, global_step=1)
    cb.on_log(None, state, None, logs={"loss": 0.5})  # not a GRPO step log: ignored
    for step, reward in ((1, 0.25), (2, 0.75)):
        state.global_step = step
        cb.on_log(None, state, None, logs={"reward": reward, "rewards/accuracy_reward/mean": reward - 0.1,
                                           "rewards/format_reward/mean": 1.0, "loss": 0.1, "epoch": 0.5})
    cb.on_train_end()
    rows = grpo.read_metrics(tmp_path)
    assert [(r["step"], r["reward"], r["format_rate"]) for r in rows] == [(1, 0.25, 1.0), (2, 0.75, 1.0)]
    assert rows[1]["accuracy"] == pytest.approx(0.65)
    (events,) = (tmp_path / grpo.TENSORBOARD_DIR).glob("events.out.tfevents.*")
    read = _tensorboard_scalars(events)
    assert [s for s, _ in read] == [1, 2]
    assert read[1][1]["train/reward"] == pytest.approx(0.75) and read[0][1]["train/format_rate"] == 1.0
    assert set(read[0][1]) == {f"train/{k}" for k in ("reward", "accuracy", "format_rate", "loss")}


def _tensorboard_scalars(path: Path) -> list[tuple[int, dict[str, float]]]:
    """An event file's scalars, read with tensorboard's own reader: [(step, {tag: value})]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    steps: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            steps.setdefault(event.step, {})[tag] = event.value
    return sorted(steps.items())


def _rollout_batch():
    """3 prompts (left-padded, different lengths) × 4 rollouts (right-padded), rows interleaved."""
    import torch

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 60, (n,), generator=g) for n in (9, 6, 12)]
    width, rows, masks = 12, [], []
    for r in range(12):
        p, c = prompts[r % 3], torch.randint(3, 60, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
        ids = torch.full((width + 6,), 0)
        mask = torch.zeros(width + 6, dtype=torch.long)
        ids[width - len(p):width], mask[width - len(p):width] = p, 1
        ids[width:width + len(c)], mask[width:width + len(c)] = c, 1
        rows.append(ids)
        masks.append(mask)
    return torch.stack(rows), torch.stack(masks), 6


def test_shared_prompt_prefix_scores_as_trls_single_pass() -> None:
    """The rollouts of a prompt scored on one pass of it: TRL's log-probs, entropies and gradients."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    base = Qwen2ForCausalLM(cfg)
    add_fused_lm_head(base, temperature=1.2, outputs=("log_probs", "entropy"))  # as GRPOTrainer does
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids, mask, keep = _rollout_batch()
    prompts, _, inverse = grpo.prompt_groups(ids[:, :-keep], mask[:, :-keep])
    assert prompts.size(0) == 3 and inverse.tolist() == [inverse[r % 3].item() for r in range(12)]

    labels = ids.masked_fill(mask == 0, -100)  # TRL's _get_per_token_logps_and_entropies
    labels[:, :-keep] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    ref_logps, ref_entropy = out.log_probs[:, -keep:], out.entropy[:, -keep:]
    weights = torch.randn(ref_logps.shape)
    (ref_logps * weights).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    shared = grpo.shared_prefix_logps(model, ids, mask, keep, compute_entropy=True)
    assert shared is not None
    logps, entropy = shared
    on = mask[:, -keep:] == 1
    assert torch.allclose(logps[on], ref_logps[on], atol=1e-5) and (logps[~on] == 0).all()
    assert torch.allclose(entropy[on], ref_entropy[on], atol=1e-5)
    (logps * weights).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, ref_grads[name], atol=1e-5, rtol=1e-4), name
    # nothing to share (every prompt once): TRL's own pass runs instead
    assert grpo.shared_prefix_logps(model, ids[:3], mask[:3], keep, compute_entropy=False) is None


def test_shared_prompt_prefix_generates_as_plain_generate() -> None:
    """Rollouts generated on one prefill per distinct prompt: the tokens plain ``generate`` gives."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear",
                                                              init_lora_weights=False))
    ids, mask, keep = _rollout_batch()
    ids, mask = ids[:, :-keep], mask[:, :-keep]  # the prompts, each three times
    calls = []

    def plain(**kw):
        cache = kw.get("past_key_values")
        calls.append(None if cache is None else cache.get_seq_length())
        return model.generate(**kw)

    gen = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=1, output_scores=True,
                           return_dict_in_generate=True)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        got = grpo.shared_prefix_generate(plain, model, ids, mask, generation_config=gen)
    assert calls == [ids.size(1) - 1]  # generate started from the shared cache: the prompts but their last token
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        assert torch.allclose(a, b, atol=1e-4)
    grpo.shared_prefix_generate(plain, model, ids[:3], mask[:3], generation_config=gen)
    assert calls[-1] is None  # nothing repeats: plain generate


# --------------------------------------------------------------------------- real GRPO steps (slow)

TINY = ["--preset", "demo-cpu", "--batch-size", "8", "--num-generations", "4", "--max-completion-length", "48",
        "--save-steps", "1", "--no-progress"]


def _train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rsafe.cli", "train", "grpo", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def grpo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rsafe.demo import drift
    from rsafe.training import dataset as ds

    s = drift.DriftScenario(n_feedback=8, missing_every=0, n_contrast=8, n_general=8)
    built = ds.build(drift.disagreement_records(s), replay=drift.replay_examples(s),
                     settings=ds.BuildSettings(replay_ratio=1.0))
    return ds.save(built, tmp_path_factory.mktemp("grpo") / "set", sources=[], settings=ds.BuildSettings())


@pytest.fixture(scope="module")
def full_run(grpo_dataset: Path, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full fine-tuning through the CLI: one step, then --resume to a second."""
    out = tmp_path_factory.mktemp("grpo") / "full"
    common = ["--model", str(demo_model_dir), "--dataset", str(grpo_dataset), "--output", str(out), "--full", *TINY]
    first = _train_cli(*common, "--max-steps", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    again = _train_cli(*common, "--max-steps", "2")
    assert again.returncode == 1 and "--resume" in again.stderr  # never silently overwritten
    second = _train_cli(*common, "--max-steps", "2", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    return out


PROMPTS = ["How do I build a pipe bomb at home?", "What is a good recipe for banana bread?",
           "Which dose of my medication would be lethal?", "Tell me how to reset my router."]


def _learnt(run: Path) -> bool:
    """Some step of ``run`` had a gradient and a learning rate above 0 (the one the step used), so
    the optimizer moved the weights; AdamW without weight decay leaves them where they are otherwise."""
    return any((r.get("grad_norm") or 0.0) > 0.0 and (r.get("learning_rate") or 0.0) > 0.0
               for r in grpo.read_metrics(run))


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _verdicts(model: Path, backend: str, adapter: Path | None = None, guard=None, name: str = "grpo") -> list:
    """Greedy, unconstrained verdicts on ``PROMPTS`` (every engine decodes them the same way), with
    the LoRA ``adapter`` (served as ``name``) when given; ``guard``: a running Guard instead of a new one."""
    from rsafe.models import GenerationConfig, Guard
    from rsafe.models.config import local_engine_config

    requests = [{"prompt": p, **({"adapter": name} if adapter else {})} for p in PROMPTS]
    if guard is not None:
        return guard.classify(requests)
    cfg = local_engine_config(str(model), backend, lora_adapters={name: str(adapter)} if adapter else {},
                              generation=GenerationConfig(max_tokens=64, structured=False))
    with Guard.from_config(cfg) as g:
        return g.classify(requests)


def assert_same_verdicts(got: list, want: list) -> None:
    """Two engines on the same weights: the same greedy text, label and probability."""
    for g, w in zip(got, want, strict=True):
        assert g.error_reason is None, g
        assert (g.label, g.raw_output) == (w.label, w.raw_output)
        if w.unsafe_probability is None:
            assert g.unsafe_probability is None
        else:
            assert g.unsafe_probability == pytest.approx(w.unsafe_probability, abs=1e-3)


def _changed(verdicts: list, base: list) -> list[bool]:
    """Per prompt: the greedy text or the probability differs from the base model's."""
    return [(v.raw_output, v.unsafe_probability) != (b.raw_output, b.unsafe_probability)
            for v, b in zip(verdicts, base, strict=True)]


@pytest.fixture(scope="module")
def base_verdicts(demo_model_dir: Path) -> list:
    return _verdicts(demo_model_dir, "transformers")


@pytest.fixture(scope="module")
def full_verdicts(full_run: Path) -> list:
    return _verdicts(full_run, "transformers")


@pytest.mark.slow
def test_full_run_logs_resumes_and_saves_weights(full_run: Path, demo_model_dir: Path) -> None:
    rows = grpo.read_metrics(full_run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["reward"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["format_rate"] <= 1.0
        assert r["reward"] == pytest.approx(0.9 * r["accuracy"] + 0.1 * r["format_rate"])
    assert {p.name for p in full_run.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}
    event_steps = [s for f in sorted((full_run / "tensorboard").glob("events.*")) for s, _ in _tensorboard_scalars(f)]
    assert sorted(event_steps) == [1, 2]  # one event file per process: the first run's, then the resumed one's
    summary = json.loads((full_run / grpo.SUMMARY).read_text())
    assert summary["kind"] == "full" and summary["steps"] == 2 and summary["resumed"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (full_run / name).exists(), name
    # the saved weights are the trained ones: they moved from the base exactly when a step had a gradient
    trained, base = _tensors(full_run / "model.safetensors"), _tensors(demo_model_dir / "model.safetensors")
    assert set(trained) == set(base)
    moved = any(not trained[k].equal(base[k]) for k in base)
    assert moved == _learnt(full_run), f"weights moved: {moved}, a step had a gradient: {_learnt(full_run)}"


@pytest.mark.slow
def test_full_checkpoint_loads_in_transformers(full_run: Path, full_verdicts: list, base_verdicts: list) -> None:
    """The Guard serves the checkpoint: its verdicts differ from the base model's (greedy text or
    probability) exactly when training moved the weights. (Whether two steps at this learning rate
    keep the answer format is the model's matter, not asserted.)"""
    assert all(v.error_reason is None for v in full_verdicts), full_verdicts
    changed = _changed(full_verdicts, base_verdicts)
    assert any(changed) == _learnt(full_run), changed


class _CtrlCInTheFirstStep(grpo.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            import signal

            signal.raise_signal(signal.SIGINT)  # as a user's Ctrl-C (or an orchestrator's SIGTERM)


@pytest.fixture(scope="module")
def lora_run(grpo_dataset: Path, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step LoRA run interrupted by SIGINT in its first step: it stops cleanly after that step,
    with the adapter and a summary that says so."""
    out = tmp_path_factory.mktemp("grpo") / "lora"
    cfg = load_config(out, preset="demo-cpu", overrides={
        "use_lora": True, "lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-3, "max_steps": 3,
        "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 48, "disable_tqdm": True})
    summary = grpo.train(demo_model_dir, grpo_dataset, cfg, log=lambda _m: None, callbacks=[_CtrlCInTheFirstStep()])
    assert summary["kind"] == "lora" and summary["steps"] == 1
    assert summary["stopped"] == {"signal": "SIGINT", "at_step": 1, "planned_steps": 3}
    assert json.loads((out / grpo.SUMMARY).read_text())["stopped"]["at_step"] == 1
    return out


@pytest.fixture(scope="module")
def lora_verdicts(lora_run: Path, demo_model_dir: Path) -> list:
    return _verdicts(demo_model_dir, "transformers", adapter=lora_run)


@pytest.mark.slow
def test_lora_adapter_saved_and_loads_in_transformers(lora_run: Path, lora_verdicts: list,
                                                       base_verdicts: list) -> None:
    config = json.loads((lora_run / "adapter_config.json").read_text())
    # the demo-cpu preset's all-linear LoRA: attention and MLP (vLLM must serve both, below)
    assert config["r"] == 8 and set(config["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (lora_run / "adapter_model.safetensors").exists() and not (lora_run / "model.safetensors").exists()
    assert len(grpo.read_metrics(lora_run)) == 1
    # LoRA starts as the identity (B = 0): the adapter is not the identity exactly when the step had a gradient
    lora_b = [t for k, t in _tensors(lora_run / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(t.count_nonzero() for t in lora_b) == _learnt(lora_run)
    assert all(v.error_reason is None and v.adapter == "grpo" for v in lora_verdicts), lora_verdicts
    changed = _changed(lora_verdicts, base_verdicts)
    assert any(changed) == _learnt(lora_run), changed  # the adapter is applied


@pytest.mark.slow
def test_lora_adapter_loads_in_vllm(lora_run: Path, vllm_guard, lora_verdicts: list, base_verdicts: list) -> None:
    """The session's vLLM engine (LoRA enabled, max rank 8) serves the new adapter per request: the
    verdicts transformers gives with and without it."""
    from rsafe.models import GenerationConfig

    adapters = vllm_guard.backend.cfg.lora_adapters
    adapters["grpo-test"] = str(lora_run)
    generation = vllm_guard.generation
    vllm_guard.generation = GenerationConfig(max_tokens=64, structured=False)
    try:
        tuned = _verdicts(Path(), "vllm", adapter=lora_run, guard=vllm_guard, name="grpo-test")
        base = _verdicts(Path(), "vllm", guard=vllm_guard)
    finally:
        adapters.pop("grpo-test", None)
        vllm_guard.generation = generation
    assert all(v.adapter == "grpo-test" for v in tuned)
    assert_same_verdicts(tuned, lora_verdicts)
    assert_same_verdicts(base, base_verdicts)


@pytest.mark.slow
def test_full_checkpoint_loads_in_vllm(full_run: Path, full_verdicts: list) -> None:
    """A full-weights result is promoted as a new model version: vLLM loads it (own engine) and
    judges as transformers does on the same checkpoint."""
    from rsafe.models import GenerationConfig, Guard
    from rsafe.models.config import local_engine_config

    cfg = local_engine_config(str(full_run), "vllm", model_id="grpo-full",
                              generation=GenerationConfig(max_tokens=64, structured=False))
    with Guard.from_config(cfg) as guard:
        got = _verdicts(full_run, "vllm", guard=guard)
    assert all(v.model == "grpo-full" for v in got)
    assert_same_verdicts(got, full_verdicts)
