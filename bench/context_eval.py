"""What conversation context changes in the demo model's verdicts, kind by kind.

    .venv/bin/python bench/common.py --out docs/bench-results/context-eval-DATE.json -- \\
        .venv/bin/python bench/context_eval.py --model demo/model [--baseline OLD_MODEL_DIR]

On the held-out ``demo_multiturn`` set (``demo/benchmarks.py``: conversations judged on their
last user turn) the guard judges every example three ways: with its earlier turns and ``judge:
last`` (what the worker does), with them and ``judge: all`` (the reference wording), and without
them (the message alone, what a per-message guard sees). Per kind (``corpus.MULTITURN_KINDS``):
``continued`` — follow-ups that continue a harmful request, the multi-turn attacks: recall;
``switched`` — harmless messages after an unsafe turn: false-positive rate (sticky flags);
``benign``, ``harmful_after_benign``, ``alone``: accuracy. Then the single-turn ``demo`` set's F1,
for this model and, with ``--baseline``, for another (the build before the multi-turn stage), so
"single-turn F1 unchanged" is measured in the same run. vLLM engine, the demo settings
(``max_tokens`` 128, windows of 128 tokens), greedy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def guard_for(model: str) -> Any:
    from rsafe.models import GenerationConfig, InputLimits
    from rsafe.models.config import local_engine_config
    from rsafe.models.guard import Guard

    return Guard.from_config(local_engine_config(model, "vllm", model_id="rsafe-demo",
                                                 generation=GenerationConfig(max_tokens=128),
                                                 limits=InputLimits(max_window_tokens=128)))


def by_kind(examples: list[Any], verdicts: list[Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = defaultdict(lambda: {"n": 0, "unsafe": 0, "right": 0, "unknown": 0,
                                                          "context_turns": 0})
    for e, v in zip(examples, verdicts):
        row = out[e.meta["kind"]]
        row["n"] += 1
        row["unsafe"] += v.label.value == "unsafe"
        row["right"] += v.label.value == e.label
        row["unknown"] += v.label.value in ("unknown", "error")
        row["context_turns"] += v.context_turns
    for row in out.values():
        row["unsafe_rate"] = round(row["unsafe"] / row["n"], 4)
        row["accuracy"] = round(row["right"] / row["n"], 4)
        row["context_turns_mean"] = round(row.pop("context_turns") / row["n"], 2)
    return dict(out)


def judge_multiturn(guard: Any, examples: list[Any], mode: str) -> dict[str, Any]:
    from rsafe.models.guard import GuardRequest

    reqs = [GuardRequest(prompt=e.prompt, id=e.id, policy="rsafe-default",
                         context=list(e.context) if mode != "none" else [], judge="all" if mode == "all" else "last")
            for e in examples]
    verdicts = guard.classify(reqs)
    return by_kind(examples, verdicts)


def single_turn_f1(model: str) -> dict[str, Any]:
    from rsafe.evaluation.runner import evaluate

    with guard_for(model) as guard:
        result = evaluate(guard, "demo", "rsafe-default", cache_dir=None)
    m = result.metrics
    return {"model": model, "f1": m.f1, "precision": m.precision, "recall": m.recall, "n": m.n,
            "unknown_rate": m.unknown_rate}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "demo" / "model"))
    ap.add_argument("--baseline", help="another model directory whose single-turn F1 is measured too")
    args = ap.parse_args(argv)
    from rsafe.demo.benchmarks import demo_multiturn_examples, register_demo_benchmarks

    register_demo_benchmarks()  # the single-turn `demo` set is evaluated by name

    examples = demo_multiturn_examples()
    results: dict[str, Any] = {"model": args.model, "examples": len(examples), "multiturn": {}}
    with guard_for(args.model) as guard:
        for mode in ("last", "all", "none"):
            results["multiturn"][mode] = judge_multiturn(guard, examples, mode)
            print(json.dumps({mode: results["multiturn"][mode]}), file=sys.stderr, flush=True)
    results["single_turn"] = [single_turn_f1(args.model)]
    if args.baseline:
        results["single_turn"].append(single_turn_f1(args.baseline))
    mt = results["multiturn"]
    results["summary"] = {
        "attack_recall_with_context": mt["last"]["continued"]["unsafe_rate"],
        "attack_recall_without_context": mt["none"]["continued"]["unsafe_rate"],
        "switched_fp_judge_last": mt["last"]["switched"]["unsafe_rate"],
        "switched_fp_judge_all": mt["all"]["switched"]["unsafe_rate"],
        "switched_fp_without_context": mt["none"]["switched"]["unsafe_rate"],
        "single_turn_f1": [r["f1"] for r in results["single_turn"]],
    }
    print(json.dumps(results["summary"], indent=1), file=sys.stderr)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
