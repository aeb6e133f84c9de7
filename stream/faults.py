"""Engine fault injection for tests and drills: a wrapper around a real backend.

``FaultyBackend`` forwards every call to the wrapped backend, except (``faults`` in the worker
config; never set in production):

* ``engine_fail_marker``: a batch holding a user turn with the marker raises ``EngineError`` on
  every attempt (a poison batch: the worker isolates the events and dead-letters them);
* ``request_error_marker``: that request alone comes back with an error (its topic's ``on_error``);
* ``engine_dead_file``: while the file exists every call raises (a dead engine: exit 4);
* ``engine_hang_marker``: a batch holding the marker never returns (a hung engine: batch timeout).

``crash_on_marker`` wraps the consumer's message conversion instead (``consumer_crash_marker``):
an input event holding the marker raises inside Faust's fetch loop, and the Faust app crashes.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Sequence

from rsafe.models.engines import Completion, EngineError


class FaultyBackend:
    def __init__(self, inner: Any, faults: Any):
        self.inner = inner
        self.faults = faults
        self.model_id = inner.model_id
        self.failures = 0

    def _check(self, user_turns: Sequence[str]) -> None:
        f = self.faults
        if f.engine_dead_file and os.path.exists(f.engine_dead_file):
            self.failures += 1
            raise EngineError(f"injected dead engine ({f.engine_dead_file} exists)")
        if f.engine_fail_marker and any(f.engine_fail_marker in t for t in user_turns):
            self.failures += 1
            raise EngineError(f"injected engine failure (a batch event contains {f.engine_fail_marker!r})")

    def _errors(self, user_turns: Sequence[str], out: list[Completion]) -> list[Completion]:
        marker = self.faults.request_error_marker
        if not marker:
            return out
        return [Completion(prompt=t, error=f"injected request error ({marker!r})") if marker in t else c
                for t, c in zip(user_turns, out)]

    def generate(self, user_turns, gen, adapters):
        self._check(user_turns)
        return self._errors(user_turns, self.inner.generate(user_turns, gen, adapters))

    async def agenerate(self, user_turns, gen, adapters):
        self._check(user_turns)
        marker = self.faults.engine_hang_marker
        if marker and any(marker in t for t in user_turns):
            await asyncio.Event().wait()  # never returns; cancelled by the batch timeout
        return self._errors(user_turns, await self.inner.agenerate(user_turns, gen, adapters))

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # tokenizer, token_counter, cfg, startup_s ...
        return getattr(self.inner, name)


class InjectedCrash(RuntimeError):
    """Raised by ``crash_on_marker``: nothing in the worker catches it."""


def crash_on_marker(convert: Any, marker: str) -> Any:
    """``convert`` (the consumer's message → ``Incoming``), raising ``InjectedCrash`` for a message
    whose raw value contains ``marker``."""
    needle = marker.encode()

    def crashing(message: Any, arrived: float, consumed_at: Any) -> Any:
        if message.value is not None and needle in message.value:
            raise InjectedCrash(f"injected consumer crash (an event contains {marker!r})")
        return convert(message, arrived, consumed_at)

    return crashing
