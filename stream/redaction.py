"""Keyed content digests for ``audit.content: hash``.

A plain sha256 of a short message lets anyone who can guess it confirm the guess offline (hash
"kill him" and compare). ``hash`` mode therefore writes an HMAC-SHA-256 under a secret key from
the environment, so only a holder of the key can. Each digest names its key (``hash_key_id``) so
keys can rotate: the current key signs, previous keys still verify the feedback join's content
check on older records.

Environment:

* ``RSAFE_AUDIT_HASH_KEY``           the current key (at least 32 characters; e.g. ``openssl rand -hex 32``)
* ``RSAFE_AUDIT_HASH_KEY_ID``        its name in records (default: a fingerprint of the key)
* ``RSAFE_AUDIT_HASH_PREVIOUS_KEYS`` earlier keys that still verify: ``ID=KEY`` items, whitespace-separated
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Mapping

HASH_KEY_ENV = "RSAFE_AUDIT_HASH_KEY"
HASH_KEY_ID_ENV = "RSAFE_AUDIT_HASH_KEY_ID"
PREVIOUS_KEYS_ENV = "RSAFE_AUDIT_HASH_PREVIOUS_KEYS"
MIN_KEY_CHARS = 32


class HashKeyError(ValueError):
    """The key for ``audit.content: hash`` is missing or unusable; the message says how to set it."""


def key_fingerprint(key: bytes) -> str:
    """A default key id: names the key without revealing it (a hash of the key, not of content)."""
    return "k-" + hashlib.sha256(b"rsafe-audit-hash-key-id\0" + key).hexdigest()[:12]


@dataclass(frozen=True)
class ContentHasher:
    """HMAC-SHA-256 of message texts under the current key; verification under any known key."""

    key: bytes
    key_id: str
    previous: Mapping[str, bytes] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ContentHasher:
        env = os.environ if env is None else env
        raw = env.get(HASH_KEY_ENV, "")
        if not raw:
            raise HashKeyError(
                f"audit.content is 'hash' but {HASH_KEY_ENV} is not set. The audit keeps an HMAC-SHA-256 "
                f"of each message under a secret key (a plain sha256 would let anyone confirm a guessed "
                f"message). Set it to {MIN_KEY_CHARS}+ random characters, e.g. "
                f"`export {HASH_KEY_ENV}=$(openssl rand -hex 32)` (in Kubernetes, from a Secret), and keep it: "
                f"the feedback join verifies reviewers' content against it. Or choose audit.content: redacted.")
        if len(raw) < MIN_KEY_CHARS:
            raise HashKeyError(f"{HASH_KEY_ENV} is {len(raw)} characters; use at least {MIN_KEY_CHARS} "
                               f"random characters (e.g. `openssl rand -hex 32`)")
        key = raw.encode("utf-8")
        previous: dict[str, bytes] = {}
        for item in env.get(PREVIOUS_KEYS_ENV, "").split():
            kid, sep, old = item.partition("=")
            if not sep or not kid or not old:
                raise HashKeyError(f"{PREVIOUS_KEYS_ENV}: expected ID=KEY items separated by spaces, got {kid!r}…")
            previous[kid] = old.encode("utf-8")
        return cls(key, env.get(HASH_KEY_ID_ENV) or key_fingerprint(key), previous)

    def digest(self, text: str | None) -> str | None:
        if text is None:
            return None
        return hmac.new(self.key, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def verify(self, text: str, digest: str, key_id: str | None) -> bool | None:
        """Whether ``text`` has ``digest`` under the key ``key_id``; None when that key is unknown here."""
        key = self.key if key_id in (None, self.key_id) else self.previous.get(key_id)  # type: ignore[arg-type]
        if key is None:
            return None
        mine = hmac.new(key, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
        return hmac.compare_digest(mine, digest)


def content_hasher(content_mode: str, env: Mapping[str, str] | None = None) -> ContentHasher | None:
    """The hasher ``audit.content`` needs: one for ``hash`` (``HashKeyError`` without a key), else None."""
    return ContentHasher.from_env(env) if content_mode == "hash" else None
