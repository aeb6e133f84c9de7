"""GRPO sweep on the drift scenario (docs/TRAINING.md): one run per setting, each evaluated.

    .venv/bin/python bench/grpo_sweep.py --model demo/model --work .cache/grpo-sweep [--only NAME ...]
    .venv/bin/python bench/grpo_sweep.py --work .cache/grpo-sweep --table     # the markdown table

Builds the scenario's dataset once (``rsafe train drift-data`` + ``rsafe train dataset``), measures
the base model once (``before.json``), then for each setting of ``SWEEP`` (over the ``demo-cpu``
preset): trains with ``rsafe.training.grpo.train`` and evaluates the result and its checkpoints with
``rsafe.demo.drift.evaluate_run``. Results accumulate in ``WORK/results.json`` (a run already
there is skipped), so the sweep can be run one setting at a time. Run one training at a time: the
timings are the point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

#: name → overrides of the demo-cpu preset. Full fine-tuning vs LoRA, learning rates,
#: temperatures, prompts per step (at a fixed 32 completions per step).
SWEEP: dict[str, dict[str, Any]] = {
    "full-lr1e-4-t1.2-p4": {"use_lora": False, "learning_rate": 1e-4},
    "full-lr2e-4-t1.2-p4": {"use_lora": False, "learning_rate": 2e-4},
    "full-lr4e-4-t1.2-p4": {"use_lora": False, "learning_rate": 4e-4},
    "full-lr2e-4-t1.0-p4": {"use_lora": False, "learning_rate": 2e-4, "temperature": 1.0},
    "full-lr2e-4-t1.5-p4": {"use_lora": False, "learning_rate": 2e-4, "temperature": 1.5},
    "full-lr2e-4-t1.2-p8": {"use_lora": False, "learning_rate": 2e-4, "num_generations": 4},
    "lora-attn-lr1e-3-t1.2-p4": {"use_lora": True, "lora_r": 16, "lora_alpha": 32, "learning_rate": 1e-3,
                                 "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "lora-all-lr1e-3-t1.2-p4": {"use_lora": True, "lora_r": 16, "lora_alpha": 32, "learning_rate": 1e-3,
                                "lora_target_modules": ["all-linear"]},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(work: Path, model: str, ablation: int, replay_ratio: float, paired: bool) -> tuple[Path, dict[str, Any]]:
    """The scenario's dataset and the base model's scores (made once per work directory)."""
    from functools import partial

    from rsafe.demo import drift
    from rsafe.training import dataset as ds

    data = work / "dataset"
    if not (data / ds.MANIFEST).exists():
        s = drift.DriftScenario(n_ablation=ablation)
        paths = drift.write_data(work / "drift", s)
        dropped = ds.Dropped()
        records = list(ds.parse_records(ds.read_file(paths["disagreements.jsonl"]).lines, dropped))
        settings = ds.BuildSettings(replay_ratio=replay_ratio, pair_by_message=paired)
        lookup = partial(ds.resolve_policy, policy_dirs=[paths["policies"]] if "policies" in paths else [])
        built = ds.build(records, replay=ds.read_replay(paths["replay.jsonl"]), settings=settings, lookup=lookup,
                         exclude_hashes=ds.read_hashes(paths["eval_hashes.txt"]), dropped=dropped)
        ds.save(built, data, sources=[{"kind": "file", "path": str(paths["disagreements.jsonl"])}], settings=settings)
    before_path = work / "before.json"
    if not before_path.exists():
        t0 = time.monotonic()
        before = drift.evaluate_model(model)
        before_path.write_text(json.dumps({"final": before, "seconds": time.monotonic() - t0}, indent=2))
    return data, json.loads(before_path.read_text())["final"]


def run_one(name: str, model: str, data: Path, work: Path, before: dict[str, Any]) -> dict[str, Any]:
    from rsafe.demo import drift
    from rsafe.training import grpo

    out = work / "runs" / name
    if not (out / grpo.SUMMARY).exists():  # trained already when only the evaluation failed
        cfg = grpo.load_config(out, preset="demo-cpu", overrides={**SWEEP[name], "disable_tqdm": True})
        grpo.train(model, data, cfg, resume=any(out.glob("checkpoint-*")), log=log)
    summary = json.loads((out / grpo.SUMMARY).read_text())
    t0 = time.monotonic()
    evaluated = drift.evaluate_run(out, model, every=20, log=log)
    result = {"name": name, "overrides": SWEEP[name], "summary": summary, **evaluated,
              "metrics": grpo.read_metrics(out), "eval_seconds": round(time.monotonic() - t0, 1),
              "targets": drift.targets(before, evaluated["final"])}
    drift.plot_run(result["metrics"], result["checkpoints"], out / "grpo_drift.png", title=name, before=before)
    return result


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table(results: dict[str, Any], before: dict[str, Any]) -> str:
    """Final held-out accuracy per run (and the base model), then held-out drift per checkpoint."""
    sets = ("drift_heldout", "contrast_heldout", "general", "platform_other")
    lines = ["| run | steps | train s | s/step | reward first→last | " + " | ".join(sets) + " | format (min) | targets met |",
             "|" + "---|" * (7 + len(sets))]
    lines.append("| base model | – | – | – | – | " + " | ".join(_pct(before[k]["accuracy"]) for k in sets)
                 + f" | {_pct(min(v['format_rate'] for v in before.values()))} | |")
    for name, r in results.items():
        s, f = r["summary"], r["final"]
        met = sum(t["ok"] for t in r["targets"].values())
        lines.append(f"| {name} | {s['steps']} | {s['train_seconds']:.0f} | {s['seconds_per_step']:.1f} | "
                     f"{s['reward']['first']:.2f}→{s['reward']['last']:.2f} | "
                     + " | ".join(_pct(f[k]["accuracy"]) for k in sets)
                     + f" | {_pct(min(v['format_rate'] for v in f.values()))} | {met}/{len(r['targets'])} |")
    lines += ["", "Checkpoints (drift_heldout / contrast_heldout / platform_other):", ""]
    for name, r in results.items():
        points = [f"{c['step']}: {_pct(c['drift_heldout']['accuracy'])}/{_pct(c['contrast_heldout']['accuracy'])}"
                  f"/{_pct(c['platform_other']['accuracy'])}" for c in r["checkpoints"]]
        lines.append(f"* {name}: " + ", ".join(points))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo/model")
    p.add_argument("--work", default=".cache/grpo-sweep")
    p.add_argument("--only", nargs="*", choices=sorted(SWEEP), help="run these settings only")
    p.add_argument("--table", action="store_true", help="print the results table and exit")
    p.add_argument("--rescore", action="store_true", help="measure the base model again and recompute the targets")
    p.add_argument("--ablation", type=int, default=0,
                   help="policy-ablation pairs per other harmful family in the replay pool (DriftScenario.n_ablation)")
    p.add_argument("--pair-by-message", action="store_true", help="dataset rows of one message side by side")
    p.add_argument("--replay-ratio", type=float, default=3.0,
                   help="replay rows per disagreement (3: the whole pool without ablation rows; 5 with them)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.table:
        before = json.loads((work / "before.json").read_text())["final"]
        print(table(results, before))
        return 0
    if args.rescore:  # the base model measured again (e.g. the evaluation sets changed): new targets
        from rsafe.demo import drift

        (work / "before.json").unlink(missing_ok=True)
        _, before = prepare(work, args.model, args.ablation, args.replay_ratio, args.pair_by_message)
        for r in results.values():
            r["targets"] = drift.targets(before, r["final"])
        results_path.write_text(json.dumps(results, indent=1))
        print(table(results, before))
        return 0
    data, before = prepare(work, args.model, args.ablation, args.replay_ratio, args.pair_by_message)
    for name in args.only or list(SWEEP):
        if name in results:
            log(f"[sweep] {name}: done already")
            continue
        results[name] = run_one(name, args.model, data, work, before)
        results_path.write_text(json.dumps(results, indent=1))
        log(f"[sweep] {name}: " + json.dumps({k: round(v["value"], 3) for k, v in results[name]["targets"].items()}))
    print(table(results, before))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
