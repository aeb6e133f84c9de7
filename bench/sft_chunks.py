"""The demo build's SFT step: one padded batch against rows run in length chunks (recipe 6).

    .venv/bin/python bench/sft_chunks.py --model demo/model [--batches 8]

For each stage of the demo build (base SFT, long messages, lookup stages 1 and 2) it draws the
stage's own batches and times forward + backward of the same batches, on the same model, both
ways, alternating (padded, chunked, padded, chunked) so that a slow minute of a shared machine
hits both: ``sft.loss_on_answers`` with ``chunk_overhead=10**9`` (one padded batch, recipe 5) and
with the default (``sft.CHUNK_OVERHEAD_TOKENS``). It prints seconds per step, the share of padding
in a padded batch, and the ratio. Also checks that the two losses agree. Figures:
docs/BENCHMARKS.md ("Cold start", the demo build).
"""

from __future__ import annotations

import argparse
import random
import time

ONE_BATCH = 10**9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo/model")
    ap.add_argument("--batches", type=int, default=8)
    args = ap.parse_args()

    import torch
    from transformers import Qwen2ForCausalLM

    from rsafe.demo import sft
    from rsafe.demo.build import LONG_STAGE, LOOKUP_STAGES, N_EVAL, N_TRAIN, SFT, split
    from rsafe.demo.corpus import long_examples, synthetic_examples
    from rsafe.demo.lookup import Ablations, encode_batch, stage_batches
    from rsafe.demo.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    model = Qwen2ForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.train()
    train, _ = split(0, N_TRAIN, N_EVAL)
    long_rows = [*long_examples(LONG_STAGE["n_long"], seed=0), *synthetic_examples(LONG_STAGE["n_short"], seed=1)]
    ablations = Ablations()
    n = args.batches
    stages = {
        "base SFT": list(sft.batches(sft.group_by_prefix(tok, train), tok.pad_token_id, n, SFT.batch_size,
                                     random.Random(0))),
        "long messages": list(sft.batches(sft.group_by_prefix(tok, long_rows), tok.pad_token_id, n,
                                          SFT.batch_size, random.Random(0))),
        **{f"lookup {i}": [encode_batch(tok, ablations, rows)
                           for rows in stage_batches(stage, n, ablations, train, random.Random(i))]
           for i, stage in enumerate(LOOKUP_STAGES, 1)},
    }

    def step(batch: tuple, overhead: int) -> float:
        t = time.perf_counter()
        loss = sft.loss_on_answers(model, *batch, chunk_overhead=overhead)
        model.zero_grad(set_to_none=True)
        loss.backward()
        return time.perf_counter() - t

    print(f"{'stage':<14} {'padding':>8} {'padded s/step':>14} {'chunked s/step':>15} {'ratio':>6}")
    for name, batches in stages.items():
        prefix, ids, labels = batches[0]
        with torch.no_grad():
            a = sft.loss_on_answers(model, prefix, ids, labels, chunk_overhead=ONE_BATCH)
            b = sft.loss_on_answers(model, prefix, ids, labels)
        assert torch.allclose(a, b, atol=1e-5), (name, a.item(), b.item())
        real = sum(sum(sft.row_lengths(batch[2])) for batch in batches)
        padded = sum(batch[1].numel() for batch in batches)
        padded_s = chunked_s = 0.0
        for batch in batches:
            padded_s += step(batch, ONE_BATCH)
            chunked_s += step(batch, sft.CHUNK_OVERHEAD_TOKENS)
        print(f"{name:<14} {1 - real / padded:>7.0%} {padded_s / n:>14.2f} {chunked_s / n:>15.2f} "
              f"{padded_s / chunked_s:>5.2f}x")


if __name__ == "__main__":
    main()
