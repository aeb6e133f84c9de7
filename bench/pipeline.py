"""Pipeline ceiling: the worker with the null engine vs a bare aiokafka loop, same broker, same run.

    .venv/bin/python bench/pipeline.py [--events 20000] [--profile out.html]

* **bare**: aiokafka consume → produce two records of verdict/audit size per event (acks=all) →
  commit, in batches (``getmany``): what Kafka itself costs, the ceiling of any worker.
* **worker**: ``GuardWorker`` with the null engine (answers at once) on the same kind of topic,
  its shipped telemetry settings (``/metrics`` served: the metrics SDK records, no spans).
* **worker, /metrics off**: the same with ``telemetry.prometheus: false`` (no SDK at all), to
  measure what serving ``/metrics`` by default costs.
* **worker + OTLP**: the same with telemetry exported to an OTLP/HTTP receiver (a child process,
  as a collector would be) at the default sampling, to measure the cost of telemetry.

Prints events/s of each and the ratios (the performance issue's target: worker / bare ≥ 0.5), and
the CPU each run cost per event — this process (all its threads) and the broker process — over the
same window as the rate (first event to last): throughput on the shared 2-core VM varies ±25 %
from run to run, CPU per event much less. ``--profile`` writes a pyinstrument profile of the worker
run. Both sides run with the worker's client-side long polling (``rsafe.stream.compat.long_poll``;
``--no-long-poll``: aiokafka as it ships, the embedded broker's empty fetches spinning).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid

from common import worker_config

VERDICT_BYTES = 700
AUDIT_BYTES = 2500
BATCH, INFLIGHT = 128, 4
"""The worker's micro-batches: as a GPU engine takes them (vLLM batches 128+ sequences); the bare
loop's batches are what one fetch returns (up to 500 records)."""

BROKER_PID: list[int] = []
"""The embedded broker's pid (its CPU is read from /proc)."""


def cpu_now() -> tuple[float, float, float]:
    """(wall, CPU seconds of this process, CPU seconds of the broker process)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    broker = 0.0
    if BROKER_PID:
        with open(f"/proc/{BROKER_PID[0]}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        broker = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), r.ru_utime + r.ru_stime, broker


def per_event(start: tuple[float, float, float], end: tuple[float, float, float], n: int) -> dict[str, float]:
    return {"events/s": n / (end[0] - start[0]), "cpu_us": (end[1] - start[1]) / n * 1e6,
            "broker_us": (end[2] - start[2]) / n * 1e6}


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


async def bare(bootstrap: str, topic: str, n: int) -> dict[str, float]:
    """consume → produce verdict + audit → commit; events/s and CPU per event."""
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
                t0 = cpu_now()
            futures = []
            for records in batch.values():
                for r in records:
                    futures.append(await producer.send(out1, verdict, key=r.key))
                    futures.append(await producer.send(out2, audit, key=r.key))
                    done += 1
            if futures:
                await asyncio.gather(*futures)
                await consumer.commit()
        return per_event(t0, cpu_now(), n)
    finally:
        await consumer.stop()
        await producer.stop()


RECEIVER = """
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
print(server.server_port, flush=True)
server.serve_forever()
"""
"""An OTLP/HTTP receiver that accepts everything (run as a child process: its CPU is not the worker's)."""


async def worker(bootstrap: str, topic: str, n: int, telemetry: dict | None = None, profile: str | None = None,
                 batch: dict | None = None) -> dict[str, float]:
    from rsafe.models.config import local_engine_config
    from rsafe.models.engines import make_backend
    from rsafe.stream.worker import GuardWorker

    cfg = worker_config(bootstrap, topic, [{"topic": topic, "policy": "rsafe-default"}],
                        batch=batch or {"size": BATCH, "linger_ms": 5, "max_inflight": INFLIGHT}, telemetry=telemetry,
                        group_id=f"w-{uuid.uuid4().hex[:6]}")
    marks: list[tuple[int, tuple[float, float, float]]] = []
    count = [0]
    finished = asyncio.Event()

    def published(outcomes) -> None:
        count[0] += len(outcomes)
        if not marks:  # from the first published batch on: the worker's start is not in the window
            marks.append((count[0], cpu_now()))
        if count[0] >= n and not finished.is_set():
            marks.append((count[0], cpu_now()))
            finished.set()

    w = GuardWorker(cfg, backend=make_backend(local_engine_config("null", "null")), on_published=published)
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="disabled")
        profiler.start()
    task = asyncio.create_task(w.run())
    await asyncio.wait_for(finished.wait(), timeout=600)
    (c0, start), (c1, end) = marks
    result = per_event(start, end, c1 - c0)
    if profiler is not None:
        profiler.stop()
        with open(profile, "w") as f:
            f.write(profiler.output_html() if profile.endswith(".html") else profiler.output_text(unicode=True))
    w.request_stop()
    await task
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--profile", help="write a pyinstrument HTML profile of the worker run here")
    ap.add_argument("--no-otlp", action="store_true")
    ap.add_argument("--batch", type=int, default=BATCH, help="the worker's batch.size")
    ap.add_argument("--inflight", type=int, default=INFLIGHT, help="the worker's batch.max_inflight")
    ap.add_argument("--no-long-poll", action="store_true", help="aiokafka as it ships (empty fetches spin)")
    args = ap.parse_args()
    from rsafe.stream.compat import long_poll
    from rsafe.stream.broker import EmbeddedBroker

    if args.no_long_poll:
        os.environ[long_poll.ENV] = "0"  # the worker installs it at start: turned off there too
    long_poll.install()
    with EmbeddedBroker(tempfile.mkdtemp(prefix="rsafe-bench-"), port=0) as broker:
        BROKER_PID.append(broker.proc.pid)
        rates = {}
        t = f"b{uuid.uuid4().hex[:6]}"
        fill(broker.bootstrap, t, args.events)
        rates["bare aiokafka"] = asyncio.run(bare(broker.bootstrap, t, args.events))
        t = f"w{uuid.uuid4().hex[:6]}"
        fill(broker.bootstrap, t, args.events)
        batch = {"size": args.batch, "linger_ms": 5, "max_inflight": args.inflight}
        rates["worker, null engine"] = asyncio.run(worker(broker.bootstrap, t, args.events, profile=args.profile,
                                                          batch=batch))
        t = f"m{uuid.uuid4().hex[:6]}"
        fill(broker.bootstrap, t, args.events)
        rates["worker, /metrics off"] = asyncio.run(worker(broker.bootstrap, t, args.events, batch=batch,
                                                           telemetry={"prometheus": False}))
        if not args.no_otlp:
            receiver = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
            try:
                port = int(receiver.stdout.readline())
                t = f"o{uuid.uuid4().hex[:6]}"
                fill(broker.bootstrap, t, args.events)
                rates["worker + OTLP export"] = asyncio.run(worker(
                    broker.bootstrap, t, args.events, batch=batch,
                    telemetry={"exporter": "otlp", "otlp": {"endpoint": f"http://127.0.0.1:{port}"}}))
            finally:
                receiver.kill()
                receiver.wait()
    base = rates["bare aiokafka"]["events/s"]
    print(f"machine: {platform.machine()} {os.cpu_count()} cores; {args.events} events per run; embedded broker; "
          f"client-side long polling {'on' if long_poll.installed() else 'off'}; worker batches "
          f"{args.batch} × {args.inflight} in flight, linger 5 ms; OTLP at the default sampling")
    print("| run | events/s | ÷ bare | CPU µs/event (this process) | broker CPU µs/event |")
    print("|---|---|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {r['events/s']:.0f} | {r['events/s'] / base:.2f} | {r['cpu_us']:.0f} | {r['broker_us']:.0f} |")
    on, off = rates["worker, null engine"], rates["worker, /metrics off"]
    print(f"/metrics (the default) costs {1 - on['events/s'] / off['events/s']:.0%} of the worker's throughput, "
          f"{on['cpu_us'] - off['cpu_us']:.0f} µs of CPU per event")
    if "worker + OTLP export" in rates:
        print(f"OTLP export costs {1 - rates['worker + OTLP export']['events/s'] / rates['worker, null engine']['events/s']:.0%} "
              "of the worker's throughput")


if __name__ == "__main__":
    main()
