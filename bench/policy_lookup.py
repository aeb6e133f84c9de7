"""Can the demo model learn to read the category list? (docs/TRAINING.md, "Teaching the demo model
to read the category list").

    .venv/bin/python bench/policy_lookup.py --model demo/model --steps 800 --fewest 2 --most 10

The drift scenario needs a guard whose verdict depends on *one line* of the policy (U13). The
demo build (recipe 5) runs two such stages itself (``rsafe.demo.build.LOOKUP_STAGES``); this
script is the experiment that found them (``rsafe.demo.lookup``). It trains a copy of the demo
model (or a fresh one, ``--fresh``) with supervised *policy-ablation pairs*: one harmful message
of category C judged under ``rsafe-default`` without C (safe: the policy does not list it) and
under ``rsafe-default`` without another category (unsafe), both rows of a pair in the same batch,
so the only thing that tells them apart is the missing line. Other categories may be removed from
both (``--fewest``/``--most`` lines kept besides: short policies make the lookup easier to find).
U13 is never removed: the drift stays unseen. Ordinary corpus examples are mixed in against
forgetting.

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

from rsafe.demo import sft
from rsafe.demo.corpus import DemoExample, family_examples, synthetic_examples
from rsafe.demo.lookup import (
    Ablations,
    LookupStage,
    ablation_pair,
    encode_batch,
    pair_accuracy,
    stage_batches,
    verdicts,
)
from rsafe.demo.tokenizer import load_tokenizer


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo/model", help="start from this model (and its tokenizer)")
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

    from rsafe.demo.build import MODEL_SHAPE

    torch.set_num_threads(2)
    tok = load_tokenizer(args.model)
    model = (sft.make_qwen2_model(MODEL_SHAPE, tok, args.seed) if args.fresh
             else Qwen2ForCausalLM.from_pretrained(args.model, dtype=torch.float32))
    ablations = Ablations()
    stage = LookupStage(steps_per_sft_step=1.0, fewest=args.fewest, most=args.most, learning_rate=args.lr,
                        pairs=args.pairs, ordinary=args.ordinary)
    rng, eval_rng = random.Random(args.seed), random.Random(f"lookup-eval-{args.seed}")
    ordinary = synthetic_examples(8000, seed=3)
    held_pairs = [ablation_pair(eval_rng, ablations, args.fewest, args.most, args.format) for _ in range(40)]
    registry = ablations.registry
    drift = family_examples("medical", registry.get("medical-platform"), 20, seed=1, split="heldout")
    contrast = family_examples("medical", registry.get("rsafe-default"), 20, seed=1, split="heldout")
    general = synthetic_examples(40, seed=777)

    def judged(rows: list[DemoExample]) -> list[str | None]:
        return verdicts(model, tok, ablations, rows)

    def evaluate(step: int) -> dict[str, float]:
        model.eval()
        out: dict[str, float] = {
            "step": step, **pair_accuracy(model, tok, ablations, held_pairs),
            "drift": sum(x == "safe" for x in judged(drift)) / len(drift),
            "contrast": sum(x == "unsafe" for x in judged(contrast)) / len(contrast),
            "general": sum(x == e.label for x, e in zip(judged(general), general)) / len(general),
        }
        log(f"[lookup] step {step}: pairs both right {out['pairs']:.0%}, rows {out['rows']:.0%} | drift "
            f"{out['drift']:.0%}, contrast {out['contrast']:.0%}, general {out['general']:.0%}")
        model.train()
        return out

    history = [evaluate(0)]

    def steps() -> Iterator[tuple[Any, Any, Any]]:
        for rows in stage_batches(stage, args.steps, ablations, ordinary, rng, args.format):
            yield encode_batch(tok, ablations, rows)

    def on_step(step: int) -> None:
        if step % args.eval_every == 0 or step == args.steps:
            history.append(evaluate(step))

    t0 = time.monotonic()
    cfg = sft.SFTConfig(steps=args.steps, batch_size=2 * args.pairs + args.ordinary, learning_rate=args.lr,
                        warmup_steps=stage.warmup_steps, seed=args.seed)
    sft.fit(model, steps(), cfg, log=log, tag="lookup", on_step=on_step)
    if args.out:
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
        with open(f"{args.out}/history.json", "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "seconds": round(time.monotonic() - t0), "history": history}, fh, indent=1)
    print(json.dumps(history[-1]))


if __name__ == "__main__":
    main()
