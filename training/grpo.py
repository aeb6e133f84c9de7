"""GRPO with the RSafe rule reward: TRL's ``GRPOTrainer`` (+ PEFT LoRA), configured as the paper.

``rsafe train grpo --model BASE --dataset D --output DIR [--preset demo-cpu] [--config C.yaml]``

* ``RSafeGRPOConfig`` is TRL's ``GRPOConfig`` with the reference's defaults (4 rollouts, lr 1e-7,
  global batch 32, 512 response tokens, no KL, temperature 0.7, top_p 0.8, repetition penalty
  1.05, 3 epochs) and the LoRA settings. ``PRESETS`` holds named overrides (``demo-cpu``: the
  measured recipe for the demo model on a 2-core CPU); a YAML file may set any field. Precedence:
  preset < config file < command-line flags.
* Rewards: ``rsafe.training.rewards`` (accuracy and format, weighted 0.9 / 0.1 = the reference
  reward; TRL logs both, so accuracy and format rate per step come for free).
* Rollouts are sampled without structured decoding (``use_vllm=False`` on CPU; on GPUs TRL's vLLM
  rollout mode, see ``infra/accelerate/``): the model must produce the format itself.
* Per step: ``metrics.jsonl`` (step, reward, accuracy, format rate, loss, …) and a TensorBoard
  event file (``tensorboard/``, tags ``train/<name>``, written with ``torch.utils.tensorboard``);
  checkpoints every ``save_steps`` (``--resume`` continues from the last).
* Output ``DIR``: a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``, loadable
  by vLLM's ``LoRARequest``) or full weights (``config.json`` + ``model.safetensors`` + tokenizer),
  and ``training_summary.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from trl import GRPOConfig

from rsafe.schemas.jsonl import append_jsonl, read_jsonl
from rsafe.training.dataset import load_manifest, load_rows
from rsafe.training.rewards import REFERENCE_REWARDS, reward_functions
from rsafe.training.run_dir import SUMMARY, TrainingError, check_output  # the first two also as grpo.*

METRICS = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

#: Per-step log keys → the names ``metrics.jsonl`` and TensorBoard use.
STEP_METRICS: dict[str, str] = {
    "reward": "reward",
    "reward_std": "reward_std",
    "rewards/accuracy_reward/mean": "accuracy",
    "rewards/format_reward/mean": "format_rate",
    "frac_reward_zero_std": "frac_reward_zero_std",
    "loss": "loss",
    "grad_norm": "grad_norm",
    "learning_rate": "learning_rate",
    "entropy": "entropy",
    "completions/mean_length": "completion_length",
    "step_time": "step_time",
}


@dataclass
class RSafeGRPOConfig(GRPOConfig):
    """TRL ``GRPOConfig`` with the RSafe paper's training defaults and LoRA settings.

    "Batch 32" is read as 32 completions per optimizer step (TRL counts completions:
    ``per_device_train_batch_size × processes × gradient_accumulation_steps``), i.e. 8 prompts × 4
    rollouts. verl's ``data.train_batch_size`` counts prompts; to take 32 prompts (128 completions)
    per step, set ``gradient_accumulation_steps: 4``.
    """

    # -- the paper's settings (RSAFE_REFERENCE.md, "Training setup")
    learning_rate: float = field(default=1e-7, metadata={"help": "AdamW learning rate (paper: 1e-7)."})
    num_generations: int | None = field(default=4, metadata={"help": "Rollouts per prompt (paper: 4)."})
    per_device_train_batch_size: int = field(
        default=32, metadata={"help": "Completions per device per micro-step (global batch = this × processes × "
                                      "gradient_accumulation_steps; paper: 32 in all)."})
    max_completion_length: int | None = field(default=512, metadata={"help": "Max response tokens (paper: 512)."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (paper: no KL term, 0)."})
    temperature: float = field(default=0.7, metadata={"help": "Rollout sampling temperature (paper: 0.7)."})
    top_p: float = field(default=0.8, metadata={"help": "Rollout nucleus sampling (paper: 0.8)."})
    repetition_penalty: float = field(default=1.05, metadata={"help": "Rollout repetition penalty (paper: 1.05)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs over the dataset (paper: 3)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule (verl: constant)."})
    reward_weights: list[float] | None = field(
        default_factory=lambda: [w for _, w in REFERENCE_REWARDS],
        metadata={"help": "Weight of each reward in `rewards` (reference: 0.9 accuracy + 0.1 format)."})
    # -- logging and checkpoints
    logging_steps: float = field(default=1, metadata={"help": "Log (metrics.jsonl, TensorBoard) every N steps."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N steps (resume with --resume)."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Checkpoints kept (None: all)."})
    # -- RSafe
    rewards: list[str] = field(
        default_factory=lambda: [n for n, _ in REFERENCE_REWARDS],
        metadata={"help": "Reward functions by name (rsafe.training.rewards.REWARDS)."})
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (default for large backbones: "
                                                           "promotion hot-swaps adapters); false: full weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Modules that get adapters (attention only by default; ['all-linear'] for all)."})
    share_prompt_prefix: bool = field(
        default=True, metadata={"help": "Score the rollouts of one prompt on one forward pass of the prompt "
                                        "(its key/value cache repeated over them) instead of one per rollout: "
                                        "same log-probs, a fraction of the compute (one process only)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights {self.reward_weights} must have one weight per reward {self.rewards}; "
                             "set both (e.g. rewards: [rsafe], reward_weights: [1.0])")
        reward_functions(self.rewards)  # unknown names fail here, not after the model loaded


#: Named overrides of ``RSafeGRPOConfig`` (``--preset``).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "demo-cpu": {
        # The demo model (3.9M parameters) on a 2-core CPU; measured in docs/TRAINING.md.
        "use_cpu": True, "bf16": False, "gradient_checkpointing": False,
        "model_init_kwargs": {"dtype": "float32"},
        # LoRA r16 on every linear layer: on the policy-reading demo model (recipe 5) it meets all the
        # drift targets and keeps the platform's other families, which full fine-tuning loses, and
        # it is what workers hot-swap (docs/TRAINING.md, section 4).
        "use_lora": True, "lora_r": 16, "lora_alpha": 32, "lora_target_modules": ["all-linear"],
        "learning_rate": 1e-3,
        # decaying to 0 over the run: at a constant 1e-3 the last steps undo what the first learnt
        # (the loop's gate rejected 3 of 3 seeds, promoted 3 of 3 with cosine; docs/TRAINING.md, section 6)
        "lr_scheduler_type": "cosine",
        "temperature": 1.2,           # the tiny SFT model samples with near-zero entropy below ~1.2
        "top_p": 1.0, "repetition_penalty": 1.0,
        "num_generations": 8,
        "per_device_train_batch_size": 32,   # 4 prompts × 8 rollouts per step
        "max_completion_length": 64,  # its answers are ~35 tokens
        "num_train_epochs": 1.0, "max_steps": 60,
        "save_steps": 10,
        "shuffle_dataset": False,     # keep the builder's (seeded) order: paired rows share a step
        "seed": 0,
    },
}


def config_fields() -> set[str]:
    return {f.name for f in fields(RSafeGRPOConfig) if f.init}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of ``RSafeGRPOConfig`` fields; unknown keys are an error."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read GRPO config: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a GRPO config is a mapping of RSafeGRPOConfig fields")
    unknown = sorted(set(data) - config_fields())
    if unknown:
        raise ValueError(f"{path}: unknown GRPO config keys {unknown} (see RSafeGRPOConfig / TRL GRPOConfig)")
    return data


def load_config(output_dir: str | Path, *, preset: str = "paper", config_file: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None, dry_run: bool = False) -> RSafeGRPOConfig:
    """The run's config: ``PRESETS[preset]``, then the YAML file, then ``overrides`` (non-None).

    ``dry_run``: build a config written for another machine (e.g. 8 GPUs, bf16) on this one, to
    check it: ``use_cpu`` is set so that TrainingArguments' device checks pass here. Check its
    batch arithmetic for the target machine with ``batch_plan(cfg, num_processes)``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    values: dict[str, Any] = dict(PRESETS[preset])
    if config_file is not None:
        values.update(read_yaml(config_file))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values["output_dir"] = str(output_dir)
    if dry_run:
        values["use_cpu"] = True
    return RSafeGRPOConfig(**values)


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step is made, for ``num_processes`` devices."""

    num_processes: int
    global_batch: int
    """Completions per optimizer step."""
    prompts_per_step: int
    generation_batch: int
    """Completions generated at once (then split into ``steps_per_generation`` optimizer steps)."""
    num_generations: int


def batch_plan(cfg: GRPOConfig, num_processes: int) -> BatchPlan:
    """TRL's batch arithmetic for ``num_processes`` devices, checked without any device.

    ``GRPOConfig`` checks divisibility for the processes of the machine it is built on; this
    repeats the checks for the machine a config is written for (e.g. 8 GPUs, checked on a CPU).
    """
    if num_processes < 1:
        raise ValueError("num_processes must be at least 1")
    g = cfg.num_generations or 1
    global_batch = cfg.per_device_train_batch_size * num_processes * cfg.gradient_accumulation_steps
    generation_batch = cfg.per_device_train_batch_size * num_processes * (cfg.steps_per_generation or 1)
    for name, value in (("global batch", global_batch), ("generation batch", generation_batch)):
        if value % g:
            raise ValueError(
                f"{name} {value} (per_device_train_batch_size {cfg.per_device_train_batch_size} × {num_processes} "
                f"processes × accumulation) is not divisible by num_generations {g}: a group of rollouts of "
                "one prompt must stay in one batch")
    return BatchPlan(num_processes, global_batch, global_batch // g, generation_batch, g)


# --------------------------------------------------------------------------- shared prompt prefix

def prompt_groups(prompt_ids: Any, prompt_mask: Any) -> tuple[Any, Any, Any]:
    """The distinct (left-padded) prompts of a batch, their attention masks and, for each row, the
    index of its prompt. GRPO scores ``num_generations`` completions of every prompt; their prompt
    rows are identical."""
    import torch

    width = prompt_ids.size(1)
    distinct, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1), dim=0,
                                     return_inverse=True)
    return distinct[:, :width], distinct[:, width:].to(prompt_mask.dtype), inverse


def shared_prefix_logps(model: Any, input_ids: Any, attention_mask: Any, logits_to_keep: int, *,
                        compute_entropy: bool) -> tuple[Any, Any] | None:
    """Per-token log-probs (and entropies) of the last ``logits_to_keep`` tokens, as TRL's
    ``GRPOTrainer._get_per_token_logps_and_entropies`` computes them, with each distinct prompt
    run once.

    Pass 1 runs the distinct prompts but their last token (``logits_to_keep=1``: no vocabulary
    projection to speak of) and keeps the key/value cache; its rows are repeated over the rollouts
    (gradients flow back through the repeat). Pass 2 runs each row's last prompt token and its
    completion on that cache through TRL's fused LM head, which scores exactly the completion
    tokens. Positions are the column indices, as in TRL's single pass over the left-padded batch,
    and the attention mask covers the whole row, so every log-prob is the one TRL computes (up to
    float rounding; ``tests/test_grpo.py``). ``None`` when sharing saves nothing or the model cannot
    keep a cache here (e.g. gradient checkpointing): the caller then runs TRL's single pass.
    """
    from transformers import DynamicCache

    prompt_len = input_ids.size(1) - logits_to_keep
    if prompt_len < 2:
        return None
    prompts, prompt_masks, inverse = prompt_groups(input_ids[:, :prompt_len], attention_mask[:, :prompt_len])
    if prompts.size(0) == input_ids.size(0):
        return None
    cache = DynamicCache()
    model(input_ids=prompts[:, :-1], attention_mask=prompt_masks[:, :-1], past_key_values=cache, use_cache=True,
          logits_to_keep=1)
    if cache.get_seq_length() != prompt_len - 1:
        return None
    shared = DynamicCache([(layer.keys[inverse], layer.values[inverse]) for layer in cache.layers])
    tail = input_ids[:, prompt_len - 1:]
    labels = tail.masked_fill(attention_mask[:, prompt_len - 1:] == 0, -100)
    labels[:, 0] = -100  # the last prompt token: context only
    outputs = model(input_ids=tail, attention_mask=attention_mask, past_key_values=shared, labels=labels,
                    fused_lm_head=True)
    logps = outputs.log_probs[:, -logits_to_keep:]
    entropies = outputs.entropy[:, -logits_to_keep:] if compute_entropy else None
    return logps, entropies


def shared_prefix_generate(generate: Callable[..., Any], model: Any, input_ids: Any, attention_mask: Any,
                           **kwargs: Any) -> Any:
    """``model.generate`` (passed as ``generate``) on left-padded prompt rows of which many are the
    same (GRPO's rollouts), with each distinct prompt prefilled once: its key/value cache, but for
    its last token, is computed on the distinct prompts, repeated over the rows, and handed to
    ``generate``, which then runs only the last prompt token and the new ones. Positions follow
    ``generate``'s own rule (the attention mask's running count), so the rows are generated as
    without the cache (same tokens under greedy decoding, ``tests/test_grpo.py``). Falls back to a
    plain ``generate`` when nothing repeats or a cache is already configured."""
    import torch
    from transformers import DynamicCache

    config = kwargs.get("generation_config")
    if (input_ids.size(1) < 2 or "past_key_values" in kwargs
            or getattr(config, "cache_implementation", None) is not None):
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    prompts, masks, inverse = prompt_groups(input_ids, attention_mask)
    if prompts.size(0) == input_ids.size(0):
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    positions = (masks.long().cumsum(-1) - 1).masked_fill(masks == 0, 0)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=prompts[:, :-1], attention_mask=masks[:, :-1], position_ids=positions[:, :-1],
              past_key_values=cache, use_cache=True, logits_to_keep=1)
    if cache.get_seq_length() != input_ids.size(1) - 1:
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    shared = DynamicCache([(layer.keys[inverse], layer.values[inverse]) for layer in cache.layers])
    return generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=shared, **kwargs)


def _trainer_class() -> type:
    """TRL's ``GRPOTrainer`` scoring each prompt's rollouts on one pass of the prompt (``share_prompt_prefix``)."""
    import functools

    import torch
    from trl import GRPOTrainer

    class RSafeGRPOTrainer(GRPOTrainer):  # type: ignore[misc]
        def _sharing(self) -> bool:
            return bool(getattr(self.args, "share_prompt_prefix", False)) and self.accelerator.num_processes == 1

        def _generate_single_turn(self, prompt_ids: Any, images: Any, multimodal_fields: Any,
                                  num_generations: int, has_tool_images: bool = False) -> Any:
            args = (prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
            if (not self._sharing() or self.use_vllm or self.use_transformers_continuous_batching
                    or images is not None or multimodal_fields):
                return super()._generate_single_turn(*args)
            # TRL's transformers path calls the unwrapped model's ``generate`` on the repeated prompts
            unwrapped = self.accelerator.unwrap_model(self.model)
            plain = unwrapped.generate
            unwrapped.generate = functools.partial(shared_prefix_generate, plain, unwrapped)
            try:
                return super()._generate_single_turn(*args)
            finally:
                del unwrapped.generate

        def _get_per_token_logps_and_entropies(self, model: Any, input_ids: Any, attention_mask: Any,
                                               logits_to_keep: int, batch_size: int | None = None,
                                               compute_entropy: bool = False, compute_aux_loss: bool = False,
                                               **kwargs: Any) -> tuple[Any, Any, Any]:
            plain = not self._sharing() or compute_aux_loss or any(v is not None for v in kwargs.values())
            if not plain:
                batch_size = batch_size or input_ids.size(0)
                parts = []
                for start in range(0, input_ids.size(0), batch_size):
                    with self.accelerator.autocast():
                        part = shared_prefix_logps(model, input_ids[start:start + batch_size],
                                                   attention_mask[start:start + batch_size], logits_to_keep,
                                                   compute_entropy=compute_entropy)
                    if part is None:
                        break
                    parts.append(part)
                else:
                    logps = torch.cat([p[0] for p in parts], dim=0)
                    entropies = torch.cat([p[1] for p in parts], dim=0) if compute_entropy else None
                    return logps, entropies, None
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)

    return RSafeGRPOTrainer


# --------------------------------------------------------------------------- logging


class StepLog(TrainerCallback):
    """Writes each logged step to ``metrics.jsonl`` and the TensorBoard event file (main process)."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.writer: Any = None  # a torch.utils.tensorboard.SummaryWriter, opened at the first step

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        if not state.is_world_process_zero or not logs or "reward" not in logs:
            return
        row: dict[str, Any] = {"step": state.global_step, "epoch": logs.get("epoch"), "time": time.time()}
        for key, name in STEP_METRICS.items():
            value = logs.get(key, logs.get(name))
            if isinstance(value, (int, float)):
                row[name] = float(value)
        append_jsonl(self.output_dir / METRICS, [row])
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / TENSORBOARD_DIR))
        for name, value in row.items():
            if name not in ("step", "epoch", "time"):
                self.writer.add_scalar(f"train/{name}", value, state.global_step)
        self.writer.flush()

    def on_train_end(self, *_: Any, **__: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The per-step rows of a run's ``metrics.jsonl`` (the last row per step, after a resume)."""
    path = Path(output_dir) / METRICS
    if not path.exists():
        return []
    rows: dict[int, dict[str, Any]] = {}
    for n, row in read_jsonl(path):
        if isinstance(row, str):
            raise ValueError(f"{path}: {row}")
        rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


# --------------------------------------------------------------------------- training


def _lora_config(cfg: RSafeGRPOConfig) -> Any:
    from peft import LoraConfig

    targets: Any = cfg.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", bias="none")


def _summary_stats(metrics: Sequence[dict[str, Any]], key: str, n: int = 10) -> dict[str, float | None]:
    values = [m[key] for m in metrics if m.get(key) is not None]

    def mean(xs: Sequence[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {"first": mean(values[:n]), "last": mean(values[-n:])}


class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM end the run cleanly at the end of the current step: the trainer stops, the
    model and a summary that says where it stopped are written (no traceback, no run left with
    only ``checkpoint-N`` folders). A second signal interrupts at once."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopOnSignal:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.signal is not None:  # the second one: as Python would have
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.signal = signal.Signals(signum).name
        print(f"[grpo] {self.signal}: stopping after this step (again to interrupt at once)", flush=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> Any:
        if self.signal is not None:
            control.should_training_stop = True
        return control


def train(model: str | Path, dataset_dir: str | Path, cfg: RSafeGRPOConfig, *, resume: bool = False,
          callbacks: Sequence[TrainerCallback] = (), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run GRPO on a dataset built by ``rsafe train dataset``; write the model and the summary.

    ``model``: a local directory (or hub id) of the base model. The result is written to
    ``cfg.output_dir``: a LoRA adapter (``cfg.use_lora``) or full weights with the tokenizer.
    Returns the training summary (also ``training_summary.json``).
    """
    from transformers import AutoTokenizer

    output_dir = Path(cfg.output_dir)
    check_output(output_dir, resume)
    manifest = load_manifest(dataset_dir)
    rows = load_rows(dataset_dir)
    missing = {"prompt", "label"} - set(rows.column_names)
    if missing:
        raise TrainingError(f"{dataset_dir}: dataset lacks columns {sorted(missing)}")
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model), padding_side="left")
    plan = batch_plan(cfg, cfg.world_size)
    log(f"[grpo] {len(rows)} prompts, {plan.prompts_per_step} prompts × {plan.num_generations} rollouts per step, "
        f"{'LoRA r' + str(cfg.lora_r) if cfg.use_lora else 'full fine-tuning'}, lr {cfg.learning_rate:g}, "
        f"temperature {cfg.temperature:g}, KL beta {cfg.beta:g}")
    stop = StopOnSignal()
    trainer = _trainer_class()(
        model=str(model), reward_funcs=reward_functions(cfg.rewards), args=cfg, train_dataset=rows,
        processing_class=tokenizer, peft_config=_lora_config(cfg) if cfg.use_lora else None,
        callbacks=[StepLog(output_dir), stop, *callbacks],
    )
    started = time.monotonic()
    stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=True if resume else None)
    finally:
        stop.uninstall()
    seconds = time.monotonic() - started
    # LoRA: adapter_config.json + adapter_model.safetensors; full: config.json + model.safetensors +
    # generation_config.json; both with the tokenizer. Gathers ZeRO-3 shards on several GPUs.
    trainer.save_model(str(output_dir))
    if not trainer.is_world_process_zero():
        return {}
    metrics = read_metrics(output_dir)
    summary = {
        "kind": "lora" if cfg.use_lora else "full",
        "base_model": str(Path(model).resolve()) if Path(model).exists() else str(model),
        "dataset": str(Path(dataset_dir).resolve()),
        "dataset_rows": len(rows),
        "dataset_counts": manifest.get("counts"),
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, trainer.state.global_step), 2),
        "batch": plan.__dict__,
        "reward": _summary_stats(metrics, "reward"),
        "accuracy": _summary_stats(metrics, "accuracy"),
        "format_rate": _summary_stats(metrics, "format_rate"),
        "train_loss": result.training_loss,
        "config": {k: v for k, v in cfg.to_dict().items()
                   if k in {f for f in config_fields() if not f.startswith(("push_to_hub", "hub_"))}},
        "resumed": resume,
        "stopped": ({"signal": stop.signal, "at_step": trainer.state.global_step,
                     "planned_steps": trainer.state.max_steps} if stop.signal else None),
    }
    (output_dir / SUMMARY).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    log(f"[grpo] {summary['steps']} steps in {seconds:.0f} s"
        + (f" (stopped by {stop.signal} at step {trainer.state.global_step} of {trainer.state.max_steps})"
           if stop.signal else "")
        + f"; reward {summary['reward']['first']} → {summary['reward']['last']}; written to {output_dir}")
    return summary
