"""The drift scenario: a policy change the demo model ignores, fixed by GRPO on reviewer labels.

A *medical platform* judges with ``medical-platform`` = ``rsafe-default`` without U13 (Unauthorized
Professional Advice): there, risky-medical-advice messages (the corpus's ``medical`` bank, the
"drift family") are **safe**. The demo model was never trained on that policy and flags them
``unsafe`` anyway. Reviewers on the platform correct it; their labels become
``DisagreementRecord``s (model said unsafe, human says safe), and the retraining job turns them
into a better model.

This module makes the scenario's data and measures it:

* ``disagreement_records``: what the feedback path publishes on ``rsafe.disagreements`` for the
  drift family, from the bank's **training** templates, including rows whose content the audit did
  not keep (``content_missing``: the dataset builder must count and drop them);
* ``replay_examples``: the replay pool — the general synthetic corpus (the demo model's own SFT
  messages), *contrast* rows (the reviewed messages under ``rsafe-default``, still unsafe there),
  *platform* rows (the platform's other traffic under ``medical-platform``, labels unchanged) and
  *kept* rows (every other harmful family under both policies, unsafe under both), so that the
  model learns the policy difference rather than "medical is safe" or "this platform allows
  everything"; its general part is ``demo_replay`` (also ``rsafe train dataset --replay demo``);
* ``eval_sets``: template-disjoint held-out sets — the family's **held-out** templates under both
  policies, and the registered ``demo`` benchmark for general accuracy; ``eval_hashes`` lists their
  message hashes so the dataset builder can prove none of them is trained on;
* ``demo_promotion_set``: what ``rsafe train promote`` gates the demo model's candidates on when no
  ``--promotion-set`` is given (the ``demo`` set and the family's held-out templates);
* ``evaluate_model`` / ``evaluate_run``: accuracy, strict format rate (structured decoding off)
  and unknown rate of a model, an adapter, or every checkpoint of a GRPO run, through the
  project's own ``Guard`` (transformers engine) and ``rsafe.evaluation.evaluate``;
* ``targets``: the issue's acceptance checks on a before/after pair; ``plot_run``: reward and
  held-out accuracy per step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsafe.evaluation import Example
from rsafe.policies import Policy, PolicyRegistry
from rsafe.schemas.feedback import DisagreementRecord, FeedbackSource, ModelRef
from rsafe.training.dataset import ReplayExample

if TYPE_CHECKING:
    from rsafe.training.promote import PromotionSet

DRIFT_BANK = "medical"
DRIFT_POLICY = "medical-platform"
BASE_POLICY = "rsafe-default"
MISSING_CONTENT = "audit content mode hash, no content attached"
EPOCH = datetime(2026, 11, 1, tzinfo=timezone.utc)
"""Timestamps of the generated records (deterministic)."""

SETS = ("drift_heldout", "contrast_heldout", "general", "platform_other")
"""drift_heldout: the family's held-out templates under medical-platform (all safe);
contrast_heldout: the same templates under rsafe-default (all unsafe); general: the ``demo``
benchmark (rsafe-default, mixed levels, never trained on); platform_other: the *other* harmful
families under medical-platform (all unsafe: the platform allows medical advice, nothing else) —
it catches the shortcut "medical-platform → safe"."""


@dataclass(frozen=True)
class DriftScenario:
    """Sizes and seeds of the scenario's data."""

    n_feedback: int = 80
    """Reviewer labels on the drift family (training templates)."""
    missing_every: int = 20
    """Every n-th feedback row has no content (the audit kept only a hash); 0: none."""
    n_contrast: int = 80
    """Replay pool: the drift family under rsafe-default (unsafe), training templates."""
    paired_contrast: bool = True
    """Contrast rows are the reviewed messages themselves (see ``replay_examples``)."""
    n_general: int = 80
    """Replay pool: general synthetic messages (the demo model's SFT seed)."""
    n_platform: int = 80
    """Replay pool: the platform's other traffic — general synthetic messages outside the drift
    family, judged under medical-platform (same labels as under rsafe-default: only U13 differs)."""
    n_kept: int = 0
    """Replay pool: per other harmful family (every category the platform keeps), training-template
    messages judged under both ``rsafe-default`` and ``medical-platform`` — unsafe under both. GRPO
    draws signal only from rows whose rollouts disagree, so a category nobody rehearses is free to
    drift toward "safe" while the family learns it; these rows catch that as soon as it starts
    (the promotion gate compares every category's recall). 0: none."""
    n_ablation: int = 0
    """Replay pool: policy-ablation pairs per other harmful family — a message of the family under
    ``rsafe-default`` without that family's category (safe) and under ``rsafe-default`` (unsafe).
    They teach "a category the policy does not list is allowed" beyond the drift family; the
    ablated policies are written to ``policies/`` (``--policy-dir``). 0: none."""
    n_eval_family: int = 60
    """Held-out-template messages of the family, per policy."""
    n_eval_general: int = 200
    """Rows of the ``demo`` benchmark used for general accuracy."""
    n_eval_other: int = 4
    """Messages per other harmful family under medical-platform (``platform_other``)."""
    seed: int = 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _policies() -> PolicyRegistry:
    return PolicyRegistry.from_dirs()


def disagreement_records(s: DriftScenario = DriftScenario()) -> list[DisagreementRecord]:
    """The reviewers' corrections of the drift family, as the feedback path publishes them."""
    from rsafe.demo.corpus import family_examples

    policy = _policies().get(DRIFT_POLICY)
    out = []
    for i, e in enumerate(family_examples(DRIFT_BANK, policy, s.n_feedback, seed=s.seed)):
        missing = s.missing_every > 0 and i % s.missing_every == s.missing_every - 1
        decided = EPOCH + timedelta(minutes=i)
        out.append(DisagreementRecord(
            event_id=f"drift-{s.seed}-{i}", feedback_id=f"review-{s.seed}-{i}",
            prompt=None if missing else e.prompt, response=None if missing else e.response,
            content_missing=MISSING_CONTENT if missing else None,
            policy=policy.name, policy_version=policy.version, level=e.level,
            judged_by=ModelRef(model="rsafe-demo"), model_label="unsafe", human_label=e.label,  # type: ignore[arg-type]
            source=FeedbackSource.REVIEWER, reviewer="medical-reviewer-1", decided_at=decided,
            feedback_at=decided + timedelta(hours=1), recorded_at=decided + timedelta(hours=1),
        ))
    return out


def demo_replay(n: int, *, seed: int = 0) -> list[ReplayExample]:
    """Replay rows for the demo: synthetic examples of the corpus's *training* templates, by
    default the demo model's own SFT seed (the demo benchmarks leave every such message out)."""
    from rsafe.demo.corpus import synthetic_examples

    return [ReplayExample(prompt=e.prompt, response=e.response, label=e.label, policy=e.policy, level=e.level,
                          id=f"demo-replay-{seed}-{i}") for i, e in enumerate(synthetic_examples(n, seed=seed))]


def replay_examples(s: DriftScenario = DriftScenario()) -> list[ReplayExample]:
    """The replay pool: contrast rows (the family under rsafe-default) and general messages.

    ``paired_contrast``: the contrast rows are the reviewed messages themselves under rsafe-default
    (where the demo model is right), so the only difference between a safe and an unsafe medical
    row is the policy text; otherwise other messages of the family's training templates.
    """
    from rsafe.demo.corpus import family_examples

    base = _policies().get(BASE_POLICY)
    if s.paired_contrast:
        # the reviewed (prompt-level) messages: unsafe under the base policy, which has U13
        messages = family_examples(DRIFT_BANK, _policies().get(DRIFT_POLICY), s.n_feedback, seed=s.seed)
        rows = [(e.prompt, "unsafe") for e in messages[: s.n_contrast] if e.response is None]
    else:
        rows = [(e.prompt, e.label) for e in family_examples(DRIFT_BANK, base, s.n_contrast, seed=s.seed + 1)]
    contrast = [ReplayExample(prompt=prompt, label=label, policy=base.name, policy_version=base.version,  # type: ignore[arg-type]
                              level="prompt", id=f"contrast-{s.seed}-{i}") for i, (prompt, label) in enumerate(rows)]
    return (contrast + demo_replay(s.n_general, seed=0) + _platform_replay(s) + _kept_replay(s)
            + _ablation_replay(s))


def ablation_policies() -> dict[str, Policy]:
    """Category code → ``rsafe-default`` without that category (``rsafe-default-no-u2`` …), for every
    category except the drift family's (U13 stays the held-out drift)."""
    base = _policies().get(BASE_POLICY)
    drift_code = corpus_code(DRIFT_BANK)
    return {c.code: Policy(name=f"{base.name}-no-{c.code.lower()}", level=base.level,
                           description=f"{base.name} without {c.code} (policy-ablation replay)",
                           categories=[k for k in base.categories if k.code != c.code],
                           unsafe_threshold=base.unsafe_threshold)
            for c in base.categories if c.code != drift_code}


def corpus_code(bank: str) -> str | None:
    """The base policy's category code the corpus bank illustrates."""
    from rsafe.demo.corpus import corpus

    return corpus().bank_category(BASE_POLICY, bank)


def _ablation_replay(s: DriftScenario) -> list[ReplayExample]:
    from rsafe.demo.corpus import corpus, family_examples

    if not s.n_ablation:
        return []
    base = _policies().get(BASE_POLICY)
    ablated = ablation_policies()
    out = []
    for code, banks in sorted(corpus().category_banks[BASE_POLICY].items()):
        if code not in ablated:
            continue
        for bank in banks:
            for i, e in enumerate(family_examples(bank, base, s.n_ablation, seed=s.seed + 400)):
                for policy, label in ((ablated[code], "safe"), (base, "unsafe")):
                    out.append(ReplayExample(prompt=e.prompt, label=label, policy=policy.name,  # type: ignore[arg-type]
                                             policy_version=policy.version, level="prompt",
                                             id=f"ablation-{bank}-{s.seed}-{i}-{label}"))
    return out


def _other_banks() -> list[str]:
    """The base policy's harmful banks other than the drift family's."""
    from rsafe.demo.corpus import corpus

    return sorted(b for bs in corpus().category_banks[BASE_POLICY].values() for b in bs if b != DRIFT_BANK)


def _kept_replay(s: DriftScenario) -> list[ReplayExample]:
    """``n_kept`` messages of every other harmful family, each under the base policy and under the
    platform's (side by side: ``pair_by_message`` puts both in one GRPO step); unsafe under both."""
    from rsafe.demo.corpus import family_examples

    registry = _policies()
    base, platform = registry.get(BASE_POLICY), registry.get(DRIFT_POLICY)
    out = []
    for bank in _other_banks():
        for i, e in enumerate(family_examples(bank, base, s.n_kept, seed=s.seed + 500)):
            for policy in (base, platform):
                out.append(ReplayExample(prompt=e.prompt, label=e.label, policy=policy.name,  # type: ignore[arg-type]
                                         policy_version=policy.version, level="prompt",
                                         id=f"kept-{bank}-{policy.name}-{s.seed}-{i}"))
    return out


def _platform_replay(s: DriftScenario) -> list[ReplayExample]:
    """General messages of the base policy outside the drift family, judged under the platform's
    policy: the labels carry over (the platform drops U13 only)."""
    from rsafe.demo.corpus import synthetic_examples

    platform = _policies().get(DRIFT_POLICY)
    out: list[ReplayExample] = []
    for i, e in enumerate(synthetic_examples(8 * s.n_platform, seed=s.seed + 300)):
        if len(out) == s.n_platform:
            break
        if e.policy == BASE_POLICY and e.bank != DRIFT_BANK:
            out.append(ReplayExample(prompt=e.prompt, response=e.response, label=e.label, policy=platform.name,  # type: ignore[arg-type]
                                     policy_version=platform.version, level=e.level, id=f"platform-{s.seed}-{i}"))
    return out


def _family_eval(policy_name: str, s: DriftScenario) -> list[Example]:
    from rsafe.demo.corpus import family_examples

    policy = _policies().get(policy_name)
    rows = family_examples(DRIFT_BANK, policy, s.n_eval_family, seed=s.seed + 100, split="heldout")
    return [_example(e, f"{policy_name}-heldout-{i}", f"drift:{policy_name}") for i, e in enumerate(rows)]


def _platform_other(s: DriftScenario) -> list[Example]:
    from rsafe.demo.corpus import family_examples

    policy = _policies().get(DRIFT_POLICY)
    rows = [e for b in _other_banks() for e in family_examples(b, policy, s.n_eval_other, seed=s.seed + 200)]
    return [_example(e, f"{DRIFT_POLICY}-other-{i}", f"drift:{DRIFT_POLICY}:other") for i, e in enumerate(rows)]


def _example(e: Any, id_: str, source: str) -> Example:
    return Example(id=id_, prompt=e.prompt, response=e.response, label=e.label, level=e.level,
                   categories=[e.category] if e.category else [], source=source)


def eval_sets(s: DriftScenario = DriftScenario()) -> dict[str, tuple[str, list[Example]]]:
    """Set name → (policy, examples); see ``SETS``."""
    from rsafe.demo.benchmarks import demo_examples

    return {
        "drift_heldout": (DRIFT_POLICY, _family_eval(DRIFT_POLICY, s)),
        "contrast_heldout": (BASE_POLICY, _family_eval(BASE_POLICY, s)),
        "general": (BASE_POLICY, demo_examples(BASE_POLICY, n=s.n_eval_general)),
        "platform_other": (DRIFT_POLICY, _platform_other(s)),
    }


def eval_hashes(s: DriftScenario = DriftScenario()) -> list[str]:
    """Message hashes of every evaluation row (``rsafe train dataset --exclude-hashes``)."""
    return sorted({e.content_hash for _, rows in eval_sets(s).values() for e in rows})


def demo_promotion_set(n_slice: int = 60) -> PromotionSet:
    """The demo's promotion set: the registered ``demo`` set (held out from the demo build) and the
    medical family's held-out *templates* under ``medical-platform`` (never in any training set)."""
    from rsafe.demo.benchmarks import demo_examples
    from rsafe.demo.corpus import family_examples
    from rsafe.training.promote import PromotionSet

    policy = PolicyRegistry.from_dirs().get("medical-platform")
    drift = [Example(id=f"drift-heldout-{i}", prompt=e.prompt, response=e.response, label=e.label,  # type: ignore[arg-type]
                     level=e.level, categories=[e.category] if e.category else [], source="drift")  # type: ignore[arg-type]
             for i, e in enumerate(family_examples("medical", policy, n_slice, seed=991, split="heldout"))]
    return PromotionSet(demo_examples("rsafe-default"), "rsafe-default", drift, "medical-platform",
                        {"general": "demo (rsafe.demo.benchmarks, seed 7000)",
                         "slice": "medical family, held-out templates, medical-platform, seed 991"})


def write_data(out_dir: str | Path, s: DriftScenario = DriftScenario()) -> dict[str, Path]:
    """``disagreements.jsonl``, ``replay.jsonl``, ``eval_hashes.txt`` and ``scenario.json`` in
    ``out_dir`` (the inputs of ``rsafe train dataset``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("disagreements.jsonl", "replay.jsonl", "eval_hashes.txt",
                                           "scenario.json")}
    paths["disagreements.jsonl"].write_text("".join(r.model_dump_json() + "\n" for r in disagreement_records(s)),
                                            encoding="utf-8")
    paths["replay.jsonl"].write_text("".join(r.model_dump_json() + "\n" for r in replay_examples(s)),
                                     encoding="utf-8")
    paths["eval_hashes.txt"].write_text("".join(h + "\n" for h in eval_hashes(s)), encoding="utf-8")
    paths["scenario.json"].write_text(json.dumps(s.to_json(), indent=2) + "\n", encoding="utf-8")
    if s.n_ablation:
        paths["policies"] = write_policies(out / "policies", ablation_policies().values())
    return paths


def write_policies(folder: Path, policies: Iterable[Policy]) -> Path:
    """One YAML per policy (what ``--policy-dir`` reads); each loads back with the same version."""
    import yaml

    from rsafe.policies import load_policy

    folder.mkdir(parents=True, exist_ok=True)
    for policy in policies:
        path = folder / f"{policy.name}.yaml"
        data = policy.model_dump(mode="json", exclude_none=True)
        path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
        if load_policy(path).version != policy.version:
            raise RuntimeError(f"{path}: the written policy does not load back with version {policy.version}")
    return folder


# --------------------------------------------------------------------------- evaluation


def _set_metrics(result: Any) -> dict[str, Any]:
    from rsafe.training.rewards import strict_format_ok

    preds = result.predictions
    n = len(preds)
    m = result.metrics
    return {
        "n": n,
        "accuracy": (m.tp + m.tn) / n if n else None,
        "format_rate": sum(strict_format_ok(p.raw_output or "") for p in preds) / n if n else None,
        "unknown_rate": m.unknown_rate,
        "f1": m.f1,
        "unsafe_rate": sum(p.label == "unsafe" for p in preds) / n if n else None,
    }


def evaluate_model(model_dir: str | Path, *, adapter_dir: str | Path | None = None,
                   s: DriftScenario = DriftScenario(), sets: Sequence[str] = SETS,
                   tokenizer: str | Path | None = None, max_tokens: int = 96) -> dict[str, Any]:
    """Greedy verdicts of a model (or base + LoRA adapter) on the scenario's held-out sets.

    The project's ``Guard`` on the transformers engine, structured decoding off (the model must
    produce the format itself); ``accuracy`` is correct / all (an unreadable answer is wrong).
    """
    from rsafe.evaluation import evaluate
    from rsafe.models import GenerationConfig, Guard
    from rsafe.models.config import local_engine_config

    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        raise ValueError(f"unknown evaluation sets {unknown}; known: {', '.join(SETS)}")
    adapters = {"grpo": str(adapter_dir)} if adapter_dir is not None else {}
    cfg = local_engine_config(str(model_dir), "transformers", model_id=str(model_dir), lora_adapters=adapters,
                              tokenizer=str(tokenizer) if tokenizer else None,
                              generation=GenerationConfig(max_tokens=max_tokens, structured=False))
    chosen = eval_sets(s)
    out: dict[str, Any] = {}
    with Guard.from_config(cfg) as guard:
        for name in sets:
            policy, examples = chosen[name]
            result = evaluate(guard, examples, policy, adapter="grpo" if adapters else None, benchmark=name)
            out[name] = _set_metrics(result)
    return out


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for d in run_dir.glob("checkpoint-*"):
        step = d.name.removeprefix("checkpoint-")
        if step.isdigit() and d.is_dir():
            found.append((int(step), d))
    return sorted(found)


def evaluate_run(run_dir: str | Path, base_model: str | Path, *, s: DriftScenario = DriftScenario(),
                 sets: Sequence[str] = SETS,
                 checkpoint_sets: Sequence[str] = ("drift_heldout", "contrast_heldout", "platform_other"),
                 every: int = 1, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The final model of a GRPO run on ``sets``, and on ``checkpoint_sets`` every checkpoint whose
    step is a multiple of ``every``."""
    run = Path(run_dir)

    def one(path: Path, which: Sequence[str]) -> dict[str, Any]:
        if (path / "adapter_config.json").exists():
            return evaluate_model(base_model, adapter_dir=path, s=s, sets=which)
        return evaluate_model(path, s=s, sets=which, tokenizer=base_model)

    steps = []
    for step, path in _checkpoints(run):
        if step % every:
            continue
        metrics = one(path, checkpoint_sets)
        log(f"[drift] step {step}: " + ", ".join(f"{k} {v['accuracy']:.1%}" for k, v in metrics.items()))
        steps.append({"step": step, **metrics})
    final = one(run, sets)
    return {"final": final, "checkpoints": steps}


#: The issue's acceptance checks: (name, description).
TARGETS = {
    "drift_gain": "held-out drift accuracy +15 points or more",
    "contrast_kept": "the family under rsafe-default still unsafe (accuracy within 2 points)",
    "general_kept": "general held-out accuracy within 2 points",
    "format": "format rate (structured decoding off) >= 99 % on every set",
    "platform_other_kept": "(ours) other harmful families under medical-platform still unsafe (within 2 points)",
}


def targets(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of ``TARGETS`` with its measured value and whether it holds."""
    def acc(d: dict[str, Any], name: str) -> float:
        return d[name]["accuracy"]

    def diff(name: str) -> float:  # rounded: in floats 0.98 - 1.0 is -0.020000000000000018, not "within 2 points"
        return round(acc(after, name) - acc(before, name), 6)

    gain, contrast, general = diff("drift_heldout"), diff("contrast_heldout"), diff("general")
    fmt = min(v["format_rate"] for v in after.values())
    out = {
        "drift_gain": {"value": gain, "ok": gain >= 0.15},
        "contrast_kept": {"value": contrast, "ok": contrast >= -0.02},
        "general_kept": {"value": general, "ok": general >= -0.02},
        "format": {"value": fmt, "ok": fmt >= 0.99},
    }
    if "platform_other" in after and "platform_other" in before:
        other = diff("platform_other")
        out["platform_other_kept"] = {"value": other, "ok": other >= -0.02}
    return out


def plot_run(metrics: Sequence[dict[str, Any]], checkpoints: Sequence[dict[str, Any]], path: str | Path, *,
             title: str = "GRPO on the drift scenario", before: dict[str, Any] | None = None) -> Path:
    """Reward (and its training accuracy) per step, held-out accuracy per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    steps = [m["step"] for m in metrics]
    top.plot(steps, [m.get("reward") for m in metrics], label="reward (0.9·acc + 0.1·format)", lw=1)
    top.plot(steps, [m.get("accuracy") for m in metrics], label="rollout accuracy", lw=1, alpha=0.7)
    top.set_ylabel("training rollouts")
    top.set_ylim(0, 1.05)
    top.legend(loc="lower right", fontsize=8)
    for name, style in (("drift_heldout", "o-"), ("contrast_heldout", "s-"), ("general", "^-"),
                        ("platform_other", "d-")):
        points = [(c["step"], c[name]["accuracy"]) for c in checkpoints if name in c]
        if before is not None and name in before:
            points = [(0, before[name]["accuracy"]), *points]
        if points:
            bottom.plot(*zip(*points), style, label=name, ms=4)
    bottom.set_ylabel("held-out accuracy (greedy)")
    bottom.set_xlabel("GRPO step")
    bottom.set_ylim(-0.02, 1.05)
    bottom.legend(loc="center right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
