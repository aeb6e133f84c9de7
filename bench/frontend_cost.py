"""Front-end CPU per generated token: what vLLM's ``AsyncLLM`` costs in the worker's own process.

    .venv/bin/python bench/frontend_cost.py            # demo model, CPU, ~3 min

On a GPU the engine core runs ~20,000 tokens/s for a 7B guard (docs/BENCHMARKS.md, "GPU"); the
worker process that holds ``AsyncLLM`` turns every generated token into Python objects (incremental
detokenization, one ``Logprob`` per candidate) on one core. At 20,000 tokens/s that core has
~50 µs per token, for everything. This measures the process CPU time (``time.process_time``: the
engine core is a child process and not counted) per generated token for each sampling option the
guard uses, on one engine, in one run:

- ``detokenize`` on/off — vLLM's incremental detokenization (the guard now decodes once at the end);
- ``logprobs`` 0/20 — top candidates per generated token (the guard reads them at the answer only).

Then the guard's own path, ``VLLMBackend.generate`` with the default ``GenerationConfig`` (structured
decoding, 20 candidates at the answer), for both ``EngineConfig.answer_logprobs``: ``inline``
(logprobs at every generated token) and ``rescore`` (the default: no logprobs during generation, a
one-token request for the answer's candidates). Both generate with ``detokenize=False`` and decode
once per completion. Reported: front-end CPU per generated token and per message, all included,
and the messages/s of this CPU engine (on a CPU the engine, not the front end, is the limit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def user_turns(n: int) -> list[str]:
    """``n`` prompt-level messages of the synthetic corpus, as ``rsafe-default`` user turns."""
    from rsafe.models.prompt import build_user_turn
    from rsafe.policies import PolicyRegistry
    from rsafe.demo.corpus import synthetic_examples

    policy = PolicyRegistry.from_dirs().get("rsafe-default")
    rows = [e for e in synthetic_examples(4 * n, seed=7100) if e.response is None][:n]
    return [build_user_turn(policy, e.prompt) for e in rows]


async def run(args: argparse.Namespace) -> dict:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from rsafe.models.config import EngineConfig
    from rsafe.models.engines.base import _load_tokenizer
    from rsafe.models.prompt import render_prompt

    tok = _load_tokenizer(EngineConfig(model=args.model))
    texts = [render_prompt(tok, turn) for turn in user_turns(args.n)]
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=args.model, dtype="float32", max_model_len=1024,
                                                       enforce_eager=True, seed=0))
    results: dict = {"n": args.n, "new_tokens": args.new_tokens}
    try:
        async def batch(detokenize: bool, logprobs: int) -> tuple[float, int, list]:
            sp = SamplingParams(max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True,
                                temperature=0.0, detokenize=detokenize, logprobs=logprobs or None,
                                output_kind=RequestOutputKind.FINAL_ONLY)

            async def one(text: str):
                final = None
                async for out in engine.generate(text, sp, request_id=uuid.uuid4().hex):
                    final = out
                return final.outputs[0]

            c0 = time.process_time()
            outs = await asyncio.gather(*(one(t) for t in texts))
            return time.process_time() - c0, sum(len(o.token_ids) for o in outs), outs

        await batch(True, 0)  # warm-up
        for detok in (True, False):
            for lp in (0, 20):
                cpu, tokens, outs = await batch(detok, lp)
                key = f"detokenize={'on' if detok else 'off'},logprobs={lp}"
                results[key] = round(cpu / tokens * 1e6, 1)
                print(f"{key}: {results[key]} µs of front-end CPU per generated token", file=sys.stderr)
    finally:
        engine.shutdown()
    return results


def guard_path(args: argparse.Namespace, answer_logprobs: str) -> dict:
    """The same messages through the guard's vLLM backend, product defaults otherwise."""
    from rsafe.models.config import EngineConfig, GenerationConfig
    from rsafe.models.engines import VLLMBackend

    turns = user_turns(args.n)
    backend = VLLMBackend(EngineConfig(model=args.model, dtype="float32", max_model_len=1024, enforce_eager=True,
                                       answer_logprobs=answer_logprobs))
    try:
        gen = GenerationConfig()
        backend.generate(turns[:8], gen, [None] * 8)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        done = backend.generate(turns, gen, [None] * len(turns))
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    finally:
        backend.close()
    tokens = sum(c.completion_tokens for c in done)
    out = {"us_per_token": round(cpu / tokens * 1e6, 1), "tokens_per_msg": round(tokens / len(done), 1),
           "ms_per_msg": round(cpu / len(done) * 1e3, 2), "msgs_per_s_cpu_engine": round(len(done) / wall, 1),
           "with_candidates": sum(1 for c in done if c.candidates and any(c.candidates))}
    print(f"guard path, answer_logprobs={answer_logprobs}: {out}", file=sys.stderr)
    return {f"guard_{answer_logprobs}": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "demo" / "model"))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=150)
    args = ap.parse_args()
    print(json.dumps({**asyncio.run(run(args)), **guard_path(args, "inline"), **guard_path(args, "rescore")}))


if __name__ == "__main__":
    main()
