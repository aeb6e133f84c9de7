"""``TransformersBackend``: plain ``transformers`` generation for machines without vLLM.

(``import transformers`` here is the Hugging Face package: imports are absolute, this module is
``rsafe.models.engines.transformers``.)
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from rsafe.models.config import EngineConfig, GenerationConfig
from rsafe.models.engines.base import Completion, EngineError, _check_model_path, _load_tokenizer
from rsafe.models.prompt import render_prompt
from rsafe.models.tokens import HFTokenCounter


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
