"""Can the demo model learn to read the category list? (docs/TRAINING.md, "Teaching the demo model
to read the category list").

    .venv/bin/python bench/policy_lookup.py --model .cache/demo-model --steps 800 --fewest 2 --most 10

The drift scenario needs a guard whose verdict depends on *one line* of the policy (U13). This
trains a copy of the demo model (or a fresh one, ``--fresh``) with supervised *policy-ablation
pairs*: one harmful message of category C judged under ``rsafe-default`` without C (safe: the
policy does not list it) and under ``rsafe-default`` without another category (unsafe), both rows of
a pair in the same batch, so the only thing that tells them apart is the missing line. Other
categories may be removed from both (``--fewest``/``--most`` lines kept besides: short policies
make the lookup easier to find). U13 is never removed: the drift stays unseen. Ordinary corpus
examples are mixed in against forgetting.

``--format name`` (default) states the topic before the decision — ``Topic: Self‑Harm & Suicide
(U9) is in this policy`` / ``… is not in this policy`` — so the deciding token follows the name's
own tokens (a same-token lookup); ``--format corpus`` keeps the corpus's wording, where the
decision comes first (``The user asks for help with…`` / ``The user asks about…``).

Every ``--eval-every`` steps it prints, greedy: held-out pairs with both rows right (chance: 0 %,
a model that ignores the policy answers both rows alike), the rows, and the drift scenario's
held-out medical messages under ``medical-platform`` (drift) and ``rsafe-default`` (contrast), and
40 general held-out messages. Not part of ``make bench`` (minutes per hundred steps on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

from rsafe.models.prompt import build_user_turn
from rsafe.policies import Policy, PolicyRegistry
from rsafe.training import sft
from rsafe.training.corpus import DemoExample, _harmful, corpus, family_examples, parse_answer, synthetic_examples
from rsafe.training.tokenizer import load_tokenizer

REGISTRY = PolicyRegistry.from_dirs()
DEFAULT = REGISTRY.get("rsafe-default")
CODES = [c.code for c in DEFAULT.categories]
KEPT = "U13"
"""Never removed: the drift scenario's category."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Ablations:
    """``rsafe-default`` without some categories, by name (``abl-u3-u9``), made on demand."""

    def __init__(self) -> None:
        self.made: dict[str, Policy] = {}

    def without(self, removed: set[str]) -> Policy:
        name = "abl-" + "-".join(sorted((c.lower() for c in removed), key=lambda c: int(c[1:])))
        if name not in self.made:
            self.made[name] = DEFAULT.model_copy(
                update={"name": name, "categories": [c for c in DEFAULT.categories if c.code not in removed]})
        return self.made[name]

    def get(self, name: str) -> Policy:
        return self.made.get(name) or REGISTRY.get(name)


def pair(rng: random.Random, ablations: Ablations, fmt: str, fewest: int, most: int) -> tuple[DemoExample, DemoExample]:
    """(safe row, unsafe row): one message, its category removed / another one removed."""
    removable = [c for c in CODES if c != KEPT]
    cat = rng.choice(removable)
    other = rng.choice([c for c in removable if c != cat])
    lines = rng.randint(fewest, most)  # lines kept besides the pair's two categories and U13
    rest = rng.sample([c for c in removable if c not in (cat, other)], max(0, len(CODES) - 3 - lines))
    bank = rng.choice(corpus().category_banks["rsafe-default"][cat])
    seed = rng.random()
    safe = _harmful(bank, ablations.without({cat, *rest}), None, "safe", False, random.Random(seed))
    unsafe = _harmful(bank, ablations.without({other, *rest}), cat, "unsafe", False, random.Random(seed))
    if fmt == "name":
        name, gist = DEFAULT.category(cat).name, corpus().harmful[bank].gist
        safe = DemoExample(safe.prompt, None, "safe", None, safe.policy,
                           reasoning=f"The user asks about {gist}. Topic: {name} is not in this policy. "
                                     "The content is safe.")
        unsafe = DemoExample(unsafe.prompt, None, "unsafe", cat, unsafe.policy,
                             reasoning=f"The user asks about {gist}. Topic: {name} ({cat}) is in this policy. "
                                       "The content is unsafe.")
    return safe, unsafe


class Lookup:
    def __init__(self, model: Any, tokenizer: Any, ablations: Ablations) -> None:
        self.model, self.tok, self.ablations = model, tokenizer, ablations

    def turn(self, e: DemoExample) -> str:
        return build_user_turn(self.ablations.get(e.policy), e.prompt, e.response)

    def batch(self, rows: list[DemoExample]) -> tuple[Any, Any, Any]:
        """(shared prefix, right-padded suffixes, labels) for ``sft.loss_on_answers``."""
        import torch

        enc = [sft.encode_turn(self.tok, self.turn(e), e.answer()) for e in rows]
        first = enc[0][0]
        n = min(min(len(x) for x, _ in enc), min(y.index(next(v for v in y if v != -100)) for _, y in enc) - 1)
        n = next((i for i in range(n) if any(x[i] != first[i] for x, _ in enc)), n)
        width = max(len(x) - n for x, _ in enc)
        ids = torch.full((len(enc), width), self.tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(enc), width), -100, dtype=torch.long)
        for i, (x, y) in enumerate(enc):
            ids[i, : len(x) - n] = torch.tensor(x[n:])
            labels[i, : len(y) - n] = torch.tensor(y[n:])
        return torch.tensor([first[:n]]), ids, labels

    def verdicts(self, rows: list[DemoExample]) -> list[str | None]:
        texts = sft.generate_turns(self.model, self.tok, [self.turn(e) for e in rows], max_new_tokens=48)
        return [parse_answer(t)[1] for t in texts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=".cache/demo-model", help="start from this model (and its tokenizer)")
    ap.add_argument("--fresh", action="store_true", help="a freshly initialised model of the demo shape instead")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pairs", type=int, default=7, help="pairs per batch (two rows each)")
    ap.add_argument("--ordinary", type=int, default=2, help="ordinary corpus examples per batch")
    ap.add_argument("--fewest", type=int, default=2, help="fewest other category lines kept")
    ap.add_argument("--most", type=int, default=10, help="most other category lines kept (15: none removed)")
    ap.add_argument("--format", choices=("name", "corpus"), default="name")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="save the trained model and the evaluations (history.json) here")
    args = ap.parse_args()

    import torch
    from transformers import Qwen2ForCausalLM

    from rsafe.training.demo import MODEL_SHAPE

    torch.set_num_threads(2)
    tok = load_tokenizer(args.model)
    model = (sft.make_qwen2_model(MODEL_SHAPE, tok, args.seed) if args.fresh
             else Qwen2ForCausalLM.from_pretrained(args.model, dtype=torch.float32))
    ablations = Ablations()
    lookup = Lookup(model, tok, ablations)
    rng, eval_rng = random.Random(args.seed), random.Random(f"lookup-eval-{args.seed}")
    ordinary = synthetic_examples(8000, seed=3)
    held_pairs = [pair(eval_rng, ablations, args.format, args.fewest, args.most) for _ in range(40)]
    drift = family_examples("medical", REGISTRY.get("medical-platform"), 20, seed=1, split="heldout")
    contrast = family_examples("medical", DEFAULT, 20, seed=1, split="heldout")
    general = synthetic_examples(40, seed=777)

    def evaluate(step: int) -> dict[str, float]:
        model.eval()
        rows = [e for p in held_pairs for e in p]
        v = lookup.verdicts(rows)
        out = {
            "step": step,
            "pairs": sum(v[2 * i] == "safe" and v[2 * i + 1] == "unsafe" for i in range(len(held_pairs))) / len(held_pairs),
            "rows": sum(x == e.label for x, e in zip(v, rows)) / len(rows),
            "drift": sum(x == "safe" for x in lookup.verdicts(drift)) / len(drift),
            "contrast": sum(x == "unsafe" for x in lookup.verdicts(contrast)) / len(contrast),
            "general": sum(x == e.label for x, e in zip(lookup.verdicts(general), general)) / len(general),
        }
        log(f"[lookup] step {step}: pairs both right {out['pairs']:.0%}, rows {out['rows']:.0%} | drift "
            f"{out['drift']:.0%}, contrast {out['contrast']:.0%}, general {out['general']:.0%}")
        model.train()
        return out

    history = [evaluate(0)]

    def steps() -> Iterator[tuple[Any, Any, Any]]:
        while True:
            rows = [e for _ in range(args.pairs) for e in pair(rng, ablations, args.format, args.fewest, args.most)]
            yield lookup.batch(rows + rng.sample(ordinary, args.ordinary))

    def on_step(step: int) -> None:
        if step % args.eval_every == 0 or step == args.steps:
            history.append(evaluate(step))

    t0 = time.monotonic()
    cfg = sft.SFTConfig(steps=args.steps, batch_size=2 * args.pairs + args.ordinary, learning_rate=args.lr,
                        warmup_steps=20, seed=args.seed)
    sft.fit(model, steps(), cfg, log=log, tag="lookup", on_step=on_step)
    if args.out:
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
        with open(f"{args.out}/history.json", "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "seconds": round(time.monotonic() - t0), "history": history}, fh, indent=1)
    print(json.dumps(history[-1]))


if __name__ == "__main__":
    main()
