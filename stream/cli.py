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
DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo" / "model"
"""The demo model the repository carries (``rsafe.demo.build.DEMO_MODEL_DIR``; not installed with the package)."""


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

    try:
        cfg = _load(args)
    except ConfigError as err:
        return _err(str(err))
    configure_logging(args.log_level, json_logs=cfg.telemetry.json_logs)
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


# --------------------------------------------------------------------------- feedback


def _feedback_config(args: argparse.Namespace):
    """Topic names and group id from ``-c`` (else the defaults), broker/security as for produce."""
    from rsafe.stream.config import load_config

    data = {"inputs": [{"topic": "rsafe.placeholder", "policy": "rsafe-default"}]}
    cfg = load_config(args.config, overrides={"broker": args.broker} if args.broker else None) if args.config \
        else load_config(data=data, overrides={"broker": args.broker} if args.broker else None)
    if getattr(args, "group_id", None):
        cfg = cfg.model_copy(update={"group_id": args.group_id})
    return cfg


def cmd_feedback_send(args: argparse.Namespace) -> int:
    import uuid

    from pydantic import ValidationError

    from rsafe.schemas.feedback import FeedbackContent, FeedbackEvent
    from rsafe.stream.clients import Message, produce

    cfg = _feedback_config(args)
    source = args.source or ("user_report" if args.report else "reviewer")
    try:
        fb = FeedbackEvent(event_id=args.event_id, feedback_id=args.feedback_id or uuid.uuid4().hex,
                           label=args.label, categories=args.category, source=source, reviewer=args.reviewer,
                           note=args.note, content=FeedbackContent(prompt=args.prompt, response=args.response)
                           if args.prompt else None)
    except ValidationError as err:
        return _err(str(err))
    topic = cfg.feedback.reports_topic if not fb.source.trusted else cfg.feedback.trusted_topic
    if args.report and fb.source.trusted:
        return _err(f"--report sends untrusted feedback; source {source!r} is a trusted one")
    try:
        produce(cfg.bootstrap, [Message(topic, fb.event_id.encode("utf-8"), fb.model_dump_json().encode("utf-8"))],
                client_kwargs=cfg.security.client_kwargs())
    except Exception as err:  # noqa: BLE001
        return _err(f"sending feedback to {topic} failed: {err}")
    print(f"sent {fb.label} feedback {fb.feedback_id} on event {fb.event_id} to {topic}", file=sys.stderr)
    return 0


def feedback_stats(cfg, idle_timeout_s: float = 1.5) -> dict[str, dict[str, int]]:
    """Trusted-feedback counts per policy version / model version / adapter version, read from
    the stats table's changelog (summed over partitions)."""
    from rsafe.stream.clients import iter_records
    from rsafe.stream.feedback import changelog_topic

    latest: dict[str, dict] = {}
    for r in iter_records(cfg.bootstrap, [changelog_topic(cfg, "stats")], idle_timeout_s=idle_timeout_s,
                          client_kwargs=cfg.security.client_kwargs()):
        key = (r.key or b"").decode("utf-8", "replace")
        if r.value is None:
            latest.pop(key, None)
        else:
            latest[key] = json.loads(r.value)
    out: dict[str, dict[str, int]] = {}
    for key, row in latest.items():
        name = key.split("|", 1)[1] if "|" in key else key
        agg = out.setdefault(name, {"trusted": 0, "agree": 0, "disagree": 0})
        for k in agg:
            agg[k] += int(row.get(k, 0))
    return out


def cmd_feedback_stats(args: argparse.Namespace) -> int:
    cfg = _feedback_config(args)
    try:
        stats = feedback_stats(cfg)
    except Exception as err:  # noqa: BLE001
        return _err(f"reading the feedback stats failed: {err}")
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    if not stats:
        print("no trusted feedback joined yet")
        return 0
    print(f"{'policy@version | model@version | adapter@version':<72} {'trusted':>8} {'agree':>7} {'rate':>6}")
    for name, row in sorted(stats.items()):
        rate = row["agree"] / row["trusted"] if row["trusted"] else 0.0
        print(f"{name.replace('|', ' | '):<72} {row['trusted']:>8} {row['agree']:>7} {rate:>6.1%}")
    return 0


def cmd_feedback_forget(args: argparse.Namespace) -> int:
    from rsafe.schemas.kafka import read_to_end
    from rsafe.stream.clients import Message, produce
    from rsafe.stream.context import forget_record

    cfg = _feedback_config(args)
    kw = cfg.security.client_kwargs()
    keys = [e.encode("utf-8") for e in args.event_ids]
    controls: list[Message] = []
    if not args.config or any(t.context.enabled for t in cfg.inputs):
        # The events' turns leave their conversations' context too (without -c: in case the workers keep
        # context): the audit records say which conversation and input topic each event belongs to.
        wanted, found = set(keys), {}
        try:
            with read_to_end(cfg.bootstrap, [cfg.outputs.audit_topic], client_kwargs=kw, timeout_s=600,
                             missing_ok=True) as audit_records:
                for r in audit_records:
                    if r.key in wanted:
                        found[r.key] = json.loads(r.value) if r.value is not None else None
        except Exception as err:  # noqa: BLE001
            return _err(f"reading {cfg.outputs.audit_topic} to find the events' conversations failed: {err}")
        for key, audit in found.items():
            if audit and audit.get("conversation_id") and audit.get("source", {}).get("topic"):
                controls.append(forget_record(audit["source"]["topic"], audit["conversation_id"],
                                              key.decode("utf-8")))
    try:
        produce(cfg.bootstrap, controls + [Message(cfg.outputs.audit_topic, k, None) for k in keys],  # type: ignore[arg-type]
                client_kwargs=kw)
    except Exception as err:  # noqa: BLE001
        return _err(f"sending the erasure tombstones failed: {err}")
    print(f"tombstoned {len(keys)} event(s) on {cfg.outputs.audit_topic}; running workers erase them from the "
          "feedback tables and tombstone their disagreement and review records", file=sys.stderr)
    if controls:
        print(f"asked the workers to remove {len(controls)} of them from their conversations' context "
              f"({', '.join(sorted({m.topic or '' for m in controls}))})", file=sys.stderr)
    return 0


def cmd_context_forget(args: argparse.Namespace) -> int:
    from rsafe.stream.clients import produce
    from rsafe.stream.context import forget_record

    cfg = _feedback_config(args)
    if args.config:
        try:
            topic = cfg.input(args.topic)
        except KeyError:
            return _err(f"{args.topic!r} is not an input topic of {args.config}")
        if not topic.context.enabled:
            return _err(f"context is off on {args.topic} in {args.config}: nothing is kept to forget")
    try:
        produce(cfg.bootstrap, [forget_record(args.topic, c) for c in args.conversation_ids],
                client_kwargs=cfg.security.client_kwargs())
    except Exception as err:  # noqa: BLE001
        return _err(f"sending the context-forget records failed: {err}")
    print(f"sent {len(args.conversation_ids)} context-forget record(s) to {args.topic}: the worker that owns each "
          "conversation's partition tombstones its context (in order with its events); the changelog's "
          "compaction removes the text from the broker (docs/STREAM.md, 'Conversation context')", file=sys.stderr)
    return 0


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

    fb = sub.add_parser("feedback", help="human feedback: send labels, agreement stats, erasure").add_subparsers(
        dest="feedback_cmd", required=True)
    s = fb.add_parser("send", help="send one feedback label for an event")
    s.add_argument("event_id")
    s.add_argument("--label", required=True, choices=["safe", "unsafe"])
    s.add_argument("--reviewer", help="who labels (a reviewer id)")
    s.add_argument("--note")
    s.add_argument("--category", action="append", default=[], help="category code (repeatable)")
    s.add_argument("--feedback-id", help="unique id (default: a random one)")
    s.add_argument("--source", choices=["reviewer", "appeal", "user_report", "external_model"],
                   help="default reviewer (user_report with --report)")
    s.add_argument("--report", action="store_true", help="untrusted feedback: the reports topic")
    s.add_argument("--prompt", help="attach the content as the reviewer saw it (audit in hash mode)")
    s.add_argument("--response")
    s.set_defaults(func=cmd_feedback_send)
    s = fb.add_parser("stats", help="agreement rate of trusted feedback per policy and model version")
    s.add_argument("--json", action="store_true")
    s.add_argument("--group-id", help="the workers' group (default: the config's)")
    s.set_defaults(func=cmd_feedback_stats)
    s = fb.add_parser("forget", help="erase stored content of events (data-protection requests)")
    s.add_argument("event_ids", nargs="+", metavar="EVENT_ID")
    s.set_defaults(func=cmd_feedback_forget)
    for cmd in ("send", "stats", "forget"):
        sp = fb.choices[cmd]
        sp.add_argument("--broker", help=f"broker URL(s) (default: RSAFE_BROKER or {DEFAULT_BROKER})")
        sp.add_argument("-c", "--config", help="the worker config (topics, group, security)")

    ctx = sub.add_parser("context", help="conversation context kept by the workers").add_subparsers(
        dest="context_cmd", required=True)
    s = ctx.add_parser("forget", help="erase the whole context of conversations (data-protection requests)")
    s.add_argument("conversation_ids", nargs="+", metavar="CONVERSATION_ID")
    s.add_argument("--topic", required=True, help="the input topic whose context is erased")
    s.add_argument("--broker", help=f"broker URL(s) (default: RSAFE_BROKER or {DEFAULT_BROKER})")
    s.add_argument("-c", "--config", help="the worker config (checks that the topic keeps context; security)")
    s.set_defaults(func=cmd_context_forget)

    p = sub.add_parser("demo", help="embedded broker + demo model + worker + sample events, live")
    p.add_argument("--model", default=str(DEMO_MODEL), help="the demo model directory (default: the repository's "
                   "demo/model)")
    p.add_argument("--config", default=str(BUNDLED_CONFIG), help="worker config (default: bundled demo.yaml)")
    p.add_argument("--samples", default=None, help="events JSONL (default: bundled samples)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=cmd_demo)
