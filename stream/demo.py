"""``rsafe demo``: the whole product on one machine, live.

Embedded broker (fresh data dir, free port) → topics → the bundled sample events → a worker on the
demo model (two input topics, two policies) → a console view that reads the verdict and DLQ
topics back from the broker → a summary. Exits 0 by itself once every sample has its verdict or
DLQ record; Ctrl-C stops the worker cleanly (in-flight batch finished and committed) at any time.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SAMPLES = Path(__file__).parent / "samples" / "demo_events.jsonl"


class _Style:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.enabled else text


LABEL_STYLE = {"safe": "32", "unsafe": "1;31", "unknown": "33", "error": "35"}


@dataclass
class _Tally:
    expected: dict[str, str]
    total: int
    verdicts: dict[str, dict] = field(default_factory=dict)
    duplicates: int = 0
    dlq: dict[tuple, dict] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return len(self.verdicts) + len(self.dlq)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _line(style: _Style, topic: str, rec: dict, width: int) -> str:
    label = rec["label"]
    p = rec.get("unsafe_probability")
    prob = f"p={p:.2f}" if isinstance(p, (int, float)) else "p=  - "
    cats = ",".join(rec.get("categories") or []) or "-"
    level = "resp" if rec.get("level") == "response" else "prompt"
    why = rec.get("reasoning_summary") or rec.get("error_reason") or ""
    if rec.get("fallback"):
        why = f"[on_error] {why}"
    room = max(20, width - 82)
    if len(why) > room:
        why = why[: room - 1] + "…"
    return (f"{topic:<13} {rec['id']:<14} {level:<6} {style(f'{label.upper():<7}', LABEL_STYLE.get(label, '0'))} "
            f"{prob} {cats:<5} {rec.get('policy') or '-':<16} {why}")


def _dlq_line(style: _Style, rec: dict, width: int) -> str:
    src = rec["source"]
    detail = rec["detail"]
    room = max(20, width - 68)
    if len(detail) > room:
        detail = detail[: room - 1] + "…"
    return (f"{src['topic']:<13} {(rec.get('event_id') or '?'):<14} {'':<6} {style('DLQ    ', '36')} "
            f"{rec['reason']:<24} {detail}")


async def _watch(bootstrap: str, topics: list[str], dlq_topic: str, tally: _Tally, style: _Style,
                 all_done: asyncio.Event) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    width = shutil.get_terminal_size((120, 20)).columns
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        tps = []
        for t in [*topics, dlq_topic]:
            parts = consumer.partitions_for_topic(t)
            while not parts:
                await consumer.force_metadata_update()  # topics were just created
                parts = consumer.partitions_for_topic(t)
                if not parts:
                    await asyncio.sleep(0.2)
            tps += [TopicPartition(t, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while not all_done.is_set():
            batch = await consumer.getmany(timeout_ms=300)
            for tp, records in batch.items():
                for r in records:
                    try:
                        rec = json.loads(r.value)
                    except (TypeError, ValueError):
                        continue
                    if tp.topic == dlq_topic:
                        src = rec.get("source", {})
                        key = (src.get("topic"), src.get("partition"), src.get("offset"))
                        if key not in tally.dlq:
                            tally.dlq[key] = rec
                            _say(_dlq_line(style, rec, width))
                    elif rec.get("id") in tally.verdicts:
                        tally.duplicates += 1  # at-least-once replay: same id, deduplicated here
                    else:
                        tally.verdicts[rec["id"]] = rec
                        _say(_line(style, rec["source"]["topic"], rec, width))
            if tally.done >= tally.total:
                all_done.set()
    finally:
        await consumer.stop()


def _summary(cfg: Any, tally: _Tally, style: _Style, elapsed: float, engine_s: float | None,
             stats: dict) -> str:
    rows: dict[tuple[str, str], Counter] = defaultdict(Counter)
    versions: dict[tuple[str, str], str] = {}
    for t in cfg.inputs:
        rows[(t.topic, t.policy)]  # every configured topic gets a row
    for rec in tally.verdicts.values():
        key = (rec["source"]["topic"], rec.get("policy") or "-")
        rows[key][rec["label"]] += 1
        versions.setdefault(key, rec.get("policy_version") or "-")
    for rec in tally.dlq.values():
        topic = rec["source"]["topic"]
        rows[(topic, cfg.input(topic).policy)]["dlq"] += 1
    out = ["", style("Summary", "1"),
           f"{'topic':<14}{'policy':<18}{'version':<14}{'safe':>6}{'unsafe':>8}{'unknown':>9}{'error':>7}{'DLQ':>6}"]
    for (topic, policy), c in sorted(rows.items()):
        out.append(f"{topic:<14}{policy:<18}{versions.get((topic, policy), '-'):<14}{c['safe']:>6}{c['unsafe']:>8}"
                   f"{c['unknown']:>9}{c['error']:>7}{c['dlq']:>6}")
    agree = judged = 0
    for eid, rec in tally.verdicts.items():
        exp = tally.expected.get(eid)
        if exp in ("safe", "unsafe"):
            judged += 1
            agree += rec["label"] == exp
    reasons = Counter(r["reason"] for r in tally.dlq.values())
    out.append("")
    out.append(f"verdicts: {len(tally.verdicts)} events, each with an audit record in {cfg.outputs.audit_topic}; "
               f"{cfg.outputs.dlq_topic}: {len(tally.dlq)} "
               f"({', '.join(f'{k} {v}' for k, v in sorted(reasons.items())) or 'none'})")
    if judged:
        out.append(f"agreement with the sample labels: {agree}/{judged} ({100 * agree / judged:.0f} %) "
                   "(a 3.9M-parameter demo model, not a real guard)")
    if tally.duplicates:
        out.append(f"duplicates dropped by id: {tally.duplicates}")
    lat = sorted(r["timings"]["total_ms"] for r in tally.verdicts.values() if r.get("timings"))
    if lat:
        out.append(f"latency consumed → verdict: p50 {lat[len(lat) // 2]:.0f} ms, max {lat[-1]:.0f} ms; "
                   f"{stats.get('batches', 0)} engine batches, "
                   f"at most {stats.get('max_inflight_batches', 0)} in flight")
    out.append(f"total {elapsed:.1f} s" + (f" (engine start {engine_s:.1f} s)" if engine_s is not None else ""))
    return "\n".join(out)


ENGINE_START_USUALLY = "25–60 s"
"""What the demo says the engine start takes on this project's 2-core machines (docs/BENCHMARKS.md, "Cold start")."""
PROGRESS_EVERY_S = 10.0
"""A line at least this often while the worker starts: no silent minute."""


def _starting(worker: Any) -> str:
    """What the starting worker is doing now (its start order: broker, topics, engine, consumer group)."""
    if worker.guard is None:
        return "the vLLM engine is starting"
    if worker.app is None:
        return "the engine is ready; starting the Kafka consumer"
    return "joining the consumer group, waiting for partitions"


async def _demo(model: str, config: str, samples: str, timeout_s: float) -> int:
    from rsafe.stream.broker import BrokerError, EmbeddedBroker, ensure_topics
    from rsafe.stream.clients import produce, read_messages
    from rsafe.stream.config import ConfigError, load_config
    from rsafe.stream.worker import GuardWorker, topic_specs

    style = _Style(sys.stdout.isatty() and os.environ.get("NO_COLOR") is None)
    t0 = time.perf_counter()
    if not Path(model).joinpath("config.json").is_file():
        print(f"rsafe demo: no model at {model!r}; the repository carries the demo model in demo/model/ "
              "(`make demo-model-rebuild` rebuilds it from its recipe)", file=sys.stderr)
        return 2
    messages = read_messages(samples, envelope=True)
    expected = {}
    for m in messages:
        try:
            v = json.loads(m.value)
            expected[v["id"]] = v.get("metadata", {}).get("expected")
        except (ValueError, TypeError, KeyError, AttributeError):
            pass
    data_dir = Path(tempfile.mkdtemp(prefix="rsafe-demo-"))
    broker = EmbeddedBroker(data_dir / "broker", port=0)
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    worker: GuardWorker | None = None

    def on_signal() -> None:
        if not interrupted.is_set():
            _say("\ninterrupted: stopping the worker (finishing the in-flight batch)…")
        interrupted.set()
        if worker is not None:
            worker.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    run_task = watch_task = None
    try:
        _say(style("RSafe stream guard demo", "1"))
        try:
            await asyncio.to_thread(broker.start)
        except BrokerError as err:
            print(f"rsafe demo: {err}", file=sys.stderr)
            return 1
        _say(f"• embedded broker (noida-db) on {broker.url}, data in {data_dir}")
        try:
            cfg = load_config(config, overrides={"broker": [broker.bootstrap], "engine": {"model": model},
                                                 "http": {"port": 0},
                                                 "embedded_broker": {"enabled": False}})
        except ConfigError as err:
            print(f"rsafe demo: {err}", file=sys.stderr)
            return 2
        await asyncio.to_thread(ensure_topics, cfg.bootstrap, topic_specs(cfg))
        by_topic = Counter(m.topic for m in messages)
        n = await asyncio.to_thread(produce, cfg.bootstrap, messages)
        _say(f"• produced {n} sample events: " + ", ".join(f"{t} {c}" for t, c in sorted(by_topic.items()))
             + f" (from {Path(samples).name})")
        for t in cfg.inputs:
            _say(f"  {t.topic:<13} → policy {t.policy}, level {t.level.value}, on_error {t.on_error.value}"
                 f"{', policy override allowed' if t.allow_policy_override else ''} → {cfg.verdicts_topic(t)}")
        _say(f"• starting the worker: vLLM engine on {model}, batches of {cfg.batch.size} / "
             f"{cfg.batch.linger_ms:.0f} ms — the engine start takes {ENGINE_START_USUALLY} on a 2-core CPU "
             "(the first run after install is the slow one: torch and vLLM are not yet in the page cache)")
        tally = _Tally(expected, len(messages))
        all_done = asyncio.Event()
        worker = GuardWorker(cfg)
        if interrupted.is_set():
            worker.request_stop()
        run_task = asyncio.create_task(worker.run())
        engine_started = time.perf_counter()
        engine_s = None
        waiters = {asyncio.create_task(worker.ready.wait()), run_task,
                   asyncio.create_task(interrupted.wait())}
        while not (await asyncio.wait(waiters, timeout=PROGRESS_EVERY_S, return_when=asyncio.FIRST_COMPLETED))[0]:
            _say(f"  … {_starting(worker)} ({time.perf_counter() - engine_started:.0f} s)")
        for w in waiters:
            if w is not run_task:
                w.cancel()
        if run_task.done() or interrupted.is_set():
            code = await run_task
            return code if code else (0 if interrupted.is_set() else 1)
        engine_s = time.perf_counter() - engine_started
        _say(f"• worker {worker.worker_id} ready after {engine_s:.1f} s; verdicts as they are published:\n")
        _say(style(f"{'topic':<13} {'id':<14} {'level':<6} {'label':<7} {'unsafe':<6} {'cats':<5} "
                   f"{'policy':<16} reasoning (summary)", "2"))
        watch_task = asyncio.create_task(_watch(broker.bootstrap, list(cfg.verdict_topics().values()),
                                                cfg.outputs.dlq_topic, tally, style, all_done))
        stop_waiters = {asyncio.create_task(all_done.wait()), asyncio.create_task(interrupted.wait()),
                        run_task, watch_task}
        done, _ = await asyncio.wait(stop_waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        for w in stop_waiters:
            if w not in (run_task, watch_task):
                w.cancel()
        finished = all_done.is_set()
        if watch_task.done() and watch_task.exception() is not None:
            print(f"rsafe demo: reading the output topics failed: {watch_task.exception()}", file=sys.stderr)
        if not finished and not interrupted.is_set():
            print(f"rsafe demo: only {tally.done}/{tally.total} events accounted for after {timeout_s:.0f} s",
                  file=sys.stderr)
        worker.request_stop()
        code = await run_task
        all_done.set()
        if not watch_task.done():
            await asyncio.wait({watch_task}, timeout=5)
        _say(_summary(cfg, tally, style, time.perf_counter() - t0, engine_s, worker.telemetry.snapshot()))
        if interrupted.is_set():
            return 0 if code == 0 else code
        return 0 if finished and code == 0 else 1
    finally:
        for task in (watch_task, run_task):
            if task is not None and not task.done():
                task.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await asyncio.to_thread(broker.stop)
        shutil.rmtree(data_dir, ignore_errors=True)


def run_demo(*, model: str, config: str, samples: str | None = None, timeout_s: float = 600.0,
             log_level: str = "WARNING") -> int:
    from rsafe.stream.worker import configure_logging

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_logging(log_level)
    if log_level.upper() != "DEBUG":
        import logging

        logging.getLogger("vllm").setLevel(logging.ERROR)
    return asyncio.run(_demo(model, config, samples or str(SAMPLES), timeout_s))
