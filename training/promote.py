"""Evaluation-gated promotion: a candidate reaches live traffic because it was measured no worse.

``rsafe train promote CANDIDATE [--against CURRENT]``:

1. register the candidate (a GRPO output directory) in the registry, or resolve ``name@version``;
2. measure candidate and current (``rsafe.evaluation.evaluate``, structured decoding *off*: the
   format rate must prove the model, not the grammar) on a promotion set that shares no row with
   any training set — the general held-out set plus the held-out disagreement family — after
   checking the candidate's dataset manifest against it;
3. decide (``gate``): F1 of the unsafe class on the general set drops by at most ``tolerance``
   points; the disagreement slice improves by at least ``min_gain`` points of accuracy; no
   category's recall drops by more than ``tolerance``; the format rate does not fall;
4. write the decision, both metric sets and the reasons to the registry (a rejected candidate is
   kept, marked); if accepted (and approved when ``require_approver``), make it current and publish
   a ``ModelControlRecord`` on the control topic: running workers switch to it.

Rollback = promoting an earlier version (``--rollback``): it skips the training and the gate, not
the record.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from rsafe.evaluation.benchmarks import Example
from rsafe.schemas.kafka import publish
from rsafe.schemas.models import ModelControlRecord
from rsafe.training.dataset import trained_hashes
from rsafe.training.registry import GateResult, ModelCard, Registry, RegistryError


@dataclass
class GateSettings:
    """The promotion gate's thresholds (points are percentage points)."""

    tolerance: float = 1.0
    """Largest allowed drop of general F1 (unsafe class) and of any category's recall."""
    min_gain: float = 10.0
    """Smallest required gain of accuracy on the disagreement slice."""
    min_slice: int = 50
    """The disagreement slice must hold at least this many examples."""
    min_category_n: int = 5
    """Categories with fewer examples are not compared (too noisy)."""
    batch_size: int = 64


@dataclass
class PromotionSet:
    """General held-out examples (+ their policy) and the held-out disagreement slice (+ policy)."""

    general: list[Example]
    general_policy: str
    slice: list[Example]
    slice_policy: str
    source: dict[str, Any] = field(default_factory=dict)

    def hashes(self) -> set[str]:
        return {e.content_hash for e in (*self.general, *self.slice)}


def load_promotion_set(folder: str | Path) -> PromotionSet:
    """An operator's promotion set: ``general.jsonl`` and ``slice.jsonl`` (rows of
    ``rsafe.evaluation.Example``: ``id``, ``prompt``, optional ``response``, ``label``, ``categories``)
    and ``promotion_set.json`` (``{"general_policy": NAME, "slice_policy": NAME}``). Neither may share
    a row with any training set (checked against the candidate's dataset manifest)."""
    from pydantic import ValidationError

    from rsafe.evaluation.benchmarks import BenchmarkError, read_rows

    folder = Path(folder)
    try:
        meta = json.loads((folder / "promotion_set.json").read_text(encoding="utf-8"))
        sets = {}
        for name in ("general", "slice"):
            rows = read_rows(folder / f"{name}.jsonl")
            sets[name] = [Example.model_validate({"id": f"{name}-{i}", **r}) for i, r in enumerate(rows)]
        return PromotionSet(sets["general"], meta["general_policy"], sets["slice"], meta["slice_policy"],
                            {"path": str(folder.resolve()), **meta})
    except (OSError, ValueError, KeyError, ValidationError, BenchmarkError) as err:
        raise RegistryError(f"{folder}: not a promotion set (general.jsonl, slice.jsonl, promotion_set.json "
                            f"with general_policy and slice_policy): {err}") from None


def save_promotion_set(pset: PromotionSet, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("general", pset.general), ("slice", pset.slice)):
        (folder / f"{name}.jsonl").write_text("".join(r.model_dump_json(exclude_none=True) + "\n" for r in rows),
                                              encoding="utf-8")
    meta = {"general_policy": pset.general_policy, "slice_policy": pset.slice_policy}
    extra = {k: v for k, v in pset.source.items() if k not in meta and k != "path"}
    (folder / "promotion_set.json").write_text(json.dumps({**meta, **extra}, indent=2, default=str) + "\n")
    (folder / "message_hashes.txt").write_text("".join(h + "\n" for h in sorted(pset.hashes())))
    return folder


def slice_examples(rows: Iterable[tuple[str, dict[str, Any]]]) -> tuple[list[Example], set[str], list[str]]:
    """Slice rows from ``(where, row)``: ``DisagreementRecord``s (the reviewers' label of a message
    the model got wrong; prompt-less ones skipped) or ``Example`` rows. Returns the examples, the
    policies the records name, and why rows were skipped."""
    from pydantic import ValidationError

    from rsafe.schemas.feedback import DisagreementRecord

    out: list[Example] = []
    policies: set[str] = set()
    skipped: list[str] = []
    for where, row in rows:
        if not isinstance(row, dict):
            skipped.append(f"{where}: not a JSON object")
            continue
        try:
            if "human_label" in row:
                rec = DisagreementRecord.model_validate(row)
                if rec.prompt is None:
                    skipped.append(f"{where}: no content ({rec.content_missing or 'prompt missing'})")
                    continue
                policies.add(rec.policy)
                out.append(Example(id=rec.key, prompt=rec.prompt, response=rec.response, label=rec.human_label,
                                   level=rec.level, source="disagreement"))  # type: ignore[arg-type]
            else:
                out.append(Example.model_validate({"id": where, **row}))
        except ValidationError as err:
            skipped.append(f"{where}: {err.errors()[0]['msg']}")
    return out, policies, skipped


def build_promotion_set(slice_rows: Sequence[Example], slice_policy: str, general: Sequence[Example],
                        general_policy: str, exclude: set[str], source: dict[str, Any]) -> tuple[PromotionSet, dict]:
    """A promotion set held out by message: a message in an excluded training set (``exclude``:
    manifest ``message_hash``es) is left out, and one message appears once (the slice wins over
    the general set). Returns the set and the counts of what was left out."""
    def keep(rows: Sequence[Example], seen: set[str]) -> tuple[list[Example], int, int]:
        kept, trained, dup = [], 0, 0
        for e in rows:
            h = e.content_hash
            if h in exclude:
                trained += 1
            elif h in seen:
                dup += 1
            else:
                seen.add(h)
                kept.append(e)
        return kept, trained, dup

    seen: set[str] = set()
    sl, sl_trained, sl_dup = keep(slice_rows, seen)
    gen, gen_trained, gen_dup = keep(general, seen)
    counts = {"slice": len(sl), "general": len(gen), "left_out": {
        "slice_in_training_set": sl_trained, "slice_duplicate": sl_dup,
        "general_in_training_set": gen_trained, "general_duplicate_or_in_slice": gen_dup}}
    return PromotionSet(gen, general_policy, sl, slice_policy, {**source, "counts": counts}), counts


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 2)


MALFORMED_EXCERPT = 300
"""Characters kept of each malformed answer (its end: where the format is missing)."""


def measure(guard: Any, pset: PromotionSet, adapter: str | None, settings: GateSettings) -> dict[str, Any]:
    """The gate's figures for one model/adapter: general F1 and per-category recall, slice accuracy,
    format rate (structured decoding off)."""
    from rsafe.evaluation import evaluate

    general = evaluate(guard, pset.general, pset.general_policy, adapter=adapter, batch_size=settings.batch_size)
    sl = evaluate(guard, pset.slice, pset.slice_policy, adapter=adapter, batch_size=settings.batch_size)
    preds = [*general.predictions, *sl.predictions]
    return {
        "general_f1": _pct(general.metrics.f1), "general_accuracy": _pct(general.metrics.accuracy),
        "slice_accuracy": _pct(sl.metrics.accuracy), "slice_n": sl.n,
        "category_recall": {c: _pct(m.recall) for c, m in general.categories.items()
                            if m.n_unsafe >= settings.min_category_n},
        "format_rate": _pct(sum(p.format_ok for p in preds) / max(1, len(preds))),
        "unknown_rate": _pct(general.metrics.unknown_rate), "n": len(preds),
        # what the figures are made of, for the reviewer of a decision: the examples it got wrong, and
        # the answers it did not give in the RSafe format (an excerpt of each)
        "wrong": sorted(p.id for p in preds if p.label != p.gold),
        "malformed": {p.id: (p.raw_output or "")[-MALFORMED_EXCERPT:] for p in preds if not p.format_ok},
    }


def measure_versions(guard: Any, pset: PromotionSet, adapters: Sequence[str | None],
                     settings: GateSettings) -> list[dict[str, Any]]:
    """``measure`` for several adapters of one engine, all at once: their requests share the
    engine's batches (bench/gate.py), so the engine runs fuller batches than one version at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(adapters), thread_name_prefix="rsafe-gate") as pool:
        futures = [pool.submit(measure, guard, pset, a, settings) for a in adapters]
        return [f.result() for f in futures]


def gate(candidate: dict[str, Any], current: dict[str, Any], settings: GateSettings) -> tuple[bool, list[str]]:
    """The decision and its reasons (every criterion, passed or failed)."""
    reasons, ok = [], True

    def check(passed: bool, text: str) -> None:
        nonlocal ok
        ok = ok and passed
        reasons.append(("PASS " if passed else "FAIL ") + text)

    c_f1, o_f1 = candidate["general_f1"] or 0.0, current["general_f1"] or 0.0
    check(c_f1 >= o_f1 - settings.tolerance,
          f"general F1 {c_f1:.1f} vs {o_f1:.1f} (may drop at most {settings.tolerance:g} points)")
    check(candidate["slice_n"] >= settings.min_slice,
          f"disagreement slice has {candidate['slice_n']} examples (at least {settings.min_slice})")
    gain = (candidate["slice_accuracy"] or 0.0) - (current["slice_accuracy"] or 0.0)
    check(gain >= settings.min_gain, f"disagreement slice accuracy {candidate['slice_accuracy']:.1f} vs "
          f"{current['slice_accuracy']:.1f}: {gain:+.1f} points (needs +{settings.min_gain:g})")
    drops = {c: (current["category_recall"][c] or 0.0) - (r or 0.0) for c, r in candidate["category_recall"].items()
             if c in current["category_recall"]}
    worst = max(drops.items(), key=lambda kv: kv[1], default=(None, 0.0))
    check(worst[1] <= settings.tolerance,
          f"largest category recall drop {worst[1]:.1f} points ({worst[0] or '-'}; at most {settings.tolerance:g})")
    check((candidate["format_rate"] or 0.0) >= (current["format_rate"] or 0.0),
          f"format rate {candidate['format_rate']:.1f}% vs {current['format_rate']:.1f}% (structured decoding off; "
          "must not fall)")
    if "wrong" in candidate and "wrong" in current:  # not a criterion: what changed, example by example
        newly = sorted(set(candidate["wrong"]) - set(current["wrong"]))
        fixed = len(set(current["wrong"]) - set(candidate["wrong"]))
        reasons.append(f"INFO {fixed} examples fixed, {len(newly)} newly wrong"
                       + (f": {', '.join(newly[:10])}{' …' if len(newly) > 10 else ''}" if newly else ""))
    return ok, reasons


def no_overlap(card: ModelCard, pset: PromotionSet) -> str | None:
    """Why the candidate's training rows overlap the promotion set — or why that cannot be proven
    (no training summary naming the dataset, no manifest) — or None (the manifests prove it)."""
    dataset = card.training.get("dataset")
    if not dataset:
        return ("the candidate names no training dataset (no training_summary.json with a dataset: a bare "
                "checkpoint?): cannot prove the promotion set is unseen (--skip-overlap-check to gate anyway)")
    manifest_path = Path(dataset) / "manifest.json"
    if not manifest_path.is_file():
        return f"the training dataset's manifest {manifest_path} is missing: cannot prove the promotion set is unseen"
    trained = trained_hashes(json.loads(manifest_path.read_text(encoding="utf-8")))
    both = trained & pset.hashes()
    return f"{len(both)} promotion-set examples are in the training set" if both else None


def publish_control(bootstrap: Sequence[str], topic: str, record: ModelControlRecord,
                    client_kwargs: dict[str, Any] | None = None) -> None:
    """Write the control record (key = the name), waiting for the broker's acknowledgement."""
    publish(bootstrap, topic, [(record.name, record.model_dump_json().encode("utf-8"))],
            client_id="rsafe-promote", client_kwargs=client_kwargs)


@dataclass
class Promotion:
    """One ``rsafe train promote`` run."""

    registry: Registry
    name: str
    """The adapter (or model) name workers serve: ``inputs[].adapter``."""
    base_model: str
    guard_factory: Callable[[dict[str, str]], Any]
    """Starts a ``Guard`` on the base model with these adapters (name → path), structured off."""
    settings: GateSettings = field(default_factory=GateSettings)
    promotion_set: Callable[[], PromotionSet] | None = None
    """Loads the set the gate measures on (``load_promotion_set``; the demo model's:
    ``rsafe.demo.drift.demo_promotion_set``). Only a rollback does without one."""
    model_guard_factory: Callable[[str], Any] | None = None
    """Starts a ``Guard`` on other full weights (a directory), structured off: gates a full-weights
    candidate (a second engine, measured one after the other)."""
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)
    skip_overlap_check: bool = False
    """Gate a candidate whose training rows cannot be checked against the promotion set."""

    def candidate(self, ref: str) -> ModelCard:
        """A registry ``name@version``, or a GRPO output directory (registered as a candidate)."""
        path = Path(ref)
        if not path.is_dir():
            return self.registry.resolve(ref)
        summary_file = path / "training_summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        kind = summary.get("kind") or ("lora" if (path / "adapter_config.json").is_file() else "full")
        parent = self.registry.current_version(self.name)
        card = self.registry.register(path, self.name, kind=kind, base_model=summary.get("base_model", self.base_model),
                                      parent_version=parent, training=summary)
        self.log(f"[promote] registered {card.ref} ({kind}) from {path}")
        return card

    def run(self, candidate_ref: str, against: str | None = None, approver: str | None = None,
            publish: Callable[[ModelControlRecord], None] | None = None, rollback: bool = False) -> ModelCard:
        if self.promotion_set is None and not rollback:
            raise RegistryError("no promotion set to gate on (Promotion.promotion_set)")
        card = self.candidate(candidate_ref)
        if rollback:
            if not any(h.get("event") in ("promoted", "rolled back to") for h in card.history):
                raise RegistryError(f"{card.ref} was never promoted: a rollback returns to an earlier promoted version")
            return self._promote(card, approver, publish, rollback=True)
        pset = self.promotion_set()
        overlap = None if self.skip_overlap_check else no_overlap(card, pset)
        if self.skip_overlap_check:
            self.log("[promote] the training-overlap check is skipped (--skip-overlap-check)")
        current_card = self.registry.resolve(against) if against else (
            self.registry.resolve(self.name) if self.registry.current_version(self.name) else None)
        adapters = {}
        if card.kind == "lora":
            adapters["candidate"] = str(self.registry.local_artifact(card.name, card.version))
        if current_card is not None and current_card.kind == "lora":
            adapters["current"] = str(self.registry.local_artifact(current_card.name, current_card.version))
        if card.kind == "full" and self.model_guard_factory is None:
            raise RegistryError("gating a full-weights candidate needs an engine on its weights "
                                "(Promotion.model_guard_factory)")
        self.log(f"[promote] measuring {card.ref} against {current_card.ref if current_card else 'the base model'} "
                 f"on {len(pset.general)} general + {len(pset.slice)} slice examples (structured decoding off)")
        if card.kind == "full":  # its own engine on the candidate's weights, then the current one
            assert self.model_guard_factory is not None
            guard = self.model_guard_factory(str(self.registry.local_artifact(card.name, card.version)))
            try:
                cand = measure(guard, pset, None, self.settings)
            finally:
                guard.close()
        guard = self.guard_factory(adapters)
        try:
            current = "current" if "current" in adapters else None
            if card.kind == "lora":  # both adapters on one engine, measured at once
                cand, curr = measure_versions(guard, pset, ["candidate", current], self.settings)
            else:
                curr = measure(guard, pset, current, self.settings)
        finally:
            guard.close()
        ok, reasons = gate(cand, curr, self.settings)
        if overlap:
            ok, reasons = False, [*reasons, f"FAIL {overlap}"]
        card.gate = GateResult(accepted=ok, reasons=reasons, against=current_card.ref if current_card else "base",
                               candidate_metrics=cand, current_metrics=curr,
                               settings={**asdict(self.settings), "promotion_set": pset.source})
        card.history.append({"event": "gated", "at": card.gate.decided_at.isoformat(), "accepted": ok})
        for r in reasons:
            self.log(f"[promote]   {r}")
        if not ok:
            card.status = "rejected"
            self.registry.save(card)
            self.log(f"[promote] {card.ref} REJECTED (kept in the registry, marked)")
            return card
        self.registry.save(card)
        return self._promote(card, approver, publish, rollback=False)

    def _promote(self, card: ModelCard, approver: str | None, publish: Callable[[ModelControlRecord], None] | None,
                 rollback: bool) -> ModelCard:
        self.registry.set_current(card, approver, rollback=rollback)
        record = ModelControlRecord(name=card.name, version=card.version, kind=card.kind,
                                    uri=self.registry.artifact_uri(card.name, card.version), base_model=card.base_model,
                                    base_version=card.base_version, promoted_by=approver, rollback=rollback)
        if publish is not None:
            publish(record)
        self.log(f"[promote] {card.ref} {'rolled back to' if rollback else 'PROMOTED'}"
                 f"{' by ' + approver if approver else ''}; control record "
                 f"{'published' if publish is not None else 'not published (no broker given)'}")
        return card
