"""Micro-batching measurement: batch size × batches in flight.

``.venv/bin/python bench/batching.py --model demo/model`` calls the engine directly;
``--kafka`` runs the real worker on an embedded broker for each setting (events/s from the first
event consumed to the last verdict published, and consumed → verdict latency p50/p99/max).
Prints a markdown table with each setting's throughput ÷ one event at a time (size 1, one in
flight), measured in the same run. docs/BENCHMARKS.md records the numbers behind the worker's
defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import itertools
import json
import shutil
import time
from pathlib import Path

from common import percentile, sample_requests


async def _run(guard, requests, size: int, inflight: int) -> tuple[float, list[float]]:
    sem = asyncio.Semaphore(inflight)
    latencies: list[float] = []

    async def one(batch):
        async with sem:
            t = time.perf_counter()
            await guard.aclassify(batch, raise_engine_errors=True)
            latencies.append((time.perf_counter() - t) * 1e3)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(requests[i:i + size]) for i in range(0, len(requests), size)))
    return time.perf_counter() - t0, latencies


async def _kafka_round(backend, engine_cfg, bootstrap: str, requests, size: int,
                       inflight: int) -> tuple[float, list[float]]:
    import uuid

    from rsafe.stream.broker import ensure_topics
    from rsafe.stream.clients import Message, produce
    from rsafe.stream.config import load_config
    from rsafe.stream.worker import GuardWorker, topic_specs

    prefix = f"bench{uuid.uuid4().hex[:6]}"
    cfg = load_config(data={
        "broker": bootstrap, "group_id": prefix, "engine": engine_cfg.model_dump(mode="json"),
        "inputs": [{"topic": f"{prefix}.general", "policy": "rsafe-default"},
                   {"topic": f"{prefix}.kids", "policy": "kids-platform"}],
        "outputs": {"audit_topic": f"{prefix}.audit", "dlq_topic": f"{prefix}.dlq"},
        "batch": {"size": size, "linger_ms": 50, "max_inflight": inflight}, "policy_reload": {"watch": False},
        "http": {"port": 0},
    }, env={})
    await asyncio.to_thread(ensure_topics, cfg.bootstrap, topic_specs(cfg))
    latencies: list[float] = []
    first: list[float] = []

    def published(outcomes) -> None:
        for o in outcomes:
            first.append(o.incoming.arrived)
            latencies.append(o.verdict_fields["timings"]["total_ms"] if o.verdict_fields else 0.0)

    worker = GuardWorker(cfg, backend=backend, on_published=published)
    task = asyncio.create_task(worker.run())
    await worker.ready.wait()
    msgs = [Message(f"{prefix}.kids" if r.policy == "kids-platform" else f"{prefix}.general", None,
                    json.dumps({"id": r.id, "prompt": r.prompt, "response": r.response}).encode()) for r in requests]
    await asyncio.to_thread(produce, cfg.bootstrap, msgs)
    while len(latencies) < len(msgs):
        await asyncio.sleep(0.05)
    wall = time.perf_counter() - min(first)
    worker.request_stop()
    await task
    return wall, latencies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--sizes", default="1,8,16,32,64")
    p.add_argument("--inflight", default="1,2,4")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--kafka", action="store_true", help="through the real worker on an embedded broker")
    args = p.parse_args()
    from rsafe.models import GenerationConfig, Guard
    from rsafe.models.config import local_engine_config

    cfg = local_engine_config(str(Path(args.model)), model_id="rsafe-demo",
                              generation=GenerationConfig(max_tokens=args.max_tokens))
    guard = Guard.from_config(cfg)
    broker = None
    try:
        requests = sample_requests(args.events)
        asyncio.run(_run(guard, requests[:16], 16, 1))  # warm-up
        what = "event" if args.kafka else "batch"
        print(f"| size | in flight | events/s | × one at a time | {what} p50 ms | {what} p99 ms | {what} max ms |")
        print("|---|---|---|---|---|---|---|")
        single: float | None = None
        if args.kafka:
            import tempfile

            from rsafe.stream.broker import EmbeddedBroker

            broker = EmbeddedBroker(tempfile.mkdtemp(prefix="rsafe-bench-"), port=0).start()
            atexit.register(shutil.rmtree, broker.data_dir, True)
        for size, inflight in itertools.product(map(int, args.sizes.split(",")), map(int, args.inflight.split(","))):
            if size == 1 and inflight > 1 and single is not None:
                continue  # one event at a time is the baseline: measured once
            if args.kafka:
                wall, lat = asyncio.run(_kafka_round(guard.backend, cfg, broker.bootstrap, requests, size, inflight))
            else:
                wall, lat = asyncio.run(_run(guard, requests, size, inflight))
            lat.sort()
            rate = len(requests) / wall
            if size == 1 and inflight == 1:
                single = rate
            gain = f"{rate / single:.1f}×" if single else "–"
            print(f"| {size} | {inflight} | {rate:.1f} | {gain} | {percentile(lat, 50):.0f} | "
                  f"{percentile(lat, 99):.0f} | {lat[-1]:.0f} |", flush=True)
    finally:
        if broker is not None:
            broker.stop()
        guard.close()


if __name__ == "__main__":
    main()
