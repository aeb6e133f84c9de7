"""Small blocking Kafka helpers (kafka-python) for ``rsafe produce`` / ``rsafe tail``, the demo and tests.

Input files are JSONL. A line is sent as it is (its bytes are the message value), so malformed
lines reach the worker and its DLQ. With ``envelope=True`` a line may instead be
``{"topic": T, "value": {...event...}}`` or ``{"topic": T, "raw": "bytes as text"}`` (the bundled
demo file uses this to spread events over topics).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from rsafe.schemas.kafka import Outgoing, send_all


@dataclass
class Message:
    topic: str | None
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None = None


def _key_of(obj: Any, key_field: str) -> bytes | None:
    if isinstance(obj, dict):
        k = obj.get(key_field)
        if isinstance(k, (str, int)) and not isinstance(k, bool):
            return str(k).encode("utf-8", "surrogatepass")
    return None


def read_messages(path: str | Path, *, key_field: str = "conversation_id", envelope: bool = False) -> list[Message]:
    """One message per non-blank line of a JSONL file (see the module docstring)."""
    out = []
    with open(path, "rb") as f:
        for line in f:
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if envelope and isinstance(obj, dict) and "topic" in obj and ("value" in obj or "raw" in obj):
                if "raw" in obj:
                    out.append(Message(obj["topic"], None, str(obj["raw"]).encode("utf-8", "surrogatepass")))
                else:
                    value = obj["value"]
                    out.append(Message(obj["topic"], _key_of(value, key_field),
                                       json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")))
                continue
            out.append(Message(None, _key_of(obj, key_field), line))
    return out


def produce(bootstrap: Sequence[str], messages: Iterable[Message], *, topic: str | None = None,
            client_kwargs: dict[str, Any] | None = None, timeout_s: float = 60.0) -> int:
    """Send messages (``topic`` overrides each message's own); returns how many were acknowledged."""
    def outgoing(m: Message) -> Outgoing:
        if not (topic or m.topic):
            raise ValueError("a message has no topic: pass --topic")
        return (topic or m.topic, m.key, m.value, m.headers)  # type: ignore[return-value]

    return send_all(bootstrap, map(outgoing, messages), client_id="rsafe-produce", client_kwargs=client_kwargs,
                    timeout_s=timeout_s, linger_ms=5)


def consumer(bootstrap: Sequence[str], topics: Sequence[str], *, from_beginning: bool = True,
             read_committed: bool = False, client_kwargs: dict[str, Any] | None = None):
    """A group-less consumer assigned to every partition of ``topics``."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=list(bootstrap), enable_auto_commit=False, group_id=None,
                      isolation_level="read_committed" if read_committed else "read_uncommitted",
                      client_id="rsafe-tail", **(client_kwargs or {}))
    tps = []
    deadline = time.monotonic() + 10
    for t in topics:
        parts = c.partitions_for_topic(t)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = c.partitions_for_topic(t)
        tps += [TopicPartition(t, p) for p in sorted(parts or [])]
    c.assign(tps)
    if from_beginning:
        c.seek_to_beginning(*tps)
    else:
        c.seek_to_end(*tps)
    return c


def iter_records(bootstrap: Sequence[str], topics: Sequence[str], *, idle_timeout_s: float | None = 2.0,
                 follow: bool = False, max_records: int | None = None, from_beginning: bool = True,
                 read_committed: bool = False, client_kwargs: dict[str, Any] | None = None) -> Iterator[Any]:
    """Yield records until ``max_records``, or ``idle_timeout_s`` without one (unless ``follow``)."""
    c = consumer(bootstrap, topics, from_beginning=from_beginning, read_committed=read_committed,
                 client_kwargs=client_kwargs)
    n, last = 0, time.monotonic()
    try:
        while True:
            batch = c.poll(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    yield r
                    n += 1
                    if max_records is not None and n >= max_records:
                        return
            if batch:
                last = time.monotonic()
            elif not follow and idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
                return
    finally:
        c.close()


def read_all(bootstrap: Sequence[str], topics: Sequence[str], **kw: Any) -> list[Any]:
    return list(iter_records(bootstrap, topics, **kw))


def end_offsets(bootstrap: Sequence[str], topics: Sequence[str], client_kwargs: dict[str, Any] | None = None) -> dict:
    c = consumer(bootstrap, topics, client_kwargs=client_kwargs)
    try:
        return {(tp.topic, tp.partition): off for tp, off in c.end_offsets(list(c.assignment())).items()}
    finally:
        c.close()


def committed_offsets(bootstrap: Sequence[str], group_id: str, topics: Sequence[str],
                      client_kwargs: dict[str, Any] | None = None) -> dict:
    """The group's committed offset for every partition of ``topics`` (None when none)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=list(bootstrap), group_id=group_id, enable_auto_commit=False,
                      **(client_kwargs or {}))
    try:
        out = {}
        for t in topics:
            for p in sorted(c.partitions_for_topic(t) or []):
                out[(t, p)] = c.committed(TopicPartition(t, p))
        return out
    finally:
        c.close()
