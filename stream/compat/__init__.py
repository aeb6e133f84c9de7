"""Where the worker leans on Faust's and aiokafka's insides — all of it, fenced here.

The worker runs on faust-streaming and aiokafka at the versions pinned in ``infra/requirements.lock``
(``SUPPORTED``). ``check()`` runs first at every worker start: another version, or a private name
the workarounds need that has moved, stops the worker with an error that says which and why,
instead of a worker that misbehaves later. ``RSAFE_ALLOW_UNTESTED_VERSIONS=1`` turns a version
mismatch (not a missing name) into a warning, to try an upgrade.

Each workaround, the upstream behaviour it replaces, and why:

``consumer.BatchDeliveryConsumer._drain_messages`` — a copy of Faust's ``Consumer._drain_messages``
    Faust hands every fetched message to the conductor inside its own ``wait_first(callback(message),
    suspend_flow.wait())``: four tasks and an ``asyncio.wait`` per message, ~10 % of the worker's CPU
    with a fast engine (py-spy, ``bench/pipeline.py``). The copy runs that race once per fetched
    batch, and hands the moderation topics' messages to the ``Intake`` in bulk: Faust's conductor →
    ``Event`` → channel queue → stream iterator path cost ~45 µs per event, a fifth of the worker's
    CPU (docs/BENCHMARKS.md). Reads ``_read_offset``, ``_commit_every``, ``_n_acked``, ``_add_gap``
    and the fetcher's ``_stopped`` as Faust's own loop does.
``consumer.ConsumerThread.verify_event_path`` — Faust's liveness check per partition
    It logged "Stream has not started processing" every few seconds for an active table's own
    changelog partitions, which the worker writes and never reads (a false alarm); the check still
    runs on every other partition. Calls Faust's ``_verify_aiokafka_event_path``.
``long_poll`` — aiokafka's ``Fetcher._proc_fetch_request``, patched process-wide
    Kafka holds an empty fetch for ``fetch.max.wait.ms``; the embedded broker (noida-db) answers at
    once, so an idle aiokafka consumer spins: ~3,900 empty fetches/s and ~80 % of a core per idle
    consumer, client and broker (``bench/idle_fetch.py``, docs/RELIABILITY.md). Nothing changes
    against Kafka (an empty fetch already took longer than the 10 ms backoff).
``internals.in_partition`` — Faust's ``faust.streams._current_event`` context variable
    The moderation agent takes its events from the ``Intake``, not from a Faust stream, so Faust's
    current event is unset there; a RocksDB table store finds the partition's database through it.
``internals.aiokafka_producer`` / ``partitioner`` / ``wait_on_metadata`` — Faust's producer's
    ``_ensure_producer()``, aiokafka's ``_partition`` and ``client._wait_on_metadata``: the sink
    writes a batch's records as one record batch per output partition (``send_batch``), chosen by
    the producer's own partitioner; a ``send`` per record cost ~15 µs per record in the client
    (docs/BENCHMARKS.md).
``internals.has_transaction`` — Faust's producer's ``_transaction_producers``
    Under exactly_once a record goes into its input partition's open transaction; a partition
    revoked in a rebalance has none, and the batch must not be published (it is redelivered).
``internals.read_offset`` — Faust's consumer's ``_read_offset``: the consumer lag metric.
``internals.buffer_full_count`` — Faust's monitor's ``topic_buffer_full``: the fetch-pause metric.
``rsafe.stream.membership.FencingWatch`` — aiokafka's log text
    aiokafka reports a fenced static member only in its log ("member_id was not recognized",
    ``FencedInstanceId``); the worker exits on it before its client rejoins and fences the other
    worker with the same ``group_instance_id``.
``rsafe.stream.app.build_app`` sets ``app.in_worker = True`` — what ``faust.Worker`` sets (the
    worker runs the app without ``faust.Worker``; exactly_once needs it before the consumer exists).
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from typing import Mapping

log = logging.getLogger("rsafe.stream.compat")

SUPPORTED: dict[str, str] = {"faust-streaming": "0.15.", "aiokafka": "0.14."}
"""Distribution → the version prefix the workarounds were written and measured against."""
ALLOW_ENV = "RSAFE_ALLOW_UNTESTED_VERSIONS"


class UnsupportedVersion(RuntimeError):
    """Faust or aiokafka is not what the worker's workarounds were written for."""


def _private_names() -> list[tuple[str, object, str]]:
    """(what, object, attribute) of every private name the workarounds use."""
    import faust.streams
    from aiokafka import AIOKafkaProducer
    from aiokafka.client import AIOKafkaClient
    from aiokafka.consumer.fetcher import Fetcher
    from faust.transport.consumer import Consumer
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
    from faust.transport.drivers.aiokafka import Producer as FaustAIOKafkaProducer

    return [
        ("faust Consumer", Consumer, "_drain_messages"),
        ("faust Consumer", Consumer, "_add_gap"),
        ("faust AIOKafkaConsumerThread", AIOKafkaConsumerThread, "_verify_aiokafka_event_path"),
        ("faust.streams", faust.streams, "_current_event"),
        ("faust aiokafka Producer", FaustAIOKafkaProducer, "_ensure_producer"),
        ("aiokafka Fetcher", Fetcher, "_proc_fetch_request"),
        ("aiokafka AIOKafkaProducer", AIOKafkaProducer, "_partition"),
        ("aiokafka AIOKafkaClient", AIOKafkaClient, "_wait_on_metadata"),
    ]


def check(env: Mapping[str, str] = os.environ) -> None:
    """Raise ``UnsupportedVersion`` when Faust or aiokafka is not a supported version (unless
    ``RSAFE_ALLOW_UNTESTED_VERSIONS=1``: then a warning) or lacks a private name used here."""
    wrong = []
    for dist, prefix in SUPPORTED.items():
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError:
            have = "not installed"
        if not have.startswith(prefix):
            wrong.append(f"{dist} {have} (supported: {prefix}x)")
    if wrong:
        msg = (f"unsupported {', '.join(wrong)}: the worker replaces parts of Faust and aiokafka "
               "(rsafe/stream/compat) that were written and measured against the pinned versions; "
               "install infra/requirements.lock")
        if env.get(ALLOW_ENV) != "1":
            raise UnsupportedVersion(f"{msg}, or set {ALLOW_ENV}=1 to try anyway")
        log.warning("%s; running anyway (%s=1)", msg, ALLOW_ENV)
    missing = [f"{what}.{name}" for what, obj, name in _private_names() if not hasattr(obj, name)]
    if missing:
        raise UnsupportedVersion(f"Faust/aiokafka changed shape: {', '.join(missing)} missing; the worker's "
                                 "workarounds (rsafe/stream/compat) need updating for this version")
