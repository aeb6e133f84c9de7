"""Faust's and aiokafka's private attributes the worker reads, each behind a named function
(why each is needed: ``rsafe.stream.compat``)."""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator


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
    from faust.streams import _current_event  # noqa: PLC2701 - Faust's context variable

    event = _PartitionEvent(partition)
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


def aiokafka_producer(app: Any) -> Any:
    """The aiokafka producer under Faust's (started on first use)."""
    return app.producer._ensure_producer()  # noqa: SLF001


def partitioner(producer: Any) -> Callable[..., int]:
    """The producer's configured partitioner, called as ``send()`` calls it."""
    return producer._partition  # noqa: SLF001


async def wait_on_metadata(producer: Any, topic: str) -> None:
    """Wait until the producer knows ``topic``'s partitions (what ``send()`` waits for per record)."""
    await producer.client._wait_on_metadata(topic)  # noqa: SLF001


def has_transaction(app: Any, transactional_id: str) -> bool:
    """Whether Faust's producer holds an open transaction of that id (exactly_once)."""
    producers = getattr(app.producer, "_transaction_producers", None)
    return producers is None or transactional_id in producers


def read_offset(consumer: Any, tp: Any) -> int | None:
    """The last offset Faust's consumer delivered of ``tp`` (None before the first)."""
    return consumer._read_offset.get(tp)  # noqa: SLF001


def buffer_full_count(app: Any) -> int:
    """How often Faust's stream buffers were full (its monitor's count; 0 without a monitor)."""
    monitor = getattr(app, "_monitor", None)
    full = getattr(monitor, "topic_buffer_full", None) if monitor is not None else None
    return sum(full.values()) if full else 0
