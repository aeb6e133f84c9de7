"""GRPO steps with and without the shared prompt prefix (``share_prompt_prefix``), same run otherwise.

    .venv/bin/python bench/grpo_prefix.py --model demo/model [--steps 6] [--rounds 2]

Builds the drift scenario's training set (as ``bench/grpo_sweep.py``), then runs ``--steps`` GRPO
steps of the ``demo-cpu`` preset (the loop's settings: 4 prompts × 8 rollouts, LoRA) with
``share_prompt_prefix`` off and on, alternating (off, on, off, on …: a slow minute of a shared
machine hits both). Per step it times the whole step and the rollout generation in it (the rest:
scoring the rollouts, backward, optimizer, rewards); the first step of each run is left out (warm-up).
It prints seconds per step both ways and the ratios, and the first step's loss both ways (same seed,
same rollouts: equal up to float rounding). Figures: docs/BENCHMARKS.md ("GRPO: the shared prompt prefix").
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dataset(work: Path) -> Path:
    from rsafe.demo import drift
    from rsafe.training import dataset as ds

    s = drift.DriftScenario()
    built = ds.build(drift.disagreement_records(s), replay=drift.replay_examples(s),
                     settings=ds.BuildSettings(pair_by_message=True))
    return ds.save(built, work / "set", sources=[], settings=ds.BuildSettings(pair_by_message=True))


def run(model: str, data: Path, out: Path, steps: int, share: bool) -> dict[str, Any]:
    """One GRPO run; per step: seconds in all (TRL's ``step_time``) and in rollout generation, and the loss."""
    from trl import GRPOTrainer

    from rsafe.training import grpo

    generate: list[float] = []
    original = GRPOTrainer._generate_single_turn  # the trainer's override calls it, sharing or not

    def timed_generate(self: Any, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            generate.append(time.perf_counter() - t)

    GRPOTrainer._generate_single_turn = timed_generate  # type: ignore[method-assign]
    try:
        cfg = grpo.load_config(out, preset="demo-cpu", overrides={
            "max_steps": steps, "save_steps": 10**6, "share_prompt_prefix": share, "disable_tqdm": True})
        with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its logs: keep stdout for the table
            grpo.train(model, data, cfg, log=log)
    finally:
        GRPOTrainer._generate_single_turn = original  # type: ignore[method-assign]
    metrics = grpo.read_metrics(out)
    return {"step": [m["step_time"] for m in metrics], "generate": generate, "loss": [m.get("loss") for m in metrics]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo/model")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step of each run is left out)")

    with tempfile.TemporaryDirectory(prefix="grpo-prefix-") as tmp:
        work = Path(tmp)
        data = dataset(work)
        results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        for r in range(args.rounds):
            for share in (False, True):
                log(f"[bench] round {r + 1}/{args.rounds}, share_prompt_prefix={share}")
                results[share].append(run(args.model, data, work / f"run-{r}-{int(share)}", args.steps, share))

    def per_step(share: bool, key: str) -> float:
        return statistics.mean(x for res in results[share] for x in res[key][1:])

    rows = []
    for share in (False, True):
        step, gen = per_step(share, "step"), per_step(share, "generate")
        rows.append((share, step, gen, step - gen))
    (_, s0, g0, r0), (_, s1, g1, r1) = rows
    print(f"GRPO, demo-cpu preset (4 prompts x 8 rollouts), {args.rounds} runs x {args.steps - 1} timed steps each way")
    print("| share_prompt_prefix | s/step | generation | the rest (score, backward, optimizer) |")
    print("|---|---|---|---|")
    for share, step, gen, rest in rows:
        print(f"| {'on' if share else 'off'} | {step:.2f} | {gen:.2f} | {rest:.2f} |")
    print(f"ratio off/on: step {s0 / s1:.2f}x, the rest {r0 / r1:.2f}x (generation {g0 / g1:.2f}x: unchanged code)")
    first = [(res["loss"][0], results[True][i]["loss"][0]) for i, res in enumerate(results[False])]
    print("first-step loss off vs on (same rollouts): " + ", ".join(f"{a:.6g} vs {b:.6g}" for a, b in first))
    return 0


if __name__ == "__main__":
    sys.exit(main())
