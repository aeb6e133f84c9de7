"""Policy-ablation pairs: teaching a guard to read its category list (docs/TRAINING.md, section 4).

A guard whose verdict must follow the policy it is given has to *look up* the message's topic in
the category list. The demo corpus alone never forces that: it varies whole policies, so a small
model can learn "weapons → unsafe" and ignore the list. A *pair* fixes that: one harmful message
of category C judged under ``rsafe-default`` without C (safe: the policy does not list it) and
under ``rsafe-default`` without another category (unsafe), both rows in the same batch, so the only
thing that tells them apart is the missing line. Other categories may be removed from both rows
(``fewest``/``most`` other lines kept): short policies make the lookup easier to find first.

``KEPT`` (U13) is never removed: the drift scenario (``rsafe.demo.drift``) is a policy change
the model has never seen, which the retraining loop then teaches it.

The reasoning names the topic just before the decision (``fmt="name"``)::

    The user asks about suicide or self-harm. Topic: Self‑Harm & Suicide (U9) is in this policy.
    The content is unsafe.

so the deciding token follows the name's own tokens; ``fmt="corpus"`` keeps the corpus's wording.
Measured (bench/policy_lookup.py): every run sits at 0 % of pairs for 100–300 steps before it finds
the lookup; a first stage on short policies, then one on every length, reaches 80 % of held-out
pairs with both rows right.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rsafe.demo import sft
from rsafe.demo.corpus import DemoExample, corpus, harmful_example, parse_answer
from rsafe.models.prompt import build_user_turn
from rsafe.policies import Policy, PolicyRegistry

KEPT = "U13"
"""Never removed from a pair's policies: the drift scenario's category stays unseen."""
ABLATION_PREFIX = "abl-"

Format = Literal["name", "corpus"]


@dataclass(frozen=True)
class LookupStage:
    """One SFT stage of ablation pairs (``steps_per_sft_step`` × the build's SFT steps)."""

    steps_per_sft_step: float
    fewest: int
    """Fewest category lines kept besides the pair's two categories and U13."""
    most: int
    """Most such lines kept (15: nothing else removed, the full 18-line policy less one)."""
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    pairs: int = 7
    """Pairs per batch (two rows each)."""
    ordinary: int = 2
    """Ordinary training examples per batch, against forgetting."""


class Ablations:
    """``base`` without some categories, by name (``abl-u3-u9``), made on demand; other names come
    from ``registry``."""

    def __init__(self, registry: PolicyRegistry | None = None, base: str = "rsafe-default") -> None:
        self.registry = registry or PolicyRegistry.from_dirs()
        self.base = self.registry.get(base)
        self.codes = [c.code for c in self.base.categories]
        self.made: dict[str, Policy] = {}

    def without(self, removed: set[str]) -> Policy:
        name = ABLATION_PREFIX + "-".join(sorted((c.lower() for c in removed), key=lambda c: int(c[1:])))
        if name not in self.made:
            self.made[name] = self.base.model_copy(
                update={"name": name, "categories": [c for c in self.base.categories if c.code not in removed]})
        return self.made[name]

    def get(self, name: str) -> Policy:
        return self.made.get(name) or self.registry.get(name)

    def turn(self, e: DemoExample) -> str:
        """The rendered user turn of ``e`` under its (possibly ablated) policy."""
        return build_user_turn(self.get(e.policy), e.prompt, e.response, context=e.context, judge="last")


def ablation_pair(rng: random.Random, ablations: Ablations, fewest: int, most: int,
                  fmt: Format = "name") -> tuple[DemoExample, DemoExample]:
    """(safe row, unsafe row): one message, its category removed / another one removed."""
    codes = ablations.codes
    removable = [c for c in codes if c != KEPT]
    cat = rng.choice(removable)
    other = rng.choice([c for c in removable if c != cat])
    lines = rng.randint(fewest, most)
    rest = rng.sample([c for c in removable if c not in (cat, other)], max(0, len(codes) - 3 - lines))
    bank = rng.choice(corpus().category_banks[ablations.base.name][cat])
    seed = rng.random()
    safe = harmful_example(bank, ablations.without({cat, *rest}), None, "safe", False, random.Random(seed))
    unsafe = harmful_example(bank, ablations.without({other, *rest}), cat, "unsafe", False, random.Random(seed))
    if fmt == "name":
        name, gist = ablations.base.category(cat).name, corpus().harmful[bank].gist
        safe = DemoExample(safe.prompt, None, "safe", None, safe.policy,
                           reasoning=f"The user asks about {gist}. Topic: {name} is not in this policy. "
                                     "The content is safe.")
        unsafe = DemoExample(unsafe.prompt, None, "unsafe", cat, unsafe.policy,
                             reasoning=f"The user asks about {gist}. Topic: {name} ({cat}) is in this policy. "
                                       "The content is unsafe.")
    return safe, unsafe


def stage_batches(stage: LookupStage, steps: int, ablations: Ablations, ordinary: Sequence[DemoExample],
                  rng: random.Random, fmt: Format = "name") -> Iterator[list[DemoExample]]:
    """The rows of each of ``steps`` batches: ``stage.pairs`` pairs, then ``stage.ordinary`` rows."""
    for _ in range(steps):
        rows = [e for _ in range(stage.pairs) for e in ablation_pair(rng, ablations, stage.fewest, stage.most, fmt)]
        yield rows + rng.sample(ordinary, min(stage.ordinary, len(ordinary)))


def encode_batch(tokenizer: Any, ablations: Ablations, rows: Sequence[DemoExample]) -> tuple[Any, Any, Any]:
    """(shared prefix, right-padded suffixes, labels) for ``sft.loss_on_answers``."""
    return sft.collate([sft.encode_turn(tokenizer, ablations.turn(e), e.answer()) for e in rows],
                       tokenizer.pad_token_id)


def verdicts(model: Any, tokenizer: Any, ablations: Ablations, rows: Sequence[DemoExample]) -> list[str | None]:
    """Greedy verdicts (``safe``/``unsafe``/None) for ``rows`` under their (possibly ablated) policies."""
    texts = sft.generate_turns(model, tokenizer, [ablations.turn(e) for e in rows], max_new_tokens=48)
    return [parse_answer(t)[1] for t in texts]


def pair_accuracy(model: Any, tokenizer: Any, ablations: Ablations,
                  pairs: Sequence[tuple[DemoExample, DemoExample]]) -> dict[str, float]:
    """Greedy verdicts on held-out pairs: ``pairs`` (both rows right; a model that ignores the
    policy scores 0) and ``rows`` (single rows right; such a model scores 50 %)."""
    rows = [e for p in pairs for e in p]
    got = verdicts(model, tokenizer, ablations, rows)
    both = sum(got[2 * i] == "safe" and got[2 * i + 1] == "unsafe" for i in range(len(pairs)))
    return {"pairs": both / max(1, len(pairs)),
            "rows": sum(v == e.label for v, e in zip(got, rows)) / max(1, len(rows))}
