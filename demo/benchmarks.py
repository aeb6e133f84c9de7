"""The synthetic demo evaluation sets: ``register_demo_benchmarks()`` adds them to ``rsafe.evaluation``.

``rsafe eval --benchmark demo`` (and ``demo_kids``, ``demo_financial``, ``demo_multiturn``) judges
held-out messages of the demo corpus: the easy templated messages the demo model knows, so its
numbers mean something on a machine without the public benchmarks. They live here, next to the
corpus, because ``rsafe.evaluation`` must not import ``rsafe.demo``. Nothing registers them on
import: the ``rsafe`` command does (``rsafe.demo.cli``), and so does any other caller that wants them
by name.
"""

from __future__ import annotations

from functools import lru_cache

from rsafe.demo.corpus import MULTITURN_KINDS, multiturn_examples, synthetic_examples
from rsafe.evaluation.benchmarks import BENCHMARKS, BenchmarkError, BenchmarkSpec, Example, register
from rsafe.policies import Level

DEMO_SEED = 7_000
"""Seed of the demo sets (the demo model trains on seed 0 and selects checkpoints on 10 000)."""
DEMO_SIZE = 400


@lru_cache(maxsize=1)
def _demo_training_messages() -> frozenset[tuple[str, str, str | None]]:
    from rsafe.demo.build import training_messages

    return training_messages(seed=0)


def demo_examples(policy: str = "rsafe-default", n: int = DEMO_SIZE, seed: int = DEMO_SEED) -> list[Example]:
    """``n`` synthetic examples labelled under ``policy``, none seen by the default demo build.

    Mixed levels (about 40 % response level). Deterministic in ``seed``.
    """
    seen = _demo_training_messages()
    out: list[Example] = []
    chunk = 0
    while len(out) < n:
        rows = synthetic_examples(max(8 * n, 1000), seed=seed + chunk)
        for i, e in enumerate(rows):
            if e.policy != policy or (e.policy, e.prompt, e.response) in seen:
                continue
            out.append(Example(
                id=f"demo-{seed + chunk}-{i}", prompt=e.prompt, response=e.response, label=e.label,
                level="response" if e.response is not None else "prompt",
                categories=[e.category] if e.category else [], source=f"demo:{policy}",
                meta={"policy": e.policy},
            ))
            if len(out) == n:
                break
        chunk += 1
        if chunk > 20:
            raise BenchmarkError(f"could not build {n} demo examples for policy {policy!r}")
    return out


def demo_multiturn_examples(n: int = DEMO_SIZE, seed: int = DEMO_SEED) -> list[Example]:
    """``n`` held-out conversations of the demo corpus (``corpus.multiturn_examples(split="heldout")``:
    held-out follow-ups and templates, never trained on), each judged on its last user turn with the
    earlier turns as context. ``meta.kind`` says which kind (``MULTITURN_KINDS``): ``continued`` are the
    multi-turn attacks (unsafe only with the earlier turn), ``switched`` the benign follow-ups after an
    unsafe turn."""
    seen = _demo_training_messages()
    rows = [e for e in multiturn_examples(4 * n, seed=seed, split="heldout")
            if e.template not in ("harmful_after_benign", "benign") or (e.policy, e.prompt, None) not in seen]
    out = [Example(id=f"demo-mt-{seed}-{i}", prompt=e.prompt, context=list(e.context), label=e.label, level="prompt",
                   categories=[e.category] if e.category else [], source=f"demo-multiturn:{e.policy}",
                   meta={"policy": e.policy, "kind": e.template})
           for i, e in enumerate(rows) if e.policy == "rsafe-default"][:n]
    if len(out) < n:
        raise BenchmarkError(f"could not build {n} held-out demo conversations")
    return out


def _register(spec: BenchmarkSpec) -> None:
    if spec.name not in BENCHMARKS:  # registering twice is harmless
        register(spec)


def register_demo_benchmarks() -> None:
    """Register ``demo``, ``demo_kids``, ``demo_financial`` and ``demo_multiturn`` (again: nothing happens)."""
    _register(BenchmarkSpec(
        name="demo", title="Demo (synthetic, rsafe-default)", level=Level.BOTH,
        build=lambda: demo_examples("rsafe-default"), source="rsafe.demo.corpus",
        notes="Synthetic held-out messages the demo model can judge; mixed prompt/response level.",
    ))
    _register(BenchmarkSpec(
        name="demo_kids", title="Demo (synthetic, kids-platform labels)", level=Level.BOTH,
        build=lambda: demo_examples("kids-platform"), tailored_policy="kids-platform", source="rsafe.demo.corpus",
        notes="Labelled under the kids-platform policy: the adaptive-taxonomy demo.",
    ))
    _register(BenchmarkSpec(
        name="demo_financial", title="Demo (synthetic, financial-advice labels)", level=Level.BOTH,
        build=lambda: demo_examples("financial-advice"), tailored_policy="financial-advice",
        source="rsafe.demo.corpus",
        notes="Labelled under the financial-advice policy: the adaptive-taxonomy demo.",
    ))
    _register(BenchmarkSpec(
        name="demo_multiturn", title="Demo conversations (synthetic, rsafe-default)", level=Level.PROMPT,
        build=lambda: demo_multiturn_examples(), source="rsafe.demo.corpus",
        notes="Held-out conversations judged on their last user turn: follow-ups that continue a harmful request "
              "(unsafe only with the context), subject changes after one (safe), harmless chats; kinds: "
              + ", ".join(k for k, _ in MULTITURN_KINDS) + ".",
    ))
