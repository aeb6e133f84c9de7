"""Per-event CPU budget of the worker's hot path, by stage, without Kafka (null engine).

    .venv/bin/python bench/cpu_stages.py [--events 4000]

Stages: decode + route (JSON → ChatEvent → policy → prepared prompt), engine + parse (the null
engine, verdict parsing), records (VerdictRecord + AuditRecord, encoded as JSON bytes). Prints µs
per event per stage (median of 5 rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    from rsafe.models.config import local_engine_config
    from rsafe.models.engines import make_backend
    from rsafe.models.guard import Guard
    from rsafe.policies import PolicyRegistry
    from rsafe.stream.config import load_config
    from rsafe.stream.moderate import Incoming, Moderator
    from rsafe.schemas.records import SourceRef
    from rsafe.stream.telemetry import Telemetry

    cfg = load_config(data={"inputs": [{"topic": "chat", "policy": "rsafe-default"}]}, env={})
    guard = Guard(make_backend(local_engine_config("null", "null")), policies=PolicyRegistry.from_dirs())
    m = Moderator(cfg, guard, worker_id="bench", telemetry=Telemetry("bench"), model_version="v")
    values = [json.dumps({"id": f"ev-{i}", "conversation_id": f"c{i % 97}",
                          "prompt": f"message number {i}: what's a good recipe for banana bread?"}).encode()
              for i in range(args.events)]

    def incoming(i: int, v: bytes) -> Incoming:
        return Incoming(value=v, key=b"c", source=SourceRef(topic="chat", partition=0, offset=i))

    stages: dict[str, list[float]] = {"decode + route": [], "engine + parse": [], "records + encode": []}
    loop = asyncio.new_event_loop()
    for _ in range(5):
        batch = [incoming(i, v) for i, v in enumerate(values)]
        t0 = time.perf_counter()
        routed = [m.route(inc) for inc in batch]
        t1 = time.perf_counter()
        verdicts = []
        for i in range(0, len(routed), args.batch):
            part = routed[i:i + args.batch]
            v, _, _ = loop.run_until_complete(m.judge(part))
            verdicts += v
        t2 = time.perf_counter()
        outcomes = [m.verdict_outcome(r, v, attempts=1, batch_size=args.batch, engine_error=None, started=t1,
                                      engine_ms=1.0) for r, v in zip(routed, verdicts)]
        t3 = time.perf_counter()
        sizes = sum(len(r.value) for o in outcomes for r in o.records)
        n = len(values)
        for name, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
            stages[name].append(dt / n * 1e6)
    print(f"{args.events} events, batches of {args.batch}, median of 5; µs per event")
    print("| stage | µs/event |")
    print("|---|---|")
    total = 0.0
    for name, xs in stages.items():
        med = statistics.median(xs)
        total += med
        print(f"| {name} | {med:.0f} |")
    print(f"| **total** | **{total:.0f}** |  (record bytes per event: {sizes / args.events:.0f})")


if __name__ == "__main__":
    main()
