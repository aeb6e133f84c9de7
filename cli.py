"""The ``rsafe`` command. The only module that wires stream, training, evaluation and the demo together.

Each area adds its own sub-commands through an ``add_commands(subparsers)`` function:
``rsafe.stream.cli`` (broker, worker, produce, tail, demo), ``rsafe.demo.cli`` (demo-model),
``rsafe.training.cli`` (train, models) and ``rsafe.evaluation.cli`` (eval). Shared engine options
live in ``rsafe.models.options``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from rsafe.models.options import add_engine_args, die, make_guard, policy_registry
from rsafe.schemas.jsonl import read_jsonl

#: Each adds its sub-commands. ``rsafe.demo.cli`` comes before ``rsafe.evaluation.cli``: its
#: ``add_commands`` registers the synthetic demo sets that ``rsafe eval`` lists (nothing registers
#: them on import); and before ``rsafe.training.cli``, which is handed the demo's part of
#: ``rsafe train`` (``train_extension``: training does not import the demo).
COMMAND_MODULES = ["rsafe.stream.cli", "rsafe.demo.cli", "rsafe.training.cli", "rsafe.evaluation.cli"]


# --------------------------------------------------------------------------- classify


def cmd_classify(args: argparse.Namespace) -> int:
    from rsafe.models import Label, Verdict
    from rsafe.policies import Level

    policies = policy_registry(args.policy_dir)
    try:
        policy = policies.resolve(args.policy)
    except Exception as err:  # noqa: BLE001 - PolicyError or unknown name
        die(str(err))
    if policy.name not in policies:
        policies.add(policy, args.policy)
    if args.text is None and args.input is None:
        die("give --text or --input FILE.jsonl")
    level = Level(args.level) if args.level else None

    def request(row: dict) -> dict:
        req = {k: row[k] for k in ("prompt", "response", "id", "messages", "context") if k in row}
        if "id" in req and isinstance(req["id"], int):
            req["id"] = str(req["id"])
        req.update(policy=policy.name, adapter=args.adapter, judge=args.judge)
        if args.max_context_tokens is not None:
            req["max_context_tokens"] = args.max_context_tokens
        if level:
            req["level"] = level
        return req

    guard = make_guard(args, policies, policy.name)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    counts: dict[str, int] = {}
    try:
        if args.text is not None:
            rows = [(1, {"prompt": args.text, **({"response": args.response} if args.response else {})})]
        else:
            rows = list(read_jsonl(args.input))
        from tqdm import tqdm

        bar = tqdm(total=len(rows), unit="msg", disable=args.input is None or not sys.stderr.isatty() and not args.progress)
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start: start + args.batch_size]
            good = [(n, r) for n, r in chunk if isinstance(r, dict)]
            verdicts = iter(guard.classify([request(r) for _, r in good]))
            for n, row in chunk:
                v = next(verdicts) if isinstance(row, dict) else Verdict(label=Label.ERROR, error_reason=row,
                                                                      model=guard.model_id)
                counts[v.label.value] = counts.get(v.label.value, 0) + 1
                out.write(v.model_dump_json(exclude_none=False) + "\n")
            out.flush()
            bar.update(len(chunk))
        bar.close()
    finally:
        if out is not sys.stdout:
            out.close()
        guard.close()
    print("summary: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())), file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- policy


def cmd_policy_validate(args: argparse.Namespace) -> int:
    from rsafe.policies import PolicyError, load_policy

    bad = 0
    for f in args.files:
        try:
            p = load_policy(f)
        except PolicyError as err:
            print(f"INVALID {err}", file=sys.stderr)
            bad += 1
            continue
        print(f"OK {f}: {p.name} version {p.version}, {len(p.categories)} categories, level {p.level.value}")
    return 1 if bad else 0


def _policy_store(args: argparse.Namespace):
    """The policy store read from the broker (``--broker``, ``-c`` config, or RSAFE_BROKER)."""
    from rsafe.stream.cli import client_settings
    from rsafe.stream.config import POLICIES_TOPIC, load_config
    from rsafe.schemas.kafka import read_policy_store

    topic = args.topic or (load_config(args.config).outputs.policies_topic if args.config else POLICIES_TOPIC)
    try:
        bootstrap, kw = client_settings(args)
        return read_policy_store(bootstrap, topic, strict=False, client_kwargs=kw)
    except Exception as err:  # noqa: BLE001 - broker unreachable, bad config
        die(f"cannot read the policy store {topic}: {err}", 1)


def cmd_policy_show(args: argparse.Namespace) -> int:
    from rsafe.models.prompt import build_user_turn, render_prompt
    from rsafe.policies import Level, PolicyError, parse_key

    try:
        name, version = parse_key(args.name)
        if version is not None:  # a stored version: the exact text it stood for
            policy = _policy_store(args).get(name, version)
        else:
            policy = policy_registry(args.policy_dir).resolve(args.name)
    except PolicyError as err:
        die(str(err), 1 if "@" in args.name else 2)
    level = Level(args.level)
    turn = build_user_turn(policy, args.prompt, args.response if level == Level.RESPONSE else None, level)
    if args.model:
        from transformers import AutoTokenizer

        turn = render_prompt(AutoTokenizer.from_pretrained(args.model), turn)
    sys.stdout.write(turn)
    print(f"# policy {policy.name} version {policy.version} level {level.value}", file=sys.stderr)
    return 0


def cmd_policy_history(args: argparse.Namespace) -> int:
    store = _policy_store(args)
    rows = store.history(args.name)
    if not rows:
        die(f"no stored versions of {args.name!r} in the policy store (stored: {', '.join(store.names()) or 'none'})", 1)
    registry = policy_registry(args.policy_dir)
    current = registry.get(args.name).version if args.name in registry else None
    for r in rows:
        mark = "  (current file)" if r.version == current else ""
        print(f"{r.name}@{r.version}\tfirst seen {r.first_seen_at.isoformat()}\tby {r.published_by or '-'}"
              f"\t{len(r.policy.get('categories', []))} categories{mark}")
    return 0


def cmd_policy_list(args: argparse.Namespace) -> int:
    policies = policy_registry(args.policy_dir)
    for name in policies.names():
        p = policies.get(name)
        print(f"{name}\t{p.version}\t{len(p.categories)} categories\t{policies.source(name)}")
    return 0


# --------------------------------------------------------------------------- main


def cmd_loop_demo(args: argparse.Namespace) -> int:
    import yaml

    from rsafe.loop import LoopSettings, main as loop_main

    overrides = {}
    if args.grpo_config:
        overrides = yaml.safe_load(Path(args.grpo_config).read_text(encoding="utf-8")) or {}
        if not isinstance(overrides, dict):
            raise SystemExit(f"{args.grpo_config}: not a mapping of GRPO settings")
    return loop_main(LoopSettings(model=args.model, work_dir=args.work_dir, grpo_steps=args.grpo_steps,
                                  grpo_overrides=overrides, n_kept=args.kept, pair_by_message=not args.no_pair))


def _store_args(p: argparse.ArgumentParser) -> None:
    from rsafe.stream.config import POLICIES_TOPIC

    p.add_argument("--broker", help="broker with the policy store (default: RSAFE_BROKER or 127.0.0.1:9092)")
    p.add_argument("-c", "--config", help="take broker and security settings from a worker config")
    p.add_argument("--topic", help=f"the policy store topic (default: the config's, else {POLICIES_TOPIC})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsafe", description="RSafe stream guard: reasoning-based moderation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="classify messages and print verdict JSON lines")
    add_engine_args(p)
    p.add_argument("--policy", default="rsafe-default", help="policy name or YAML file")
    p.add_argument("--level", choices=["prompt", "response"], help="default: response when a response is given")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="one prompt to classify")
    src.add_argument("--input", help="JSONL file: prompt, optional response and id; or messages (OpenAI chat "
                     "format, the judged turn last) to judge a turn with its conversation")
    p.add_argument("--response", help="with --text: the assistant response to judge")
    p.add_argument("--judge", choices=["last", "all"], default="last",
                   help="with messages: judge only the last message (default) or the whole conversation")
    p.add_argument("--max-context-tokens", type=int, help="with messages: most prompt tokens the earlier turns "
                   "take (default: what the model's context leaves)")
    p.add_argument("--output", help="write verdict JSONL here (default: stdout)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--progress", action="store_true", help="show the progress bar even when not a TTY")
    p.set_defaults(func=cmd_classify)

    pol = sub.add_parser("policy", help="inspect and validate policies").add_subparsers(dest="policy_cmd", required=True)
    v = pol.add_parser("validate", help="validate policy YAML files")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=cmd_policy_validate)
    s = pol.add_parser("show", help="print the exact prompt a policy (or a stored NAME@VERSION) renders")
    s.add_argument("name", help="policy name, YAML file, or NAME@VERSION from the policy store")
    s.add_argument("--level", choices=["prompt", "response"], default="prompt")
    s.add_argument("--prompt", default="{prompt}", help="message to place in the template")
    s.add_argument("--response", default="{response}")
    s.add_argument("--model", help="render with this model's chat template too")
    s.add_argument("--policy-dir", action="append", default=[])
    _store_args(s)
    s.set_defaults(func=cmd_policy_show)
    h = pol.add_parser("history", help="list a policy's stored versions with first-seen times")
    h.add_argument("name")
    h.add_argument("--policy-dir", action="append", default=[])
    _store_args(h)
    h.set_defaults(func=cmd_policy_history)
    ls = pol.add_parser("list", help="list known policies")
    ls.add_argument("--policy-dir", action="append", default=[])
    ls.set_defaults(func=cmd_policy_list)

    loop = sub.add_parser("loop", help="the whole retraining loop").add_subparsers(dest="loop_cmd", required=True)
    ld = loop.add_parser("demo", help="feedback → disagreements → GRPO → gate → hot swap, live on the demo model")
    ld.add_argument("--model", default="demo/model", help="the demo model directory (the repository's, as committed)")
    ld.add_argument("--work-dir", default=".cache/loop", help="broker data, registry, dataset, runs (wiped first)")
    ld.add_argument("--grpo-steps", type=int, default=60, help="GRPO optimizer steps (demo-cpu preset)")
    ld.add_argument("--grpo-config", help="YAML of GRPO settings over the demo-cpu preset (e.g. beta: 0.04)")
    ld.add_argument("--kept", type=int, default=2,
                    help="replay: messages of every other harmful family under both policies (0: none)")
    ld.add_argument("--no-pair", action="store_true",
                    help="shuffle the training rows freely (default: a message's rows share a GRPO step)")
    ld.set_defaults(func=cmd_loop_demo)

    loaded = {}
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        if name == "rsafe.training.cli" and "rsafe.demo.cli" in loaded:
            module.add_commands(sub, loaded["rsafe.demo.cli"].train_extension())
        else:
            module.add_commands(sub)
        loaded[name] = module
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
