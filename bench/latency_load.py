"""Latency under load: an open-loop producer at 50 % and 90 % of the worker's capacity (issue 14, item 5).

    .venv/bin/python bench/latency_load.py --model demo/model [--duration 60] [--plot docs/img/latency_load.png]

One vLLM engine (the demo model) behind a ``GuardWorker`` with the worker's default micro-batching
(or ``--batch-size`` / ``--inflight`` / ``--linger-ms``), on an embedded broker:

1. **capacity** — ``--capacity-events`` messages produced at once; messages/s from the first
   consumed to the last published;
2. **open loop** at 50 % and 90 % of that rate for ``--duration`` s each: a producer sends at a
   fixed rate whatever the latency; per message the latency consumed → published (the verdict
   and audit records acknowledged by the broker), and every 0.5 s the consumer lag (records of the
   input partitions not yet read) and the messages in the system (produced, not yet published).

Prints p50/p99/max per load and the issue's check: p99 at 50 % ≤ 2 × (linger + one batch's engine
time, the median over the run); writes the plot (latency and lag over time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from common import percentile, worker_config


def messages(n: int, seed: int) -> list[tuple[str, bytes]]:
    from rsafe.demo.corpus import synthetic_examples

    out = []
    for i, e in enumerate(synthetic_examples(n, seed=seed)):
        if e.policy == "rsafe-default":
            out.append((f"s{seed}-{i}", json.dumps({"id": f"s{seed}-{i}", "prompt": e.prompt,
                                                    "response": e.response}).encode()))
    return out


class Recorder:
    """Publication times and latencies per message, from the worker's ``on_published`` hook."""

    def __init__(self) -> None:
        self.published: dict[str, tuple[float, float]] = {}
        """id → (published at, consumed → published seconds)."""
        self.engine_ms: list[float] = []
        self.batch_sizes: list[int] = []

    def __call__(self, outcomes) -> None:
        now = time.perf_counter()
        self.batch_sizes.append(len(outcomes))
        for o in outcomes:
            if o.verdict_fields is not None:
                self.published[o.verdict_fields["id"]] = (now, now - o.incoming.arrived)
                self.engine_ms.append(o.verdict_fields["timings"]["engine_ms"])


def open_loop(bootstrap: list[str], topic: str, msgs: list[tuple[str, bytes]], rate: float, duration: float,
              sent: dict[str, float]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0, client_id="rsafe-load")
    t0 = time.perf_counter()
    i = 0
    try:
        while True:
            due = t0 + i / rate
            if due - t0 >= duration or i >= len(msgs):
                break
            time.sleep(max(0.0, due - time.perf_counter()))
            mid, value = msgs[i]
            sent[mid] = time.perf_counter()
            producer.send(topic, key=mid.encode(), value=value)
            i += 1
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)


async def run(args: argparse.Namespace) -> dict:
    from rsafe.models import GenerationConfig, Guard
    from rsafe.models.config import local_engine_config
    from rsafe.stream.broker import EmbeddedBroker, ensure_topics
    from rsafe.stream.clients import Message, produce
    from rsafe.stream.worker import GuardWorker, topic_specs

    engine = local_engine_config(args.model, model_id="rsafe-demo", generation=GenerationConfig(max_tokens=128),
                                 limits={"max_window_tokens": 128})
    guard = Guard.from_config(engine)
    broker = EmbeddedBroker(tempfile.mkdtemp(prefix="rsafe-bench-"), port=0).start()
    rec = Recorder()
    batch = {k: v for k, v in (("size", args.batch_size), ("max_inflight", args.inflight),
                               ("linger_ms", args.linger_ms)) if v is not None}
    prefix = f"load{uuid.uuid4().hex[:6]}"
    inputs = [{"topic": f"{prefix}.chat", "policy": "rsafe-default", "partitions": 2}]
    cfg = worker_config(broker.bootstrap, prefix, inputs, batch=batch, engine=engine)
    topic = cfg.inputs[0].topic
    await asyncio.to_thread(ensure_topics, cfg.bootstrap, topic_specs(cfg))
    worker = GuardWorker(cfg, backend=guard.backend, on_published=rec)
    task = asyncio.create_task(worker.run())
    result: dict = {"batch": cfg.batch.model_dump(), "machine": f"{platform.machine()} {os.cpu_count()} cores"}
    try:
        await worker.ready.wait()

        async def settle(ids: set[str], timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while not ids <= rec.published.keys():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(ids - rec.published.keys())} messages not published")
                await asyncio.sleep(0.1)

        warm = messages(40, seed=1)
        await asyncio.to_thread(produce, cfg.bootstrap, [Message(topic, k.encode(), v) for k, v in warm])
        await settle({k for k, _ in warm}, 300)
        cap = messages(args.capacity_events * 2, seed=2)[: args.capacity_events]
        t0 = time.perf_counter()
        await asyncio.to_thread(produce, cfg.bootstrap, [Message(topic, k.encode(), v) for k, v in cap])
        await settle({k for k, _ in cap}, 600)
        capacity = len(cap) / (max(rec.published[k][0] for k, _ in cap) - t0)
        result["capacity_msgs_per_s"] = round(capacity, 2)
        rec.engine_ms.clear()
        result["runs"] = []
        for n, load in enumerate(args.loads):
            rate = load * capacity
            msgs = messages(int(rate * args.duration * 2.2) + 10, seed=10 + n)
            sent: dict[str, float] = {}
            timeline: list[tuple[float, int, int]] = []
            start = time.perf_counter()
            producer = threading.Thread(target=open_loop, args=(cfg.bootstrap, topic, msgs, rate, args.duration, sent))
            producer.start()
            while producer.is_alive() or not sent.keys() <= rec.published.keys():
                lag = sum(n for _, _, n in worker._lag())
                in_system = sum(1 for k in list(sent) if k not in rec.published)
                timeline.append((time.perf_counter() - start, lag, in_system))
                if time.perf_counter() - start > args.duration + 300:
                    raise TimeoutError("the worker did not catch up within 300 s after the load stopped")
                await asyncio.sleep(0.5)
            lat = [rec.published[k][1] * 1e3 for k in sent]
            e2e = [(rec.published[k][0] - sent[k]) * 1e3 for k in sent]
            series = sorted((sent[k] - start, rec.published[k][1] * 1e3) for k in sent)
            result["runs"].append({
                "load": load, "rate": round(rate, 2), "n": len(sent),
                "p50_ms": round(percentile(lat, 50)), "p99_ms": round(percentile(lat, 99)), "max_ms": round(max(lat)),
                "produced_to_published_p99_ms": round(percentile(e2e, 99)),
                "max_lag": max(t[1] for t in timeline), "max_in_system": max(t[2] for t in timeline),
                "timeline": timeline, "series": series,
            })
        result["engine_batch_ms_median"] = round(statistics.median(rec.engine_ms), 1)
        result["linger_ms"] = cfg.batch.linger_ms
    finally:
        worker.request_stop()
        await task
        guard.close()
        broker.stop()
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(2, len(runs), figsize=(6 * len(runs), 6), sharex="col", squeeze=False)
    for col, r in enumerate(runs):
        top, bottom = axes[0][col], axes[1][col]
        top.plot([s[0] for s in r["series"]], [s[1] for s in r["series"]], ".", ms=2)
        top.axhline(r["p99_ms"], color="r", lw=0.8, label=f"p99 {r['p99_ms']} ms")
        top.set_title(f"{int(r['load'] * 100)} % load ({r['rate']} msgs/s)")
        top.set_ylabel("consumed → published, ms")
        top.legend(loc="upper right")
        bottom.plot([t[0] for t in r["timeline"]], [t[1] for t in r["timeline"]], label="consumer lag (records)")
        bottom.plot([t[0] for t in r["timeline"]], [t[2] for t in r["timeline"]], label="in the system", alpha=0.7)
        bottom.set_xlabel("seconds")
        bottom.legend(loc="upper right")
    fig.suptitle(f"Worker latency under open-loop load (demo model, vLLM CPU; batch {result['batch']['size']} × "
                 f"{result['batch']['max_inflight']}, linger {result['linger_ms']:g} ms)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.9])
    ap.add_argument("--capacity-events", type=int, default=300)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--inflight", type=int)
    ap.add_argument("--linger-ms", type=float)
    ap.add_argument("--plot", help="write the latency/lag plot here (PNG)")
    ap.add_argument("--json", help="write the whole result here")
    args = ap.parse_args()
    result = asyncio.run(run(args))
    if args.plot:
        plot(result, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    bound = 2 * (result["linger_ms"] + result["engine_batch_ms_median"])
    print(f"machine: {result['machine']}; batch {result['batch']['size']} × {result['batch']['max_inflight']}, "
          f"linger {result['linger_ms']:g} ms; capacity {result['capacity_msgs_per_s']} msgs/s; "
          f"one batch's engine time (median) {result['engine_batch_ms_median']} ms")
    print("| load | msgs/s | messages | p50 ms | p99 ms | max ms | max consumer lag | max in system |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        print(f"| {int(r['load'] * 100)} % | {r['rate']} | {r['n']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | "
              f"{r['max_lag']} | {r['max_in_system']} |")
    half = next((r for r in result["runs"] if r["load"] == 0.5), None)
    if half is not None:
        print(f"p99 at 50 % load {half['p99_ms']} ms vs 2 × (linger + one batch's engine time) = {bound:.0f} ms: "
              f"{'met' if half['p99_ms'] <= bound else 'NOT met'}")


if __name__ == "__main__":
    main()
