"""Every policy version that judged anything, retrievable by ``name@version``.

A verdict names ``policy`` + ``policy_version`` (a content hash). ``PolicyStore`` keeps the text
each version stood for, so an auditor can read the policy behind an old verdict, the retraining
job can render a disagreement under the exact policy it was judged with, and a replay under an
older version is possible. The store itself is plain data: the stream worker fills it from (and
publishes to) a compacted Kafka topic (``rsafe.stream.policy_store``); ``rsafe policy show
NAME@VERSION`` and ``rsafe policy history NAME`` read it.

A stored version is checked on read: its content must hash to its version; a mismatch is an
error (``PolicyIntegrityError``), never silently used.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rsafe.policies.policy import Policy, PolicyError, UnknownPolicyError

SCHEMA_VERSION = 1


class PolicyIntegrityError(PolicyError):
    """A stored policy whose content does not hash to its version (tampered or corrupted)."""


def policy_key(name: str, version: str) -> str:
    """The store's key: ``name@version``."""
    return f"{name}@{version}"


def parse_key(ref: str) -> tuple[str, str | None]:
    """``name@version`` → (name, version); a bare name → (name, None)."""
    name, sep, version = ref.partition("@")
    if not name or (sep and not version):
        raise PolicyError(f"{ref!r}: expected NAME or NAME@VERSION")
    return name, version or None


class StoredPolicy(BaseModel):
    """One policy version as kept in the store (the value on the policies topic)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: str
    policy: dict[str, Any]
    """The policy's full content (``Policy.model_dump(mode="json")``), description included."""
    first_seen_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    published_by: str | None = None
    """The worker that first published this version."""

    @property
    def key(self) -> str:
        return policy_key(self.name, self.version)

    @classmethod
    def of(cls, policy: Policy, published_by: str | None = None) -> StoredPolicy:
        return cls(name=policy.name, version=policy.version, policy=policy.model_dump(mode="json"),
                   published_by=published_by)

    def load(self) -> Policy:
        """The policy, after checking that its content hashes to the stored version."""
        try:
            policy = Policy.model_validate(self.policy)
        except ValidationError as err:
            raise PolicyIntegrityError(f"stored policy {self.key} is not a valid policy: {err}") from None
        if policy.name != self.name or policy.version != self.version:
            raise PolicyIntegrityError(
                f"stored policy {self.key}: its content hashes to {policy.name}@{policy.version}; "
                "the stored text was changed after it was published and cannot be trusted")
        return policy

    def to_json(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> StoredPolicy:
        try:
            return cls.model_validate(json.loads(data))
        except (ValueError, ValidationError) as err:
            raise PolicyIntegrityError(f"unreadable stored policy record: {err}") from None


class PolicyStore:
    """Policy versions by ``name@version`` (the first record seen for a key is kept)."""

    def __init__(self, records: Iterable[StoredPolicy] = ()):
        self._records: dict[str, StoredPolicy] = {}
        for r in records:
            self.add(r)

    @classmethod
    def from_topic_values(cls, values: Iterable[tuple[str, bytes | None]], *,
                          on_unreadable: Callable[[str, PolicyIntegrityError], object] | None = None) -> PolicyStore:
        """A store from the policies topic's records, ``(where, value)`` in offset order: tombstones
        are skipped and the first record of a key is kept. An unreadable record raises
        ``PolicyIntegrityError`` naming where it is, unless ``on_unreadable`` takes it (the stream
        worker logs and skips it; the retraining job lets it raise)."""
        store = cls()
        for where, value in values:
            if value is None:  # a tombstone
                continue
            try:
                store.add(StoredPolicy.from_json(value))
            except PolicyIntegrityError as err:
                if on_unreadable is None:
                    raise PolicyIntegrityError(f"{where}: {err}") from None
                on_unreadable(where, err)
        return store

    def add(self, record: StoredPolicy) -> bool:
        """Keep ``record`` unless its key is already stored; True when it was new."""
        if record.key in self._records:
            return False
        self._records[record.key] = record
        return True

    def keys(self) -> list[str]:
        return list(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def record(self, name: str, version: str) -> StoredPolicy:
        try:
            return self._records[policy_key(name, version)]
        except KeyError:
            known = ", ".join(r.version for r in self.history(name)) or "none"
            raise UnknownPolicyError(f"policy {policy_key(name, version)} is not in the store "
                                     f"(stored versions of {name!r}: {known})") from None

    def get(self, name: str, version: str) -> Policy:
        """The exact policy ``name@version`` judged with (integrity checked)."""
        return self.record(name, version).load()

    def history(self, name: str) -> list[StoredPolicy]:
        """The stored versions of ``name``, oldest first."""
        return sorted((r for r in self._records.values() if r.name == name), key=lambda r: r.first_seen_at)

    def names(self) -> list[str]:
        return sorted({r.name for r in self._records.values()})
