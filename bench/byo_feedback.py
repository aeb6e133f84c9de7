"""Bring your own feedback: a team's policy change, end to end through the public commands only.

    .venv/bin/python bench/common.py --out docs/bench-results/byo-feedback.json -- \\
        .venv/bin/python bench/byo_feedback.py --model demo/model

The scenario (not a category removal): a shop platform adds "U19 Competitor Promotion" to
``rsafe-default`` (policy ``brand-platform`` in its own folder). Its worker judges the shop chat,
reviewers label the decisions, and the retraining job runs on what they corrected:

1. ``rsafe broker`` and ``rsafe worker -c worker.yaml`` (feedback on, the team's policy folder);
2. ``rsafe produce --topic shop.chat events.jsonl``: rival-shop pushes and ordinary questions;
3. reviewers' labels for a held-out share of the events → ``rsafe.feedback`` (``rsafe produce``);
   the worker writes the disagreements; ``rsafe train promotion-set --from-topic rsafe.disagreements
   --general demo`` takes them as the gate's slice (and writes their message hashes);
4. labels for the other events → ``rsafe.feedback``; ``rsafe train dataset --from-topic
   rsafe.disagreements --policy-dir TEAM --replay demo --exclude-hashes PSET/message_hashes.txt``;
5. ``rsafe train grpo --preset demo-cpu --lora``; ``rsafe train promote RUN --promotion-set PSET
   --policy-dir TEAM``.

Prints one JSON line with every step's figures and the gate's decision, as they are. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from team_grpo_steps import ORDINARY, PUSH, RIVALS, team_policy  # noqa: E402

RSAFE = [sys.executable, "-m", "rsafe.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    t = time.monotonic()
    res = subprocess.run([*RSAFE, *args], capture_output=True, text=True, timeout=timeout)
    sys.stderr.write(f"$ rsafe {' '.join(args)}  ({time.monotonic() - t:.0f} s, exit {res.returncode})\n")
    sys.stderr.write(res.stderr[-2500:])
    return res


def tail(broker: str, topic: str) -> list[dict]:
    res = subprocess.run([*RSAFE, "tail", topic, "--broker", broker, "--timeout", "2"], capture_output=True, text=True)
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def wait_for(what: str, count, target: int, timeout_s: float) -> int:
    deadline, last = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        n = count()
        if n >= target:
            return n
        if n != last:
            sys.stderr.write(f"[byo] {what}: {n} of {target}\n")
            last = n
        time.sleep(3)
    return count()


def settle(count, quiet_s: float = 12, timeout_s: float = 300) -> int:
    """The count once it has not changed for ``quiet_s``."""
    deadline, last, since = time.monotonic() + timeout_s, -1, time.monotonic()
    while time.monotonic() < deadline:
        n = count()
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return n
        time.sleep(3)
    return last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo/model")
    ap.add_argument("--push", type=int, default=150, help="rival-shop pushes (unsafe under brand-platform)")
    ap.add_argument("--ordinary", type=int, default=50, help="ordinary shop questions (safe)")
    ap.add_argument("--held-out", type=float, default=0.4, help="share of the events whose labels make the slice")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--replay-ratio", type=float, default=1.0)
    ap.add_argument("--min-slice", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="rsafe-byo-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    team = work / "team-policies"
    team_policy(team)
    port = free_port()
    broker = f"127.0.0.1:{port}"
    env = {**os.environ, "RSAFE_BROKER": broker}
    out: dict = {"benchmark": "byo_feedback", "model": args.model, "settings": vars(args),
                 "scenario": "brand-platform = rsafe-default + U19 Competitor Promotion"}
    procs = []
    try:
        procs.append(subprocess.Popen([*RSAFE, "broker", "--port", str(port), "--data-dir", str(work / "broker")],
                                      stdout=open(work / "broker.log", "w"), stderr=subprocess.STDOUT))
        cfg = work / "worker.yaml"
        cfg.write_text(json.dumps({
            "broker": broker, "group_id": "shop-guard", "policy_dirs": [str(team)],
            "inputs": [{"topic": "shop.chat", "policy": "brand-platform", "partitions": 1}],
            "feedback": {"enabled": True}, "audit": {"content": "full"}, "http": {"enabled": False},
            "batch": {"size": 8, "linger_ms": 100, "max_inflight": 4},
            "engine": {"backend": "vllm", "model": args.model, "model_id": "rsafe-demo",
                       "generation": {"max_tokens": 128}},
        }))
        time.sleep(3)
        t0 = time.monotonic()
        procs.append(subprocess.Popen([*RSAFE, "worker", "-c", str(cfg)], stdout=open(work / "worker.log", "w"),
                                      stderr=subprocess.STDOUT, env=env))
        rng = random.Random(args.seed)
        events = []
        for i in range(args.push + args.ordinary):
            push = i < args.push
            text = (rng.choice(PUSH).format(r=rng.choice(RIVALS)) if push else rng.choice(ORDINARY)) + f" (order {i})"
            events.append({"id": f"shop-{i}", "conversation_id": f"c{i}", "prompt": text, "_truth": push})
        rng.shuffle(events)
        (work / "events.jsonl").write_text("".join(json.dumps({k: v for k, v in e.items() if k != "_truth"}) + "\n"
                                                   for e in events))
        assert sh("produce", "--broker", broker, "--topic", "shop.chat", str(work / "events.jsonl")).returncode == 0
        n = wait_for("verdicts", lambda: len(tail(broker, "shop.chat.verdicts")), len(events), 900)
        verdicts = {v["id"]: v for v in tail(broker, "shop.chat.verdicts")}
        out["worker"] = {"events": len(events), "verdicts": n, "seconds_to_all_verdicts": round(time.monotonic() - t0)}
        truth = {e["id"]: e["_truth"] for e in events}
        said = {i: v["label"] for i, v in verdicts.items()}
        out["before"] = {
            "pushes_flagged_unsafe": sum(1 for i, p in truth.items() if p and said.get(i) == "unsafe"),
            "pushes": args.push,
            "ordinary_flagged_unsafe": sum(1 for i, p in truth.items() if not p and said.get(i) == "unsafe"),
            "ordinary": args.ordinary}

        def feedback(ids: list[str], path: Path) -> None:
            path.write_text("".join(json.dumps({
                "event_id": i, "feedback_id": f"review-{i}", "label": "unsafe" if truth[i] else "safe",
                "source": "reviewer", "reviewer": "moderator-1"}) + "\n" for i in ids))
            assert sh("produce", "--broker", broker, "--topic", "rsafe.feedback", "--key-field", "event_id",
                      str(path)).returncode == 0

        ids = [e["id"] for e in events]
        cut = int(len(ids) * args.held_out)
        held, train_ids = ids[:cut], ids[cut:]
        feedback(held, work / "feedback-held-out.jsonl")
        slice_n = settle(lambda: len(tail(broker, "rsafe.disagreements")))
        pset = work / "promotion-set"
        res = sh("train", "promotion-set", "--from-topic", "rsafe.disagreements", "--broker", broker,
                 "--general", "demo", "--min-slice", str(args.min_slice), "--out", str(pset))
        assert res.returncode == 0
        out["promotion_set"] = {"labels_sent": len(held), "disagreements": slice_n,
                                **json.loads((pset / "promotion_set.json").read_text())["counts"]}
        feedback(train_ids, work / "feedback-train.jsonl")
        total = settle(lambda: len(tail(broker, "rsafe.disagreements")))
        dataset = work / "dataset"
        res = sh("train", "dataset", "--from-topic", "--broker", broker, "--policy-dir", str(team), "--replay", "demo",
                 "--replay-pool", "800", "--replay-ratio", str(args.replay_ratio), "--exclude-hashes", str(pset / "message_hashes.txt"), "--out", str(dataset))
        assert res.returncode == 0
        manifest = json.loads((dataset / "manifest.json").read_text())
        out["dataset"] = {"labels_sent": len(train_ids), "disagreements_on_topic": total, "counts": manifest["counts"]}
        run = work / "grpo"
        t = time.monotonic()
        res = sh("train", "grpo", "--model", args.model, "--dataset", str(dataset), "--output", str(run),
                 "--preset", "demo-cpu", "--lora", "--max-steps", str(args.steps), "--no-progress")
        assert res.returncode == 0
        summary = json.loads((run / "training_summary.json").read_text())
        out["grpo"] = {k: summary[k] for k in ("steps", "train_seconds", "seconds_per_step", "reward", "accuracy",
                                               "format_rate")}
        out["grpo"]["command_seconds"] = round(time.monotonic() - t)
        t = time.monotonic()
        res = sh("train", "promote", str(run), "--model", args.model, "--promotion-set", str(pset),
                 "--policy-dir", str(team), "--registry", str(work / "registry"), "--no-publish",
                 "--min-slice", str(args.min_slice), "--max-tokens", "128")
        gate = json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else {}
        card = subprocess.run([*RSAFE, "models", "show", gate.get("ref", "guard"), "--registry", str(work / "registry")],
                              capture_output=True, text=True)
        shown = json.loads(card.stdout) if card.returncode == 0 and card.stdout.strip() else {}
        out["promote"] = {"exit": res.returncode, "seconds": round(time.monotonic() - t), **gate,
                          "candidate_metrics": (shown.get("gate") or {}).get("candidate_metrics"),
                          "current_metrics": (shown.get("gate") or {}).get("current_metrics")}
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
