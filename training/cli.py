"""Training sub-commands of ``rsafe``: the retraining job (``train …``) and the registry (``models …``).

* ``rsafe train dataset --from-topic rsafe.disagreements | --from-file F --out D``
* ``rsafe train grpo --model BASE --dataset D --output DIR [--preset demo-cpu] [--config C]``
* ``rsafe train promote CANDIDATE --model BASE --promotion-set DIR …``
* ``rsafe models list|show``

The demo's part of ``rsafe train`` (``drift-data``, ``drift-eval``, ``--replay demo`` and the demo
model's promotion set) is handed in by the root command as a ``TrainExtension``
(``rsafe.demo.cli.train_extension``): this room never imports ``rsafe.demo``.

Heavy imports (torch, transformers, TRL, datasets, kafka) happen inside the command functions, so
``rsafe --help`` stays fast. Exit codes: 0 done, 1 runtime failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsafe.models.options import die
from rsafe.schemas.topics import MODELS_TOPIC, POLICIES_TOPIC


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class TrainExtension:
    """What another room plugs into ``rsafe train`` without this one importing it: the root command
    passes the demo's (``rsafe.demo.cli.train_extension``)."""

    add_commands: Callable[[argparse._SubParsersAction], None] | None = None
    """Adds more ``rsafe train`` sub-commands, after ``grpo`` (the demo's ``drift-data``, ``drift-eval``)."""
    replay_pools: dict[str, Callable[[int, int], list[Any]]] = field(default_factory=dict)
    """``--replay NAME`` → a function of (``--replay-pool`` size, ``--seed``) → replay rows (the demo's
    ``demo``: the synthetic corpus's training messages)."""
    default_promotion_set: Callable[[str, str], Callable[[], Any]] | None = None
    """Without ``--promotion-set``: a function of (base model, candidate) → the loader of the set to
    gate on; it raises ``ValueError``, saying why, when that set may not gate this candidate (the
    demo's synthetic set gates the demo model only). None: ``--promotion-set`` is required."""


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
        replay, replay_sources = _replay_sources(args, ds)
        exclude = ds.read_hashes(args.exclude_hashes) if args.exclude_hashes else set()
        excluded_sets: list[dict[str, Any]] = []
        if args.exclude_evaluation:
            eval_hashes, excluded_sets = ds.evaluation_hashes(args.eval_data_dir)
            exclude |= eval_hashes
        settings = ds.BuildSettings(replay_ratio=args.replay_ratio, balance=args.balance,
                                    pair_by_message=args.pair_by_message, seed=args.seed)
        store = None
        if args.policies_topic != "none" and (args.from_topic or args.broker_given):
            store = read_policy_store(args.broker, args.policies_topic, strict=True)
            _log(f"[dataset] policy store {args.policies_topic}: {len(store)} versions")
        lookup = partial(ds.resolve_policy, policy_dirs=args.policy_dir or (), store=store)
        built = ds.build(records, replay=replay, settings=settings, lookup=lookup, exclude_hashes=exclude,
                         current=ds.current_policy(args.policy_dir or (), store), dropped=dropped)
        refused = _too_many_drops(built, args.allow_drops)
        if refused:
            die(refused, 1)
        ds.save(built, out, sources=[source.description, *replay_sources], settings=settings,
                extra={"exclude_hashes": {"path": args.exclude_hashes, "count": len(exclude)},
                       "excluded_evaluation_sets": excluded_sets})
    except (ds.DatasetError, PolicyError, KafkaReadError, ValueError) as err:
        die(str(err), 1)
    source.commit()  # only now: a failed build reads the same records again next time
    c = built.counts
    _log(f"[dataset] {c['rows']} rows ({c['disagreements']} disagreements + {c['replay']} replay), "
         f"labels {c['labels']}, dropped {c['dropped'] or 'none'}")
    for reason, n in sorted(c["dropped"].items()):
        keys = [d["key"] for d in built.dropped.rows if d["reason"] == reason]
        _log(f"[dataset]   dropped {n} {reason}: {', '.join(keys[:5])}{' ...' if n > 5 else ''}")
    if c.get("balance", "met") != "met":
        _log(f"[dataset] WARNING: class balance {c['balance']}")
    if excluded_sets:
        _log("[dataset] never trained on: " + ", ".join(f"{s['name']} ({s['examples']})" for s in excluded_sets))
    print(out)
    return 0


#: Drop reasons that are the builder's choice (balance, sampling), not the record's fault.
DISCRETIONARY_DROPS = frozenset({"class_balance", "sampling"})


def _too_many_drops(built: Any, allowed: bool) -> str | None:
    """A refusal when the build dropped more than half of its valid disagreements by choice. The
    builder never does today (no disagreement is dropped for balance): this keeps it that way."""
    rows = built.dropped.rows
    chosen = sum(1 for d in rows if d["reason"] in DISCRETIONARY_DROPS and not d["key"].startswith("replay"))
    valid = built.counts["disagreements"] + chosen
    if allowed or not chosen or chosen * 2 <= valid:
        return None
    return (f"{chosen} of {valid} valid disagreements were dropped for balance or sampling; reviewer labels are "
            "the scarcest data: nothing saved (--allow-drops to save it anyway)")


def _replay_sources(args: argparse.Namespace, ds: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    """``--replay SRC[:SHARE]`` (repeatable) → replay sources and their manifest entries."""
    sources, described = [], []
    for value in args.replay or []:
        name, share = ds.parse_replay_arg(value)
        if name in args.replay_pools:
            examples = args.replay_pools[name](args.replay_pool, args.seed)
            entry = {"kind": "replay", "path": name, "pool": len(examples)}
        else:
            examples = ds.read_replay(name)
            entry = {"kind": "replay", "path": name, "pool": len(examples),
                     "sha256": ds.read_file(name).description["sha256"]}
        sources.append(ds.ReplaySource(name, examples, share))
        described.append(entry)
    for entry, share in zip(described, ds.resolve_shares(sources) if sources else []):
        entry["share"] = share
    return sources, described


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


def _gate_policies(args: argparse.Namespace, broker: Any, needed: set[str]) -> Any:
    """The policies the gate judges with, resolved as ``train dataset`` resolves them: ``--policy-dir``
    and the bundled ones, then the newest version in the policy store for a name found in neither.
    A policy found nowhere stops here, before an engine starts."""
    from rsafe.models.options import policy_registry
    from rsafe.policies import PolicyError
    from rsafe.schemas.kafka import KafkaReadError, read_policy_store
    from rsafe.training.dataset import current_policy

    registry = policy_registry(args.policy_dir)
    missing = sorted(n for n in needed if n not in registry)
    if missing and broker and args.policies_topic != "none":
        servers = broker.split(",") if isinstance(broker, str) else list(broker)
        try:
            store = read_policy_store(servers, args.policies_topic, strict=True)
        except (KafkaReadError, ValueError) as err:
            die(f"the promotion set needs policy {missing[0]!r}, which is not in --policy-dir or bundled, and the "
                f"policy store {args.policies_topic} could not be read: {err}", 1)
        current = current_policy(args.policy_dir, store)
        for name in missing:
            try:
                policy = current(name)
            except PolicyError:
                continue
            registry.add(policy, f"{args.policies_topic}:{name}@{policy.version}")
        missing = sorted(n for n in needed if n not in registry)
    if missing:
        die(f"unknown policy {missing[0]!r} in the promotion set: give the folder of its YAML with --policy-dir"
            + ("" if broker else ", or --broker to read it from the policy store"), 2)
    return registry


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

    gate_policies: Any = None  # set below, before any engine starts

    def gate_engine(**changes: Any) -> Any:  # the gate's engine: structured decoding always off
        data = {**base_cfg.model_dump(), **changes, "generation": replace(base_cfg.generation, structured=False)}
        return Guard.from_config(EngineConfig.model_validate(data), policies=gate_policies)

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
    promotion_set = None  # a rollback is not gated
    if args.promotion_set:
        from rsafe.training.promote import load_promotion_set

        promotion_set = lambda: load_promotion_set(args.promotion_set)  # noqa: E731
    elif not args.rollback:
        if args.default_promotion_set is None:
            die("no --promotion-set given: a promotion set is a folder of held-out, labelled rows from your own "
                "traffic that no training set contains; docs/TRAINING.md section 5 says how to make one", 2)
        try:
            promotion_set = args.default_promotion_set(args.model, args.candidate)
        except ValueError as refused:
            die(str(refused), 2)
    if promotion_set is not None:
        loaded = promotion_set()
        promotion_set = lambda: loaded  # noqa: E731
        gate_policies = _gate_policies(args, broker, {loaded.general_policy, loaded.slice_policy})
    gate = GateSettings(tolerance=args.tolerance, min_gain=args.min_gain, min_slice=args.min_slice)
    promotion = Promotion(registry, args.name, args.model, guard_factory, settings=gate, log=_log,
                          model_guard_factory=model_guard_factory, promotion_set=promotion_set,
                          skip_overlap_check=args.skip_overlap_check)
    try:
        card = promotion.run(args.candidate, args.against, args.approver, publish, rollback=args.rollback)
    except (RegistryError, ValueError, OSError) as err:
        die(str(err), 1)
    print(json.dumps({"ref": card.ref, "status": card.status, "kind": card.kind,
                      "accepted": card.gate.accepted if card.gate and not args.rollback else None,
                      "reasons": card.gate.reasons if card.gate and not args.rollback else [],
                      "control_topic": topic if publish else None}))
    return 0 if card.status == "promoted" else 3


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


def cmd_train_promotion_set(args: argparse.Namespace) -> int:
    from rsafe.evaluation.benchmarks import BenchmarkError, load_benchmark, read_rows
    from rsafe.schemas.jsonl import read_jsonl
    from rsafe.schemas.kafka import KafkaReadError, read_to_end
    from rsafe.training import dataset as ds
    from rsafe.training.promote import build_promotion_set, save_promotion_set, slice_examples

    out = Path(args.out)
    if (out / "promotion_set.json").exists():
        die(f"{out} already holds a promotion set; choose a new --out", 2)
    try:
        if args.slice:
            rows = [(f"{Path(args.slice).name}:{n}", r) for n, r in read_jsonl(args.slice)]
            bad = [r for _, r in rows if isinstance(r, str)]
            if bad:
                die(f"{args.slice}: {bad[0]}", 1)
            slice_source: dict[str, Any] = {"kind": "file", "path": str(Path(args.slice).resolve())}
        else:
            broker = args.broker or os.environ.get("RSAFE_BROKER", "127.0.0.1:9092")
            with read_to_end(broker, [args.from_topic], client_id="rsafe-promotion-set") as reader:
                rows = [(f"{r.topic}[{r.partition}]@{r.offset}", json.loads(r.value)) for r in reader
                        if r.value is not None]
            slice_source = {"kind": "topic", "topic": args.from_topic, "records": len(rows)}
        slice_rows, named, skipped = slice_examples(rows)  # type: ignore[arg-type]
        slice_policy = args.slice_policy or (next(iter(named)) if len(named) == 1 else None)
        if slice_policy is None:
            die(f"the slice rows name {len(named)} policies ({', '.join(sorted(named)) or 'none'}): "
                "give --slice-policy", 2)
        if Path(args.general).is_file():
            general = [_general_example(i, r) for i, r in enumerate(read_rows(args.general))]
            general_source = {"kind": "file", "path": str(Path(args.general).resolve())}
        else:
            data = load_benchmark(args.general, args.eval_data_dir, hub=False)
            general, general_source = list(data), {"kind": "evaluation set", "name": args.general, "source": data.source}
        exclude: set[str] = set()
        for d in args.exclude_dataset:
            exclude |= ds.trained_hashes(ds.load_manifest(d))
        pset, counts = build_promotion_set(slice_rows, slice_policy, general, args.general_policy, exclude,
                                           {"slice_source": slice_source, "general_source": general_source,
                                            "excluded_datasets": [str(Path(d).resolve()) for d in args.exclude_dataset],
                                            "skipped": skipped})
    except (BenchmarkError, ds.DatasetError, KafkaReadError, OSError, ValueError) as err:
        die(str(err), 1)
    save_promotion_set(pset, out)
    _log(f"[promotion-set] {counts['slice']} slice rows under {slice_policy}, {counts['general']} general rows under "
         f"{args.general_policy}; left out {counts['left_out']}; skipped {len(skipped)}")
    if counts["slice"] < args.min_slice:
        _log(f"[promotion-set] WARNING: the slice has {counts['slice']} rows; the gate needs --min-slice "
             f"{args.min_slice}")
    _log(f"[promotion-set] keep these messages out of future training sets: rsafe train dataset --exclude-hashes "
         f"{out / 'message_hashes.txt'}")
    print(out)
    return 0


def _general_example(i: int, row: dict[str, Any]) -> Any:
    from rsafe.evaluation.benchmarks import Example

    return Example.model_validate({"id": f"general-{i}", **row})


def _add_promotion_set(train: argparse._SubParsersAction) -> None:
    from rsafe.training.promote import GateSettings

    p = train.add_parser("promotion-set", help="build a promotion set (held out by message) for rsafe train promote")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--slice", metavar="FILE", help="slice rows: a JSONL of DisagreementRecords or of rows "
                                                     "{prompt, response, label, level, categories}")
    src.add_argument("--from-topic", metavar="T", help="slice rows: every DisagreementRecord on topic T (e.g. a "
                                                       "held-out share of the reviewers' labels)")
    p.add_argument("--slice-policy", help="the slice's policy (default: the one the records name)")
    p.add_argument("--general", required=True, metavar="FILE|SET",
                   help="general rows: a JSONL of rows, or a registered evaluation set here (e.g. demo)")
    p.add_argument("--general-policy", default="rsafe-default", help="the general rows' policy (default rsafe-default)")
    p.add_argument("--exclude-dataset", action="append", default=[], metavar="DIR",
                   help="a training set (rsafe train dataset output) whose messages the set must not contain")
    p.add_argument("--eval-data-dir", default=os.environ.get("RSAFE_DATA_DIR"), metavar="DIR",
                   help="local copies of evaluation sets (default $RSAFE_DATA_DIR)")
    p.add_argument("--broker", help="with --from-topic (default $RSAFE_BROKER or 127.0.0.1:9092)")
    p.add_argument("--min-slice", type=int, default=GateSettings().min_slice, help="warn below this many slice rows")
    p.add_argument("--out", required=True, help="new directory for the set")
    p.set_defaults(func=cmd_train_promotion_set)


def _add_promote(train: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
    p.add_argument("--policies-topic", default=POLICIES_TOPIC,
                   help=f"the policy store, read (with a broker) for a promotion-set policy not in --policy-dir "
                        f"(default {POLICIES_TOPIC}; 'none': never)")
    p.add_argument("--no-publish", action="store_true", help="decide and record only")
    p.add_argument("--skip-overlap-check", action="store_true",
                   help="gate a candidate whose training rows cannot be checked against the promotion set (no "
                        "training_summary.json naming its dataset); default: such a candidate is refused")
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
    return p


# --------------------------------------------------------------------------- wiring


def _add_dataset(train: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
    p.add_argument("--replay", action="append", metavar="SRC[:SHARE]",
                   help="a replay pool (repeatable): a JSONL of {prompt, response, label, policy[, policy_version, "
                        "level]} or a named pool ('demo': the synthetic corpus's training messages), with the share "
                        "of the replay rows drawn from it (default: an equal part of what the given shares leave); "
                        "a row without policy_version is rendered with its policy's current text (--policy-dir, "
                        "the bundled policies, else the newest version in the policy store)")
    p.add_argument("--replay-ratio", type=float, default=1.0, help="replay rows per disagreement row (default 1)")
    p.add_argument("--replay-pool", type=int, default=2000, help="size of the 'demo' replay pool (default 2000)")
    p.add_argument("--no-balance", dest="balance", action="store_false",
                   help="do not balance classes (default: replay chosen by class; a disagreement is never dropped "
                        "for balance — when the replay cannot balance the set, it says so and keeps them all)")
    p.add_argument("--allow-drops", action="store_true",
                   help="save even when more than half of the valid disagreements were dropped for balance or "
                        "sampling (default: refuse)")
    p.add_argument("--pair-by-message", action="store_true",
                   help="order rows in units of two, the rows of one message side by side (a reviewed message "
                        "and its contrast under another policy land in the same GRPO step)")
    p.add_argument("--exclude-hashes", metavar="F",
                   help="message hashes of evaluation rows never to train on (one per line, or JSONL message_hash)")
    p.add_argument("--no-exclude-evaluation", dest="exclude_evaluation", action="store_false",
                   help="train even on rows of the registered evaluation sets (default: every set whose rows are "
                        "here — built in process, or a local copy under --eval-data-dir — is excluded; the "
                        "manifest lists them)")
    p.add_argument("--eval-data-dir", metavar="DIR", default=os.environ.get("RSAFE_DATA_DIR"),
                   help="where local copies of evaluation sets are (as rsafe eval --data-dir; default $RSAFE_DATA_DIR)")
    p.add_argument("--policy-dir", action="append", metavar="DIR",
                   help="extra folder of policy YAMLs (older versions judged decisions may refer to)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_dataset)
    return p


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


def add_commands(sub: argparse._SubParsersAction, extension: TrainExtension | None = None) -> None:
    """``rsafe train …`` and ``rsafe models …``; ``extension``: what another room adds to ``train``."""
    extension = extension or TrainExtension()
    train = sub.add_parser("train", help="the retraining job: dataset, GRPO, drift scenario").add_subparsers(
        dest="train_cmd", required=True)
    _add_dataset(train).set_defaults(replay_pools=extension.replay_pools)
    _add_grpo(train)
    if extension.add_commands is not None:
        extension.add_commands(train)
    _add_promotion_set(train)
    _add_promote(train).set_defaults(default_promotion_set=extension.default_promotion_set)

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
