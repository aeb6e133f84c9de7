"""Pipeline ceiling: the worker with the null engine vs a bare aiokafka loop, same broker, same run.

    .venv/bin/python bench/pipeline.py [--events 20000] [--profile out.html]

* **bare**: aiokafka consume → produce two records of verdict/audit size per event (acks=all) →
  commit, in batches (``getmany``): what Kafka itself costs, the ceiling of any worker.
* **worker**: ``GuardWorker`` with the null engine (answers at once) on the same kind of topic.
* **worker + OTLP**: the same with telemetry exported to an OTLP/HTTP receiver in this process
  (the default sampling), to measure the cost of tracing.

Prints events/s of each and the ratios (the performance issue's target: worker / bare ≥ 0.5).
``--profile`` writes a pyinstrument profile of the worker run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from common import worker_config

VERDICT_BYTES = 700
AUDIT_BYTES = 2500


def events(n: int) -> list[bytes]:
    return [json.dumps({"id": f"ev-{i}", "conversation_id": f"c{i % 97}",
                        "prompt": f"message number {i}: what's a good recipe for banana bread?"}).encode()
            for i in range(n)]


def fill(bootstrap: str, topic: str, n: int, partitions: int = 3) -> None:
    from kafka import KafkaProducer

    from rsafe.stream.broker import ensure_topics

    ensure_topics([bootstrap], [(topic, partitions, {})])
    p = KafkaProducer(bootstrap_servers=[bootstrap], acks="all", linger_ms=20, batch_size=256 * 1024)
    for i, value in enumerate(events(n)):
        p.send(topic, key=f"c{i % 97}".encode(), value=value)
    p.flush()
    p.close()


async def bare(bootstrap: str, topic: str, n: int) -> float:
    """consume → produce verdict + audit → commit; events/s."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    out1, out2 = f"{topic}.v", f"{topic}.a"
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bare-{uuid.uuid4().hex[:6]}",
                                enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=500)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await consumer.start()
    await producer.start()
    verdict, audit = b"v" * VERDICT_BYTES, b"a" * AUDIT_BYTES
    done, t0 = 0, None
    try:
        while done < n:
            batch = await consumer.getmany(timeout_ms=1000)
            if t0 is None and batch:
                t0 = time.perf_counter()
            futures = []
            for records in batch.values():
                for r in records:
                    futures.append(await producer.send(out1, verdict, key=r.key))
                    futures.append(await producer.send(out2, audit, key=r.key))
                    done += 1
            if futures:
                await asyncio.gather(*futures)
                await consumer.commit()
        return n / (time.perf_counter() - t0)
    finally:
        await consumer.stop()
        await producer.stop()


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


async def worker(bootstrap: str, topic: str, n: int, telemetry: dict | None = None, profile: str | None = None,
                 batch: dict | None = None) -> float:
    from rsafe.models.config import local_engine_config
    from rsafe.models.engines import make_backend
    from rsafe.stream.worker import GuardWorker

    cfg = worker_config(bootstrap, topic, [{"topic": topic, "policy": "rsafe-default"}],
                        batch=batch or {"size": 64, "linger_ms": 5, "max_inflight": 4}, telemetry=telemetry,
                        group_id=f"w-{uuid.uuid4().hex[:6]}")
    first: list[float] = []
    count = [0]
    finished = asyncio.Event()

    def published(outcomes) -> None:
        if not first:
            first.append(min(o.incoming.arrived for o in outcomes))
        count[0] += len(outcomes)
        if count[0] >= n:
            finished.set()

    w = GuardWorker(cfg, backend=make_backend(local_engine_config("null", "null")), on_published=published)
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="disabled")
        profiler.start()
    task = asyncio.create_task(w.run())
    await asyncio.wait_for(finished.wait(), timeout=600)
    rate = n / (time.perf_counter() - first[0])
    if profiler is not None:
        profiler.stop()
        with open(profile, "w") as f:
            f.write(profiler.output_html() if profile.endswith(".html") else profiler.output_text(unicode=True))
    w.request_stop()
    await task
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--profile", help="write a pyinstrument HTML profile of the worker run here")
    ap.add_argument("--no-otlp", action="store_true")
    args = ap.parse_args()
    from rsafe.stream.broker import EmbeddedBroker

    with EmbeddedBroker(tempfile.mkdtemp(prefix="rsafe-bench-"), port=0) as broker:
        rates = {}
        t = f"b{uuid.uuid4().hex[:6]}"
        fill(broker.bootstrap, t, args.events)
        rates["bare aiokafka"] = asyncio.run(bare(broker.bootstrap, t, args.events))
        t = f"w{uuid.uuid4().hex[:6]}"
        fill(broker.bootstrap, t, args.events)
        rates["worker, null engine"] = asyncio.run(worker(broker.bootstrap, t, args.events, profile=args.profile))
        if not args.no_otlp:
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            t = f"o{uuid.uuid4().hex[:6]}"
            fill(broker.bootstrap, t, args.events)
            rates["worker + OTLP export"] = asyncio.run(worker(
                broker.bootstrap, t, args.events,
                telemetry={"exporter": "otlp", "otlp": {"endpoint": f"http://127.0.0.1:{server.server_port}"}}))
            server.shutdown()
    base = rates["bare aiokafka"]
    print(f"machine: {platform.machine()} {os.cpu_count()} cores; {args.events} events per run; embedded broker")
    print("| run | events/s | ÷ bare |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / base:.2f} |")
    if "worker + OTLP export" in rates:
        print(f"OTLP export costs {1 - rates['worker + OTLP export'] / rates['worker, null engine']:.0%} of the "
              "worker's throughput")


if __name__ == "__main__":
    main()
