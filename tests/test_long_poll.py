"""Client-side long polling (``rsafe.stream.compat.long_poll``): an idle aiokafka consumer stops spinning on a
broker that answers empty fetches at once, and a record that arrives is still fetched promptly."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from rsafe.stream.compat import long_poll
from rsafe.stream.broker import ensure_topics
from streamkit import kafka  # noqa: F401 - fixture


@pytest.fixture
def shim():
    assert long_poll.install(long_poll.DEFAULT_BACKOFF_MS), "aiokafka's Fetcher changed shape: the shim is off"
    yield
    long_poll.uninstall()
    long_poll.install()  # the rest of the session runs as a worker would (idempotent, process-wide)


async def _idle_then_one_record(bootstrap: str, topic: str, idle_s: float) -> tuple[int, float]:
    """Fetch requests sent while idle for ``idle_s``, and seconds from producing one record to
    consuming it."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    with long_poll.counting_fetches() as calls:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        try:
            await consumer.start()
            await producer.start()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(consumer.getone(), timeout=0.3)  # assigned and at the end of the log
            calls[0] = 0
            await asyncio.sleep(idle_s)
            idle_fetches = calls[0]
            sent = time.monotonic()
            await producer.send_and_wait(topic, b"hello")
            record = await asyncio.wait_for(consumer.getone(), timeout=10)
            assert record.value == b"hello"
            return idle_fetches, time.monotonic() - sent
        finally:
            await consumer.stop()
            await producer.stop()


def test_idle_consumer_does_not_spin_and_still_gets_records_promptly(kafka, shim):
    topic = f"lp-{uuid.uuid4().hex[:6]}"
    ensure_topics([kafka], [(topic, 1, {})])
    idle_s = 1.5
    fetches, latency = asyncio.run(_idle_then_one_record(kafka, topic, idle_s))
    # One fetch per 10 ms backoff at most (~150 in 1.5 s); without the shim the embedded broker
    # takes ~3,900/s (bench/idle_fetch.py). Against Kafka, ~3 (500 ms long polls).
    assert fetches <= idle_s * 1000 / long_poll.DEFAULT_BACKOFF_MS * 1.5, fetches
    assert latency < 1.0, latency


def test_install_is_idempotent_and_can_be_turned_off(monkeypatch):
    try:
        assert long_poll.install() and long_poll.install() and long_poll.installed()
        monkeypatch.setenv(long_poll.ENV, "0")
        assert not long_poll.install() and not long_poll.installed()
    finally:
        long_poll.uninstall()
        monkeypatch.delenv(long_poll.ENV)
        long_poll.install()
