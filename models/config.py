"""Engine and generation settings (reference defaults: greedy, 512 reasoning tokens)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    """Bound on the reasoning length under structured decoding, in characters (a loose bound:
    the exact bound is ``max_tokens``, enforced by ``force_answer``)."""
    force_answer: bool = True
    """Under structured decoding: when generation runs out of ``max_tokens`` before the answer,
    continue the same sequence with ``</think>`` and a constrained ``\\boxed{safe|unsafe}``, so a
    verdict never ends ``unknown`` because the reasoning was long (the verdict says
    ``answer_forced``). The guard keeps room for it in the context (``ANSWER_RESERVE`` tokens)."""

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


#: The names of the generation backends (``rsafe.models.engines.BACKENDS``).
EngineName = Literal["vllm", "transformers", "openai", "null"]


class InputLimits(BaseModel):
    """What the guard accepts as a message, and how it judges long ones."""

    model_config = ConfigDict(extra="forbid")

    max_chars: Annotated[int, Field(gt=0)] = 64_000
    """Hard cap on the work per message: the longest prompt or response judged, in characters.
    Within it, a message whose prompt does not fit the model's context is judged in overlapping
    token windows (``window_overlap_tokens``), all in one engine batch."""
    on_oversize: Literal["reject", "truncate"] = "reject"
    """A prompt or response over ``max_chars``. ``reject`` (the default, fail closed): no part of
    the message is judged; the verdict is ``error`` with ``error_reason: too_large`` (the stream
    worker publishes the topic's ``on_error`` label with ``fallback: true``, dead-letters the event
    and queues it on the review topic). ``truncate`` (opt-in): judge the first and the last
    ``max_chars / 2`` characters only (head and tail windows); the verdict says
    ``truncated_input`` and names the characters left unjudged (``unjudged_ranges``), and the
    worker queues it for review too. A request hidden in the middle of a long text is never seen
    under ``truncate``."""
    window_overlap_tokens: Annotated[int, Field(ge=0, le=512)] = 32
    """Tokens shared by consecutive windows, so a phrase cut at a border is seen whole in one."""
    max_window_tokens: Annotated[int | None, Field(gt=32)] = None
    """Content tokens per window at most (None: as many as the context allows). For a model that
    judges shorter texts better than long ones (the demo model: 320); a message longer than this
    is windowed even when it would fit the context."""


class EngineConfig(BaseModel):
    """Which model runs the guard, and where.

    Settings that depend on the machine (``LOCAL_KEYS``: ``dtype``, ``max_model_len``,
    ``gpu_memory_utilization``, ``enforce_eager``, ``answer_logprobs``, ``max_num_seqs``,
    ``max_num_batched_tokens``) default to ``local_defaults``: GPU settings
    when CUDA is available, CPU-safe ones otherwise. Every caller (CLI, worker, benchmarks, tests)
    gets them from here.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    backend: EngineName = "vllm"
    """``vllm`` (in-process), ``transformers``, ``openai`` (an OpenAI-compatible server) or
    ``null`` (answers ``null_label`` at once: tests, soak runs, pipeline benchmarks only)."""
    model: str
    """A local directory or a Hugging Face id (e.g. ``Qwen/Qwen2.5-7B-Instruct``)."""
    model_id: str | None = None
    """Name reported in verdicts; defaults to ``model``."""
    tokenizer: str | None = None
    """Tokenizer directory or id when it differs from ``model``."""
    dtype: str = "auto"
    """Weights and activations: ``auto`` (GPU default), ``float32`` (CPU default), ``bfloat16``, ..."""
    max_model_len: Annotated[int, Field(gt=0)] = 4096
    """Context length (prompt + generated tokens). GPU default 4096, CPU default 1024."""
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    """Share of GPU memory vLLM may take; on vLLM-CPU the share of host memory (CPU default 0.5)."""
    enable_prefix_caching: bool = True
    """The policy text comes first in every prompt, so its KV cache is shared."""
    enforce_eager: bool = False
    """No CUDA graphs / compilation (CPU default: on)."""
    max_num_seqs: Annotated[int | None, Field(gt=0)] = None
    """vLLM's cap on sequences scheduled in one step (None: vLLM's own default; vLLM 0.26's
    ``AsyncLLM`` took 128 on an H200). GPU default 512, CPU default None (``local_defaults``):
    the H200 runs 2 and 3 of docs/BENCHMARKS.md "GPU" used 512."""
    max_num_batched_tokens: Annotated[int | None, Field(gt=0)] = None
    """vLLM's token budget per scheduler step, prefill and decode together (None: vLLM's own
    default; vLLM 0.26's ``AsyncLLM`` took 2,048 on an H200). GPU default 8,192, CPU default None
    (``local_defaults``): the H200 runs 2 and 3 of docs/BENCHMARKS.md "GPU" used 8,192."""
    answer_logprobs: Literal["rescore", "inline"] = "rescore"
    """Where the answer's candidates (``GenerationConfig.top_logprobs``, for the unsafe
    probability) come from. ``rescore``: a one-token request on the generation up to the answer
    (prefix-cached), so the generation itself asks for no logprobs. ``inline``: logprobs at every
    generated token, in one request, but a ``Logprob`` object (a JSON object from a server) per
    candidate per token in the process that holds the engine client. vLLM backend: ``rescore`` on
    a GPU, where that one core is the limit and ``inline`` costs ~4× its CPU per token; ``inline``
    on a CPU, where the engine is the limit and the extra request costs ~20 % of its messages/s
    (bench/frontend_cost.py, docs/BENCHMARKS.md). ``openai`` backend: ``rescore`` (the server's
    API process pays the per-token cost; it continues the text up to the answer)."""
    cpu_kvcache_space_gib: Annotated[int, Field(ge=1)] = 1
    """vLLM-CPU only: KV cache size in whole GiB (vLLM-CPU reads the variable with ``int()``,
    which fails on "0.5"), exported as ``VLLM_CPU_KVCACHE_SPACE`` when that variable is not set
    (vLLM-CPU refuses to start without it on small hosts). 1 GiB holds 256 sequences of the demo
    model's full 1,024-token context; its allocation takes ~0.5 s of the start (docs/BENCHMARKS.md
    "Cold start")."""
    cpu_worker_process: bool = False
    """vLLM-CPU only: run the model in a worker process of its own, as vLLM-CPU does unless told
    otherwise (its multiprocess executor: a third Python process, spawned, that imports vLLM and
    torch once more). False (the default): the model runs in the engine core process (vLLM's
    single-process executor, with the OpenMP settings vLLM gives its worker process;
    ``rsafe.models.engines.vllm.start_cpu_engine``): one process start fewer, about half the engine
    start on 2 cores, at the same generation speed (docs/BENCHMARKS.md "Cold start"). The
    engine core stays a process of its own either way (vLLM's ``AsyncLLM`` always spawns it).
    No effect on a GPU."""
    enable_lora: bool = False
    """Serve LoRA adapters (per request, by name)."""
    max_lora_rank: int = 16
    max_loras: int = 4
    """Adapters resident at once."""
    lora_adapters: dict[str, str] = {}
    """Adapter name → path; requests select one by name (vLLM ``LoRARequest``)."""
    base_url: str | list[str] | None = None
    """openai backend: e.g. ``http://127.0.0.1:8000/v1``, or several servers of the same model as a
    list (or one string with commas; env ``RSAFE_ENGINE__BASE_URL='[http://a:8000/v1, http://b:8000/v1]'``).
    Requests go to the healthy server with the fewest outstanding requests; a server that fails
    (connection error, 5xx) is taken out of rotation and retried after a back-off; a call fails
    only when every server failed (``rsafe.models.engines.openai.OpenAIBackend``)."""

    @field_validator("base_url", mode="before")
    @classmethod
    def _check_base_url(cls, value: Any) -> Any:
        """A URL stays a string; several (a list, or a string with commas) become a list."""
        if value is None:
            return None
        if not isinstance(value, (str, list, tuple)):
            raise ValueError("base_url: expected a URL or a list of URLs")
        items = value.split(",") if isinstance(value, str) else list(value)
        urls = [str(u).strip() for u in items if u is not None and str(u).strip()]
        if not urls:
            if isinstance(value, str):
                return None  # empty: the openai check below says what is missing
            raise ValueError("base_url: the list of URLs is empty")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"base_url {url!r}: expected http(s)://host:port/v1")
        bare = [u.rstrip("/") for u in urls]
        dupes = sorted({u for u in bare if bare.count(u) > 1})
        if dupes:
            raise ValueError(f"base_url {dupes[0]!r} is listed twice")
        return urls[0] if isinstance(value, str) and len(urls) == 1 else urls
    api_key: str | None = None
    """openai backend: sent as a bearer token."""
    request_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    """openai backend: per-request timeout."""
    device: str = "cpu"
    """transformers backend: torch device."""
    null_label: Literal["safe", "unsafe"] = "safe"
    """null backend: the answer it gives to every request."""
    limits: InputLimits = InputLimits()
    """What the guard accepts as a message."""
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    """Sampling settings (reference defaults: greedy, 512 tokens)."""

    @model_validator(mode="before")
    @classmethod
    def _local_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("backend", "vllm") not in ("openai", "null"):
            missing = [k for k in LOCAL_KEYS if k not in data]
            if missing:
                defaults = local_defaults()
                data = {**{k: defaults[k] for k in missing}, **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        if self.backend == "vllm" and self.lora_adapters and not self.enable_lora:
            raise ValueError("lora_adapters are set but enable_lora is false; set enable_lora: true")
        for name, path in self.lora_adapters.items():
            if self.backend != "openai" and not Path(path).exists():
                raise ValueError(f"lora_adapters.{name}: adapter path {path!r} does not exist")
        return self

    @property
    def display_id(self) -> str:
        return self.model_id or self.model


LOCAL_KEYS = ("dtype", "max_model_len", "gpu_memory_utilization", "enforce_eager", "answer_logprobs",
              "max_num_seqs", "max_num_batched_tokens")
"""Engine settings whose default depends on the machine (see ``local_defaults``)."""


def cuda_available() -> bool:
    """Whether a CUDA GPU is usable, asked through NVML: without that, torch's check initialises
    CUDA in this process, and vLLM's engine process, forked from it later, fails with "Cannot
    re-initialize CUDA in forked subprocess" (seen on the GPU machine; docs/BENCHMARKS.md "GPU")."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch, broken driver: no GPU
        return False


def machine_defaults(gpu: bool) -> dict[str, Any]:
    """The engine defaults for a GPU machine (``gpu``) or a CPU one: GPU (``auto`` dtype,
    4096-token context, 90 % of GPU memory, CUDA graphs, answer candidates rescored, 512 sequences
    and 8,192 tokens per scheduler step, the settings of the H200 runs 2 and 3 of
    docs/BENCHMARKS.md "GPU") or CPU-safe (float32, 1024 tokens, half the host memory, eager,
    answer candidates inline, vLLM's own scheduler limits)."""
    if gpu:
        return {"dtype": "auto", "max_model_len": 4096, "gpu_memory_utilization": 0.9, "enforce_eager": False,
                "answer_logprobs": "rescore", "max_num_seqs": 512, "max_num_batched_tokens": 8192}
    return {"dtype": "float32", "max_model_len": 1024, "gpu_memory_utilization": 0.5, "enforce_eager": True,
            "answer_logprobs": "inline", "max_num_seqs": None, "max_num_batched_tokens": None}


@lru_cache(maxsize=1)
def local_defaults() -> dict[str, Any]:
    """Machine-dependent engine defaults for this machine: ``machine_defaults`` of whether CUDA is
    available."""
    return machine_defaults(cuda_available())


def local_engine_config(model: str, backend: EngineName = "vllm", **overrides: Any) -> EngineConfig:
    """Settings for ``model`` on this machine (``local_defaults``); ``overrides`` win. The one
    helper every CLI, benchmark, the worker and the tests build engine settings with."""
    return EngineConfig(backend=backend, model=model, **overrides)


def apply_engine_environment(cfg: EngineConfig) -> None:
    """Process environment an engine needs before it starts: on a GPU, vLLM's engine process is
    spawned, not forked (a library may have initialised CUDA in this process already, and a fork
    cannot use it); on vLLM-CPU, the KV cache size. (Where vLLM-CPU runs the model,
    ``cpu_worker_process``, is set for the engine's start only: ``rsafe.models.engines.vllm.start_cpu_engine``.)"""
    if cfg.backend != "vllm":
        return
    if cuda_available():
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cfg.cpu_kvcache_space_gib:g}")
