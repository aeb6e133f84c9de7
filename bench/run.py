"""Engine benchmarks on one machine, in one run: structured decoding cost, batching gain.

    make bench                      # or: .venv/bin/python bench/run.py --model demo/model

Prints a markdown table of messages/s and the ratios, measured in this run; paste into
docs/BENCHMARKS.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=64, help="messages per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    from rsafe.models import GenerationConfig, Guard, Label
    from rsafe.models.config import cuda_available, local_engine_config
    from rsafe.demo.corpus import synthetic_examples

    on_gpu = cuda_available()
    cfg = local_engine_config(args.model, model_id="bench", max_model_len=1024,
                              generation=GenerationConfig(max_tokens=args.max_tokens))
    t0 = time.perf_counter()
    guard = Guard.from_config(cfg)
    startup = time.perf_counter() - t0
    reqs = [{"prompt": e.prompt, "response": e.response, "policy": e.policy}
            for e in synthetic_examples(args.n, seed=7)]
    variants = {
        "batched, free decoding": (GenerationConfig(max_tokens=args.max_tokens, structured=False), len(reqs)),
        "batched, structured decoding": (GenerationConfig(max_tokens=args.max_tokens, structured=True,
                                                          max_reasoning_chars=400), len(reqs)),
        "one at a time, free decoding": (GenerationConfig(max_tokens=args.max_tokens, structured=False), 1),
    }
    guard.classify(reqs[:4])  # warm-up
    rows = []
    for name, (gen, batch) in variants.items():
        g = Guard(guard.backend, policies=guard.policies, generation=gen)
        g.classify(reqs[:2])  # compile grammars etc.
        times, parseable = [], 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = []
            for i in range(0, len(reqs), batch):
                out += g.classify(reqs[i:i + batch])
            times.append(time.perf_counter() - start)
            parseable = sum(v.label in (Label.SAFE, Label.UNSAFE) for v in out)
        rows.append((name, len(reqs) / statistics.median(times), parseable / len(reqs)))
    guard.close()
    base = rows[0][1]
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {'GPU' if on_gpu else 'CPU'}; "
          f"engine start {startup:.0f} s; {len(reqs)} messages, median of {args.repeats}")
    print("| variant | messages/s | vs batched free | parseable |")
    print("|---|---|---|---|")
    for name, rate, ok in rows:
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {ok:.0%} |")


if __name__ == "__main__":
    main()
