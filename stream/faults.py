"""Engine fault injection for tests and drills: a wrapper around a real backend.

``FaultyBackend`` forwards every call to the wrapped backend, except that a batch holding a user
turn that contains ``marker`` raises ``EngineError`` (on every attempt, so retries run out and the
topic's ``on_error`` applies). Enabled only by ``faults.engine_fail_marker`` in the worker config.
"""

from __future__ import annotations

from typing import Any, Sequence

from rsafe.models.engines import EngineError


class FaultyBackend:
    def __init__(self, inner: Any, marker: str):
        self.inner = inner
        self.marker = marker
        self.model_id = inner.model_id
        self.failures = 0

    def _check(self, user_turns: Sequence[str]) -> None:
        if any(self.marker in t for t in user_turns):
            self.failures += 1
            raise EngineError(f"injected engine failure (a batch event contains {self.marker!r})")

    def generate(self, user_turns, gen, adapters):
        self._check(user_turns)
        return self.inner.generate(user_turns, gen, adapters)

    async def agenerate(self, user_turns, gen, adapters):
        self._check(user_turns)
        return await self.inner.agenerate(user_turns, gen, adapters)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # tokenizer, cfg, startup_s ...
        return getattr(self.inner, name)
