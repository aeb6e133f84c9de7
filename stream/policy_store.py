"""The policy store on Kafka: a compacted topic (``outputs.policies_topic``, default
``rsafe.policies``), key ``name@version``, value a ``StoredPolicy`` (JSON).

The worker publishes every policy it loads — at start and on each reload — before it judges with
it. Publishing is idempotent: a version already on the topic is not written again, so its
first-seen time and publisher stay those of the first worker that loaded it. Readers keep the
first record of a key. ``rsafe.schemas.kafka.read_policy_store`` builds a ``rsafe.policies.PolicyStore``
from the topic (``strict=False`` here: an unreadable record is logged and skipped).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from rsafe.policies import PolicyRegistry
from rsafe.policies.store import StoredPolicy
from rsafe.schemas.kafka import publish, read_policy_store

log = logging.getLogger("rsafe.stream.policy_store")


class PolicyPublisher:
    """Publishes policy versions the topic does not hold yet (blocking; call it off the loop)."""

    def __init__(self, bootstrap: Sequence[str], topic: str, worker_id: str,
                 client_kwargs: dict[str, Any] | None = None):
        self.bootstrap = list(bootstrap)
        self.topic = topic
        self.worker_id = worker_id
        self.client_kwargs = client_kwargs or {}
        self.known: set[str] | None = None

    def publish(self, registry: PolicyRegistry) -> list[str]:
        """Write every version of ``registry`` missing from the topic; returns the keys written.
        Raises on a broker failure (the caller then does not use the new policies)."""
        if self.known is None:
            self.known = set(read_policy_store(self.bootstrap, self.topic, strict=False,
                                                client_kwargs=self.client_kwargs).keys())
        new = [StoredPolicy.of(registry.get(n), self.worker_id) for n in registry.names()]
        new = [r for r in new if r.key not in self.known]
        if not new:
            return []
        publish(self.bootstrap, self.topic, [(r.key, r.to_json()) for r in new], client_id="rsafe-policies",
                client_kwargs=self.client_kwargs, timeout_s=30)
        self.known.update(r.key for r in new)
        return [r.key for r in new]
