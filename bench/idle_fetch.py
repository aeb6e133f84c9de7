"""How hard an idle consumer polls the broker: fetch requests/s and CPU on an empty topic.

    .venv/bin/python bench/idle_fetch.py                   # the embedded broker (started here)
    .venv/bin/python bench/idle_fetch.py --broker HOST:9092   # a real Kafka

Apache Kafka holds an empty fetch for ``fetch.max.wait.ms`` (long polling): an idle consumer
sends ~1–2 fetches/s. A broker that answers at once makes aiokafka's fetch loop spin
(docs/RELIABILITY.md, "The embedded broker is not Kafka"). Each setting is measured as aiokafka
ships and with the worker's client-side long polling (``rsafe.stream.compat.long_poll``).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
import uuid


async def probe(bootstrap: str, topic: str, wait_ms: int, seconds: float) -> tuple[int, float]:
    from aiokafka import AIOKafkaConsumer

    from rsafe.stream.compat.long_poll import counting_fetches

    with counting_fetches() as count:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, fetch_max_wait_ms=wait_ms,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
            count[0] = 0
            try:
                await asyncio.wait_for(consumer.getone(), timeout=seconds)
            except asyncio.TimeoutError:
                pass
            after, dt = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - t0
            cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / dt
            return round(count[0] / dt), cpu
        finally:
            await consumer.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker", help="bootstrap of a running broker (default: start the embedded one)")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    from rsafe.stream.broker import EmbeddedBroker, ensure_topics

    topic = f"idle-{uuid.uuid4().hex[:6]}"
    broker = None if args.broker else EmbeddedBroker(tempfile.mkdtemp(prefix="rsafe-bench-"), port=0).start()
    bootstrap = args.broker or broker.bootstrap
    try:
        ensure_topics([bootstrap], [(topic, 1, {})])
        from rsafe.stream.compat import long_poll

        print("| client | fetch_max_wait_ms | fetch requests/s | CPU (share of one core) |")
        print("|---|---|---|---|")
        for shim in (False, True):
            if shim:
                long_poll.install(long_poll.DEFAULT_BACKOFF_MS)
            try:
                for wait_ms in (500, 1500):
                    rate, cpu = asyncio.run(probe(bootstrap, topic, wait_ms, args.seconds))
                    client = f"long polling shim ({long_poll.DEFAULT_BACKOFF_MS:g} ms)" if shim else "aiokafka as is"
                    print(f"| {client} | {wait_ms} | {rate} | {cpu:.0%} |")
            finally:
                long_poll.uninstall()
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
