"""Training sub-commands of ``rsafe``: ``demo-model build`` and the retraining job (``train …``).

* ``rsafe train dataset --from-topic rsafe.disagreements | --from-file F --out D``
* ``rsafe train grpo --model BASE --dataset D --output DIR [--preset demo-cpu] [--config C]``
* ``rsafe train drift-data --out DIR`` and ``rsafe train drift-eval …``: the drift scenario
  (``rsafe.training.drift``, docs/TRAINING.md)

Heavy imports (torch, transformers, TRL, datasets, kafka) happen inside the command functions, so
``rsafe --help`` stays fast. Exit codes: 0 done, 1 runtime failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rsafe.models.options import die
from rsafe.schemas.topics import MODELS_TOPIC


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_demo_model_build(args: argparse.Namespace) -> int:
    from rsafe.training.demo import build_demo_model

    path = build_demo_model(args.dir, seed=args.seed, force=args.force, log=_log)
    print(path)
    return 0


def cmd_demo_model_check(args: argparse.Namespace) -> int:
    from rsafe.training.demo import check_demo_model, read_manifest

    problem = check_demo_model(args.dir)
    if problem:
        die(problem, 1)
    manifest = read_manifest(args.dir) or {}
    print(f"{args.dir}: the demo model of recipe {manifest.get('recipe')} ({manifest.get('params', 0) / 1e6:.1f}M "
          f"parameters, built by `{manifest.get('command')}` in {manifest.get('build_seconds', 0):,.0f} s)")
    return 0


# --------------------------------------------------------------------------- train dataset


def cmd_train_dataset(args: argparse.Namespace) -> int:
    from functools import partial

    from rsafe.policies import PolicyError
    from rsafe.schemas.kafka import KafkaReadError, read_policy_store
    from rsafe.training import dataset as ds

    out = Path(args.out)
    args.broker_given = args.broker is not None
    args.broker = args.broker or os.environ.get("RSAFE_BROKER", "127.0.0.1:9092")
    if (out / ds.MANIFEST).exists():
        die(f"{out} already holds a dataset; choose a new --out", 2)
    try:
        if args.from_file:
            source = ds.read_file(args.from_file)
        else:
            source = ds.read_topic(args.broker, args.from_topic, group_id=args.group_id)
        dropped = ds.Dropped()
        records = list(ds.parse_records(source.lines, dropped))
        if args.replay is None:
            replay = []
        elif args.replay == "demo":
            replay = ds.demo_replay(args.replay_pool, seed=args.seed)
        else:
            replay = ds.read_replay(args.replay)
        exclude = ds.read_hashes(args.exclude_hashes) if args.exclude_hashes else set()
        settings = ds.BuildSettings(replay_ratio=args.replay_ratio, balance=args.balance,
                                    pair_by_message=args.pair_by_message, seed=args.seed)
        store = None
        if args.policies_topic != "none" and (args.from_topic or args.broker_given):
            store = read_policy_store(args.broker, args.policies_topic, strict=True)
            _log(f"[dataset] policy store {args.policies_topic}: {len(store)} versions")
        lookup = partial(ds.resolve_policy, policy_dirs=args.policy_dir or (), store=store)
        built = ds.build(records, replay=replay, settings=settings, lookup=lookup, exclude_hashes=exclude,
                         dropped=dropped)
        replay_source = {"kind": "replay", "path": args.replay, "pool": len(replay)}
        if args.replay not in (None, "demo"):
            replay_source["sha256"] = ds.read_file(args.replay).description["sha256"]
        ds.save(built, out, sources=[source.description, replay_source], settings=settings,
                extra={"exclude_hashes": {"path": args.exclude_hashes, "count": len(exclude)}})
    except (ds.DatasetError, PolicyError, KafkaReadError, ValueError) as err:
        die(str(err), 1)
    source.commit()  # only now: a failed build reads the same records again next time
    c = built.counts
    _log(f"[dataset] {c['rows']} rows ({c['disagreements']} disagreements + {c['replay']} replay), "
         f"labels {c['labels']}, dropped {c['dropped'] or 'none'}")
    print(out)
    return 0


# --------------------------------------------------------------------------- train grpo

#: Flags of ``rsafe train grpo`` that set ``RSafeGRPOConfig`` fields (flag dest → field).
GRPO_FLAGS = {
    "learning_rate": "learning_rate", "max_steps": "max_steps", "epochs": "num_train_epochs",
    "temperature": "temperature", "num_generations": "num_generations",
    "batch_size": "per_device_train_batch_size", "max_completion_length": "max_completion_length",
    "save_steps": "save_steps", "seed": "seed", "use_lora": "use_lora",
}


def cmd_train_grpo(args: argparse.Namespace) -> int:
    from rsafe.training.dataset import DatasetError, load_manifest
    from rsafe.training.run_dir import TrainingError, check_output

    try:  # before TRL's imports (~12 s): a wrong --output or --dataset is refused at once
        check_output(Path(args.output), args.resume)
        load_manifest(args.dataset)
    except (TrainingError, DatasetError) as err:
        die(str(err), 1)
    from rsafe.training import grpo

    overrides = {field: getattr(args, dest) for dest, field in GRPO_FLAGS.items()}
    if args.no_progress:
        overrides["disable_tqdm"] = True
    try:
        cfg = grpo.load_config(args.output, preset=args.preset, config_file=args.config, overrides=overrides)
    except (ValueError, TypeError) as err:
        die(f"GRPO config: {err}", 2)
    try:
        grpo.train(args.model, args.dataset, cfg, resume=args.resume, log=_log)
    except (grpo.TrainingError, ValueError) as err:
        die(str(err), 1)
    print(args.output)
    return 0


# --------------------------------------------------------------------------- drift scenario


def cmd_drift_data(args: argparse.Namespace) -> int:
    from rsafe.training import drift

    scenario = drift.DriftScenario(n_feedback=args.n_feedback, n_contrast=args.n_contrast,
                                   n_general=args.n_general, n_platform=args.n_platform, n_kept=args.n_kept,
                                   seed=args.seed)
    for path in drift.write_data(args.out, scenario).values():
        print(path)
    return 0


def cmd_drift_eval(args: argparse.Namespace) -> int:
    from rsafe.training import drift, grpo

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


# --------------------------------------------------------------------------- promotion and the registry


def _models_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``models:`` section (and ``broker``) of a worker config file, for defaults; flags win."""
    if not getattr(args, "config", None):
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        die(f"{args.config}: cannot read the worker config: {err}", 2)
    section = dict(data.get("models") or {})
    if data.get("broker"):
        section.setdefault("broker", data["broker"])
    return section


def _registry(args: argparse.Namespace, settings: dict[str, Any]) -> Any:
    from rsafe.training.registry import Registry

    url = args.registry or os.environ.get("RSAFE_REGISTRY") or settings.get("registry")
    if not url:
        die("no registry: give --registry DIR|URL, $RSAFE_REGISTRY, or a --config whose models.registry is set", 2)
    return Registry(url)


def cmd_train_promote(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from rsafe.models import Guard
    from rsafe.models.config import EngineConfig
    from rsafe.models.options import engine_config_from_args
    from rsafe.training.promote import GateSettings, Promotion, publish_control
    from rsafe.training.registry import RegistryError

    settings = _models_settings(args)
    registry = _registry(args, settings)
    require = args.require_approver or bool(settings.get("require_approver"))
    if require and not args.approver:
        die("promotion requires a named approver here (models.require_approver): give --approver NAME", 2)
    base_cfg = engine_config_from_args(args)

    def gate_engine(**changes: Any) -> Any:  # the gate's engine: structured decoding always off
        data = {**base_cfg.model_dump(), **changes, "generation": replace(base_cfg.generation, structured=False)}
        return Guard.from_config(EngineConfig.model_validate(data))

    def guard_factory(adapters: dict[str, str]) -> Any:
        return gate_engine(enable_lora=True, max_lora_rank=max(base_cfg.max_lora_rank, args.max_lora_rank),
                           lora_adapters={**base_cfg.lora_adapters, **adapters})

    def model_guard_factory(path: str) -> Any:  # a full-weights candidate: an engine on its own weights
        return gate_engine(model=path, enable_lora=False, lora_adapters={})

    broker = args.broker or settings.get("broker")
    topic = args.control_topic or settings.get("control_topic") or MODELS_TOPIC
    publish = None
    if broker and not args.no_publish:
        servers = broker.split(",") if isinstance(broker, str) else list(broker)
        publish = lambda record: publish_control(servers, topic, record)  # noqa: E731
    if not args.promotion_set and not args.rollback:
        refused = _demo_set_refused(args.model, args.candidate)
        if refused:
            die(refused, 2)
    gate = GateSettings(tolerance=args.tolerance, min_gain=args.min_gain, min_slice=args.min_slice)
    promotion = Promotion(registry, args.name, args.model, guard_factory, settings=gate, log=_log,
                          model_guard_factory=model_guard_factory)
    if args.promotion_set:
        from rsafe.training.promote import load_promotion_set

        promotion.promotion_set = lambda: load_promotion_set(args.promotion_set)
    try:
        card = promotion.run(args.candidate, args.against, args.approver, publish, rollback=args.rollback)
    except (RegistryError, ValueError, OSError) as err:
        die(str(err), 1)
    print(json.dumps({"ref": card.ref, "status": card.status, "kind": card.kind,
                      "accepted": card.gate.accepted if card.gate and not args.rollback else None,
                      "reasons": card.gate.reasons if card.gate and not args.rollback else [],
                      "control_topic": topic if publish else None}))
    return 0 if card.status == "promoted" else 3


def _demo_set_refused(base_model: str, candidate: str) -> str | None:
    """Why the demo's promotion set may not gate this candidate (its base is not the demo model), or None."""
    from rsafe.training.demo import is_demo_model

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


def cmd_models_list(args: argparse.Namespace) -> int:
    registry = _registry(args, _models_settings(args))
    rows = []
    for name in ([args.name] if args.name else registry.names()):
        current = registry.current_version(name)
        for c in registry.cards(name):
            rows.append({"name": c.name, "version": c.version, "kind": c.kind, "status": c.status,
                         "current": c.version == current, "created_at": c.created_at.isoformat(timespec="seconds"),
                         "parent": c.parent_version, "gate": None if c.gate is None else c.gate.accepted,
                         "promoted_by": c.promoted_by})
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    if not rows:
        _log(f"no models in {registry.url}")
        return 0
    print(f"{'NAME':<16} {'VERSION':<14} {'KIND':<5} {'STATUS':<9} {'GATE':<8} {'CREATED':<20} PARENT")
    for r in rows:
        gate = {None: "-", True: "accepted", False: "rejected"}[r["gate"]]
        print(f"{r['name']:<16} {r['version']:<14} {r['kind']:<5} {r['status'] + ('*' if r['current'] else ''):<9} "
              f"{gate:<8} {r['created_at']:<20} {r['parent'] or '-'}")
    print("(* current)")
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    from rsafe.training.registry import RegistryError

    registry = _registry(args, _models_settings(args))
    try:
        card = registry.resolve(args.ref)
    except (RegistryError, FileNotFoundError) as err:
        die(f"{args.ref}: {err}", 1)
    out = json.loads(card.model_dump_json())
    out["current"] = registry.current_version(card.name) == card.version
    out["artifact"] = registry.artifact_uri(card.name, card.version)
    print(json.dumps(out, indent=2))
    return 0


def _add_registry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", help="the model registry, a directory or fsspec URL (default $RSAFE_REGISTRY, "
                                      "or models.registry of --config)")
    p.add_argument("--config", help="a worker config YAML: its models: section gives defaults")


def _add_promote(train: argparse._SubParsersAction) -> None:
    from rsafe.models.options import add_engine_args
    from rsafe.training.promote import GateSettings

    d = GateSettings()
    p = train.add_parser("promote", help="gate a candidate (evaluation on a promotion set), then promote it: "
                                         "registry + control record → running workers switch")
    p.add_argument("candidate", help="a GRPO output directory (registered first) or a registry NAME@VERSION")
    p.add_argument("--against", metavar="NAME@VERSION", help="compare with this version (default: the current one)")
    p.add_argument("--name", default="guard", help="the adapter name workers serve (inputs[].adapter; default guard)")
    p.add_argument("--approver", help="who promotes (recorded; required when models.require_approver)")
    p.add_argument("--require-approver", action="store_true", help="refuse without --approver")
    p.add_argument("--rollback", action="store_true",
                   help="return to an earlier promoted version: no gate, but the record and the control message")
    p.add_argument("--broker", help="Kafka bootstrap for the control record (default: broker of --config; "
                                    "without one nothing is published)")
    p.add_argument("--control-topic", help="default models.control_topic of --config, else rsafe.models")
    p.add_argument("--no-publish", action="store_true", help="decide and record only")
    p.add_argument("--promotion-set", metavar="DIR",
                   help="general.jsonl + slice.jsonl + promotion_set.json: held-out rows of your own traffic "
                        "(docs/TRAINING.md section 5). Required unless the base model is the demo model, "
                        "which is gated on the demo's synthetic set")
    p.add_argument("--tolerance", type=float, default=d.tolerance,
                   help=f"largest drop of general F1 / any category recall, points (default {d.tolerance:g})")
    p.add_argument("--min-gain", type=float, default=d.min_gain,
                   help=f"smallest gain on the disagreement slice, points (default {d.min_gain:g})")
    p.add_argument("--min-slice", type=int, default=d.min_slice, help=f"smallest slice (default {d.min_slice})")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the gate engine's LoRA rank limit (default 16)")
    _add_registry_args(p)
    add_engine_args(p)  # the gate's engine on the base model: --model BASE --engine …
    p.set_defaults(func=cmd_train_promote, structured=False)


# --------------------------------------------------------------------------- wiring


def _add_dataset(train: argparse._SubParsersAction) -> None:
    from rsafe.training.dataset import DEFAULT_GROUP_ID, DEFAULT_POLICIES_TOPIC, DEFAULT_TOPIC

    p = train.add_parser("dataset", help="disagreements (+ replay) → a rendered GRPO training set with a manifest")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-topic", nargs="?", const=DEFAULT_TOPIC, metavar="TOPIC",
                     help=f"read new records of TOPIC (default {DEFAULT_TOPIC}) since this group's last run")
    src.add_argument("--from-file", metavar="F", help="read DisagreementRecord JSONL from F")
    p.add_argument("--out", required=True, help="new directory for the dataset (data/ + manifest.json)")
    p.add_argument("--broker", default=None,
                   help="Kafka bootstrap host:port (default $RSAFE_BROKER or 127.0.0.1:9092)")
    p.add_argument("--policies-topic", default=DEFAULT_POLICIES_TOPIC,
                   help=f"the policy store: the texts of the policy versions records were judged under (default "
                        f"{DEFAULT_POLICIES_TOPIC}; read with --from-topic or an explicit --broker; 'none': only "
                        "bundled policies and --policy-dir)")
    p.add_argument("--group-id", default=DEFAULT_GROUP_ID,
                   help=f"consumer group whose offsets mark what earlier runs read (default {DEFAULT_GROUP_ID})")
    p.add_argument("--replay", metavar="FILE|demo",
                   help="replay pool: a JSONL of {prompt, response, label, policy[, policy_version, level]}, or "
                        "'demo' (the synthetic corpus's training messages)")
    p.add_argument("--replay-ratio", type=float, default=1.0, help="replay rows per disagreement row (default 1)")
    p.add_argument("--replay-pool", type=int, default=2000, help="size of the 'demo' replay pool (default 2000)")
    p.add_argument("--no-balance", dest="balance", action="store_false",
                   help="do not balance classes (default: replay chosen by class; majority sampled down if needed)")
    p.add_argument("--pair-by-message", action="store_true",
                   help="order rows in units of two, the rows of one message side by side (a reviewed message "
                        "and its contrast under another policy land in the same GRPO step)")
    p.add_argument("--exclude-hashes", metavar="F",
                   help="message hashes of evaluation rows never to train on (one per line, or JSONL message_hash)")
    p.add_argument("--policy-dir", action="append", metavar="DIR",
                   help="extra folder of policy YAMLs (older versions judged decisions may refer to)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_dataset)


def _add_grpo(train: argparse._SubParsersAction) -> None:
    p = train.add_parser("grpo", help="GRPO with the RSafe rule reward (TRL GRPOTrainer)")
    p.add_argument("--model", required=True, help="base model directory (or hub id)")
    p.add_argument("--dataset", required=True, help="a directory made by `rsafe train dataset`")
    p.add_argument("--output", required=True, help="directory for checkpoints, logs and the result")
    p.add_argument("--preset", default="paper",
                   help="named settings: paper (the reference's defaults) or demo-cpu (demo model on a CPU)")
    p.add_argument("--config", metavar="C.yaml", help="YAML of RSafeGRPOConfig / TRL GRPOConfig fields (over the preset)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="use_lora", action="store_const", const=True, help="train a LoRA adapter")
    mode.add_argument("--full", dest="use_lora", action="store_const", const=False, help="full fine-tuning")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--temperature", type=float)
    p.add_argument("--num-generations", type=int, help="rollouts per prompt")
    p.add_argument("--batch-size", type=int, help="completions per device per step (prompts × rollouts)")
    p.add_argument("--max-completion-length", type=int)
    p.add_argument("--save-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_grpo)


def _add_drift(train: argparse._SubParsersAction) -> None:
    from rsafe.training.drift import SETS, DriftScenario

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


def add_commands(sub: argparse._SubParsersAction) -> None:
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

    train = sub.add_parser("train", help="the retraining job: dataset, GRPO, drift scenario").add_subparsers(
        dest="train_cmd", required=True)
    _add_dataset(train)
    _add_grpo(train)
    _add_drift(train)
    _add_promote(train)

    models = sub.add_parser("models", help="the model registry: versions, cards, gate decisions").add_subparsers(
        dest="models_cmd", required=True)
    ls = models.add_parser("list", help="registered versions (all names, or NAME)")
    ls.add_argument("name", nargs="?")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_registry_args(ls)
    ls.set_defaults(func=cmd_models_list)
    show = models.add_parser("show", help="a version's model card: NAME@VERSION, NAME@current or NAME")
    show.add_argument("ref")
    _add_registry_args(show)
    show.set_defaults(func=cmd_models_show)
