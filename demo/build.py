"""The bundled demo guard model: a tiny Qwen2 that answers in the RSafe format, built on CPU.

No model hub is needed: the tokenizer (byte-level BPE, ``rsafe.demo.tokenizer``) and the model
(Qwen2 architecture, ~3.9M parameters) are trained here, by SFT (``rsafe.demo.sft``) on the
templated synthetic corpus (``rsafe.demo.corpus``) with the project's real prompt template,
then on long messages, then on *policy-ablation pairs* (``rsafe.demo.lookup``) so that its
verdict follows the category list it is given, not only the message. The result loads with
``transformers`` and with vLLM exactly like a real RSafe checkpoint, so the whole product
(engine, streaming worker, evaluation, retraining) runs end to end on a laptop. It is a demo, not
a guard: it knows only the easy synthetic cases it was trained on.

Answer format (what the model generates after ``<|im_start|>assistant\\n``)::

    <think>
    The user asks for help with making weapons or explosives. This falls under U2 - Weapons &
    Illegal Tactics. The content is unsafe.
    </think>
    \\boxed{unsafe}<|im_end|>

and, for what it learned in the lookup stages, a topic check before the decision::

    <think>
    The user asks about suicide or self-harm. Topic: Self‑Harm & Suicide is not in this policy.
    The content is safe.
    </think>
    \\boxed{safe}<|im_end|>

Builds are cached and keyed on a hash of their *recipe* (corpus file, model shape, training
settings, tokenizer settings, prompt template): a directory built from another recipe is rebuilt
instead of silently reused. Bump ``RECIPE_VERSION`` when the training code changes meaning.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rsafe.demo import sft
from rsafe.demo.corpus import (
    MULTITURN_KINDS,
    DemoExample,
    corpus,
    long_examples,
    multiturn_examples,
    synthetic_examples,
)
from rsafe.demo.lookup import Ablations, LookupStage, ablation_pair, encode_batch, pair_accuracy, stage_batches
from rsafe.demo.tokenizer import (
    CHAT_TEMPLATE,
    QWEN2_PRETOKENIZE_REGEX,
    VOCAB_SIZE,
    load_tokenizer,
    train_tokenizer,
    user_turn,
    verdict_token_ids,
)

RECIPE_VERSION = 7
"""1: the first demo model (plain byte-level BPE); 2: Qwen2 pre-tokenizer + NFC, corpus as data;
3: long messages (windows of up to ``WINDOW_TOKENS`` tokens); 4: a second stage on long messages;
5: two policy-lookup stages (``LOOKUP_STAGES``); 6: the same training, its loss computed in
length chunks (``sft.length_chunks``: a quarter faster, the same loss up to float rounding, so
not the same weights as 5); 7: a last stage on conversations (``MULTITURN_STAGE``)."""
WINDOW_TOKENS = 128
"""The demo model judges windows of up to this many content tokens (``InputLimits.max_window_tokens``
in stream/demo.yaml and the tests): it is trained on long messages of about that size."""

#: The model's shape. head_dim is hidden / heads = 64 (vLLM's CPU attention has no head_dim 16).
MODEL_SHAPE: dict[str, int] = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
SFT = sft.SFTConfig(steps=400, batch_size=16, learning_rate=1e-3, warmup_steps=20)
LONG_STAGE = {"steps_per_sft_step": 1.0, "learning_rate": 3e-4, "warmup_steps": 10, "n_long": 2400, "n_short": 2400}
"""The second SFT stage: long messages (``corpus.long_examples``: a request in filler, or filler
alone) half and half with ordinary ones, at a lower rate. Without it the model flags about a third
of pure-filler windows unsafe (measured: 8 of 12 safe), so a long benign text — judged in ~29
windows, unsafe if any is — is never safe; after 200 steps 36 of 40 filler windows are safe (not
enough), after 400 all 40 and a 3,000-token filler alone, and held-out accuracy does not drop."""
LOOKUP_STAGES = (
    LookupStage(steps_per_sft_step=2.0, fewest=0, most=7),
    LookupStage(steps_per_sft_step=1.5, fewest=2, most=15),
)
"""Policy-ablation pairs (``rsafe.demo.lookup``) after the long-message stage, so the model reads
its category list: short policies first (0–7 lines besides the pair's), then every length.
Found with bench/policy_lookup.py (docs/TRAINING.md, section 4, runs e and f); in the recipe-6
build of 2026-12-01, held-out pairs with both rows right 85 % after the first, 97.5 % after the
second, in 2,119 s of the build's 2,959 (a slow hour). U13 is never removed, so the drift scenario
stays a change the model has not been taught (it gets 40 % of the loop's held-out drift right)."""
MULTITURN_STAGE = {"steps_per_sft_step": 0.75, "learning_rate": 1e-4, "warmup_steps": 10, "n_multiturn": 2400,
                   "n_short": 1200, "n_long": 900, "n_eval": 40, "conversations": 4, "pairs": 3, "ordinary": 3,
                   "long": 3}
"""The last stage: each batch 4 conversations (``corpus.multiturn_examples``: a follow-up that
continues a harmful request is unsafe, one that changes the subject is safe, harmless chats are
safe; judged with ``judge: last`` and up to four earlier turns), 3 policy-ablation pairs like the
last lookup stage's, 3 ordinary rows and 3 long messages, at a low rate, against forgetting.
Measured on 2026-12-07 (each a run of this stage on the recipe-6 model): conversations alone (16 a
batch, lr 3e-4) erased the category lookup (held-out pairs both right 97.5 % → 5 %); 6
conversations, 4 pairs and 2 ordinary rows kept the lookup but cost long messages (a request in
3,000 tokens of filler found at 4 of 8 places) and single-turn F1 (48 demo messages: 1.0 → 0.86);
4 / 3 / 4 ordinary / 2 long at lr 2e-4 kept single-turn F1 but flagged a window of filler alone;
these settings with a tenth of ``alone`` conversations kept everything but flagged a follow-up on
its own (held-out ``alone`` 0 %): ``MULTITURN_KINDS`` gives them a fifth.
Held-out conversations (held-out follow-ups and templates) measure the stage."""
N_TRAIN = 4000
N_EVAL = 40
EVAL_SEED_OFFSET = 10_000
"""Held-out examples for checkpoint selection use seed + this (the demo benchmark sets use 7 000)."""
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "steps": 30, "lr": 5e-4, "n_train": 400}


# --------------------------------------------------------------------------------------------
# Cached, atomic builds
# --------------------------------------------------------------------------------------------

def recipe_hash(**parts: Any) -> str:
    """A short hash of everything that determines a build."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def model_recipe(seed: int, steps: int) -> str:
    probe = DemoExample("probe", None, "safe", None, "rsafe-default")
    return recipe_hash(version=RECIPE_VERSION, corpus=corpus().sha256, shape=MODEL_SHAPE,
                       sft={**asdict(SFT), "steps": steps, "seed": seed}, long_stage=LONG_STAGE,
                       lookup=[asdict(stage) for stage in LOOKUP_STAGES],
                       multiturn={**MULTITURN_STAGE, "kinds": MULTITURN_KINDS},
                       n_train=N_TRAIN, n_eval=N_EVAL,
                       vocab=VOCAB_SIZE, regex=QWEN2_PRETOKENIZE_REGEX, chat=CHAT_TEMPLATE,
                       template=user_turn(probe))


MANIFEST = "manifest.json"
"""What a finished build writes last: its recipe hash, the command that made it, the build's measured
figures and a sha256 of every file (the committed demo model, ``demo/model/``, carries one too)."""
DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "demo" / "model"
"""The committed demo model artifact (in the repository, not in the installed package)."""
REBUILD_COMMAND = "make demo-model-rebuild"
"""Rebuilds ``demo/model/`` in place from the recipe (``rsafe demo-model build demo/model``)."""


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """A finished build's manifest (None: no finished build there). Builds made before manifests
    wrote the same summary to ``.ok``."""
    for name in (MANIFEST, ".ok"):
        try:
            data = json.loads((Path(out_dir) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return data
    return None


def built_recipe(out_dir: str | Path) -> str | None:
    """The recipe hash a finished build was made from (None: no finished build there)."""
    manifest = read_manifest(out_dir)
    return manifest.get("recipe") if manifest else None


def file_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file of a build (the manifest aside), by relative path."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name not in (MANIFEST, ".ok")}


def write_manifest(folder: str | Path, recipe: str, summary: dict[str, Any], *, command: str) -> dict[str, Any]:
    """Write ``manifest.json`` for a finished build in ``folder``; return it."""
    import platform

    manifest = {"recipe": recipe, "command": command,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": {"platform": platform.platform(), "processor": platform.machine(),
                            "cpus": os.cpu_count()},
                **summary, "files": file_hashes(folder)}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def check_demo_model(path: str | Path = DEMO_MODEL_DIR, *, seed: int = 0) -> str | None:
    """Why ``path`` is not the demo model the code's recipe makes (None: it is): missing, built from
    another recipe, or its files differ from those its manifest lists. The message says how to
    rebuild and refresh it."""
    manifest = read_manifest(path)
    fix = f"rebuild and refresh it with `{REBUILD_COMMAND}` (30–50 min on 2 cores), then commit demo/model/"
    if manifest is None:
        return f"{path}: no demo model build (no {MANIFEST}); {fix}"
    want = model_recipe(seed, SFT.steps)
    if manifest.get("recipe") != want:
        return (f"{path} was built from recipe {manifest.get('recipe')}, the code's recipe is {want} (the corpus, "
                f"model shape, training settings or template changed); {fix}")
    listed = manifest.get("files")
    if listed is not None and listed != file_hashes(path):
        return f"{path}: its files differ from those its {MANIFEST} lists (edited or partly copied); {fix}"
    return None


def is_demo_model(path: str | Path) -> bool:
    """Whether ``path`` holds a build of the demo model's recipe (of the seed and steps it records):
    what the demo's synthetic promotion set may gate, and nothing else."""
    summary = read_manifest(path)
    try:
        return summary is not None and summary.get("recipe") == model_recipe(int(summary["seed"]),
                                                                             int(summary["steps"]))
    except (KeyError, TypeError, ValueError):
        return False


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """An exclusive lock beside ``out_dir``, so concurrent builders do the work once."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_build(out_dir: str | Path, recipe: str, build: Callable[[Path], dict[str, Any]], *,
                 force: bool = False, log: Callable[[str], None] = print, command: str | None = None) -> Path:
    """Run ``build(tmp_dir) -> summary`` unless ``out_dir`` already holds a build of ``recipe``.

    The build happens in a temporary sibling directory under an exclusive lock (concurrent
    builders do the work once); ``manifest.json`` (``write_manifest``: the summary, ``recipe``, the
    command, the build's seconds, the files' hashes) is written last and the directory renamed into
    place, so a half-built directory is never used.
    """
    out_dir = Path(out_dir)

    def fresh() -> bool:
        return not force and built_recipe(out_dir) == recipe

    if fresh():
        return out_dir
    with _build_lock(out_dir):
        if fresh():
            return out_dir
        old = built_recipe(out_dir)
        if old is not None and not force:
            log(f"[build] {out_dir} was built from recipe {old}, not {recipe}: rebuilding")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            started = time.monotonic()
            summary = build(tmp)
            summary.setdefault("build_seconds", round(time.monotonic() - started, 1))
            for path in tmp.iterdir():  # mkdtemp and safetensors make owner-only files
                path.chmod(0o755 if path.is_dir() else 0o644)
            tmp.chmod(0o755)
            write_manifest(tmp, recipe, summary, command=command or f"rsafe demo-model build {out_dir}")
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


# --------------------------------------------------------------------------------------------
# The demo model
# --------------------------------------------------------------------------------------------

def training_messages(seed: int = 0) -> frozenset[tuple[str, str, str | None]]:
    """Every (policy, prompt, response) a demo build of ``seed`` (default steps) trains on, in every
    stage (a conversation's judged turn included): what evaluation sets must leave out (``rsafe.demo.benchmarks``). A lookup pair's
    message counts under ``rsafe-default`` too: its policies are that one less a line or two."""
    examples = [*synthetic_examples(N_TRAIN, seed=seed), *long_examples(LONG_STAGE["n_long"], seed=seed),
                *synthetic_examples(LONG_STAGE["n_short"], seed=seed + 1)]
    seen = {(e.policy, e.prompt, e.response) for e in examples}
    ordinary, evals = split(seed, N_TRAIN, N_EVAL)
    for rows in multiturn_rows(seed, SFT.steps, evals, Ablations()):
        seen.update((policy, e.prompt, e.response) for e in rows for policy in (e.policy, "rsafe-default"))
    for _stage, _steps, batches in lookup_batches(seed, SFT.steps, Ablations(), ordinary):
        for rows in batches:
            seen.update((policy, e.prompt, e.response) for e in rows for policy in (e.policy, "rsafe-default"))
    return frozenset(seen)


def lookup_batches(seed: int, steps: int, ablations: Ablations, ordinary: list[DemoExample]
                   ) -> Iterator[tuple[LookupStage, int, Iterator[list[DemoExample]]]]:
    """(stage, its steps, its batches' rows) for each of ``LOOKUP_STAGES`` of a build of ``steps``
    SFT steps; deterministic in ``seed`` (one random stream per stage)."""
    for i, stage in enumerate(LOOKUP_STAGES):
        n = int(steps * stage.steps_per_sft_step)
        yield stage, n, stage_batches(stage, n, ablations, ordinary, random.Random(f"rsafe-lookup-{seed}-{i}"))


def split(seed: int, n_train: int, n_eval: int) -> tuple[list[DemoExample], list[DemoExample]]:
    """Train and held-out examples; no held-out message (with its response) occurs in training."""
    evals = synthetic_examples(n_eval, seed=seed + EVAL_SEED_OFFSET)
    held = {(e.policy, e.prompt, e.response) for e in evals}
    train = [e for e in synthetic_examples(n_train, seed=seed) if (e.policy, e.prompt, e.response) not in held]
    return train, evals


def eval_steps(steps: int) -> list[int]:
    """Checkpoints to evaluate: every 10 % of training from half way (and the end)."""
    if steps < 100:
        return [steps]
    return sorted({round(steps * f / 10) for f in range(5, 11)})


def build_demo_model(out_dir: str | Path, *, seed: int = 0, steps: int | None = None,
                     force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Build the demo guard model (tokenizer + Qwen2 weights) into ``out_dir``; return it.

    Cached (see ``cached_build``): nothing is done when ``out_dir`` holds a build of the same
    recipe. ``manifest.json`` holds the recipe, the command, the figures (params, steps, held-out
    format rate and accuracy, seconds) and the files' hashes. The data and its order are
    deterministic in ``seed``; the weights of two full builds are not bit-identical, even on one
    machine (CPU kernels, thread timing; docs/TRAINING.md). The repository carries the default build as
    ``demo/model/`` (``DEMO_MODEL_DIR``); ``make demo-model-rebuild`` refreshes it. ``steps``
    defaults to ``SFT.steps`` (with the later stages, 30–50 min on 2 CPU cores); the held-out set is
    evaluated at a few checkpoints and the best one is kept. A build of fewer than 100 steps is a
    test build: a tenth of the data.
    """
    steps = SFT.steps if steps is None else steps
    return cached_build(out_dir, model_recipe(seed, steps),
                        lambda tmp: _build_model(tmp, seed=seed, steps=steps, log=log), force=force, log=log,
                        command=f"rsafe demo-model build {out_dir}" + (f" --seed {seed}" if seed else "")
                        + (f" (steps {steps})" if steps != SFT.steps else ""))


def _build_model(tmp: Path, *, seed: int, steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    t0 = time.monotonic()
    scale = 1 if steps >= 100 else 10  # a short build (tests): a tenth of the data, 8 held-out examples
    train, evals = split(seed, N_TRAIN // scale, N_EVAL if scale == 1 else 8)
    log(f"[demo-model] {len(train)} training / {len(evals)} held-out examples; training tokenizer")
    tokenizer = train_tokenizer(train)
    groups = sft.group_by_prefix(tokenizer, train)
    lengths = sorted(len(prefix) + len(x) for prefix, items in groups for x, _ in items)
    log(f"[demo-model] vocab {len(tokenizer)}, sequence length median {lengths[len(lengths) // 2]}, "
        f"max {lengths[-1]}; {len(groups)} shared prompt prefixes")
    model = sft.make_qwen2_model(MODEL_SHAPE, tokenizer, seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[demo-model] {n_params / 1e6:.2f}M parameters, {steps} steps of batch {SFT.batch_size}")

    checkpoints = set(eval_steps(steps))
    best: dict[str, Any] = {"score": (-1.0, -1.0), "step": 0, "state": None, "metrics": {}}

    def on_step(step: int) -> None:
        if step not in checkpoints:
            return
        metrics = sft.evaluate_answers(model, tokenizer, evals)
        model.train()
        log(f"[demo-model] step {step}: format {metrics['format_rate']:.0%}, "
            f"accuracy {metrics['accuracy']:.0%} on {len(evals)} held-out")
        score = (metrics["accuracy"], metrics["format_rate"])
        if score >= best["score"]:
            best.update(score=score, step=step, metrics=metrics, state=copy.deepcopy(model.state_dict()))

    cfg = sft.SFTConfig(**{**asdict(SFT), "steps": steps, "seed": seed})
    sft.train(model, groups, tokenizer.pad_token_id, cfg, log=log, tag="demo-model", on_step=on_step)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    log(f"[demo-model] keeping step {best['step']}")
    long_steps = int(steps * LONG_STAGE["steps_per_sft_step"])
    if long_steps:
        held = {(e.policy, e.prompt, e.response) for e in evals}
        rows = [e for e in (*long_examples(LONG_STAGE["n_long"] // scale, seed=seed),
                            *synthetic_examples(LONG_STAGE["n_short"] // scale, seed=seed + 1))
                if (e.policy, e.prompt, e.response) not in held]
        stage = sft.SFTConfig(steps=long_steps, batch_size=SFT.batch_size, learning_rate=LONG_STAGE["learning_rate"],
                              warmup_steps=LONG_STAGE["warmup_steps"], seed=seed)
        log(f"[demo-model] long-message stage: {long_steps} steps on {len(rows)} examples")
        sft.train(model, sft.group_by_prefix(tokenizer, rows), tokenizer.pad_token_id, stage, log=log,
                  tag="demo-model long")
        best["metrics"] = sft.evaluate_answers(model, tokenizer, evals)
        log(f"[demo-model] after the long-message stage: format {best['metrics']['format_rate']:.0%}, "
            f"accuracy {best['metrics']['accuracy']:.0%} on {len(evals)} held-out")
    lookup = _lookup_stages(model, tokenizer, seed=seed, steps=steps, train=train, log=log)
    if lookup:
        best["metrics"] = sft.evaluate_answers(model, tokenizer, evals)
        log(f"[demo-model] after the lookup stages: format {best['metrics']['format_rate']:.0%}, "
            f"accuracy {best['metrics']['accuracy']:.0%} on {len(evals)} held-out")
    multiturn = multiturn_stage(model, tokenizer, seed=seed, steps=steps, evals=evals, log=log)
    if multiturn:
        best["metrics"] = sft.evaluate_answers(model, tokenizer, evals)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    summary = {
        "params": n_params, "steps": steps, "best_step": best["step"], "seed": seed,
        "eval_examples": len(evals), "eval_format_rate": best["metrics"].get("format_rate"),
        "eval_accuracy": best["metrics"].get("accuracy"), "vocab_size": len(tokenizer),
        "verdict_token_ids": verdict_token_ids(tokenizer), "lookup": lookup, "multiturn": multiturn,
        "seconds": round(time.monotonic() - t0, 1),
        "torch": torch.__version__,
    }
    log(f"[demo-model] built in {summary['seconds']:.0f} s "
        f"(format {summary['eval_format_rate']:.0%}, accuracy {summary['eval_accuracy']:.0%})")
    return summary


def multiturn_rows(seed: int, steps: int, evals: list[DemoExample], ablations: Ablations
                   ) -> Iterator[list[DemoExample]]:
    """The rows of each batch of the multi-turn stage of a build of ``steps`` SFT steps (see
    ``MULTITURN_STAGE``); deterministic in ``seed``."""
    n = int(steps * MULTITURN_STAGE["steps_per_sft_step"])
    scale = 1 if steps >= 100 else 10
    held = {(e.policy, e.prompt, e.response) for e in evals}
    conversations = multiturn_examples(MULTITURN_STAGE["n_multiturn"] // scale, seed=seed)
    ordinary = [e for e in synthetic_examples(MULTITURN_STAGE["n_short"] // scale, seed=seed + 2)
                if (e.policy, e.prompt, e.response) not in held]
    long = long_examples(MULTITURN_STAGE["n_long"] // scale, seed=seed + 3)
    rng = random.Random(f"rsafe-multiturn-stage-{seed}")
    last = LOOKUP_STAGES[-1]
    m = MULTITURN_STAGE
    for _ in range(n):
        rows = [e for _ in range(m["pairs"]) for e in ablation_pair(rng, ablations, last.fewest, last.most)]
        yield (rows + rng.sample(conversations, m["conversations"]) + rng.sample(ordinary, m["ordinary"])
               + rng.sample(long, m["long"]))


def multiturn_stage(model: Any, tokenizer: Any, *, seed: int, steps: int, evals: list[DemoExample],
                    log: Callable[[str], None]) -> dict[str, Any]:
    """Run ``MULTITURN_STAGE`` on ``model``; return its steps, seconds and held-out figures
    (conversations by kind, the single-turn held-out set, policy-ablation pairs)."""
    n = int(steps * MULTITURN_STAGE["steps_per_sft_step"])
    if n == 0:
        return {}
    t0 = time.monotonic()
    scale = 1 if steps >= 100 else 10
    ablations = Ablations()
    m = MULTITURN_STAGE
    stage = sft.SFTConfig(steps=n, batch_size=m["conversations"] + 2 * m["pairs"] + m["ordinary"] + m["long"],
                          learning_rate=m["learning_rate"], warmup_steps=m["warmup_steps"], seed=seed)
    log(f"[demo-model] multi-turn stage: {n} steps of {m['conversations']} conversations, {m['pairs']} "
        f"policy-ablation pairs, {m['ordinary']} ordinary rows and {m['long']} long messages")
    sft.fit(model, (encode_batch(tokenizer, ablations, rows) for rows in multiturn_rows(seed, steps, evals, ablations)),
            stage, log=log, tag="demo-model multi-turn")
    conversations = multiturn_examples(m["n_eval"] // scale, seed=seed, split="heldout")
    out: dict[str, Any] = {"steps": n, "heldout": len(conversations)}
    texts = sft.generate(model, tokenizer, conversations)
    for kind, _ in MULTITURN_KINDS:
        idx = [i for i, e in enumerate(conversations) if e.template == kind]
        right = sum(parse_answer_label(texts[i]) == conversations[i].label for i in idx)
        out[f"accuracy_{kind}"] = round(right / len(idx), 4) if idx else None
    single = sft.evaluate_answers(model, tokenizer, evals)
    pairs = pair_accuracy(model, tokenizer, ablations, _heldout_pairs(seed, 40 if steps >= 100 else 4, ablations))
    out.update(single_accuracy=single["accuracy"], pairs=pairs["pairs"], seconds=round(time.monotonic() - t0, 1))
    log("[demo-model] after the multi-turn stage: " + ", ".join(f"{k} {v}" for k, v in out.items()))
    return out


def _heldout_pairs(seed: int, n: int, ablations: Ablations) -> list[Any]:
    """``n`` held-out policy-ablation pairs like the last lookup stage's (what a later stage keeps of it)."""
    rng = random.Random(f"rsafe-multiturn-pairs-{seed}")
    last = LOOKUP_STAGES[-1]
    return [ablation_pair(rng, ablations, last.fewest, last.most) for _ in range(n)]


def parse_answer_label(text: str) -> str | None:
    from rsafe.demo.corpus import parse_answer

    ok, label = parse_answer(text)
    return label if ok else None


def _lookup_stages(model: Any, tokenizer: Any, *, seed: int, steps: int, train: list[DemoExample],
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run ``LOOKUP_STAGES``; return each stage's steps, seconds and held-out pair accuracy."""
    ablations = Ablations()
    held_rng = random.Random(f"rsafe-lookup-heldout-{seed}")
    out: list[dict[str, Any]] = []
    for i, (stage, n, batches) in enumerate(lookup_batches(seed, steps, ablations, train), 1):
        if n == 0:
            continue
        t0 = time.monotonic()
        log(f"[demo-model] lookup stage {i}: {n} steps, {stage.pairs} policy-ablation pairs + "
            f"{stage.ordinary} ordinary rows a batch, {stage.fewest}–{stage.most} other lines kept")
        cfg = sft.SFTConfig(steps=n, batch_size=2 * stage.pairs + stage.ordinary, learning_rate=stage.learning_rate,
                            warmup_steps=stage.warmup_steps, seed=seed)
        sft.fit(model, (encode_batch(tokenizer, ablations, rows) for rows in batches), cfg, log=log,
                tag=f"demo-model lookup {i}")
        held = [ablation_pair(held_rng, ablations, stage.fewest, stage.most) for _ in range(40 if steps >= 100 else 4)]
        metrics = pair_accuracy(model, tokenizer, ablations, held)
        log(f"[demo-model] after lookup stage {i}: held-out pairs both right {metrics['pairs']:.0%}, "
            f"rows {metrics['rows']:.0%}")
        out.append({"stage": i, "steps": n, "seconds": round(time.monotonic() - t0, 1),
                    "heldout_pairs": len(held), **metrics})
    return out


def flipped(examples: list[DemoExample]) -> list[DemoExample]:
    """The same messages with the opposite labels (a deliberately bad adapter, for gate tests)."""
    return [DemoExample(e.prompt, e.response, "safe" if e.label == "unsafe" else "unsafe", None, e.policy)
            for e in examples]


LoraVariant = str
"""``default`` (the demo corpus), ``flipped`` (opposite labels) or ``drift`` (the corpus plus the
medical family labelled safe under ``medical-platform``: the drift scenario learned by SFT)."""


def lora_examples(variant: LoraVariant, seed: int) -> list[DemoExample]:
    train, _ = split(seed + 1, LORA["n_train"], N_EVAL)
    if variant == "default":
        return train
    if variant == "flipped":
        return flipped(train)
    if variant == "drift":
        from rsafe.policies import PolicyRegistry
        from rsafe.demo.corpus import family_examples

        registry = PolicyRegistry.from_dirs()
        drift = family_examples("medical", registry.get("medical-platform"), 160, seed=seed + 5)
        contrast = family_examples("medical", registry.get("rsafe-default"), 80, seed=seed + 6)
        return [*train, *drift, *contrast]
    raise ValueError(f"unknown LoRA variant {variant!r} (default, flipped, drift)")


def build_demo_lora(model_dir: str | Path, out_dir: str | Path, *, seed: int = 0, steps: int = LORA["steps"],
                    variant: LoraVariant = "default", lr: float = LORA["lr"], force: bool = False) -> Path:
    """Train a small LoRA adapter (rank 8 on q_proj, v_proj) for the demo model; return its dir.

    Saved with PEFT's ``save_pretrained`` (``adapter_config.json`` + safetensors), so vLLM's
    ``LoRARequest(name, id, out_dir)`` loads it (engine with ``enable_lora=True, max_lora_rank=8``).
    ``variant`` chooses its training rows (``lora_examples``). Cached and atomic like
    ``build_demo_model``; keyed on the base model's recipe too.
    """
    parts = {"lr": lr} if lr != LORA["lr"] else {}  # (the hash of a default build stays what it was)
    recipe = recipe_hash(base=built_recipe(model_dir), lora=LORA, steps=steps, seed=seed, variant=variant, **parts)

    def build(tmp: Path) -> dict[str, Any]:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import Qwen2ForCausalLM

        t0 = time.monotonic()
        tokenizer = load_tokenizer(model_dir)
        groups = sft.group_by_prefix(tokenizer, lora_examples(variant, seed))
        torch.manual_seed(seed)
        base = Qwen2ForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        config = LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.0,
                            target_modules=LORA["target_modules"], task_type="CAUSAL_LM", bias="none")
        model = get_peft_model(base, config)
        cfg = sft.SFTConfig(steps=steps, batch_size=SFT.batch_size, learning_rate=lr,
                            warmup_steps=SFT.warmup_steps, seed=seed)
        sft.train(model, groups, tokenizer.pad_token_id, cfg, log=lambda _msg: None, tag="demo-lora")
        model.save_pretrained(tmp)
        return {"base_model": str(Path(model_dir).resolve()), "rank": LORA["r"], "steps": steps, "lr": lr, "seed": seed,
                "variant": variant, "target_modules": LORA["target_modules"],
                "seconds": round(time.monotonic() - t0, 1)}

    return cached_build(out_dir, recipe, build, force=force, log=lambda _msg: None)
