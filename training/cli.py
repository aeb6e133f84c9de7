"""Training sub-commands of ``rsafe``: ``demo-model build`` (and the retraining job's commands).

Heavy imports (torch, transformers, TRL) happen inside the command functions, so ``rsafe --help``
stays fast.
"""

from __future__ import annotations

import argparse
import sys


def cmd_demo_model_build(args: argparse.Namespace) -> int:
    from rsafe.training.demo import build_demo_model

    path = build_demo_model(args.dir, seed=args.seed, force=args.force,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
    print(path)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    dm = sub.add_parser("demo-model", help="the bundled tiny demo model").add_subparsers(dest="dm_cmd", required=True)
    b = dm.add_parser("build", help="build (or reuse the cached) demo model into DIR")
    b.add_argument("dir")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="rebuild even when DIR holds a build of this recipe")
    b.set_defaults(func=cmd_demo_model_build)
