"""Hot swap: the worker follows the model control topic (``models.control_topic``, compacted, key =
adapter name) outside its consumer group, from the start, so a new worker also sees the current
versions.

* a LoRA record for an adapter the worker serves → the new weights are loaded into the running
  engine under a new LoRA id; batches in flight finish on the old one, and every verdict from then
  on carries the new ``adapter_version``;
* a full-weights record for ``models.model_name`` → loaded at the worker's start; while running,
  the worker keeps serving the old version and reports "restart required" on ``/readyz`` (the
  orchestrator replaces pods one at a time).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Sequence

from pydantic import ValidationError

from rsafe.models.artifacts import local_copy
from rsafe.schemas.models import ModelControlRecord
from rsafe.stream.config import Models as ModelsConfig

log = logging.getLogger("rsafe.stream.models")


def read_current(bootstrap: Sequence[str], topic: str, client_kwargs: dict[str, Any] | None = None,
                 ) -> tuple[dict[str, ModelControlRecord], dict[int, int]]:
    """The latest record per name on the control topic, and the end offsets read up to."""
    from rsafe.stream.clients import consumer

    c = consumer(bootstrap, [topic], client_kwargs=client_kwargs)
    try:
        ends = {tp.partition: off for tp, off in c.end_offsets(list(c.assignment())).items()}
        current: dict[str, ModelControlRecord] = {}
        done = {p for p, end in ends.items() if end == 0}
        while len(done) < len(ends):
            for tp, records in c.poll(timeout_ms=500).items():
                for r in records:
                    _apply_record(current, r.key, r.value)
                    if r.offset + 1 >= ends[tp.partition]:
                        done.add(tp.partition)
        return current, ends
    finally:
        c.close()


def _apply_record(current: dict[str, ModelControlRecord], key: bytes | None, value: bytes | None) -> None:
    name = key.decode("utf-8", "replace") if key else None
    if value is None:
        if name:
            current.pop(name, None)
        return
    try:
        rec = ModelControlRecord.model_validate_json(value)
    except ValidationError as err:
        log.error("ignoring an invalid model control record (key %r): %s", name, err)
        return
    current[rec.name] = rec


class ModelWatcher:
    """Applies promotions to a running worker."""

    def __init__(self, models: ModelsConfig, backend: Any, adapters_in_use: set[str],
                 on_restart_required: Callable[[str], None], model_version: str | None, *,
                 bootstrap: Sequence[str], client_kwargs: dict[str, Any]):
        self.models = models
        self.bootstrap, self.client_kwargs = list(bootstrap), client_kwargs
        self.backend = backend
        self.adapters = adapters_in_use
        self.on_restart_required = on_restart_required
        self.model_version = model_version
        self.versions: dict[str, str] = {}
        """Adapter name → the version being served (after a swap)."""

    async def apply(self, rec: ModelControlRecord) -> None:
        m = self.models
        if rec.kind == "full":
            if rec.name == m.model_name and rec.version != self.model_version:
                why = (f"model {rec.name} version {rec.version} was promoted"
                       f"{' (rollback)' if rec.rollback else ''}; this worker serves {self.model_version}")
                log.warning("restart required: %s", why)
                self.on_restart_required(why)
            return
        if rec.name not in self.adapters or self.versions.get(rec.name) == rec.version:
            return
        try:
            path = await asyncio.to_thread(local_copy, rec.uri, f"{m.cache_dir}/{rec.name}", rec.version)
            await asyncio.to_thread(self.backend.load_adapter, rec.name, str(path), rec.version)
        except Exception as err:  # noqa: BLE001 - keep serving the current adapter
            log.error("could not switch adapter %s to version %s (%s): %s; still serving %s", rec.name,
                      rec.version, rec.uri, err, self.versions.get(rec.name, "the configured one"))
            return
        old = self.versions.get(rec.name, "the configured one")
        self.versions[rec.name] = rec.version
        log.info("adapter %s switched from %s to %s%s (promoted by %s)", rec.name, old, rec.version,
                 " (rollback)" if rec.rollback else "", rec.promoted_by or "-")

    async def follow(self, ends: dict[int, int]) -> None:
        """Apply the records published after ``ends`` (a group-less consumer), until cancelled."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        topic = self.models.control_topic
        c = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                             client_id="rsafe-models-watch", **self.client_kwargs)
        await c.start()
        try:
            tps = [TopicPartition(topic, p) for p in sorted(ends)]
            c.assign(tps)
            for tp in tps:
                c.seek(tp, ends[tp.partition])
            while True:
                batch = await c.getmany(timeout_ms=1000)
                for records in batch.values():
                    for r in records:
                        current: dict[str, ModelControlRecord] = {}
                        _apply_record(current, r.key, r.value)
                        for rec in current.values():
                            await self.apply(rec)
        finally:
            await c.stop()
