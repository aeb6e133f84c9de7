"""The demo's commands: ``rsafe demo-model build|check``, and its part of ``rsafe train``.

``add_commands`` (called by the root command, ``rsafe.cli``, before the other rooms' commands)
registers the synthetic demo evaluation sets that ``rsafe eval`` lists (``register_demo_benchmarks``:
nothing registers them on import) and adds ``rsafe demo-model``. ``train_extension`` is what the root
command hands ``rsafe.training.cli``, which does not import this room:

* ``rsafe train drift-data --out DIR`` and ``rsafe train drift-eval …``: the drift scenario
  (``rsafe.demo.drift``, docs/TRAINING.md);
* ``rsafe train dataset --replay demo``: the synthetic corpus's training messages as the replay pool;
* ``rsafe train promote`` without ``--promotion-set``: the demo's synthetic promotion set, for the
  demo model's candidates only.

Exit codes: 0 done, 1 runtime failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rsafe.models.options import die
from rsafe.training.cli import TrainExtension


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- demo-model


def cmd_demo_model_build(args: argparse.Namespace) -> int:
    from rsafe.demo.build import build_demo_model

    path = build_demo_model(args.dir, seed=args.seed, force=args.force, log=_log)
    print(path)
    return 0


def cmd_demo_model_check(args: argparse.Namespace) -> int:
    from rsafe.demo.build import check_demo_model, read_manifest

    problem = check_demo_model(args.dir)
    if problem:
        die(problem, 1)
    manifest = read_manifest(args.dir) or {}
    print(f"{args.dir}: the demo model of recipe {manifest.get('recipe')} ({manifest.get('params', 0) / 1e6:.1f}M "
          f"parameters, built by `{manifest.get('command')}` in {manifest.get('build_seconds', 0):,.0f} s)")
    return 0


# --------------------------------------------------------------------------- drift scenario


def cmd_drift_data(args: argparse.Namespace) -> int:
    from rsafe.demo import drift

    scenario = drift.DriftScenario(n_feedback=args.n_feedback, n_contrast=args.n_contrast,
                                   n_general=args.n_general, n_platform=args.n_platform, n_kept=args.n_kept,
                                   seed=args.seed)
    for path in drift.write_data(args.out, scenario).values():
        print(path)
    return 0


def cmd_drift_eval(args: argparse.Namespace) -> int:
    from rsafe.demo import drift
    from rsafe.training import grpo

    sets = args.sets.split(",") if args.sets else list(drift.SETS)
    if args.run:
        report = drift.evaluate_run(args.run, args.model, sets=sets, every=args.every, log=_log)
        report["metrics"] = grpo.read_metrics(args.run)
        summary = Path(args.run) / grpo.SUMMARY
        report["training_summary"] = json.loads(summary.read_text()) if summary.exists() else None
    else:
        report = {"final": drift.evaluate_model(args.model, adapter_dir=args.adapter, sets=sets)}
    if args.before:
        before = json.loads(Path(args.before).read_text())["final"]
        report["before"] = before
        if set(drift.SETS) <= set(before) and set(drift.SETS) <= set(report["final"]):
            report["targets"] = drift.targets(before, report["final"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.plot and args.run:
        drift.plot_run(report["metrics"], report["checkpoints"], args.plot, before=report.get("before"))
    for name, m in report["final"].items():
        _log(f"[drift] {name}: accuracy {m['accuracy']:.1%}, format {m['format_rate']:.1%} (n={m['n']})")
    for name, t in report.get("targets", {}).items():
        _log(f"[drift] target {name}: {t['value']:+.3f} {'ok' if t['ok'] else 'NOT MET'}")
    print(args.out)
    return 0


def _add_drift(train: argparse._SubParsersAction) -> None:
    from rsafe.demo.drift import SETS, DriftScenario

    d = DriftScenario()
    p = train.add_parser("drift-data", help="the drift scenario's disagreements, replay pool and evaluation hashes")
    p.add_argument("--out", required=True)
    p.add_argument("--n-feedback", type=int, default=d.n_feedback)
    p.add_argument("--n-contrast", type=int, default=d.n_contrast)
    p.add_argument("--n-general", type=int, default=d.n_general)
    p.add_argument("--n-platform", type=int, default=d.n_platform)
    p.add_argument("--n-kept", type=int, default=d.n_kept,
                   help="messages of every other harmful family under both policies (the loop demo uses 2)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=cmd_drift_data)

    e = train.add_parser("drift-eval", help="accuracy / format rate on the drift scenario's held-out sets")
    e.add_argument("--model", required=True, help="the (base) model directory")
    which = e.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="a LoRA adapter directory on --model")
    which.add_argument("--run", help="a GRPO output directory: its result and every checkpoint")
    e.add_argument("--sets", help=f"comma-separated subset of {','.join(SETS)}")
    e.add_argument("--before", help="a report of the base model: adds the targets check")
    e.add_argument("--out", required=True, help="report JSON")
    e.add_argument("--every", type=int, default=1, help="with --run: checkpoints whose step is a multiple of this")
    e.add_argument("--plot", help="with --run: PNG of reward and held-out accuracy per step")
    e.set_defaults(func=cmd_drift_eval)


# --------------------------------------------------------------------------- promotion and replay


def _demo_set_refused(base_model: str, candidate: str) -> str | None:
    """Why the demo's promotion set may not gate this candidate (its base is not the demo model), or None."""
    from rsafe.demo.build import is_demo_model

    bases = [base_model]
    summary = Path(candidate) / "training_summary.json"
    if summary.is_file():
        try:
            bases.append(json.loads(summary.read_text(encoding="utf-8")).get("base_model") or base_model)
        except ValueError:
            pass
    other = next((b for b in bases if not is_demo_model(b)), None)
    if other is None:
        return None
    return (f"no --promotion-set given and the base model {other!r} is not the demo model: the demo's promotion "
            "set is synthetic and says nothing about a real model. A promotion set is a folder of held-out, "
            "labelled rows from your own traffic that no training set contains (general.jsonl under your "
            "general policy, slice.jsonl for the change being trained, promotion_set.json naming both "
            "policies); docs/TRAINING.md section 5 says how to make one. Then: rsafe train promote ... "
            "--promotion-set DIR")


def _default_promotion_set(base_model: str, candidate: str) -> Callable[[], Any]:
    """The demo's promotion set, when the candidate's base is the demo model (else ``ValueError``: why not)."""
    from rsafe.demo.drift import demo_promotion_set

    refused = _demo_set_refused(base_model, candidate)
    if refused:
        raise ValueError(refused)
    return demo_promotion_set


def _demo_replay(n: int, seed: int) -> list[Any]:
    from rsafe.demo.drift import demo_replay

    return demo_replay(n, seed=seed)


def train_extension() -> TrainExtension:
    """The demo's part of ``rsafe train`` (``rsafe.training.cli.add_commands`` takes it)."""
    return TrainExtension(add_commands=_add_drift, replay_pools={"demo": _demo_replay},
                          default_promotion_set=_default_promotion_set)


# --------------------------------------------------------------------------- wiring


def add_commands(sub: argparse._SubParsersAction) -> None:
    from rsafe.demo.benchmarks import register_demo_benchmarks

    register_demo_benchmarks()  # before rsafe.evaluation.cli, which lists them in `rsafe eval --help`
    dm = sub.add_parser("demo-model", help="the bundled tiny demo model").add_subparsers(dest="dm_cmd", required=True)
    b = dm.add_parser("build", help="build (or reuse the cached) demo model into DIR (the repository carries "
                      "the default build in demo/model: make demo-model-rebuild refreshes it)")
    b.add_argument("dir")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="rebuild even when DIR holds a build of this recipe")
    b.set_defaults(func=cmd_demo_model_build)
    c = dm.add_parser("check", help="is DIR the demo model the code's recipe makes? (exit 1 with how to rebuild)")
    c.add_argument("dir", nargs="?", default="demo/model")
    c.set_defaults(func=cmd_demo_model_check)
