"""Faust wiring, in one place: the app, its consumer, the moderation agent and the sink.

Messages are read as raw bytes (``value_serializer="raw"``) so that a malformed event reaches the
worker and goes to the DLQ instead of failing inside Faust's decoder. The consumer hands the
moderation topics' messages to the agent a fetched batch at a time (``rsafe.stream.intake``); the
agent micro-batches them into the pipeline and acks nothing itself: ``BatchPipeline`` acks each
message after its records were acknowledged by the broker, and Faust commits acked offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import tempfile
import time
import weakref
from datetime import datetime
from typing import Any, Awaitable, Callable, Iterable, Iterator, Sequence

import faust
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AiokafkaConsumer
from faust.transport.drivers.aiokafka import Transport as AiokafkaTransport
from faust.types import TP

from rsafe.stream.config import StreamConfig
from rsafe.stream.intake import Intake
from rsafe.stream.moderate import Incoming, Outcome
from rsafe.stream.pipeline import BatchPipeline, NotPublishable
from rsafe.schemas.common import utcnow
from rsafe.schemas.records import SourceRef

log = logging.getLogger("rsafe.stream.app")

AGENT_NAME = "rsafe-moderate"


def client_id() -> str:
    """The Kafka client id of this process: ``rsafe-<host>-<pid>`` (how a worker recognises another
    live worker of its own host in the group's member list)."""
    return f"rsafe-{socket.gethostname()}-{os.getpid()}"


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


def build_app(cfg: StreamConfig, datadir: str | None = None) -> faust.App:
    """The Faust app for ``cfg`` (no web server, raw bytes, manual topic management).

    ``datadir``: Faust's state directory; default a fresh temporary one, so no ``<group>-data``
    folder appears in the working directory.
    """
    app = faust.App(
        cfg.group_id,
        broker_client_id=client_id(),
        consumer_group_instance_id=cfg.resolved_group_instance_id,
        datadir=datadir or tempfile.mkdtemp(prefix="rsafe-faust-"),
        broker=cfg.faust_broker,
        broker_credentials=cfg.security.faust_credentials(),
        processing_guarantee=cfg.processing_guarantee,
        web_enabled=False,
        autodiscover=False,
        store=cfg.feedback.store,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset=cfg.auto_offset_reset,
        stream_buffer_maxsize=cfg.stream_buffer,
        stream_wait_empty=False,  # the worker drains its own pipeline at stop (worker._shutdown)
        broker_commit_interval=cfg.commit_interval_s,
        producer_acks=-1,
        producer_linger=0.005,  # a few ms: a batch's records go out in a few produce requests, not one each
        producer_max_batch_size=512 * 1024,
        producer_max_request_size=max(4 * cfg.max_event_bytes, 1 << 20),
        topic_allow_declare=False,
        topic_disable_leader=True,
    )
    app.transport = Transport(app.conf.broker_consumer, app)
    # What faust.Worker sets. Before the consumer exists (``wire`` builds it): the consumer reads
    # ``app.in_transaction`` (exactly_once needs in_worker) once, when it is built.
    app.in_worker = True
    return app


class _PartitionEvent:
    """What Faust's stores read of the current event: its message's partition."""

    def __init__(self, partition: int):
        self.message = _PartitionMessage(partition)


class _PartitionMessage:
    def __init__(self, partition: int):
        self.partition = partition


@contextlib.contextmanager
def in_partition(partition: int) -> Iterator[None]:
    """Table access on behalf of an event of ``partition`` outside Faust's own stream iteration.

    The moderation agent takes its events from the ``Intake``, not from a Faust stream, so Faust's
    current event (a context variable its stream sets per event) is unset there; a RocksDB store
    finds the partition's database through it. This sets it for the duration of the access."""
    from faust.streams import _current_event  # noqa: PLC2701 - Faust's context variable (faust-streaming 0.15)

    event = _PartitionEvent(partition)
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


def context_tables(app: faust.App, cfg: StreamConfig) -> dict[str, Any]:
    """One Faust table per input topic with ``context.enabled`` (``rsafe.stream.context``), its
    changelog co-partitioned with the topic. The worker writes the changelog records itself, with
    the event's verdict (in its transaction under exactly_once): the stores are updated directly."""
    from rsafe.stream.context import changelog_topic, table_name

    tables = {}
    for t in cfg.inputs:
        if not t.context.enabled:
            continue
        n = t.partitions
        tables[t.topic] = app.Table(
            table_name(t.topic), default=None, partitions=n, key_type=str, help=f"conversation context of {t.topic}",
            changelog_topic=app.topic(changelog_topic(cfg, t.topic), partitions=n, key_type=str,
                                      key_serializer="raw", value_serializer="json", compacting=True, deleting=True))
    return tables


def to_incoming(m: Any, arrived: float, consumed_at: datetime) -> Incoming:
    """A consumed Faust ``Message`` as the pipeline's ``Incoming`` (the message is its ack handle)."""
    ts = m.timestamp
    return Incoming(value=m.value, key=m.key,
                    source=SourceRef(topic=m.topic, partition=m.partition, offset=m.offset,
                                     timestamp_ms=int(ts * 1000) if ts else None),
                    arrived=arrived, consumed_at=consumed_at, handle=m, headers=m.headers)


def acker(app: faust.App) -> Callable[[Incoming], Awaitable[None]]:
    """The pipeline's ack: marks the message's offset as processed; Faust commits it."""
    consumer = app.consumer

    async def ack(inc: Incoming) -> None:
        consumer.ack(inc.handle)

    return ack


async def moderate_agent(stream: Any, *, intake: Intake, pipeline: BatchPipeline, batch_size: int,
                         linger_s: float) -> None:
    """Micro-batch (up to ``batch_size`` events or ``linger_s``, across partitions) into the pipeline.

    The agent's stream subscribes the input topics; their messages reach the agent through
    ``intake`` (``BatchDeliveryConsumer.attach_intake``), not through the stream."""
    async for batch in intake.take(batch_size, linger_s):
        await pipeline.submit(batch)


class FaustSink:
    """Publishes outcomes with the app's producer and waits for the broker's acknowledgements.

    at_least_once: the records of a batch go out as one record batch per output partition
    (``AIOKafkaProducer.send_batch``; partitions chosen by the producer's own partitioner, as
    ``send`` would) — a per-record ``send`` costs ~15 µs per record in the client (docs/BENCHMARKS.md).
    exactly_once: each record goes into the open transaction of its *input* partition (the one
    whose offsets Faust commits with it), so records and offsets commit atomically.
    """

    def __init__(self, app: faust.App, transactional: bool):
        self.app = app
        self.transactional = transactional

    def _transactional_id(self, source: SourceRef) -> str | None:
        if not self.transactional:
            return None
        try:
            group = self.app.assignor.group_for_topic(source.topic)
        except KeyError:
            raise NotPublishable(f"{source.topic} is not assigned to this worker any more") from None
        tid = f"{self.app.conf.id}-{group}-{source.partition}"
        if tid not in getattr(self.app.producer, "_transaction_producers", {tid: None}):
            raise NotPublishable(f"no open transaction for {source.topic}[{source.partition}] "
                                 "(partition revoked in a rebalance)")
        return tid

    async def write(self, outcomes: Sequence[Outcome]) -> None:
        if not self.transactional:
            await self._write_batches(outcomes)
            return
        producer = self.app.producer
        futures = []
        for o in outcomes:
            tid = self._transactional_id(o.incoming.source)
            for r in o.records:
                futures.append(await producer.send(r.topic, r.key, r.value, r.partition, None, r.headers,
                                                   transactional_id=tid))
        if futures:
            await asyncio.gather(*futures)

    async def _write_batches(self, outcomes: Sequence[Outcome]) -> None:
        producer = self.app.producer._ensure_producer()  # noqa: SLF001 - Faust's aiokafka producer
        partition = producer._partition  # noqa: SLF001 - the configured partitioner, as send() uses it
        builders: dict[tuple[str, int], Any] = {}
        futures = []
        ready: set[str] = set()
        for o in outcomes:
            for r in o.records:
                if r.topic not in ready:  # the topic's partitions known (what send() waits for per record)
                    await producer.client._wait_on_metadata(r.topic)  # noqa: SLF001
                    ready.add(r.topic)
                p = r.partition if r.partition is not None else partition(r.topic, None, r.key, r.value, r.key, r.value)
                tp = (r.topic, p)
                builder = builders.get(tp)
                if builder is None:
                    builder = builders[tp] = producer.create_batch()
                if builder.append(timestamp=None, key=r.key, value=r.value, headers=r.headers or []) is None:
                    futures.append(await producer.send_batch(builder, tp[0], partition=tp[1]))  # full: send it
                    builder = builders[tp] = producer.create_batch()
                    if builder.append(timestamp=None, key=r.key, value=r.value, headers=r.headers or []) is None:
                        del builders[tp]  # larger than a whole batch: on its own
                        futures.append(await producer.send(r.topic, r.value, key=r.key, headers=r.headers,
                                                           partition=r.partition))
        for (topic, p), builder in builders.items():
            futures.append(await producer.send_batch(builder, topic, partition=p))
        if futures:
            await asyncio.gather(*futures)


def wire(app: faust.App, cfg: StreamConfig, pipeline: BatchPipeline) -> Any:
    """Register the moderation agent on every input topic (one channel, one agent instance), fed
    by the consumer through an ``Intake`` of ``cfg.stream_buffer`` events."""
    topics = [t.topic for t in cfg.inputs]
    channel = app.topic(*topics, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    intake: Intake[Incoming] = Intake(cfg.stream_buffer)
    convert: Callable[[Any, float, Any], Incoming] = to_incoming
    if cfg.faults.consumer_crash_marker:  # test hook (config ``faults``): an error no guard catches
        from rsafe.stream.faults import crash_on_marker

        convert = crash_on_marker(to_incoming, cfg.faults.consumer_crash_marker)
    app.consumer.attach_intake(topics, intake, convert)
    app.intake = intake  # type: ignore[attr-defined] - held here (flow control keeps a weak reference)
    fun = functools.partial(moderate_agent, intake=intake, pipeline=pipeline, batch_size=cfg.batch.size,
                            linger_s=cfg.batch.linger_ms / 1000)
    functools.update_wrapper(fun, moderate_agent)
    return app.agent(channel, name=AGENT_NAME, concurrency=1)(fun)


# --------------------------------------------------------------------------- feedback


class AuditReader:
    """Reads one audit record back by its pointer (topic, partition, offset), for a disagreement's
    content and reasoning. A group-less consumer, started on first use."""

    def __init__(self, cfg: StreamConfig):
        self.cfg = cfg
        self._consumer: Any = None

    async def fetch(self, ptr: dict) -> dict | None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(bootstrap_servers=self.cfg.bootstrap, group_id=None,
                                              enable_auto_commit=False, client_id="rsafe-audit-reader",
                                              **self.cfg.security.client_kwargs())
            await self._consumer.start()
        tp = TopicPartition(ptr["topic"], ptr["partition"])
        self._consumer.assign([tp])
        self._consumer.seek(tp, ptr["offset"])
        batch = await self._consumer.getmany(tp, timeout_ms=10_000, max_records=1)
        for r in batch.get(tp, []):
            if r.offset == ptr["offset"] and r.value is not None:
                return json.loads(r.value)
        return None  # compacted away (a later record of the key exists) or erased

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


class FeedbackWiring:
    """The feedback agent, its tables and the tick timer, in one app (see ``rsafe.stream.feedback``)."""

    def __init__(self, app: faust.App, cfg: StreamConfig, worker_id: str, transactional: bool,
                 telemetry: Any = None):
        from rsafe.stream.feedback import TABLES, FeedbackJoin, tick_topic

        self.app, self.cfg = app, cfg
        fb = cfg.feedback
        from rsafe.stream.feedback import changelog_topic

        n = cfg.outputs.partitions
        self.tables = {
            name: app.Table(name, default=None, partitions=n, key_type=str, help=f"feedback {name}",
                            changelog_topic=app.topic(changelog_topic(cfg, name), partitions=n, key_type=str,
                                                      key_serializer="raw", value_serializer="json",
                                                      compacting=True))
            for name in TABLES}
        self.reader = AuditReader(cfg)
        on_trusted = None
        if telemetry is not None:
            def on_trusted(agree: bool, d: dict) -> None:
                telemetry.feedback(agree, d.get("policy_version"), d.get("model_version"))
        self.join = FeedbackJoin(cfg, self.tables, self.reader.fetch, worker_id=worker_id, on_trusted=on_trusted)
        self.sink = FaustSink(app, transactional=transactional)
        self.topics = {"audit": cfg.outputs.audit_topic, "trusted": fb.trusted_topic,
                       "reports": fb.reports_topic, "ticks": tick_topic(cfg)}
        channel = app.topic(*self.topics.values(), key_type=bytes, value_type=bytes,
                            key_serializer="raw", value_serializer="raw", partitions=cfg.outputs.partitions)
        fun = functools.partial(self._agent)
        functools.update_wrapper(fun, FeedbackWiring._agent)
        app.agent(channel, name="rsafe-feedback", concurrency=1)(fun)
        self.ticker: asyncio.Task | None = None

    async def _agent(self, stream: Any) -> None:
        async for event in stream.events():
            m = event.message
            source = SourceRef(topic=m.topic, partition=m.partition, offset=m.offset)
            try:
                if m.topic == self.topics["audit"]:
                    outs = await self.join.on_decision(m.key, m.value, source)
                elif m.topic == self.topics["ticks"]:
                    outs = self.join.on_tick(m.partition)
                else:
                    outs = await self.join.on_feedback(m.key, m.value, source,
                                                       trusted_topic=m.topic == self.topics["trusted"])
            except Exception:  # noqa: BLE001 - a bug must not stop the join; the record is logged
                log.exception("feedback join failed for %s[%d]@%d", m.topic, m.partition, m.offset)
                continue
            await self._publish(outs, source)

    async def _publish(self, outs: Sequence[Any], source: SourceRef) -> None:
        delay = 0.5
        while outs:
            try:
                tid = self.sink._transactional_id(source)
                futures = [await self.app.producer.send(o.topic, o.key, o.value, None, None, None,
                                                        transactional_id=tid) for o in outs]
                await asyncio.gather(*futures)
                return
            except NotPublishable as err:
                log.warning("feedback outputs not published: %s (the record is redelivered)", err)
                raise
            except Exception as err:  # noqa: BLE001 - broker trouble: retry, never skip
                log.warning("publishing %d feedback outputs failed: %s; retrying in %.1f s", len(outs), err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def tick_forever(self) -> None:
        """One tick per assigned tick-topic partition every ``feedback.expiry_interval_s``."""
        while True:
            await asyncio.sleep(self.cfg.feedback.expiry_interval_s)
            try:
                parts = sorted(tp.partition for tp in self.app.consumer.assignment()
                               if tp.topic == self.topics["ticks"])
                for p in parts:
                    await self.app.producer.send(self.topics["ticks"], None, b"tick", p, None, None)
            except Exception as err:  # noqa: BLE001 - the next tick tries again
                log.debug("feedback tick failed: %s", err)
