"""The engine side of the guard on a GPU, at production size: a Qwen2.5-7B-shaped model.

    .venv/bin/python bench/gpu.py --compare-prefix --out docs/bench-results/gpu-NAME.json   # GPU, ~6 min
    .venv/bin/python bench/gpu.py --shape demo --n 64 --sequential 8 --duration 10 --new-tokens 32 \\
        --max-model-len 1024 --compare-prefix --out .cache/bench-results/gpu-demo-cpu.json     # CPU smoke run

No model hub is reachable, so the weights are vLLM's ``load_format="dummy"`` (random values) on a
Qwen2.5-7B ``config.json`` written here — throughput does not depend on the weights' values. The
tokenizer is the demo model's (its ids fit the 7B vocabulary; it splits text into more tokens than
Qwen's, so the prompt lengths are reported as measured). Every prompt is the project's real RSafe
prompt (``rsafe-default`` policy, the model's chat template) around a message of the synthetic
corpus; the reasoning length is fixed with ``min_tokens = max_tokens = --new-tokens`` and
``ignore_eos`` (~150 tokens, a realistic RSafe reasoning).

**The engine is the guard's**: its ``EngineConfig`` is this machine's defaults
(``rsafe.models.config.machine_defaults``: on a GPU ``max_num_seqs`` 512 and 8,192 batched tokens
per step, on a CPU vLLM's own) with the flags below on top, and vLLM starts with the arguments the
guard's ``VLLMBackend`` passes (``rsafe.models.engines.vllm_engine_kwargs``) plus
``load_format="dummy"`` for the 7B shape. Like the guard, it generates with ``detokenize=False``
(``--detokenize``: vLLM turns every token into text as it goes, for comparison).

The three H200 runs of docs/BENCHMARKS.md "GPU" (docs/bench-results/gpu-h200-*.json), by flags:

    run 1  --max-num-seqs vllm --max-num-batched-tokens vllm --detokenize --n 512 --sequential 16 --duration 30 --compare-prefix
    run 2  --max-num-seqs 512 --max-num-batched-tokens 8192 --detokenize --n 1024 --sequential 4 --duration 12
    run 3  --max-num-seqs 512 --max-num-batched-tokens 8192 --no-detokenize --n 1024 --sequential 2 --duration 2

(``vllm``: leave the setting to vLLM. ``--sequential`` of the three runs was not recorded; the
values above are the script's default then (run 1) and what the docs of that day state.)

Measured, in one run on one engine (``AsyncLLM``, the worker's engine class):

1. **batched**: all ``--n`` messages at once — messages/s, generated tokens/s, p50/p99 latency;
2. **one at a time**: ``--sequential`` messages, each after the previous — the batching ratio;
3. **open loop** at 50 % and 90 % of the batched rate for ``--duration`` s each: p50/p99, and the
   rate actually offered (the producer shares the process with vLLM's client and can fall behind);
4. **prefix caching off** (``--compare-prefix``, a second engine in a subprocess): batched
   messages/s and prefill tokens computed per message, vs on.

Writes one JSON file (``--out``): the command, date, git commit, machine (GPU name, driver),
versions (vLLM, torch, ...), every engine setting (the ``EngineConfig``, the arguments passed to
vLLM, what vLLM resolved, the sampling parameters, ``detokenize``) and the results. Reference
(docs/CAPACITY.md, from /work/shared/PERFORMANCE_NOTES.md): compute ceiling ≈ 200 msgs/s per H100
in BF16 with the policy prefix cached, 75–100 for a realistic vLLM setup; target ≥ 100 msgs/s per
GPU.
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
from typing import Any

from common import environment, run_metadata, write_result

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
VLLM_DEFAULT = "vllm"
"""The value of ``--max-num-seqs`` / ``--max-num-batched-tokens`` that leaves the setting to vLLM."""


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
    from rsafe.demo.corpus import synthetic_examples

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
    """Progress on stderr (the run is unattended; the result goes to ``--out``)."""
    print(f"[gpu bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def engine_config(args: argparse.Namespace, model: Path) -> Any:
    """The guard's ``EngineConfig`` for this run: the machine's defaults (GPU or CPU, by
    ``--device``), the flags on top."""
    from rsafe.models.config import EngineConfig, machine_defaults

    settings = machine_defaults(gpu=args.device == "gpu")
    if args.max_model_len is not None:
        settings["max_model_len"] = args.max_model_len
    for key in ("max_num_seqs", "max_num_batched_tokens"):
        flag = getattr(args, key)
        if flag is not None:  # not given: the guard's default for this machine
            settings[key] = None if flag == VLLM_DEFAULT else int(flag)
    return EngineConfig(backend="vllm", model=str(model), enable_prefix_caching=not args.no_prefix_caching,
                        **settings)


async def bench(args: argparse.Namespace, model: Path, texts: list[str]) -> dict[str, Any]:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from rsafe.models.config import apply_engine_environment
    from rsafe.models.engines import vllm_engine_kwargs

    cfg = engine_config(args, model)
    apply_engine_environment(cfg)
    engine_args = vllm_engine_kwargs(cfg)
    if args.shape != "demo":
        engine_args["load_format"] = "dummy"
    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))
    start_s = time.perf_counter() - t0
    vc = engine.vllm_config
    resolved = {  # what vLLM made of the arguments (None where this vLLM version has no such field)
        "max_num_seqs": getattr(vc.scheduler_config, "max_num_seqs", None),
        "max_num_batched_tokens": getattr(vc.scheduler_config, "max_num_batched_tokens", None),
        "block_size": vc.cache_config.block_size,
        "max_model_len": getattr(vc.model_config, "max_model_len", None),
        "dtype": str(getattr(vc.model_config, "dtype", None)),
        "enable_prefix_caching": getattr(vc.cache_config, "enable_prefix_caching", None),
        "enforce_eager": getattr(vc.model_config, "enforce_eager", None),
    }
    log(f"engine up in {start_s:.0f} s: {resolved}")
    sampling = {"max_tokens": args.new_tokens, "min_tokens": args.new_tokens, "ignore_eos": True,
                "temperature": 0.0, "detokenize": args.detokenize}
    sp = SamplingParams(**sampling, output_kind=RequestOutputKind.FINAL_ONLY)
    settings = {
        "engine_config": cfg.model_dump(mode="json", include={
            "backend", "dtype", "max_model_len", "gpu_memory_utilization", "enable_prefix_caching", "enforce_eager",
            "max_num_seqs", "max_num_batched_tokens", "enable_lora", "max_lora_rank", "max_loras",
            "cpu_kvcache_space_gib"}),
        "engine_args": engine_args,  # all of them (model/tokenizer: a temporary copy for the 7B shape)
        "vllm_resolved": resolved,
        "sampling": {**sampling, "output_kind": "FINAL_ONLY"},
        "detokenize": args.detokenize,
    }
    results: dict[str, Any] = {"engine_start_s": round(start_s, 1)}
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
        results.update({
            "n": len(texts),
            "prompt_tokens_mean": round(statistics.mean(r[1] for r in res), 1),
            "new_tokens": args.new_tokens,
            "prefill_computed_per_msg": round(statistics.mean(prefill), 1),
            "batched_msgs_per_s": round(len(texts) / wall, 2),
            "batched_tokens_per_s": round(sum(r[2] for r in res) / wall, 1),
            "batched_p50_s": round(pct(lat, 0.5), 3), "batched_p99_s": round(pct(lat, 0.99), 3),
        })
        log(f"batched: {results['batched_msgs_per_s']} msgs/s, p99 {results['batched_p99_s']} s")
        if args.no_prefix_caching:
            return {"settings": settings, "results": results}
        seq = texts[: args.sequential]
        t = time.perf_counter()
        for x in seq:
            await one(x)
        results["sequential_n"] = len(seq)
        results["sequential_msgs_per_s"] = round(len(seq) / (time.perf_counter() - t), 2)
        results["batching_ratio"] = round(results["batched_msgs_per_s"] / results["sequential_msgs_per_s"], 1)
        log(f"one at a time: {results['sequential_msgs_per_s']} msgs/s (batching {results['batching_ratio']}x)")
        for load in (0.5, 0.9):  # open loop: a fixed arrival rate, whatever the latency
            rate = load * results["batched_msgs_per_s"]
            tasks, i, t = [], 0, time.perf_counter()
            while time.perf_counter() - t < args.duration:
                tasks.append(asyncio.ensure_future(one(texts[i % len(texts)])))
                i += 1
                await asyncio.sleep(max(0.0, t + i / rate - time.perf_counter()))
            sent_s = time.perf_counter() - t
            lat = [r[0] for r in await asyncio.gather(*tasks)]
            key = f"open_loop_{int(load * 100)}"
            results[key] = {"rate": round(rate, 1), "n": len(lat), "seconds": round(sent_s, 1),
                            "offered_msgs_per_s": round(len(lat) / sent_s, 1),
                            "p50_s": round(pct(lat, 0.5), 3), "p99_s": round(pct(lat, 0.99), 3)}
            log(f"open loop {int(load * 100)} %: {results[key]}")
        return {"settings": settings, "results": results}
    finally:
        engine.shutdown()


def compare_prefix(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """A second engine with prefix caching off (a subprocess: one engine per process), its figures
    and the comparison added to ``result``."""
    log("second engine: prefix caching off")
    with tempfile.TemporaryDirectory() as tmp:
        off_path = Path(tmp) / "off.json"
        argv = [a for a in sys.argv[1:] if a != "--compare-prefix"]
        if "--out" in argv:  # the subprocess writes its own file
            i = argv.index("--out")
            del argv[i:i + 2]
        argv = [a for a in argv if not a.startswith("--out=")]
        proc = subprocess.run([sys.executable, __file__, "--no-prefix-caching", *argv, "--out", str(off_path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            result["results"]["prefix_off_error"] = proc.stderr[-2000:]
            log(f"prefix caching off failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
            return
        off = json.loads(off_path.read_text())
    on, off_r = result["results"], off["results"]
    on["prefix_off"] = {k: off_r[k] for k in ("batched_msgs_per_s", "prefill_computed_per_msg", "engine_start_s")}
    on["prefix_off_settings"] = off["settings"]["engine_config"]
    on["prefix_speedup"] = round(on["batched_msgs_per_s"] / off_r["batched_msgs_per_s"], 2)
    saved = off_r["prefill_computed_per_msg"] - on["prefill_computed_per_msg"]
    on["prefix_reuse_of_aligned"] = round(saved / max(1, on["aligned_prefix_tokens"]), 3)  # target ≥ 0.8


def scheduler_flag(value: str) -> str:
    """An integer, or ``vllm`` (leave the setting to vLLM)."""
    if value == VLLM_DEFAULT or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"expected a positive integer or {VLLM_DEFAULT!r}, got {value!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["qwen2.5-7b", "demo"], default="qwen2.5-7b")
    ap.add_argument("--demo-model", default=str(ROOT / "demo" / "model"), help="tokenizer (and the demo shape)")
    ap.add_argument("--n", type=int, default=512, help="messages in the batched run")
    ap.add_argument("--sequential", type=int, default=16, help="messages in the one-at-a-time run")
    ap.add_argument("--new-tokens", type=int, default=150, help="reasoning + answer tokens per message (fixed)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of each open-loop run")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the guard's (GPU 4096, CPU 1024)")
    ap.add_argument("--device", choices=["gpu", "cpu"], default=None, help="default: gpu when CUDA is available")
    ap.add_argument("--max-num-seqs", type=scheduler_flag, default=None,
                    help="vLLM's cap on sequences in a step; 'vllm': vLLM's default (default: the guard's: GPU 512, "
                         "CPU vLLM's)")
    ap.add_argument("--max-num-batched-tokens", type=scheduler_flag, default=None,
                    help="vLLM's token budget per step; 'vllm': vLLM's default (default: the guard's: GPU 8192, "
                         "CPU vLLM's)")
    ap.add_argument("--detokenize", action=argparse.BooleanOptionalAction, default=False,
                    help="let vLLM detokenize token by token (default: no, as the guard: it decodes once at the end)")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--compare-prefix", action="store_true", help="also run with prefix caching off (subprocess)")
    ap.add_argument("--out", default=None,
                    help="the raw result (JSON); default .cache/bench-results/gpu-SHAPE-DEVICE-TIME.json")
    args = ap.parse_args()
    if args.device is None:
        from rsafe.models.config import cuda_available

        args.device = "gpu" if cuda_available() else "cpu"
    out = Path(args.out or ROOT / ".cache" / "bench-results" /
               f"gpu-{args.shape}-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    result: dict[str, Any] = {"benchmark": "bench/gpu.py", **run_metadata([sys.executable, *sys.argv])}
    with tempfile.TemporaryDirectory() as tmp:
        model = model_dir(args.shape, Path(args.demo_model), Path(tmp) / "model")
        texts = prompts(model, args.n)
        measured = asyncio.run(bench(args, model, texts))
        result["settings"] = {"shape": args.shape, "device": args.device, "n": args.n, "sequential": args.sequential,
                              "new_tokens": args.new_tokens, "duration_s": args.duration, **measured["settings"]}
        result["results"] = {**measured["results"], **prefix_report(model, texts)}
    result["environment"] = environment()  # as the engine ran: apply_engine_environment sets some
    r = result["results"]
    block = result["settings"]["vllm_resolved"]["block_size"]
    r["aligned_prefix_tokens"] = r["shared_prefix_tokens"] // block * block
    if args.compare_prefix and not args.no_prefix_caching:
        write_result(out, result)  # kept even if the second engine fails
        compare_prefix(args, result)
    write_result(out, result)
    if not args.no_prefix_caching:
        s = result["settings"]
        print(f"| {s['shape']} | {s['device']} | {r['batched_msgs_per_s']} | {r['batched_tokens_per_s']} | "
              f"{r['batched_p99_s']} | {r.get('batching_ratio')} | {r['prefill_computed_per_msg']} / "
              f"{r['prompt_tokens_mean']} | {r.get('prefix_speedup', '–')} |", file=sys.stderr)
        print(f"shared prefix {r['shared_prefix_tokens']} tokens, {r['aligned_prefix_tokens']} in whole "
              f"{block}-token blocks; prefill saved per message with caching: "
              f"{r.get('prefix_reuse_of_aligned', '–')} of the aligned part (target ≥ 0.8); across policies: "
              f"{r['across_policies']}", file=sys.stderr)
    log(f"result: {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    main()
