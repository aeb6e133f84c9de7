"""Client-side long polling for brokers that answer an empty fetch at once (the embedded broker).

Apache Kafka holds a fetch that finds no data for ``fetch.max.wait.ms`` (long polling), so an
idle aiokafka consumer sends ~1–2 fetches/s. The embedded broker (noida-db) answers at once, so
aiokafka's fetch loop spins: ~3,900 empty fetches/s and ~80 % of a core per idle consumer, on the
client *and* on the broker (``bench/idle_fetch.py``, docs/RELIABILITY.md). A worker whose input is
drained spins the same way while it works through the batches it has buffered; on the 2-core
machine that halved the worker's share of the CPU (``bench/pipeline.py``).

``install()`` wraps aiokafka's per-node fetch task: a fetch that came back without records
*sooner* than ``min(fetch_max_wait_ms, backoff)`` keeps its node busy for the rest of that time,
as a long-polling broker would have. Against Kafka an empty fetch already took ``fetch_max_wait_ms``
(500 ms by default, far above the backoff), so nothing changes there; a fetch that returns
records is never delayed. The cost on the embedded broker: a record that arrives while a consumer
waits out the backoff is fetched up to ``backoff`` later (10 ms by default; the worker lingers
100 ms for a batch).

Process-wide and idempotent (every aiokafka consumer of the process, Faust's included). It patches
a private method of aiokafka's ``Fetcher``; ``installed()`` reports whether the patch is active
and ``tests/test_long_poll.py`` checks it against the pinned aiokafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, Iterator

log = logging.getLogger("rsafe.stream.long_poll")

DEFAULT_BACKOFF_MS = 10.0
ENV = "RSAFE_EMPTY_FETCH_BACKOFF_MS"
"""Overrides the backoff; ``0`` turns the shim off."""

_state: dict[str, Any] = {"original": None, "backoff_s": 0.0}


def installed() -> bool:
    return _state["original"] is not None and _state["backoff_s"] > 0


def install(backoff_ms: float | None = None) -> bool:
    """Turn client-side long polling on (``backoff_ms`` default: ``$RSAFE_EMPTY_FETCH_BACKOFF_MS``,
    else 10). Returns whether it is active (False when turned off or aiokafka changed shape)."""
    if backoff_ms is None:
        backoff_ms = float(os.environ.get(ENV, DEFAULT_BACKOFF_MS))
    _state["backoff_s"] = max(0.0, backoff_ms) / 1000
    if _state["original"] is not None:
        return installed()
    try:
        from aiokafka.consumer.fetcher import Fetcher
    except ImportError:  # pragma: no cover - aiokafka is a dependency
        return False
    original = getattr(Fetcher, "_proc_fetch_request", None)
    if original is None or not asyncio.iscoroutinefunction(original):
        log.warning("aiokafka's Fetcher has no _proc_fetch_request coroutine: client-side long polling "
                    "is off (idle consumers spin on a broker that answers empty fetches at once)")
        return False

    async def _proc_fetch_request(self: Any, assignment: Any, node_id: int, request: Any) -> bool:
        loop = asyncio.get_running_loop()
        started = loop.time()
        got_records = await original(self, assignment, node_id, request)
        backoff = _state["backoff_s"]
        if not got_records and backoff > 0:
            hold = min(self._fetch_max_wait_ms / 1000, backoff) - (loop.time() - started)
            if hold > 0:
                try:
                    await asyncio.sleep(hold)
                except asyncio.CancelledError:  # closing or unassigned: as aiokafka does, no result
                    return False
        return got_records

    Fetcher._proc_fetch_request = _proc_fetch_request  # type: ignore[method-assign]
    _state["original"] = original
    return installed()


def uninstall() -> None:
    """Restore aiokafka's own fetch task (tests and benchmarks that measure the spin)."""
    if _state["original"] is not None:
        from aiokafka.consumer.fetcher import Fetcher

        Fetcher._proc_fetch_request = _state["original"]  # type: ignore[method-assign]
        _state["original"] = None


@contextlib.contextmanager
def counting_fetches() -> Iterator[list[int]]:
    """Count the fetch requests aiokafka sends while inside (``counter[0]``; reset it to start a
    window): how the benchmark and the tests see a consumer spin or not."""
    from aiokafka.consumer.fetcher import Fetcher

    counter = [0]
    inner = Fetcher._proc_fetch_request

    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return await inner(self, *args, **kwargs)

    Fetcher._proc_fetch_request = counted  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        Fetcher._proc_fetch_request = inner  # type: ignore[method-assign]
