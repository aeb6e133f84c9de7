"""The engine side of the guard on a GPU, at production size: a Qwen2.5-7B-shaped model.

    .venv/bin/python bench/gpu.py --compare-prefix      # on a GPU machine: 7B shape, bf16, ~6 min
    .venv/bin/python bench/gpu.py --shape demo --n 32 --duration 5 --new-tokens 32   # CPU smoke run

No model hub is reachable, so the weights are vLLM's ``load_format="dummy"`` (random values) on a
Qwen2.5-7B ``config.json`` written here — throughput does not depend on the weights' values. The
tokenizer is the demo model's (its ids fit the 7B vocabulary; it splits text into more tokens than
Qwen's, so the prompt lengths are reported as measured). Every prompt is the project's real RSafe
prompt (``rsafe-default`` policy, the model's chat template) around a message of the synthetic
corpus; the reasoning length is fixed with ``min_tokens = max_tokens = --new-tokens`` and
``ignore_eos`` (~150 tokens, a realistic RSafe reasoning). Engine settings as the guard runs them
on a GPU: ``max_num_seqs`` 512, 8,192 batched tokens per step, no incremental detokenization
(``--detokenize`` turns it on, for comparison: it cost a third of the messages/s on an H200).

Measured, in one run on one engine (``AsyncLLM``, the worker's engine class):

1. **batched**: all ``--n`` messages at once — messages/s, generated tokens/s, p50/p99 latency;
2. **one at a time**: ``--sequential`` messages, each after the previous — the batching ratio;
3. **open loop** at 50 % and 90 % of the batched rate for ``--duration`` s each: p50/p99;
4. **prefix caching off** (``--compare-prefix``, a second engine in a subprocess): batched
   messages/s and prefill tokens computed per message, vs on.

Prints a JSON summary and markdown rows for docs/BENCHMARKS.md. Reference (docs/CAPACITY.md,
../shared/PERFORMANCE_NOTES.md): compute ceiling ≈ 209 msgs/s per H100 (BF16, ~200 new prompt
tokens + ~150 reasoning tokens, policy prefix cached); target ≥ 100 msgs/s per GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Qwen2.5-7B-Instruct's architecture (config.json of the hub model).
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "sliding_window": 131072, "max_window_layers": 28, "attention_dropout": 0.0, "initializer_range": 0.02,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def model_dir(shape: str, demo_model: Path, out: Path) -> Path:
    """A model directory for vLLM: the 7B config (dummy weights) or the demo model itself."""
    if shape == "demo":
        return demo_model
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (demo_model / name).exists():
            shutil.copy(demo_model / name, out / name)
    demo_cfg = json.loads((demo_model / "config.json").read_text())
    cfg = {**QWEN25_7B, **{k: demo_cfg[k] for k in ("bos_token_id", "eos_token_id") if k in demo_cfg}}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def prompts(model: Path, n: int) -> list[str]:
    from transformers import AutoTokenizer

    from rsafe.models.prompt import build_user_turn, render_prompt
    from rsafe.policies import PolicyRegistry
    from rsafe.training.corpus import synthetic_examples

    tok = AutoTokenizer.from_pretrained(str(model))
    policy = PolicyRegistry.from_dirs().get("rsafe-default")
    rows = [e for e in synthetic_examples(4 * n, seed=7000) if e.response is None][:n]
    return [render_prompt(tok, build_user_turn(policy, e.prompt)) for e in rows]


def prefix_report(model: Path, texts: list[str]) -> dict:
    """Tokens the rendered prompts share: across the messages of one policy (everything before the
    message: chat template, task text, the policy's categories), and across policies (the common
    head of two policies' prompts — e.g. ``medical-platform`` shares ``rsafe-default``'s U1–U12)."""
    from transformers import AutoTokenizer

    from rsafe.models.prompt import build_user_turn, render_prompt
    from rsafe.policies import PolicyRegistry

    tok = AutoTokenizer.from_pretrained(str(model))
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    shared = len(os.path.commonprefix(ids))
    registry = PolicyRegistry.from_dirs()
    heads = {name: tok.encode(render_prompt(tok, build_user_turn(registry.get(name), "x")), add_special_tokens=False)
             for name in ("rsafe-default", "medical-platform", "kids-platform")}
    return {"shared_prefix_tokens": shared,
            "across_policies": {f"rsafe-default/{name}": len(os.path.commonprefix([heads["rsafe-default"], h]))
                                for name, h in heads.items() if name != "rsafe-default"}}


def log(msg: str) -> None:
    """Progress on stderr (the run is unattended; stdout's last line is the JSON result)."""
    print(f"[gpu bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def bench(args: argparse.Namespace, model: Path, texts: list[str]) -> dict:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    on_gpu = args.device == "gpu"
    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(model), load_format="dummy" if args.shape != "demo" else "auto",
        dtype="bfloat16" if on_gpu else "float32", max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching, gpu_memory_utilization=0.9,
        enforce_eager=not on_gpu, seed=0, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens))
    start_s = time.perf_counter() - t0
    block_size = engine.vllm_config.cache_config.block_size
    log(f"engine up in {start_s:.0f} s (block {block_size}, max_num_seqs "
        f"{engine.vllm_config.scheduler_config.max_num_seqs})")
    sp = SamplingParams(max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True, temperature=0.0,
                        output_kind=RequestOutputKind.FINAL_ONLY, detokenize=args.detokenize)
    prefill: list[int] = []

    async def one(text: str) -> tuple[float, int, int]:
        t = time.perf_counter()
        final = None
        async for out in engine.generate(text, sp, request_id=uuid.uuid4().hex):
            final = out
        assert final is not None
        cached = getattr(final, "num_cached_tokens", None) or 0
        prefill.append(len(final.prompt_token_ids) - cached)
        return time.perf_counter() - t, len(final.prompt_token_ids), len(final.outputs[0].token_ids)

    try:
        await asyncio.gather(*(one(t) for t in texts[:8]))  # warm-up (and the policy prefix in the cache)
        prefill.clear()
        t = time.perf_counter()
        res = await asyncio.gather(*(one(x) for x in texts))
        wall = time.perf_counter() - t
        lat = [r[0] for r in res]
        out = {
            "engine_start_s": round(start_s, 1), "n": len(texts), "block_size": block_size,
            "max_num_seqs": engine.vllm_config.scheduler_config.max_num_seqs, "detokenize": args.detokenize,
            "prompt_tokens_mean": round(statistics.mean(r[1] for r in res), 1),
            "new_tokens": args.new_tokens,
            "prefill_computed_per_msg": round(statistics.mean(prefill), 1),
            "batched_msgs_per_s": round(len(texts) / wall, 2),
            "batched_tokens_per_s": round(sum(r[2] for r in res) / wall, 1),
            "batched_p50_s": round(pct(lat, 0.5), 3), "batched_p99_s": round(pct(lat, 0.99), 3),
        }
        log(f"batched: {out['batched_msgs_per_s']} msgs/s, p99 {out['batched_p99_s']} s")
        if args.no_prefix_caching:
            return out
        seq = texts[: args.sequential]
        t = time.perf_counter()
        for x in seq:
            await one(x)
        out["sequential_msgs_per_s"] = round(len(seq) / (time.perf_counter() - t), 2)
        out["batching_ratio"] = round(out["batched_msgs_per_s"] / out["sequential_msgs_per_s"], 1)
        log(f"one at a time: {out['sequential_msgs_per_s']} msgs/s (batching {out['batching_ratio']}x)")
        for load in (0.5, 0.9):  # open loop: a fixed arrival rate, whatever the latency
            rate = load * out["batched_msgs_per_s"]
            tasks, i, t = [], 0, time.perf_counter()
            while time.perf_counter() - t < args.duration:
                tasks.append(asyncio.ensure_future(one(texts[i % len(texts)])))
                i += 1
                await asyncio.sleep(max(0.0, t + i / rate - time.perf_counter()))
            lat = [r[0] for r in await asyncio.gather(*tasks)]
            out[f"open_loop_{int(load * 100)}"] = {"rate": round(rate, 1), "n": len(lat),
                                                   "p50_s": round(pct(lat, 0.5), 3), "p99_s": round(pct(lat, 0.99), 3)}
            log(f"open loop {int(load * 100)} %: {out[f'open_loop_{int(load * 100)}']}")
        return out
    finally:
        engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["qwen2.5-7b", "demo"], default="qwen2.5-7b")
    ap.add_argument("--demo-model", default=str(ROOT / ".cache" / "demo-model"), help="tokenizer (and the demo shape)")
    ap.add_argument("--n", type=int, default=512, help="messages in the batched run")
    ap.add_argument("--sequential", type=int, default=16, help="messages in the one-at-a-time run")
    ap.add_argument("--new-tokens", type=int, default=150, help="reasoning + answer tokens per message (fixed)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of each open-loop run")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--device", choices=["gpu", "cpu"], default=None, help="default: gpu when CUDA is available")
    ap.add_argument("--max-num-seqs", type=int, default=512, help="vLLM's cap on sequences in a step")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192, help="vLLM's token budget per step")
    ap.add_argument("--detokenize", action="store_true",
                    help="let vLLM detokenize token by token (the guard does not: it decodes once at the end)")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--compare-prefix", action="store_true", help="also run with prefix caching off (subprocess)")
    args = ap.parse_args()
    if args.device is None:
        from rsafe.models.config import cuda_available

        args.device = "gpu" if cuda_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        model = model_dir(args.shape, Path(args.demo_model), Path(tmp) / "model")
        texts = prompts(model, args.n)
        result = {"shape": args.shape, "device": args.device, **asyncio.run(bench(args, model, texts)),
                  **prefix_report(model, texts)}
        result["aligned_prefix_tokens"] = result["shared_prefix_tokens"] // result["block_size"] * result["block_size"]
    if args.compare_prefix and not args.no_prefix_caching:
        log(f"prefix caching on: {json.dumps(result)}")  # kept even if the second engine fails
        log("second engine: prefix caching off")
        cmd = [sys.executable, __file__, "--no-prefix-caching", *[a for a in sys.argv[1:] if a != "--compare-prefix"]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            result["prefix_off_error"] = proc.stderr[-2000:]
            log(f"prefix caching off failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        else:
            off = json.loads(proc.stdout.splitlines()[-1])
            result["prefix_off"] = {k: off[k] for k in ("batched_msgs_per_s", "prefill_computed_per_msg", "engine_start_s")}
            result["prefix_speedup"] = round(result["batched_msgs_per_s"] / off["batched_msgs_per_s"], 2)
            saved = off["prefill_computed_per_msg"] - result["prefill_computed_per_msg"]
            result["prefix_reuse_of_aligned"] = round(saved / max(1, result["aligned_prefix_tokens"]), 3)  # target ≥ 0.8
    if not args.no_prefix_caching:
        r = result
        print(f"| {r['shape']} | {r['device']} | {r['batched_msgs_per_s']} | {r['batched_tokens_per_s']} | "
              f"{r['batched_p99_s']} | {r.get('batching_ratio')} | {r['prefill_computed_per_msg']} / "
              f"{r['prompt_tokens_mean']} | {r.get('prefix_speedup', '–')} |", file=sys.stderr)
        print(f"shared prefix {r['shared_prefix_tokens']} tokens, {r['aligned_prefix_tokens']} in whole "
              f"{r['block_size']}-token blocks; prefill saved per message with caching: "
              f"{r.get('prefix_reuse_of_aligned', '–')} of the aligned part (target ≥ 0.8); across policies: "
              f"{r['across_policies']}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    main()
