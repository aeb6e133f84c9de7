"""Command-line options shared by every command that runs a guard model (``rsafe classify``,
``rsafe eval``, ``rsafe train promote`` ...), and the helpers that turn them into a ``Guard``.

Kept here, next to ``EngineConfig``, so that each area's CLI module builds its commands without
importing the root ``rsafe.cli`` (no import cycle). Engine settings come from
``local_engine_config``: machine-dependent defaults, flags on top.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn


def die(msg: str, code: int = 2) -> NoReturn:
    """Print ``rsafe: error: msg`` and exit with ``code`` (2: usage, 1: runtime failure)."""
    print(f"rsafe: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs a guard model."""
    from rsafe.models.engines import BACKENDS  # (imports no engine library: they load when one starts)

    g = p.add_argument_group("engine")
    g.add_argument("--model", required=True, help="model dir or HF id (e.g. Qwen/Qwen2.5-7B-Instruct)")
    # every backend but null: a fixed answer, for tests and benchmarks, never offered on the command line
    g.add_argument("--engine", choices=[name for name in BACKENDS if name != "null"], default="vllm")
    g.add_argument("--base-url", help="openai engine: server URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model-id", help="name reported in verdicts (default: --model)")
    g.add_argument("--dtype", default=None, help="default: auto on a GPU, float32 on a CPU")
    g.add_argument("--max-model-len", type=int, default=None, help="default: 4096 on a GPU, 1024 on a CPU")
    g.add_argument("--max-tokens", type=int, default=512, help="max generated tokens (reasoning + answer)")
    g.add_argument("--structured", action=argparse.BooleanOptionalAction, default=True,
                   help="constrain output to the RSafe format (vLLM structured outputs; default on)")
    g.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="register a LoRA adapter")
    g.add_argument("--adapter", help="LoRA adapter name to use for every request")
    g.add_argument("--max-chars", type=int, default=None, help="longest message judged, in characters (default: InputLimits.max_chars)")
    g.add_argument("--on-oversize", choices=["reject", "truncate"], default=None,
                   help="a message over --max-chars: reject (default: an error verdict, too_large; nothing "
                        "judged in part) or truncate (judge its head and tail only; the middle is never seen)")
    g.add_argument("--max-window-tokens", type=int, default=None,
                   help="content tokens per window of a long message (default: what the context allows)")
    g.add_argument("--policy-dir", action="append", default=[], help="extra directory of policy YAML files")


def engine_config_from_args(args: argparse.Namespace) -> Any:
    """``EngineConfig`` from ``add_engine_args`` options (machine defaults where not given)."""
    from rsafe.models.config import GenerationConfig, InputLimits, local_engine_config

    loras = {}
    for item in args.lora:
        name, sep, path = item.partition("=")
        if not sep:
            die(f"--lora {item!r}: expected NAME=PATH")
        loras[name] = path
    overrides: dict[str, Any] = {}
    if args.dtype:
        overrides["dtype"] = args.dtype
    if args.max_model_len:
        overrides["max_model_len"] = args.max_model_len
    limits: dict[str, Any] = {}
    if args.on_oversize is not None:
        limits["on_oversize"] = args.on_oversize
    if args.max_window_tokens is not None:
        limits["max_window_tokens"] = args.max_window_tokens
    if args.max_chars is not None:
        limits["max_chars"] = args.max_chars
    try:
        return local_engine_config(
            args.model, args.engine, model_id=args.model_id, base_url=args.base_url,
            enable_lora=bool(loras), max_lora_rank=16, lora_adapters=loras,
            limits=InputLimits(**limits),
            generation=GenerationConfig(max_tokens=args.max_tokens, structured=args.structured),
            **overrides,
        )
    except ValueError as err:
        die(str(err))


def policy_registry(dirs: list[str]) -> Any:
    """Bundled policies plus ``dirs``; exits with the reason on a bad policy file."""
    from rsafe.policies import PolicyError, PolicyRegistry

    try:
        return PolicyRegistry.from_dirs(*dirs)
    except PolicyError as err:
        die(str(err))


def make_guard(args: argparse.Namespace, policies: Any = None, default_policy: str | None = None) -> Any:
    """A started ``Guard`` from the engine options; exits 1 with the reason when the engine fails."""
    from rsafe.models.engines import EngineError
    from rsafe.models.guard import Guard
    from rsafe.policies import DEFAULT_POLICY

    try:
        return Guard.from_config(engine_config_from_args(args), policies=policies,
                                 default_policy=default_policy or DEFAULT_POLICY)
    except EngineError as err:
        die(str(err), 1)
