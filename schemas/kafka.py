"""Blocking Kafka helpers of the contract (kafka-python), used by the worker's commands and the
retraining job alike: read topics to their end, publish keyed records and wait for the broker,
read the policy store.

Batch readers here never join a consumer group (partitions are assigned by hand, so no rebalance
can stall them); a ``group_id`` only stores where a reader got to (``EndRead.commit``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from rsafe.policies.store import PolicyIntegrityError, PolicyStore

log = logging.getLogger("rsafe.schemas.kafka")

METADATA_WAIT_S = 10.0
"""How long a reader waits for a topic's partitions to appear in the broker's metadata."""


class KafkaReadError(RuntimeError):
    """A topic could not be read to its end (missing, or the reading took too long)."""


def servers(bootstrap: str | Sequence[str]) -> list[str]:
    return [bootstrap] if isinstance(bootstrap, str) else list(bootstrap)


@dataclass
class EndRead:
    """Records of some topics from a start position to the end offsets seen when it opened.

    The start is the group's committed offset (``group_id``), else the beginning. Iterate it once;
    then ``offsets`` says ``{(topic, partition): (start, reached)}``. ``commit()`` stores the reached
    positions for the group and closes the consumer; ``close()`` only closes it.
    """

    consumer: Any
    ends: dict[Any, int]
    starts: dict[Any, int]
    group_id: str | None
    timeout_s: float
    reached: dict[Any, int] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        c = self.consumer
        deadline = time.monotonic() + self.timeout_s
        left = {tp for tp, end in self.ends.items() if self.starts[tp] < end}
        self.reached = dict(self.starts)
        while left:
            if time.monotonic() > deadline:
                topics = ", ".join(sorted({tp.topic for tp in left}))
                raise KafkaReadError(f"reading {topics} to its end took over {self.timeout_s:g} s")
            for tp, records in c.poll(timeout_ms=500).items():
                for r in records:
                    if r.offset < self.ends[tp]:
                        yield r
            for tp in list(left):  # the position also passes compacted-away offsets and transaction markers
                self.reached[tp] = min(c.position(tp), self.ends[tp])
                if self.reached[tp] >= self.ends[tp]:
                    left.discard(tp)

    @property
    def offsets(self) -> dict[tuple[str, int], tuple[int, int]]:
        return {(tp.topic, tp.partition): (self.starts[tp], self.reached.get(tp, self.starts[tp]))
                for tp in self.ends}

    def commit(self) -> None:
        from kafka.structs import OffsetAndMetadata

        try:
            if self.group_id is not None and self.reached:
                self.consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in self.reached.items()})
        finally:
            self.close()

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> EndRead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_to_end(bootstrap: str | Sequence[str], topics: Sequence[str], *, group_id: str | None = None,
                client_id: str = "rsafe-reader", client_kwargs: dict[str, Any] | None = None,
                timeout_s: float = 60.0, missing_ok: bool = False) -> EndRead:
    """Open a reader of ``topics`` up to their current end offsets (a compacted topic's current
    state, or a batch of new records after ``group_id``'s committed offsets). A topic that does
    not exist raises ``KafkaReadError``, or reads as empty with ``missing_ok``."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=servers(bootstrap), group_id=group_id, enable_auto_commit=False,
                             auto_offset_reset="earliest", client_id=client_id, **(client_kwargs or {}))
    try:
        parts = []
        for topic in topics:
            ids = consumer.partitions_for_topic(topic)
            deadline = time.monotonic() + (METADATA_WAIT_S if missing_ok else 0.0)
            while not ids and time.monotonic() < deadline:
                time.sleep(0.2)
                ids = consumer.partitions_for_topic(topic)
            if not ids and not missing_ok:
                raise KafkaReadError(f"topic {topic!r} does not exist on {','.join(servers(bootstrap))}")
            parts += [TopicPartition(topic, p) for p in sorted(ids or ())]
        consumer.assign(parts)
        ends = consumer.end_offsets(parts) if parts else {}
        starts = {tp: consumer.position(tp) for tp in parts}
    except BaseException:
        consumer.close()
        raise
    return EndRead(consumer, ends, starts, group_id, timeout_s)


Outgoing = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]] | None]
"""A record to send: (topic, key, value, headers); a ``None`` value is a tombstone."""


def send_all(bootstrap: str | Sequence[str], records: Iterable[Outgoing], *, client_id: str = "rsafe-publish",
             client_kwargs: dict[str, Any] | None = None, timeout_s: float = 60.0, linger_ms: int = 0) -> int:
    """Send ``records`` (acks=all) and wait until the broker has every one; a failure raises.
    Returns how many were written."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=servers(bootstrap), acks="all", linger_ms=linger_ms,
                             client_id=client_id, **(client_kwargs or {}))
    try:
        futures = [producer.send(topic, key=key, value=value, headers=headers or None)
                   for topic, key, value, headers in records]
        producer.flush(timeout=timeout_s)
        for f in futures:
            f.get(timeout=timeout_s)
        return len(futures)
    finally:
        producer.close(timeout=5)


def publish(bootstrap: str | Sequence[str], topic: str, records: Sequence[tuple[str, bytes | None]], *,
            client_id: str = "rsafe-publish", client_kwargs: dict[str, Any] | None = None,
            timeout_s: float = 60.0) -> int:
    """Send ``(key, value)`` records of one topic (a control record, policy versions) and wait."""
    return send_all(bootstrap, ((topic, k.encode("utf-8"), v, None) for k, v in records), client_id=client_id,
                    client_kwargs=client_kwargs, timeout_s=timeout_s)


def read_policy_store(bootstrap: str | Sequence[str], topic: str, *, strict: bool,
                      client_kwargs: dict[str, Any] | None = None, timeout_s: float = 60.0) -> PolicyStore:
    """Every policy version on the compacted policies topic, as the workers published them.

    ``strict``: an unreadable or tampered record raises ``PolicyIntegrityError`` naming it (the
    retraining job: a training row must never be rendered from a text that is not its version);
    otherwise it is logged and skipped (the worker, the CLI). A topic that does not exist yet is an
    empty store unless ``strict``.
    """
    def skip(where: str, err: PolicyIntegrityError) -> None:
        log.warning("skipping %s: %s", where, err)

    with read_to_end(bootstrap, [topic], client_id="rsafe-policies", client_kwargs=client_kwargs,
                     timeout_s=timeout_s, missing_ok=not strict) as reader:
        return PolicyStore.from_topic_values(
            ((f"{r.topic}[{r.partition}]@{r.offset}", r.value) for r in reader),
            on_unreadable=None if strict else skip)
