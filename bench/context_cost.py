"""What conversation context costs: msgs/s and prompt tokens computed per message by the number of
earlier turns shown, with vLLM's prefix caching on and off.

    .venv/bin/python bench/common.py --out docs/bench-results/context-cost-DATE.json -- \\
        .venv/bin/python bench/context_cost.py --model demo/model

The guard judges ``--conversations`` conversations turn by turn, as the stream worker does: every
conversation's turn t in one batch (the t messages before it as context, ``judge: last``), then
turn t+1, up to ``--turns``. The messages are the demo corpus's short harmless questions (a
prompt-level topic: each event a user message), so the model's answers — and their lengths — stay
alike at every depth. For each
depth the script reports msgs/s of that batch, the prompt tokens per message, and the prompt tokens
the engine computed (not taken from its prefix cache: ``prompt_tokens - cached_prompt_tokens``).
Each setting (prefix caching on, off) runs in its own engine start, with the demo settings of
tests/conftest.py (``max_tokens`` 128). One warm-up batch of other conversations runs first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REPORT_DEPTHS = (0, 1, 4, 8)


def conversations(n: int, turns: int, seed: int) -> list[list[str]]:
    """``n`` conversations of ``turns + 1`` harmless user messages of the demo corpus."""
    from rsafe.demo.corpus import corpus

    c = corpus()
    rng = random.Random(seed)
    slots = c.slots
    out = []
    for _ in range(n):
        rows = []
        for _ in range(turns + 1):
            bank = c.benign[rng.choice(sorted(c.benign))]
            template = rng.choice(bank.prompts)
            for name, values in slots.items():
                template = template.replace("{" + name + "}", rng.choice(values))
            rows.append(template)
        out.append(rows)
    return out


def requests_at(convs: list[list[str]], depth: int, tag: str) -> list[Any]:
    """Every conversation's message ``depth``, judged with the ``depth`` messages before it (a
    prompt-level topic: each event a user message, which the next event's context repeats, so the
    prompt of message d+1 extends the prompt of message d)."""
    from rsafe.models.conversation import Turn
    from rsafe.models.guard import GuardRequest

    return [GuardRequest(prompt=rows[depth], id=f"{tag}-{i}-{depth}", policy="rsafe-default",
                         context=[Turn(role="user", content=q) for q in rows[:depth]])
            for i, rows in enumerate(convs)]


async def run_setting(model: str, prefix_caching: bool, n: int, turns: int) -> dict[str, Any]:
    from rsafe.models import GenerationConfig, InputLimits
    from rsafe.models.config import local_engine_config
    from rsafe.models.guard import Guard

    cfg = local_engine_config(model, "vllm", model_id="rsafe-demo", generation=GenerationConfig(max_tokens=128),
                              limits=InputLimits(max_window_tokens=128), enable_prefix_caching=prefix_caching)
    started = time.perf_counter()
    guard = Guard.from_config(cfg)
    start_s = time.perf_counter() - started
    try:
        warm = conversations(n, 1, seed=99)
        await guard.aclassify(requests_at(warm, 1, "warm"))
        convs = conversations(n, turns, seed=7)
        depths = []
        for depth in range(turns + 1):
            reqs = requests_at(convs, depth, "c")
            t0 = time.perf_counter()
            prepared = [guard.prepare(r) for r in reqs]
            ready = [p for p in prepared if not hasattr(p, "label")]
            assert len(ready) == len(reqs), [getattr(p, "error_reason", None) for p in prepared]
            completions = await guard.backend.agenerate([p.windows[0].user_turn for p in ready], guard.generation,
                                                        [None] * len(ready))
            seconds = time.perf_counter() - t0
            prompt = [c.prompt_tokens for c in completions]
            cached = [c.cached_prompt_tokens or 0 for c in completions]
            depths.append({
                "earlier_turns": depth, "messages": len(reqs), "seconds": round(seconds, 3),
                "msgs_per_s": round(len(reqs) / seconds, 2),
                "context_turns": statistics.mean(len(p.context.turns) for p in ready),
                "context_tokens_mean": statistics.mean(p.context.tokens or 0 for p in ready),
                "prompt_tokens_mean": round(statistics.mean(prompt), 1),
                "computed_prompt_tokens_mean": round(statistics.mean(p - c for p, c in zip(prompt, cached)), 1),
                "completion_tokens_mean": round(statistics.mean(c.completion_tokens for c in completions), 1),
                "errors": sum(1 for c in completions if c.error),
            })
            print(json.dumps({"prefix_caching": prefix_caching, **depths[-1]}), flush=True)
    finally:
        guard.close()
    return {"prefix_caching": prefix_caching, "engine_start_s": round(start_s, 1), "depths": depths}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "demo" / "model"))
    ap.add_argument("--conversations", type=int, default=16, help="conversations per batch (the worker's batch size)")
    ap.add_argument("--turns", type=int, default=8, help="deepest context, in earlier exchanges")
    ap.add_argument("--settings", nargs="+", default=["on", "off"], choices=["on", "off"],
                    help="prefix caching settings to run (one engine start each)")
    args = ap.parse_args(argv)
    results = [asyncio.run(run_setting(args.model, s == "on", args.conversations, args.turns)) for s in args.settings]
    print("\nprefix caching  earlier turns  msgs/s  prompt tokens  computed  context tokens", file=sys.stderr)
    table = []
    for r in results:
        for d in r["depths"]:
            if d["earlier_turns"] in REPORT_DEPTHS or d["earlier_turns"] == args.turns:
                print(f"{'on' if r['prefix_caching'] else 'off':>14}  {d['earlier_turns']:>13}  {d['msgs_per_s']:>6.1f}  "
                      f"{d['prompt_tokens_mean']:>13.0f}  {d['computed_prompt_tokens_mean']:>8.0f}  "
                      f"{d['context_tokens_mean']:>14.0f}", file=sys.stderr)
                table.append({"prefix_caching": r["prefix_caching"], **d})
    print(json.dumps({"settings": {"conversations": args.conversations, "turns": args.turns, "model": args.model, "policy": "rsafe-default",
                                   "max_tokens": 128, "judge": "last"}, "runs": results, "table": table}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
