"""The policy store on Kafka: a compacted topic (``outputs.policies_topic``, default
``rsafe.policies``), key ``name@version``, value a ``StoredPolicy`` (JSON).

The worker publishes every policy it loads — at start and on each reload — before it judges with
it. Publishing is idempotent: a version already on the topic is not written again, so its
first-seen time and publisher stay those of the first worker that loaded it. Readers keep the
first record of a key. ``read_store`` builds a ``rsafe.policies.PolicyStore`` from the topic.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from rsafe.policies import PolicyRegistry
from rsafe.policies.store import PolicyStore, StoredPolicy

log = logging.getLogger("rsafe.stream.policy_store")


def read_store(bootstrap: Sequence[str], topic: str, *, client_kwargs: dict[str, Any] | None = None,
               idle_timeout_s: float = 1.0) -> PolicyStore:
    """Every policy version on ``topic`` (unreadable records are logged and skipped)."""
    from rsafe.stream.clients import iter_records

    records = iter_records(bootstrap, [topic], idle_timeout_s=idle_timeout_s, client_kwargs=client_kwargs)
    return PolicyStore.from_topic_values(
        ((f"{r.topic}[{r.partition}]@{r.offset}", r.value) for r in records),
        on_unreadable=lambda where, err: log.warning("skipping %s: %s", where, err))


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
        from kafka import KafkaProducer

        if self.known is None:
            self.known = set(read_store(self.bootstrap, self.topic, client_kwargs=self.client_kwargs,
                                        idle_timeout_s=0.5).keys())
        new = [StoredPolicy.of(registry.get(n), self.worker_id) for n in registry.names()]
        new = [r for r in new if r.key not in self.known]
        if not new:
            return []
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", client_id="rsafe-policies",
                                 **self.client_kwargs)
        try:
            futures = [producer.send(self.topic, key=r.key.encode("utf-8"), value=r.to_json()) for r in new]
            producer.flush(timeout=30)
            for f in futures:
                f.get(timeout=30)
        finally:
            producer.close(timeout=5)
        self.known.update(r.key for r in new)
        return [r.key for r in new]
