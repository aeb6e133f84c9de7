"""The cost of long messages: messages/s for messages judged in 1 window vs in ~4 windows (vLLM).

    .venv/bin/python bench/windows.py --model demo/model [--n 48] [--max-window-tokens 128]

Both sets are judged in batches of ``--batch`` messages by the same engine in one run; a message of
k windows costs k engine sequences, so the ratio shows what windowing costs per message.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-window-tokens", type=int, default=128)
    args = ap.parse_args()
    from rsafe.models import GenerationConfig, Guard, InputLimits
    from rsafe.models.config import local_engine_config
    from rsafe.demo.corpus import filler_text

    cfg = local_engine_config(args.model, model_id="bench", generation=GenerationConfig(max_tokens=128),
                              limits=InputLimits(max_window_tokens=args.max_window_tokens))
    guard = Guard.from_config(cfg)
    rng = random.Random(5)
    short = [{"prompt": filler_text(250, rng)} for _ in range(args.n)]
    long_ = [{"prompt": filler_text(4 * 4 * args.max_window_tokens, rng)} for _ in range(args.n)]
    windows = {name: statistics.mean(len(guard.prepare(r).windows) for r in rows)
               for name, rows in (("short", short), ("long", long_))}
    guard.classify(short[:4])  # warm-up
    rates = {}
    for name, rows in (("short", short), ("long", long_)):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for i in range(0, len(rows), args.batch):
                guard.classify(rows[i:i + args.batch])
            times.append(time.perf_counter() - t0)
        rates[name] = len(rows) / statistics.median(times)
    guard.close()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores; demo model, max_window_tokens "
          f"{args.max_window_tokens}, batches of {args.batch}, median of {args.repeats}")
    print("| messages | windows per message | messages/s | sequences/s |")
    print("|---|---|---|---|")
    for name in ("short", "long"):
        print(f"| {name} | {windows[name]:.1f} | {rates[name]:.2f} | {rates[name] * windows[name]:.2f} |")
    print(f"a {windows['long']:.1f}-window message costs {rates['short'] / rates['long']:.1f}x a 1-window one")


if __name__ == "__main__":
    main()
