"""Conversation context: the recent turns of each conversation, per input topic, in a Faust table.

Input records are keyed by conversation id, so a conversation stays on one partition, in order.
For every input topic with ``context.enabled`` the worker keeps one table (keyed like the input,
co-partitioned with it through a changelog topic of the same partition count) whose value for a
conversation is its recent turns: the prompt and response texts of its earlier events on that
topic, oldest first, each with its event id. The guard's reasoning and verdicts never enter it.

``ConversationContext.use`` runs as an event is routed (consume order), so two turns of one
conversation in one micro-batch see each other in order. It returns the turns to show the model,
their event ids (named in the audit record) and the changelog record of the update; the worker
publishes that record with the event's verdict — in the same Kafka transaction under
``exactly_once`` — so a restarted worker's table (rebuilt from the changelog) holds exactly the
turns whose verdicts were published. A redelivered event finds its own turns in the table: it is
shown the turns before them and nothing is stored twice.

Erasure: a *control record* on the input topic, keyed by the conversation id (so it is processed in
order with the conversation's events, in its partition's transaction), with the header
``rsafe-control: context-forget`` and the value ``{"conversation_id": ..., "event_id": ...}``:
without ``event_id`` the whole conversation is tombstoned; with it, that event's turns are removed.
``rsafe context forget`` and ``rsafe feedback forget`` send them. Idle conversations expire after
``context.ttl``: never shown once expired, tombstoned by a sweep of their partition, and removed
from the changelog by its retention (docs/STREAM.md, "Conversation context").
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, MutableMapping

from rsafe.models.conversation import Turn
from rsafe.stream.config import InputTopic, StreamConfig

CONTROL_HEADER = "rsafe-control"
FORGET = b"context-forget"

Skipped = Literal["disabled", "messages", "no_key", "key_mismatch"]


def forget_record(topic: str, conversation_id: str, event_id: str | None = None) -> Any:
    """The control record that erases a conversation's context (or one event's turns of it)."""
    from rsafe.stream.clients import Message

    body = {"conversation_id": conversation_id, **({"event_id": event_id} if event_id else {})}
    return Message(topic, conversation_id.encode("utf-8", "surrogatepass"), json.dumps(body).encode("utf-8"),
                   headers=[(CONTROL_HEADER, FORGET)])


def table_name(topic: str) -> str:
    """The Faust table of an input topic's conversation context."""
    return f"context-{topic}"


def changelog_topic(cfg: StreamConfig, topic: str) -> str:
    """The changelog topic of an input topic's context table (Faust's naming)."""
    return f"{cfg.group_id}-{table_name(topic)}-changelog"


def changelog_specs(cfg: StreamConfig) -> list[tuple[str, int, dict[str, str]]]:
    """The context changelog topics: one per input topic with context, as many partitions as the
    input topic, compacted (one record per conversation) *and* deleted after ``ttl`` (a conversation
    idle longer than that leaves the topic even if no sweep tombstoned it), with compaction due
    within ``max_compaction_lag_s`` (how long an erased or replaced text can survive on the broker)."""
    specs = []
    for t in cfg.inputs:
        c = t.context
        if not c.enabled:
            continue
        ttl_ms = int(c.ttl * 1000)
        lag_ms = int(c.max_compaction_lag_s * 1000)
        specs.append((changelog_topic(cfg, t.topic), t.partitions, {
            "cleanup.policy": "compact,delete", "retention.ms": str(ttl_ms),
            "max.compaction.lag.ms": str(lag_ms), "segment.ms": str(max(min(lag_ms, ttl_ms), 60_000)),
        }))
    return specs


@dataclass
class ContextUse:
    """What routing one event did with its conversation's context."""

    turns: list[Turn] = field(default_factory=list)
    """Earlier turns to show the model, oldest first (the guard keeps the newest that fit)."""
    event_ids: list[str] = field(default_factory=list)
    """The event id of each turn in ``turns``."""
    changelog: list[tuple[str, int, bytes, bytes | None]] = field(default_factory=list)
    """(topic, partition, key, value) records to publish with the event's outcome (None: tombstone)."""
    source: Literal["table", "event"] | None = None
    skipped: Skipped | None = None
    """Why the table was not used (None when it was, or when the event brought its own history)."""
    undo: Callable[[], None] | None = None
    """Puts the conversation back as it was (the event is rejected after all: it never joins it)."""


class ContextError(ValueError):
    """A control record that cannot be applied (the message says why)."""


def _turns_of(event_id: str, prompt: str, response: str | None, max_chars: int) -> list[dict[str, str]]:
    out = [{"e": event_id, "r": "user", "t": prompt[-max_chars:]}]
    if response is not None:
        out.append({"e": event_id, "r": "assistant", "t": response[-max_chars:]})
    return out


class ConversationContext:
    """The conversation tables of the input topics with ``context.enabled``.

    ``tables[topic]`` is the store of that topic's Faust table, a mapping of conversation key →
    ``{"p": partition, "u": last update (epoch s), "turns": [{"e": event id, "r": role, "t": text}]}``
    (plain dicts in the unit tests). ``in_partition(partition)`` is entered around every access: a
    RocksDB store keeps one database per partition and finds it through Faust's current event.
    """

    def __init__(self, cfg: StreamConfig, tables: dict[str, MutableMapping[str, Any]], *,
                 in_partition: Callable[[int], Any] | None = None, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.tables = tables
        self.clock = clock
        self._in_partition = in_partition
        self._swept: dict[tuple[str, int], float] = {}

    def enabled(self, topic: InputTopic) -> bool:
        return topic.context.enabled and topic.topic in self.tables

    def _partition(self, partition: int) -> Any:
        return self._in_partition(partition) if self._in_partition is not None else contextlib.nullcontext()

    def _record(self, topic: str, partition: int, key: str, value: dict[str, Any] | None) -> tuple:
        data = None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "surrogatepass")
        return (changelog_topic(self.cfg, topic), partition, key.encode("utf-8", "surrogatepass"), data)

    def use(self, topic: InputTopic, key: bytes | None, partition: int, event_id: str, conversation_id: str | None,
            prompt: str, response: str | None) -> ContextUse:
        """The context of one routed event, and the update that adds its turns (see the module doc)."""
        if not self.enabled(topic):
            return ContextUse(skipped="disabled")
        if not key:
            return ContextUse(skipped="no_key")
        conv = key.decode("utf-8", "surrogatepass")
        if conversation_id is not None and conversation_id != conv:
            return ContextUse(skipped="key_mismatch")
        c = topic.context
        now = self.clock()
        with self._partition(partition):
            table = self.tables[topic.topic]
            entry = table.get(conv)
            if entry is not None and now - entry.get("u", 0) > c.ttl:
                entry = None  # expired: never shown; the sweep tombstones it
            turns: list[dict[str, str]] = list(entry["turns"]) if entry else []
            mine = [i for i, t in enumerate(turns) if t.get("e") == event_id]
            if mine:  # redelivered: its turns are stored; show what came before them, store nothing
                before = turns[: mine[0]]
                return ContextUse([Turn(role=t["r"], content=t["t"]) for t in before],
                                  [t["e"] for t in before], source="table")
            shown = turns
            turns = (turns + _turns_of(event_id, prompt, response, c.max_turn_chars))[-c.max_turns:]
            value = {"p": partition, "u": round(now, 3), "turns": turns}
            before_entry = table.get(conv)
            table[conv] = value

        def undo() -> None:
            with self._partition(partition):
                if before_entry is None:
                    self.tables[topic.topic].pop(conv, None)
                else:
                    self.tables[topic.topic][conv] = before_entry

        return ContextUse([Turn(role=t["r"], content=t["t"]) for t in shown], [t["e"] for t in shown],
                          [self._record(topic.topic, partition, conv, value)], source="table", undo=undo)

    def forget(self, topic: InputTopic, key: bytes | None, partition: int, value: bytes | None) -> list[tuple]:
        """Apply a ``context-forget`` control record: the changelog records to publish."""
        try:
            body = json.loads(value) if value else {}
        except ValueError:
            raise ContextError("the control record's value is not JSON") from None
        if not isinstance(body, dict):
            raise ContextError("the control record's value must be a JSON object")
        conv = body.get("conversation_id") or (key.decode("utf-8", "surrogatepass") if key else None)
        if not isinstance(conv, str) or not conv:
            raise ContextError("a context-forget record needs conversation_id (or a key)")
        if key and key.decode("utf-8", "surrogatepass") != conv:
            raise ContextError(f"the record's key {key!r} is not its conversation_id {conv!r}: it was not "
                               "written to the conversation's partition")
        if not self.enabled(topic):
            return []
        event_id = body.get("event_id")
        with self._partition(partition):
            table = self.tables[topic.topic]
            entry = table.get(conv)
            if event_id is None or entry is None:
                if conv in table:
                    del table[conv]
                return [self._record(topic.topic, partition, conv, None)]
            turns = [t for t in entry["turns"] if t.get("e") != event_id]
            if not turns:
                del table[conv]
                return [self._record(topic.topic, partition, conv, None)]
            value = {**entry, "turns": turns}
            table[conv] = value
            return [self._record(topic.topic, partition, conv, value)]

    def sweep(self, topic: InputTopic, partition: int, *, every_s: float = 60.0) -> list[tuple]:
        """Tombstones for the conversations of ``partition`` idle longer than ``ttl`` (at most once
        per ``every_s`` per partition; run as the partition's events are routed)."""
        if not self.enabled(topic):
            return []
        now = self.clock()
        if now - self._swept.get((topic.topic, partition), 0.0) < every_s:
            return []
        self._swept[(topic.topic, partition)] = now
        ttl = topic.context.ttl
        out = []
        with self._partition(partition):
            table = self.tables[topic.topic]
            expired = [k for k, v in list(table.items()) if v and v.get("p") == partition and now - v.get("u", 0) > ttl]
            for k in expired:
                del table[k]
                out.append(self._record(topic.topic, partition, k, None))
        return out

