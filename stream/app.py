"""Faust wiring, in one place: the app, its consumer, the moderation agent and the sink.

Messages are read as raw bytes (``value_serializer="raw"``) so that a malformed event reaches the
worker and goes to the DLQ instead of failing inside Faust's decoder. The consumer hands the
moderation topics' messages to the agent a fetched batch at a time (``rsafe.stream.intake``); the
agent micro-batches them into the pipeline and acks nothing itself: ``BatchPipeline`` acks each
message after its records were acknowledged by the broker, and Faust commits acked offsets.

What this uses of Faust's and aiokafka's insides is in ``rsafe.stream.compat`` (the bulk-delivering
consumer, the producer internals of the batch sink), with why; the feedback agent's wiring is in
``rsafe.stream.feedback_agent``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import tempfile
from datetime import datetime
from typing import Any, Awaitable, Callable, Sequence

import faust

from rsafe.schemas.records import SourceRef
from rsafe.stream.compat import internals
from rsafe.stream.compat.consumer import Transport
from rsafe.stream.config import Batching, StreamConfig
from rsafe.stream.intake import Intake
from rsafe.stream.moderate import Incoming, Outcome
from rsafe.stream.pipeline import BatchPipeline, NotPublishable

log = logging.getLogger("rsafe.stream.app")

AGENT_NAME = "rsafe-moderate"


def client_id() -> str:
    """The Kafka client id of this process: ``rsafe-<host>-<pid>`` (how a worker recognises another
    live worker of its own host in the group's member list)."""
    return f"rsafe-{socket.gethostname()}-{os.getpid()}"


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

    def transactional_id(self, source: SourceRef) -> str | None:
        if not self.transactional:
            return None
        try:
            group = self.app.assignor.group_for_topic(source.topic)
        except KeyError:
            raise NotPublishable(f"{source.topic} is not assigned to this worker any more") from None
        tid = f"{self.app.conf.id}-{group}-{source.partition}"
        if not internals.has_transaction(self.app, tid):
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
            tid = self.transactional_id(o.incoming.source)
            for r in o.records:
                futures.append(await producer.send(r.topic, r.key, r.value, r.partition, None, r.headers,
                                                   transactional_id=tid))
        if futures:
            await asyncio.gather(*futures)

    async def _write_batches(self, outcomes: Sequence[Outcome]) -> None:
        producer = internals.aiokafka_producer(self.app)
        partition = internals.partitioner(producer)
        builders: dict[tuple[str, int], Any] = {}
        futures = []
        ready: set[str] = set()
        for o in outcomes:
            for r in o.records:
                if r.topic not in ready:  # the topic's partitions known (what send() waits for per record)
                    await internals.wait_on_metadata(producer, r.topic)
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


def wire(app: faust.App, topics: Sequence[str], pipeline: BatchPipeline, batch: Batching, *,
         crash_marker: str | None = None) -> Any:
    """Register the moderation agent on the input ``topics`` (one channel, one agent instance), fed
    by the consumer through an ``Intake`` of ``batch.intake_size`` events. ``crash_marker``: the
    ``faults`` test hook (an error no guard catches)."""
    topics = list(topics)
    channel = app.topic(*topics, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    intake: Intake[Incoming] = Intake(batch.intake_size)
    convert: Callable[[Any, float, Any], Incoming] = to_incoming
    if crash_marker:
        from rsafe.stream.faults import crash_on_marker

        convert = crash_on_marker(to_incoming, crash_marker)
    app.consumer.attach_intake(topics, intake, convert)
    app.intake = intake  # type: ignore[attr-defined] - held here (flow control keeps a weak reference)
    fun = functools.partial(moderate_agent, intake=intake, pipeline=pipeline, batch_size=batch.size,
                            linger_s=batch.linger_ms / 1000)
    functools.update_wrapper(fun, moderate_agent)
    return app.agent(channel, name=AGENT_NAME, concurrency=1)(fun)
