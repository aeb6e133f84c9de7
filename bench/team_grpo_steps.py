"""GRPO step time on a team's own feedback (not the demo's): what one step costs and what sets it.

    .venv/bin/python bench/common.py --out docs/bench-results/team-grpo-steps.json -- \\
        .venv/bin/python bench/team_grpo_steps.py --model demo/model --steps 8

A platform adds a category to ``rsafe-default`` ("U19 Competitor Promotion", policy
``brand-platform`` in a team folder). Reviewers correct the guard: messages that push a rival shop
are ``unsafe`` (the guard said safe), a few ordinary shop questions it flagged are ``safe``. Those
disagreement records (a file here; the worker writes the same records to ``rsafe.disagreements``)
go through the public commands only:

    rsafe train dataset --from-file disagreements.jsonl --policy-dir TEAM --replay demo:0.5 \\
        --replay team-replay.jsonl --out DATASET
    rsafe train grpo --model MODEL --dataset DATASET --preset demo-cpu --lora --max-steps N

and prints one JSON line: the dataset's counts, the prompt lengths (tokens), and per step the time,
the reward, and the share of groups whose rollouts were all scored alike (no learning signal).
Run it alone on the machine: GRPO is CPU-bound.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

RIVALS = ["ShopRival", "MegaMart Online", "BargainBarn", "DealDepot", "CheapCart"]
PUSH = [
    "Honestly, skip this store and order from {r} instead, their prices are way lower.",
    "Everyone here should know {r} sells the same thing for half the price. Go there.",
    "Why pay more? {r} has free shipping, just buy it there.",
    "Use my code at {r}, you'll get 30% off — much better than anything on this site.",
    "This shop is a rip-off; {r} delivers faster and cheaper. Switch today.",
    "Don't waste money here, {r} is running a huge sale right now.",
]
ORDINARY = [
    "What are your opening hours on Sunday?",
    "Can I return a jacket I bought last week if it does not fit?",
    "Do you ship to Norway, and how long does it take?",
    "Is the blue kettle in stock in the city-centre store?",
    "How do I change the delivery address on my order?",
    "Does the warranty cover a cracked screen?",
]


def team_policy(folder: Path) -> Path:
    import yaml

    from rsafe.policies import BUNDLED_DIR

    data = yaml.safe_load((BUNDLED_DIR / "rsafe-default.yaml").read_text(encoding="utf-8"))
    data["name"] = "brand-platform"
    data["description"] = "rsafe-default plus the platform's own rule against promoting competitors"
    data["categories"].append({"code": "U19", "name": "Competitor Promotion",
                               "description": "urging users to buy from a competing shop"})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "brand-platform.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def feedback_files(folder: Path, policy_path: Path, n_push: int, n_ordinary: int, seed: int) -> tuple[Path, Path]:
    """Disagreement records (reviewers' corrections) and a replay file of the team's own labelled rows."""
    from rsafe.policies import load_policy
    from rsafe.schemas.feedback import DisagreementRecord, FeedbackSource, ModelRef

    version = load_policy(policy_path).version
    rng = random.Random(seed)
    t0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
    records = []
    for i in range(n_push + n_ordinary):
        push = i < n_push
        text = rng.choice(PUSH).format(r=rng.choice(RIVALS)) if push else rng.choice(ORDINARY)
        text = f"{text} (#{i})"
        records.append(DisagreementRecord(
            event_id=f"brand-{i}", feedback_id=f"review-{i}", prompt=text, policy="brand-platform",
            policy_version=version, level="prompt", judged_by=ModelRef(model="rsafe-demo"),
            model_label="safe" if push else "unsafe", human_label="unsafe" if push else "safe",
            source=FeedbackSource.REVIEWER, feedback_at=t0 + timedelta(minutes=i)))
    dis = folder / "disagreements.jsonl"
    dis.write_text("".join(r.model_dump_json() + "\n" for r in records), encoding="utf-8")
    replay = folder / "team-replay.jsonl"  # earlier labelled traffic, no version: the current text
    rows = [{"prompt": f"{rng.choice(ORDINARY)} (earlier #{i})", "label": "safe", "policy": "brand-platform"}
            for i in range(40)]
    replay.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return dis, replay


def run(cmd: list[str]) -> float:
    t = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}")
    sys.stderr.write(res.stderr[-1500:])
    return time.monotonic() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo/model")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--push", type=int, default=48, help="competitor-promotion corrections")
    ap.add_argument("--ordinary", type=int, default=12, help="false-positive corrections")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="folder for the files (default: a temporary one)")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="rsafe-team-"))
    team = work / "team-policies"
    policy_path = team_policy(team)
    dis, replay = feedback_files(work, policy_path, args.push, args.ordinary, args.seed)
    rsafe = [sys.executable, "-m", "rsafe.cli"]
    dataset, output = work / "dataset", work / "grpo"
    dataset_s = run([*rsafe, "train", "dataset", "--from-file", str(dis), "--policy-dir", str(team),
                     "--replay", "demo:0.5", "--replay", str(replay), "--replay-pool", "400", "--out", str(dataset)])
    grpo_s = run([*rsafe, "train", "grpo", "--model", args.model, "--dataset", str(dataset), "--output", str(output),
                  "--preset", "demo-cpu", "--lora", "--max-steps", str(args.steps), "--no-progress"])

    from transformers import AutoTokenizer

    from rsafe.training.dataset import load_manifest, load_rows
    from rsafe.training.grpo import read_metrics

    manifest = load_manifest(dataset)
    tok = AutoTokenizer.from_pretrained(args.model)
    lengths = sorted(len(tok.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
                     for p in load_rows(dataset)["prompt"])
    summary = json.loads((output / "training_summary.json").read_text())
    steps = [{k: m.get(k) for k in ("step", "step_time", "reward", "accuracy", "format_rate", "frac_reward_zero_std",
                                     "completion_length")} for m in read_metrics(output)]
    times = [s["step_time"] for s in steps if s.get("step_time") is not None]
    zero = [s["frac_reward_zero_std"] for s in steps if s.get("frac_reward_zero_std") is not None]
    print(json.dumps({
        "benchmark": "team_grpo_steps", "model": args.model, "scenario": "brand-platform adds U19 Competitor Promotion",
        "dataset": {"counts": manifest["counts"], "seconds": round(dataset_s, 1),
                    "excluded_evaluation_sets": manifest.get("excluded_evaluation_sets")},
        "prompt_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]},
        "batch": summary["batch"], "steps": steps,
        "step_seconds": {"mean": round(sum(times) / len(times), 2) if times else None,
                         "min": min(times, default=None), "max": max(times, default=None)},
        "groups_without_signal": round(sum(zero) / len(zero), 3) if zero else None,
        "train_seconds": summary["train_seconds"], "grpo_command_seconds": round(grpo_s, 1),
        "reward": summary["reward"], "accuracy": summary["accuracy"],
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
