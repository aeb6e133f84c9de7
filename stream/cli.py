"""Stream sub-commands of ``rsafe``: broker, worker, produce, tail, demo.

``rsafe.cli`` calls ``add_commands(subparsers)``. Heavy imports (Faust, vLLM) happen inside the
command functions, so ``rsafe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rsafe.stream.config import DEFAULT_BROKER

BUNDLED_CONFIG = Path(__file__).parent / "demo.yaml"


def _err(msg: str) -> int:
    print(f"rsafe: error: {msg}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace):
    """The worker config from ``-c`` (+ env, + flags)."""
    from rsafe.stream.config import load_config

    overrides: dict = {}
    if getattr(args, "broker", None):
        overrides["broker"] = args.broker
    if getattr(args, "group_id", None):
        overrides["group_id"] = args.group_id
    if getattr(args, "model", None):
        overrides["engine"] = {"model": args.model}
    return load_config(args.config, overrides=overrides)


def client_settings(args: argparse.Namespace) -> tuple[list[str], dict]:
    """Bootstrap servers and client security for produce / tail."""
    from rsafe.stream.config import Security, load_config, parse_brokers

    if args.config:
        cfg = load_config(args.config, overrides={"broker": args.broker} if args.broker else None)
        return cfg.bootstrap, cfg.security.client_kwargs()
    broker = args.broker or os.environ.get("RSAFE_BROKER") or DEFAULT_BROKER
    return list(parse_brokers(broker) or []), Security().client_kwargs()


# --------------------------------------------------------------------------- commands


def cmd_broker(args: argparse.Namespace) -> int:
    from rsafe.stream.broker import BrokerError, main_foreground

    try:
        return main_foreground(args.data_dir, args.port, args.host)
    except BrokerError as err:
        return _err(str(err))


def cmd_worker(args: argparse.Namespace) -> int:
    from rsafe.stream.config import ConfigError
    from rsafe.stream.worker import configure_logging, run_worker

    configure_logging(args.log_level)
    try:
        cfg = _load(args)
    except ConfigError as err:
        return _err(str(err))
    return run_worker(cfg)


def cmd_produce(args: argparse.Namespace) -> int:
    from rsafe.stream.clients import produce, read_messages

    try:
        bootstrap, kw = client_settings(args)
        messages = read_messages(args.file, key_field=args.key_field, envelope=args.envelope or not args.topic)
    except (OSError, ValueError) as err:
        return _err(str(err))
    if not args.topic and any(m.topic is None for m in messages):
        return _err("some lines are not envelopes with a topic: pass --topic")
    try:
        n = produce(bootstrap, messages, topic=args.topic, client_kwargs=kw)
    except Exception as err:  # noqa: BLE001 - broker errors, shown plainly
        return _err(f"producing to {','.join(bootstrap)} failed: {err}")
    print(f"produced {n} messages to {args.topic or 'their topics'} on {','.join(bootstrap)}", file=sys.stderr)
    return 0


def _short(value: bytes | None) -> str:
    """One line for a verdict / DLQ / audit record (``--pretty``)."""
    try:
        rec = json.loads(value or b"")
    except ValueError:
        return repr(value)
    if "reason" in rec and "original_b64" in rec:
        src = rec.get("source", {})
        where = f"{src.get('topic')}[{src.get('partition')}]@{src.get('offset')}"
        return f"DLQ {rec['reason']:<24} {where}: {rec.get('detail')}"
    label = str(rec.get("label", "?")).upper()
    p = rec.get("unsafe_probability")
    prob = f"{p:.2f}" if isinstance(p, (int, float)) else "  - "
    cats = ",".join(rec.get("categories") or []) or "-"
    why = rec.get("reasoning_summary") or rec.get("error_reason") or rec.get("reasoning") or ""
    return (f"{rec.get('id') or rec.get('event_id')}  {label:<7} p={prob} {cats:<8} "
            f"{rec.get('policy')}@{rec.get('policy_version')}  {why}")


def cmd_tail(args: argparse.Namespace) -> int:
    from rsafe.stream.clients import iter_records

    try:
        bootstrap, kw = client_settings(args)
    except (OSError, ValueError) as err:
        return _err(str(err))
    try:
        for r in iter_records(bootstrap, args.topics, follow=args.follow, idle_timeout_s=args.timeout,
                              max_records=args.max, from_beginning=not args.from_end,
                              read_committed=args.committed, client_kwargs=kw):
            if args.pretty:
                print(f"{r.topic}[{r.partition}]@{r.offset} {_short(r.value)}", flush=True)
            else:
                sys.stdout.write((r.value or b"null").decode("utf-8", "replace") + "\n")
                sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rsafe.stream.demo import run_demo

    return run_demo(model=args.model, config=args.config, samples=args.samples, timeout_s=args.timeout,
                    log_level=args.log_level)


# --------------------------------------------------------------------------- parser


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (noida-db) for development")
    p.add_argument("--data-dir", default=".cache/broker", help="where the broker keeps its data")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("worker", help="moderate chat events from Kafka (Faust worker)")
    p.add_argument("-c", "--config", required=True, help="worker config YAML (see docs/STREAM.md)")
    p.add_argument("--model", help="override engine.model")
    p.add_argument("--broker", help="override broker (also RSAFE_BROKER)")
    p.add_argument("--group-id", help="override group_id")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_worker)

    for name, helptext in (("produce", "send a JSONL file of chat events to a topic"),
                           ("tail", "print the records of topics (verdicts, audit, DLQ)")):
        p = sub.add_parser(name, help=helptext)
        if name == "produce":
            p.add_argument("file", help="JSONL, one event per line (sent as is)")
            p.add_argument("--topic", help="target topic (default: each line's envelope topic)")
            p.add_argument("--key-field", default="conversation_id", help="event field used as the Kafka key")
            p.add_argument("--envelope", action="store_true",
                           help='lines may be {"topic": T, "value": {...}} or {"topic": T, "raw": "..."}')
        else:
            p.add_argument("topics", nargs="+", metavar="TOPIC")
            p.add_argument("-f", "--follow", action="store_true", help="keep waiting for new records")
            p.add_argument("--max", type=int, help="stop after this many records")
            p.add_argument("--timeout", type=float, default=3.0, help="stop after this many idle seconds")
            p.add_argument("--from-end", action="store_true", help="only new records")
            p.add_argument("--committed", action="store_true", help="read_committed (exactly_once outputs)")
            p.add_argument("--pretty", action="store_true", help="one short line per record")
        p.add_argument("--broker", help=f"broker URL(s) (default: RSAFE_BROKER or {DEFAULT_BROKER})")
        p.add_argument("-c", "--config", help="take broker and security settings from a worker config")
        p.set_defaults(func=cmd_produce if name == "produce" else cmd_tail)

    p = sub.add_parser("demo", help="embedded broker + demo model + worker + sample events, live")
    p.add_argument("--model", required=True, help="the demo model directory (make demo-model)")
    p.add_argument("--config", default=str(BUNDLED_CONFIG), help="worker config (default: bundled demo.yaml)")
    p.add_argument("--samples", default=None, help="events JSONL (default: bundled samples)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=cmd_demo)
