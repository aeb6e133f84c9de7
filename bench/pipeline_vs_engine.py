"""Pipeline vs engine: the same messages through the whole path vs the engine alone (issue 14, item 2).

    .venv/bin/python bench/pipeline_vs_engine.py --model demo/model [--events 1000]

One vLLM engine, started once, serves both runs (same process, same machine, same messages):

* **engine alone** — every request handed to ``Guard.aclassify`` at once: the engine's best case
  (it schedules as many sequences as it can hold; nothing else runs);
* **full path** — the messages produced to an input topic of an embedded broker → ``GuardWorker``
  (micro-batches ``--batch-size`` × ``--inflight``) → verdict records → consumed by a plain
  consumer. Timed from the first produce to the last verdict consumed.

Prints messages/s of each and the ratio (target ≥ 0.90).
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

from common import worker_config


def requests(n: int):
    from rsafe.models.guard import GuardRequest
    from rsafe.demo.corpus import synthetic_examples

    return [GuardRequest(prompt=e.prompt, response=e.response, policy=e.policy, id=f"m{i}")
            for i, e in enumerate(synthetic_examples(n, seed=7))]


async def engine_alone(guard, reqs) -> float:
    t0 = time.perf_counter()
    verdicts = await guard.aclassify(reqs, raise_engine_errors=True)
    dt = time.perf_counter() - t0
    assert len(verdicts) == len(reqs)
    return len(reqs) / dt


def consume(bootstrap: list[str], topics: list[str], ids: set[str], got: dict[str, float],
            stop: threading.Event) -> None:
    from rsafe.stream.clients import consumer

    c = consumer(bootstrap, topics, from_beginning=True)
    try:
        while not stop.is_set() and len(got) < len(ids):
            for records in c.poll(timeout_ms=200).values():
                now = time.perf_counter()
                for r in records:
                    vid = json.loads(r.value)["id"]
                    if vid in ids:
                        got.setdefault(vid, now)
    finally:
        c.close()


async def full_path(backend, engine_cfg, bootstrap: str, reqs, size: int, inflight: int, linger_ms: int) -> float:
    from rsafe.stream.broker import ensure_topics
    from rsafe.stream.clients import Message, produce
    from rsafe.stream.worker import GuardWorker, topic_specs

    prefix = f"pve{uuid.uuid4().hex[:6]}"
    policies = sorted({r.policy for r in reqs})
    inputs = [{"topic": f"{prefix}.{p}", "policy": p, "partitions": 2} for p in policies]
    batch = {"size": size, "linger_ms": linger_ms, "max_inflight": inflight}
    cfg = worker_config(bootstrap, prefix, inputs, batch=batch, engine=engine_cfg)
    await asyncio.to_thread(ensure_topics, cfg.bootstrap, topic_specs(cfg))
    worker = GuardWorker(cfg, backend=backend)
    task = asyncio.create_task(worker.run())
    await worker.ready.wait()
    ids = {r.id for r in reqs}
    got: dict[str, float] = {}
    stop = threading.Event()
    reader = threading.Thread(target=consume, args=(cfg.bootstrap, list(cfg.verdict_topics().values()), ids, got, stop),
                              daemon=True)
    reader.start()
    await asyncio.sleep(1.0)  # the reader has its assignment before the first message
    msgs = [Message(f"{prefix}.{r.policy}", r.id.encode(),
                    json.dumps({"id": r.id, "prompt": r.prompt, "response": r.response}).encode()) for r in reqs]
    t0 = time.perf_counter()
    await asyncio.to_thread(produce, cfg.bootstrap, msgs)
    while len(got) < len(ids):
        if task.done():
            raise RuntimeError(f"the worker stopped: {task.result()}")
        await asyncio.sleep(0.1)
    rate = len(ids) / (max(got.values()) - t0)
    stop.set()
    reader.join(timeout=10)
    worker.request_stop()
    await task
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--inflight", type=int, default=4)
    ap.add_argument("--linger-ms", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    from rsafe.models import GenerationConfig, Guard
    from rsafe.models.config import local_engine_config
    from rsafe.stream.broker import EmbeddedBroker

    cfg = local_engine_config(args.model, model_id="rsafe-demo",
                              generation=GenerationConfig(max_tokens=args.max_tokens),
                              limits={"max_window_tokens": 128})
    guard = Guard.from_config(cfg)
    try:
        reqs = requests(args.events)
        asyncio.run(engine_alone(guard, reqs[:32]))  # warm-up
        alone = asyncio.run(engine_alone(guard, reqs))
        with EmbeddedBroker(tempfile.mkdtemp(prefix="rsafe-bench-"), port=0) as broker:
            path = asyncio.run(full_path(guard.backend, cfg, broker.bootstrap, reqs, args.batch_size, args.inflight,
                                         args.linger_ms))
    finally:
        guard.close()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores; {args.events} messages; demo model on vLLM; "
          f"worker batches {args.batch_size} × {args.inflight} in flight, linger {args.linger_ms} ms")
    print("| run | messages/s | ÷ engine alone |")
    print("|---|---|---|")
    print(f"| engine alone (all {args.events} at once) | {alone:.1f} | 1.00 |")
    print(f"| produce → worker → verdict consumed | {path:.1f} | **{path / alone:.2f}** |")


if __name__ == "__main__":
    main()
