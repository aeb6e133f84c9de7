"""The feedback agent's Faust wiring: its tables, its agent and tick timer, and the audit reader
(the join itself, without Faust: ``rsafe.stream.feedback``)."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any, Sequence

import faust

from rsafe.schemas.records import SourceRef
from rsafe.stream.app import FaustSink
from rsafe.stream.config import StreamConfig
from rsafe.stream.pipeline import NotPublishable

log = logging.getLogger("rsafe.stream.feedback_agent")


class AuditReader:
    """Reads one audit record back by its pointer (topic, partition, offset), for a disagreement's
    content and reasoning. A group-less consumer, started on first use."""

    def __init__(self, bootstrap: Sequence[str], client_kwargs: dict[str, Any]):
        self.bootstrap, self.client_kwargs = list(bootstrap), client_kwargs
        self._consumer: Any = None

    async def fetch(self, ptr: dict) -> dict | None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                              enable_auto_commit=False, client_id="rsafe-audit-reader",
                                              **self.client_kwargs)
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
        self.reader = AuditReader(cfg.bootstrap, cfg.security.client_kwargs())
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
                tid = self.sink.transactional_id(source)
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
