"""The ``rsafe`` command. The only module that wires stream, training and evaluation together.

Each area adds its own sub-commands through an ``add_commands(subparsers)`` function:
``rsafe.stream.cli`` (broker, worker, produce, tail, demo) and ``rsafe.evaluation.cli`` (eval).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator

COMMAND_MODULES = ["rsafe.stream.cli", "rsafe.evaluation.cli", "rsafe.training.cli"]


def _die(msg: str, code: int = 2) -> None:
    print(f"rsafe: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


# --------------------------------------------------------------------------- engine options


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs a guard model."""
    g = p.add_argument_group("engine")
    g.add_argument("--model", required=True, help="model dir or HF id (e.g. Qwen/Qwen2.5-7B-Instruct)")
    g.add_argument("--engine", choices=["vllm", "transformers", "openai"], default="vllm")
    g.add_argument("--base-url", help="openai engine: server URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model-id", help="name reported in verdicts (default: --model)")
    g.add_argument("--dtype", default=None, help="auto (GPU) / float32 (CPU default)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-tokens", type=int, default=512, help="max generated tokens (reasoning + answer)")
    g.add_argument("--structured", action=argparse.BooleanOptionalAction, default=True,
                   help="constrain output to the RSafe format (vLLM structured outputs; default on)")
    g.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="register a LoRA adapter")
    g.add_argument("--adapter", help="LoRA adapter name to use for every request")
    g.add_argument("--max-chars", type=int, default=16_000, help="longest message judged")
    g.add_argument("--on-oversize", choices=["truncate", "reject"], default="truncate")
    g.add_argument("--policy-dir", action="append", default=[], help="extra directory of policy YAML files")


def engine_config_from_args(args: argparse.Namespace):
    from rsafe.models import EngineConfig, GenerationConfig, InputLimits

    from rsafe.models.config import cuda_available

    on_cpu = args.engine != "openai" and not cuda_available()
    loras = {}
    for item in args.lora:
        name, sep, path = item.partition("=")
        if not sep:
            _die(f"--lora {item!r}: expected NAME=PATH")
        loras[name] = path
    try:
        return EngineConfig(
            backend=args.engine, model=args.model, model_id=args.model_id, base_url=args.base_url,
            dtype=args.dtype or ("float32" if on_cpu else "auto"),
            max_model_len=args.max_model_len or (1024 if on_cpu else 4096),
            gpu_memory_utilization=0.5 if on_cpu else 0.9, enforce_eager=on_cpu,
            enable_lora=bool(loras), max_lora_rank=16, lora_adapters=loras,
            limits=InputLimits(max_chars=args.max_chars, on_oversize=args.on_oversize),
            generation=GenerationConfig(max_tokens=args.max_tokens, structured=args.structured),
        )
    except ValueError as err:
        _die(str(err))


def policy_registry(dirs: list[str]):
    from rsafe.policies import PolicyError, PolicyRegistry

    try:
        return PolicyRegistry.from_dirs(*dirs)
    except PolicyError as err:
        _die(str(err))


def make_guard(args: argparse.Namespace, policies=None, default_policy: str | None = None):
    from rsafe.models import EngineError, Guard
    from rsafe.policies import DEFAULT_POLICY

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        return Guard.from_config(engine_config_from_args(args), policies=policies,
                                 default_policy=default_policy or DEFAULT_POLICY)
    except EngineError as err:
        _die(str(err), 1)


# --------------------------------------------------------------------------- classify


def _read_jsonl(path: str) -> Iterator[tuple[int, dict | str]]:
    """(line number, row) for each non-blank line; a row that is not a JSON object is a string error."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield n, f"line {n}: not valid JSON: {err.msg}"
                continue
            yield n, row if isinstance(row, dict) else f"line {n}: expected a JSON object, got {type(row).__name__}"


def cmd_classify(args: argparse.Namespace) -> int:
    from rsafe.models import Label, Verdict
    from rsafe.policies import Level

    policies = policy_registry(args.policy_dir)
    try:
        policy = policies.resolve(args.policy)
    except Exception as err:  # noqa: BLE001 - PolicyError or unknown name
        _die(str(err))
    if policy.name not in policies:
        policies.add(policy, args.policy)
    if args.text is None and args.input is None:
        _die("give --text or --input FILE.jsonl")
    level = Level(args.level) if args.level else None

    def request(row: dict) -> dict:
        req = {k: row[k] for k in ("prompt", "response", "id") if k in row}
        if "id" in req and isinstance(req["id"], int):
            req["id"] = str(req["id"])
        req.update(policy=policy.name, adapter=args.adapter)
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
            rows = list(_read_jsonl(args.input))
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
        print(f"OK {f}: {p.name} v{p.version}, {len(p.categories)} categories, level {p.level.value}")
    return 1 if bad else 0


def cmd_policy_show(args: argparse.Namespace) -> int:
    from rsafe.models.prompt import build_user_turn, render_prompt
    from rsafe.policies import Level

    policies = policy_registry(args.policy_dir)
    try:
        policy = policies.resolve(args.name)
    except Exception as err:  # noqa: BLE001
        _die(str(err))
    level = Level(args.level)
    turn = build_user_turn(policy, args.prompt, args.response if level == Level.RESPONSE else None, level)
    if args.model:
        from transformers import AutoTokenizer

        turn = render_prompt(AutoTokenizer.from_pretrained(args.model), turn)
    sys.stdout.write(turn)
    print(f"# policy {policy.name} version {policy.version} level {level.value}", file=sys.stderr)
    return 0


def cmd_policy_list(args: argparse.Namespace) -> int:
    policies = policy_registry(args.policy_dir)
    for name in policies.names():
        p = policies.get(name)
        print(f"{name}\tv{p.version}\t{len(p.categories)} categories\t{policies.source(name)}")
    return 0


# --------------------------------------------------------------------------- demo model


def cmd_demo_model_build(args: argparse.Namespace) -> int:
    from rsafe.models.demo_model import build_demo_model

    path = build_demo_model(args.dir, seed=args.seed, force=args.force,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
    print(path)
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsafe", description="RSafe stream guard: reasoning-based moderation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="classify messages and print verdict JSON lines")
    add_engine_args(p)
    p.add_argument("--policy", default="rsafe-default", help="policy name or YAML file")
    p.add_argument("--level", choices=["prompt", "response"], help="default: response when a response is given")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="one prompt to classify")
    src.add_argument("--input", help="JSONL file with prompt, optional response and id")
    p.add_argument("--response", help="with --text: the assistant response to judge")
    p.add_argument("--output", help="write verdict JSONL here (default: stdout)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--progress", action="store_true", help="show the progress bar even when not a TTY")
    p.set_defaults(func=cmd_classify)

    pol = sub.add_parser("policy", help="inspect and validate policies").add_subparsers(dest="policy_cmd", required=True)
    v = pol.add_parser("validate", help="validate policy YAML files")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=cmd_policy_validate)
    s = pol.add_parser("show", help="print the exact prompt a policy renders")
    s.add_argument("name", help="policy name or YAML file")
    s.add_argument("--level", choices=["prompt", "response"], default="prompt")
    s.add_argument("--prompt", default="{prompt}", help="message to place in the template")
    s.add_argument("--response", default="{response}")
    s.add_argument("--model", help="render with this model's chat template too")
    s.add_argument("--policy-dir", action="append", default=[])
    s.set_defaults(func=cmd_policy_show)
    ls = pol.add_parser("list", help="list known policies")
    ls.add_argument("--policy-dir", action="append", default=[])
    ls.set_defaults(func=cmd_policy_list)

    dm = sub.add_parser("demo-model", help="the bundled tiny demo model").add_subparsers(dest="dm_cmd", required=True)
    b = dm.add_parser("build", help="build (or reuse the cached) demo model into DIR")
    b.add_argument("dir")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true")
    b.set_defaults(func=cmd_demo_model_build)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
