"""Faust's aiokafka consumer, delivering in bulk (why: ``rsafe.stream.compat``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Iterable

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AiokafkaConsumer
from faust.transport.drivers.aiokafka import Transport as AiokafkaTransport
from faust.types import TP

from rsafe.schemas.common import utcnow
from rsafe.stream.intake import Intake


class ConsumerThread(AIOKafkaConsumerThread):
    """Faust's consumer thread, without its false alarm on table changelogs.

    Faust's liveness check (``verify_event_path``, every ``stream_processing_timeout``) logs "Stream
    has not started processing TP(...-changelog)" for an active table's own changelog partitions:
    the worker *writes* them (each table update), and after recovery nobody reads them on purpose
    — so their high-water mark always runs ahead of the (unread) position, and a long-running
    worker with the feedback join logged that error every few seconds. The check still runs on
    every other partition; fetch liveness (``_verify_aiokafka_event_path``) runs on all.
    """

    def verify_event_path(self, now: float, tp: TP) -> None:
        if tp.topic in self.consumer.app.tables.changelog_topics:
            self._verify_aiokafka_event_path(now, tp)
            return None
        return super().verify_event_path(now, tp)


class BatchDeliveryConsumer(AiokafkaConsumer):
    """Faust's aiokafka consumer, delivering each fetched batch in one task, and the moderation
    topics' messages in bulk.

    Faust's ``Consumer._drain_messages`` hands every message to the conductor inside its own
    ``wait_first(callback(message), suspend_flow.wait())``: four tasks and an ``asyncio.wait`` per
    message, ~10 % of the worker's CPU with a fast engine (py-spy, ``bench/pipeline.py``). This is the
    same loop with that race run once per fetched batch: the whole delivery is what races the flow
    suspension (a rebalance), and delivery stops before the next message once the flow is suspended
    — messages not delivered are never acked, so they are fetched again from the committed offsets.
    Everything else (read offsets, gaps, ``commit_every``, yielding every 100 messages) is Faust's.

    Messages of the topics given to ``attach_intake`` skip the conductor: they go, converted by
    ``convert``, into the ``Intake`` the moderation agent takes from (a list per fetched batch,
    at most ``INTAKE_CHUNK`` at a time). Other topics (the feedback agent's) take Faust's path.
    """

    INTAKE_CHUNK = 512
    intake: Intake | None = None
    intake_topics: frozenset[str] = frozenset()
    convert: Callable[[Any, float, Any], Any] | None = None

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def attach_intake(self, topics: Iterable[str], intake: Intake, convert: Callable[[Any, float, Any], Any]) -> None:
        """Deliver ``topics`` into ``intake``: ``convert(message, arrived, consumed_at)`` per message."""
        self.intake, self.intake_topics, self.convert = intake, frozenset(topics), convert
        self.app.flow_control.manage_queue(intake)  # cleared with Faust's buffers when partitions are revoked

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - run by every worker test
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        suspended = self.suspend_flow.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag, unset_flag = self.diag.set_flag, self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        since_yield = 0

        intake, intake_topics, convert = self.intake, self.intake_topics, self.convert
        chunk = self.INTAKE_CHUNK
        flow_resumed = self.app.flow_control.acquire  # what Faust's conductor awaits per message

        async def put(bulk: list[Any]) -> None:
            # After a rebalance Faust resumes the flow once the assignment is set up (exactly_once:
            # the partitions' transactions begun); messages wait for that, as in Faust's own path.
            await flow_resumed()
            await intake.put_many(bulk)

        async def deliver(records: Any) -> None:
            nonlocal since_yield
            bulk: list[Any] = []
            arrived: float | None = None  # when the fetch returned (the first message), not when it began
            consumed_at = None
            try:
                async for tp, message in records:
                    if arrived is None:
                        arrived, consumed_at = time.perf_counter(), utcnow()
                    since_yield += 1
                    if since_yield > 100:
                        await asyncio.sleep(0)
                        since_yield = 0
                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is not None and offset < r_offset:
                        continue  # already delivered (Faust logs these as dropped)
                    if r_offset and offset - r_offset > 1 and acks_enabled_for(message.topic):
                        await self._add_gap(tp, r_offset + 1, offset)
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                    if suspended():
                        return
                    if message.topic in intake_topics:
                        bulk.append(convert(message, arrived, consumed_at))
                        if len(bulk) >= chunk:
                            await put(bulk)
                            bulk = []
                    else:
                        await callback(message)
                    set_read_offset(tp, offset)
                if bulk and not suspended():
                    await put(bulk)
            finally:
                bulk.clear()  # suspended (a rebalance): not delivered, so fetched again

        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                records = getmany(timeout=1.0)
                await self.sleep(0)
                if not self.should_stop:
                    await self.wait_first(deliver(records), self.suspend_flow.wait())
                unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)


class Transport(AiokafkaTransport):
    Consumer = BatchDeliveryConsumer
