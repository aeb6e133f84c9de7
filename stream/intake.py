"""Between the Kafka consumer and the moderation agent: a bounded buffer of consumed messages.

The consumer (``app.BatchDeliveryConsumer``) hands over the moderation topics' messages a fetched
batch at a time (``put_many``), and the moderation agent takes them a micro-batch at a time
(``take``). Faust's own path — a conductor callback, an ``Event`` and a channel-queue put per
message, then the stream iterator and ``noack_take`` — cost ~45 µs per event, a fifth of the
worker's CPU with a fast engine (``bench/pipeline.py``, docs/BENCHMARKS.md); this is a deque.

Backpressure: ``put_many`` waits while ``maxsize`` messages are buffered, so the consumer stops
delivering and the Kafka client stops fetching once its own prefetch buffer is full. At most
``maxsize`` messages are buffered. ``clear`` (called by Faust's flow control when
partitions are revoked, like Faust's own stream buffers) drops what was not taken yet: nothing
of it was acked, so it is fetched again from the committed offsets.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import AsyncIterator, Generic, Sequence, TypeVar

T = TypeVar("T")


class Intake(Generic[T]):
    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize}")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._grew = asyncio.Event()
        self._shrank = asyncio.Event()
        self.full_waits = 0
        """How often delivery waited for the agent (the consumer stopped delivering)."""

    def __len__(self) -> int:
        return len(self._items)

    async def put_many(self, items: Sequence[T]) -> None:
        """Add a fetched batch, as room allows: waits while the buffer is full."""
        i, n = 0, len(items)
        while i < n:
            room = self.maxsize - len(self._items)
            if room <= 0:
                self.full_waits += 1
                while len(self._items) >= self.maxsize:
                    self._shrank.clear()
                    await self._shrank.wait()
                continue
            self._items.extend(items[i:i + room])
            i += room
            self._grew.set()

    def clear(self) -> None:
        """Drop everything not taken yet (partitions revoked: it is fetched again)."""
        self._items.clear()
        self._shrank.set()

    async def take(self, size: int, within: float) -> AsyncIterator[list[T]]:
        """Micro-batches: up to ``size`` items, waiting at most ``within`` seconds after the first
        one for the batch to fill."""
        items = self._items
        loop = asyncio.get_running_loop()
        while True:
            while not items:
                self._grew.clear()
                await self._grew.wait()
            if len(items) < size and within > 0:
                deadline = loop.time() + within
                while len(items) < size:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._grew.clear()
                    try:
                        await asyncio.wait_for(self._grew.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
            n = min(size, len(items))
            if not n:  # cleared while lingering
                continue
            batch = [items.popleft() for _ in range(n)]
            self._shrank.set()
            yield batch
