"""The promotion gate's measurement: two versions, one after the other or both at once.

    .venv/bin/python bench/gate.py --model demo/model [--general 200] [--slice 60] [--rounds 1]
                                   [--ops reference grouped] [--variants "sequential, 64" "both at once, 64"]

The gate (``rsafe train promote``) measures the candidate and the current version on the promotion
set, on one vLLM engine with both LoRA adapters loaded. This times that measurement on the engine
the loop's gate uses (``--max-tokens 96``, windows of 128 tokens, structured decoding off), on the
demo model with its demo adapter loaded under two names, for:

* ``sequential, 64``: one version, then the other, 64 requests per engine call (the gate until 2026-12-01);
* ``sequential, all``: the same, the whole set in one call (vLLM schedules it);
* ``both at once, 64``: the two versions measured concurrently (``training.promote.measure_versions``);
* ``both at once, all``: the same, each version's whole set in one call;

each on an engine with vLLM's own CPU LoRA ops (``reference``) and on one with rsafe's plugin
(``grouped``, ``models/vllm_cpu_lora.py``), which must give the same figures. Within an engine
every variant gets promotion sets of its own seeds, so that no variant finds another's prompts in
vLLM's prefix cache; each engine gets the same sets. Prints seconds and messages/s per variant and
the ratios to the first, and whether both engines' gate figures agree.
Figures: docs/BENCHMARKS.md ("The promotion gate").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def promotion_set(seed: int, n_general: int, n_slice: int) -> Any:
    from rsafe.evaluation.benchmarks import Example
    from rsafe.policies import PolicyRegistry
    from rsafe.demo.benchmarks import demo_examples
    from rsafe.demo.corpus import family_examples
    from rsafe.training.promote import PromotionSet

    policy = PolicyRegistry.from_dirs().get("medical-platform")
    sl = [Example(id=f"slice-{seed}-{i}", prompt=e.prompt, response=e.response, label=e.label,  # type: ignore[arg-type]
                  level=e.level, categories=[e.category] if e.category else [], source="drift")  # type: ignore[arg-type]
          for i, e in enumerate(family_examples("medical", policy, n_slice, seed=seed, split="heldout"))]
    return PromotionSet(demo_examples("rsafe-default", n=n_general, seed=seed), "rsafe-default", sl,
                        "medical-platform")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo/model")
    ap.add_argument("--general", type=int, default=200)
    ap.add_argument("--slice", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--ops", nargs="+", choices=["reference", "grouped"], default=["reference", "grouped"],
                    help="vLLM's CPU LoRA ops: its reference ops, rsafe's grouped ones (models/vllm_cpu_lora.py)")
    ap.add_argument("--variants", nargs="+", default=["sequential, 64", "both at once, 64"],
                    choices=["sequential, 64", "sequential, all", "both at once, 64", "both at once, all"])
    args = ap.parse_args()

    from dataclasses import replace

    from rsafe.models import Guard
    from rsafe.models.config import GenerationConfig, InputLimits, local_engine_config
    from rsafe.demo.build import build_demo_lora
    from rsafe.training.promote import GateSettings, measure, measure_versions

    adapter = str(build_demo_lora(args.model, ".cache/demo-lora"))
    cfg = local_engine_config(args.model, "vllm", model_id="rsafe-demo", enable_lora=True, max_lora_rank=16,
                              lora_adapters={"candidate": adapter, "current": adapter},
                              limits=InputLimits(max_window_tokens=128),
                              generation=GenerationConfig(max_tokens=96, structured=False))

    def sequential(guard: Any, batch: int) -> Any:
        def run(pset: Any) -> list[dict[str, Any]]:
            settings = replace(GateSettings(), batch_size=batch)
            return [measure(guard, pset, name, settings) for name in ("candidate", "current")]
        return run

    def at_once(guard: Any, batch: int) -> Any:
        def run(pset: Any) -> list[dict[str, Any]]:
            return measure_versions(guard, pset, ["candidate", "current"], replace(GateSettings(), batch_size=batch))
        return run

    seconds: dict[str, list[float]] = {}
    figures: dict[str, dict[str, list[Any]]] = {}
    for ops in args.ops:  # one engine each: the plugin reads the variable when vLLM's processes start
        os.environ["RSAFE_VLLM_CPU_LORA"] = ops
        t0 = time.perf_counter()
        guard = Guard.from_config(cfg)
        log(f"[bench] LoRA ops {ops}: engine started in {time.perf_counter() - t0:.0f} s")
        variants = {"sequential, 64": sequential(guard, 64), "sequential, all": sequential(guard, 10**6),
                    "both at once, 64": at_once(guard, 64), "both at once, all": at_once(guard, 10**6)}
        variants = {k: v for k, v in variants.items() if k in args.variants}
        seed = 20000  # the same sets for each engine: their figures must agree
        try:
            for r in range(args.rounds):
                for name, run in variants.items():
                    seed += 1
                    pset = promotion_set(seed, args.general, args.slice)
                    t = time.perf_counter()
                    out = run(pset)
                    key = f"{ops} ops, {name}"
                    seconds.setdefault(key, []).append(time.perf_counter() - t)
                    figures.setdefault(ops, {}).setdefault(f"{r}/{name}", []).extend(
                        (m["general_f1"], m["slice_accuracy"], m["wrong"]) for m in out)
                    log(f"[bench] round {r + 1}: {key}: {seconds[key][-1]:.1f} s")
        finally:
            guard.close()
    n = 2 * (args.general + args.slice)
    first_key = next(iter(seconds))
    first = sum(seconds[first_key])
    print(f"Promotion gate: 2 versions × ({args.general} general + {args.slice} slice) = {n} requests, "
          f"{args.rounds} round(s), demo model on vLLM with LoRA")
    print(f"| variant | seconds | messages/s | vs {first_key} |")
    print("|---|---|---|---|")
    for name, s in seconds.items():
        mean = sum(s) / len(s)
        print(f"| {name} | {mean:.1f} | {n / mean:.1f} | {first / sum(s):.2f}x |")
    if len(figures) == 2:
        a, b = figures.values()
        same = all(a[k] == b[k] for k in a)
        print(f"same gate figures (F1, slice accuracy, examples wrong) with both LoRA ops: {'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
