"""Bounded in-flight batches: moderate → publish (broker-acknowledged) → ack → (commit).

* At most ``max_inflight`` batches are in the engine at once; ``submit`` waits for a free slot, so
  the agent stops taking events, Faust's stream buffer fills and the consumer pauses fetching.
* Batches publish in submission order (a conversation's verdicts keep their order).
* A message is acked only after every record of its outcome was acknowledged by the broker;
  Faust commits acked offsets. A publish failure is retried with backoff and never acked early.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Awaitable, Callable, Iterable, Protocol, Sequence

from rsafe.stream.moderate import EngineDead, Incoming, Moderator, Outcome
from rsafe.stream.telemetry import Telemetry, inject_headers

log = logging.getLogger("rsafe.stream.pipeline")


class LeftForRedelivery(Exception):
    """Raised by a moderator to drop a batch unacked on purpose (e.g. the engine died at shutdown):
    its messages are redelivered to the next worker instead of getting ``on_error`` verdicts."""


class NotPublishable(Exception):
    """A publish that retrying cannot fix (e.g. the input partition's transaction was revoked in a
    rebalance): the outcomes are dropped unacked, so the partition's new owner processes them."""


class Sink(Protocol):
    """Where outcomes go. ``write`` returns once the broker acknowledged every record."""

    async def write(self, outcomes: Sequence[Outcome]) -> None: ...


Ack = Callable[[Incoming], Awaitable[object]]
OnPublished = Callable[[Sequence[Outcome]], object]


class BatchPipeline:
    def __init__(self, moderator: Moderator, sink: Sink, ack: Ack, *, max_inflight: int,
                 telemetry: Telemetry, commit: Callable[[], Awaitable[object]] | None = None,
                 on_published: OnPublished | None = None, publish_backoff_s: float = 0.5,
                 max_publish_backoff_s: float = 10.0, on_engine_dead: Callable[[str], object] | None = None,
                 consumer_group: str | None = None):
        self.moderator = moderator
        self.sink = sink
        self.ack = ack
        self.commit = commit
        self.on_published = on_published
        self.on_engine_dead = on_engine_dead
        self.consumer_group = consumer_group
        self.telemetry = telemetry
        self.max_inflight = max_inflight
        self._slots = asyncio.Semaphore(max_inflight)
        self._tail: asyncio.Future | None = None
        self._tasks: set[asyncio.Task] = set()
        self.publish_backoff_s = publish_backoff_s
        self.max_publish_backoff_s = max_publish_backoff_s
        self.stopping = False
        self._holes: dict[tuple[str, int], int] = {}
        """Per input partition, the lowest offset of a batch left unacked. Faust commits the first
        run of consecutive acked offsets, so acking a later batch would commit past the hole and
        lose it: later offsets of that partition are not acked (they are redelivered after the
        restart or rebalance that redelivers the hole — duplicates, never loss)."""
        self._running = 0
        """Set at shutdown: a publish that keeps failing is given up (left unacked → replayed)."""

    @property
    def inflight(self) -> int:
        """Batches holding an engine slot now."""
        return self._running

    async def submit(self, batch: Sequence[Incoming]) -> None:
        """Start a batch once a slot is free (waiting here is the backpressure). Once stopping, a
        batch is not started: its messages stay unacked and are redelivered."""
        if not batch or self.stopping:
            return
        await self._slots.acquire()
        if self.stopping:
            self._slots.release()
            return
        self._running += 1
        prev, done = self._tail, asyncio.get_running_loop().create_future()
        self._tail = done
        task = asyncio.create_task(self._run(list(batch), prev, done), name="rsafe-batch")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for every submitted batch to finish (published and acked, or given up)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _run(self, batch: list[Incoming], prev: asyncio.Future | None, done: asyncio.Future) -> None:
        started = time.perf_counter()
        self.telemetry.batch_started(len(batch))
        for topic, n in Counter(inc.source.topic for inc in batch).items():
            self.telemetry.consumed(topic, n)
        try:
            with self.telemetry.tracer.start_as_current_span("rsafe.batch") as span:
                span.set_attribute("rsafe.batch_size", len(batch))
                outcomes = await self.moderator.moderate(batch)
                judged = time.perf_counter()
                events = self.telemetry.event_spans(outcomes, span, self.consumer_group)
                for o, s in zip(outcomes, events):
                    headers = inject_headers(s) if s is not None else None
                    for r in o.records:
                        r.headers = headers or None
                if prev is not None:
                    await asyncio.shield(prev)  # publish in submission order
                try:
                    published = await self._publish(outcomes)
                finally:
                    for s in events:
                        if s is not None:
                            s.end()
                if published:
                    done_at = time.perf_counter()
                    for o in outcomes:
                        self.telemetry.published((done_at - o.incoming.arrived) * 1e3)
                log.debug("batch of %d: moderated in %.0f ms, published in %.0f ms", len(batch),
                          (judged - started) * 1e3, (time.perf_counter() - judged) * 1e3)
                if published:
                    held = 0
                    for inc in batch:
                        hole = self._holes.get((inc.source.topic, inc.source.partition))
                        if hole is not None and inc.source.offset > hole:
                            held += 1  # acking it would commit past the hole
                            continue
                        await self.ack(inc)
                    if held:
                        log.warning("%d published events not acked: an earlier batch of their partition was "
                                    "left unacked (they will be redelivered with it)", held)
                    if self.commit is not None:
                        await self.commit()
                    if self.on_published is not None:
                        self.on_published(outcomes)
                else:
                    self._hole(batch)
        except asyncio.CancelledError:
            self._hole(batch)
            raise
        except LeftForRedelivery as why:
            self._hole(batch)
            log.warning("batch of %d left unacked for redelivery: %s", len(batch), why)
        except EngineDead as why:
            self._hole(batch)
            log.critical("engine dead: %s; batch of %d left unacked, stopping the worker", why, len(batch))
            if self.on_engine_dead is not None:
                self.on_engine_dead(str(why))
        except Exception:  # noqa: BLE001 - never crash the worker; unacked messages are replayed
            self._hole(batch)
            log.exception("batch of %d failed; its messages stay unacked and will be redelivered", len(batch))
        finally:
            if not done.done():
                done.set_result(None)
            self._running -= 1
            self._slots.release()
            self.telemetry.batch_finished(len(batch), (time.perf_counter() - started) * 1e3)

    def _hole(self, batch: Sequence[Incoming]) -> None:
        for inc in batch:
            tp = (inc.source.topic, inc.source.partition)
            if tp not in self._holes or inc.source.offset < self._holes[tp]:
                if tp not in self._holes and not self.stopping:
                    log.error("%s[%d]: offsets from %d left unacked; later offsets of this partition are not "
                              "committed until they are redelivered (restart or rebalance)", tp[0], tp[1],
                              inc.source.offset)
                self._holes[tp] = inc.source.offset

    def partitions_reassigned(self, tps: Iterable[tuple[str, int]]) -> None:
        """A rebalance redelivers these partitions from their committed offsets: their holes are gone."""
        for tp in tps:
            self._holes.pop(tp, None)

    async def _publish(self, outcomes: Sequence[Outcome]) -> bool:
        delay, attempt = self.publish_backoff_s, 0
        while True:
            attempt += 1
            try:
                await self.sink.write(outcomes)
                return True
            except asyncio.CancelledError:
                raise
            except NotPublishable as err:
                log.warning("not publishing %d outcomes: %s (they will be redelivered)", len(outcomes), err)
                return False
            except Exception as err:  # noqa: BLE001 - broker trouble: retry, never ack early
                self.telemetry.publish_failure()
                if self.stopping and attempt >= 3:
                    log.error("giving up publishing %d outcomes at shutdown: %s (they will be redelivered)",
                              len(outcomes), err)
                    return False
                log.warning("publishing %d outcomes failed (attempt %d): %s; retrying in %.1f s",
                            len(outcomes), attempt, err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_publish_backoff_s)
