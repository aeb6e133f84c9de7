"""``rsafe eval``: measure a guard model on the RSafe benchmarks with one command.

    rsafe eval --model M --benchmark toxicchat --data-dir data/ [--limit N] [--policy P]
    rsafe eval --model demo/model --benchmark demo --engine transformers
    rsafe eval --model M --benchmark all --data-dir data/ --adaptive --robustness
    rsafe eval --model M --benchmark mhj --benchmark safedialbench --data-dir data/ [--no-context]

Writes results.json, results.md, predictions and plots to ``--out`` and prints the markdown.
See docs/EVALUATION.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from rsafe.evaluation.benchmarks import BENCHMARKS, PAPER_BENCHMARKS
from rsafe.models.options import add_engine_args, die, make_guard, policy_registry

EVAL_POLICY_DIR = Path(__file__).resolve().parent / "policies"
"""Policies shipped with the evaluation (the tailored taxonomies, e.g. ``wildguard-taxonomy``)."""


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a guard model on the RSafe benchmarks",
                       description="Evaluate a guard model on the RSafe benchmarks (F1 of the unsafe class, "
                                   "unknown rate, AUPRC, speed), side by side with the published figures.")
    add_engine_args(p)
    p.add_argument("--benchmark", action="append", required=True, metavar="NAME",
                   help=f"repeatable; 'all' = {', '.join(PAPER_BENCHMARKS)}; also: "
                        f"{', '.join(n for n in BENCHMARKS if n not in PAPER_BENCHMARKS)}")
    p.add_argument("--data-dir", default=os.environ.get("RSAFE_EVAL_DATA"),
                   help="folder with <name>.jsonl|parquet|csv local copies (default: $RSAFE_EVAL_DATA); "
                        "else the hub is tried")
    p.add_argument("--no-hub", action="store_true", help="never try the Hugging Face hub")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out benchmarks that cannot be loaded instead of failing")
    p.add_argument("--limit", type=int, help="a deterministic sample of at most N examples per set")
    p.add_argument("--policy", default="rsafe-default", help="policy name or YAML file")
    p.add_argument("--adaptive", nargs="?", const="auto", metavar="POLICY",
                   help="also run under a tailored policy and compare; without a value, each set's own "
                        "(wildguardtest_*: wildguard-taxonomy, demo_kids: kids-platform, ...)")
    p.add_argument("--robustness", action="store_true",
                   help="also run jailbreak-wrapped copies of the prompt-level examples")
    p.add_argument("--jailbreak-mode", choices=["cycle", "all"], default="cycle",
                   help="cycle: one wrapper per prompt; all: every wrapper on every prompt")
    p.add_argument("--no-context", action="store_true",
                   help="judge the last message of multi-turn examples (mhj, safedialbench) without its "
                        "earlier turns, to compare recall with and without context")
    p.add_argument("--out", default=None, help="output folder (default: out/eval/<model id>)")
    p.add_argument("--cache-dir", default=".cache/eval", help="verdict cache (resume); default .cache/eval")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the verdict cache")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--progress", action="store_true", help="show progress bars even when not a TTY")
    p.set_defaults(func=cmd_eval)

    d = sub.add_parser("eval-download", help="save benchmark splits from the hub as local JSONL files",
                       description="On a machine with internet: save the published evaluation split of each "
                                   "benchmark to <data-dir>/<name>.jsonl for offline `rsafe eval --data-dir`.")
    d.add_argument("--benchmark", action="append", required=True, metavar="NAME", help="repeatable; 'all'")
    d.add_argument("--data-dir", required=True)
    d.set_defaults(func=cmd_eval_download)


def _benchmarks(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        for n in (PAPER_BENCHMARKS if name == "all" else [name]):
            if n not in BENCHMARKS:
                die(f"unknown benchmark {n!r}; known: all, {', '.join(BENCHMARKS)}")
            if n not in out:
                out.append(n)
    return out


def cmd_eval_download(args: argparse.Namespace) -> int:
    from rsafe.evaluation.benchmarks import download_benchmark

    failed = 0
    done: set[str] = set()
    for name in _benchmarks(args.benchmark):
        spec = BENCHMARKS[name]
        if spec.hub_id is None and spec.homepage:
            print(f"rsafe eval-download: {name} is not on the hub; get its files from {spec.homepage}",
                  file=sys.stderr)
        if spec.hub_id is None or (spec.hub_id, spec.config, spec.split) in done:
            continue
        try:
            path = download_benchmark(name, args.data_dir)
        except Exception as err:  # noqa: BLE001 - report every set, then fail
            print(f"rsafe eval-download: {name}: {type(err).__name__}: {err}", file=sys.stderr)
            failed += 1
            continue
        done.add((spec.hub_id, spec.config, spec.split))
        print(f"{name}: {path}")
    return 1 if failed else 0


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def cmd_eval(args: argparse.Namespace) -> int:
    from rsafe.evaluation.benchmarks import BenchmarkError, load_benchmark
    from rsafe.evaluation.report import Report, markdown_report, write_report
    from rsafe.evaluation.runner import AdaptiveResult, evaluate, evaluate_robustness

    if args.limit is not None and args.limit < 1:
        die("--limit must be at least 1")
    if args.batch_size < 1:
        die("--batch-size must be at least 1")
    names = _benchmarks(args.benchmark)

    policies = policy_registry([*([str(EVAL_POLICY_DIR)] if EVAL_POLICY_DIR.is_dir() else []), *args.policy_dir])

    def resolve(name: str):
        try:
            pol = policies.resolve(name)
        except Exception as err:  # noqa: BLE001 - PolicyError or unknown name
            die(str(err))
        if pol.name not in policies:
            policies.add(pol, name)
        return pol

    policy = resolve(args.policy)
    tailored: dict[str, object] = {}
    if args.adaptive:
        for n in names:
            choice = BENCHMARKS[n].tailored_policy if args.adaptive == "auto" else args.adaptive
            if choice and choice != policy.name:
                tailored[n] = resolve(choice)
            elif not choice:
                print(f"rsafe eval: {n} has no tailored policy of its own; give one with --adaptive POLICY",
                      file=sys.stderr)

    data = {}
    for n in names:  # load everything before starting the engine: fail fast
        try:
            data[n] = load_benchmark(n, args.data_dir, args.limit, hub=not args.no_hub)
        except BenchmarkError as err:
            if not args.skip_missing:
                die(str(err))
            print(f"rsafe eval: skipping {n}: {err}", file=sys.stderr)
            continue
        d = data[n]
        print(f"rsafe eval: {n}: {len(d)} examples from {d.source}"
              + (f" (sample of {d.total})" if len(d) < d.total else "")
              + (f", {n_ctx} with earlier turns" + (" (dropped: --no-context)" if args.no_context else "")
                 if (n_ctx := sum(bool(e.context) for e in d)) else "")
              + ("; skipped " + ", ".join(f"{c} {why}" for why, c in d.skipped.items()) if d.skipped else ""),
              file=sys.stderr)
    if not data:
        die("no benchmark could be loaded")

    out_dir = Path(args.out or Path("out") / "eval" / _slug(args.model_id or args.model))
    guard = make_guard(args, policies, policy.name)
    kw = dict(batch_size=args.batch_size, cache_dir=None if args.no_cache else args.cache_dir,
              adapter=args.adapter, progress=args.progress or sys.stderr.isatty(), context=not args.no_context)
    report = Report(
        model=guard.model_id, engine=args.engine, adapter=args.adapter, policy=policy.name,
        policy_version=policy.version, limit=args.limit,
        settings={"generation": dataclasses.asdict(guard.generation), "limits": guard.limits.model_dump(),
                  "batch_size": args.batch_size, "data_dir": args.data_dir, "context": not args.no_context,
                  "engine_startup_s": getattr(guard.backend, "startup_s", None)},
    )
    try:
        for n, d in data.items():
            clean = evaluate(guard, d, policy, **kw)
            report.runs.append(clean)
            if n in tailored:
                other = evaluate(guard, d, tailored[n], **kw)
                report.runs.append(other)
                report.adaptive.append(AdaptiveResult(benchmark=n, default=clean, tailored=other))
            if args.robustness and any(e.level == "prompt" for e in d):
                rb = evaluate_robustness(guard, d, policy, clean=clean, mode=args.jailbreak_mode, **kw)
                report.runs.append(rb.wrapped)
                report.robustness.append(rb)
    except KeyboardInterrupt:
        print("\nrsafe eval: interrupted; verdicts computed so far are cached in "
              f"{args.cache_dir} - run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        guard.close()

    thresholds = {p: policies.get(p).unsafe_threshold for p in {r.policy for r in report.runs}}
    written = write_report(report, out_dir, plots=not args.no_plots, thresholds=thresholds)
    sys.stdout.write(markdown_report(report))
    print(f"rsafe eval: wrote {written['json']}, {written['markdown']}, {len(written['predictions'])} prediction "
          f"files and {len(written['plots'])} plots in {out_dir}", file=sys.stderr)
    return 0
