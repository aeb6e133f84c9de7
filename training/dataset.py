"""The retraining set: disagreements (+ a replay sample) → rendered GRPO prompts, with a manifest.

``rsafe train dataset --from-topic rsafe.disagreements | --from-file F --out D`` runs ``build`` and
``save``. Step by step:

1. **read** ``DisagreementRecord`` rows (``rsafe.schemas.feedback``) from a JSONL file or the topic
   (``read_topic``: its own consumer group; offsets are committed only after the dataset is saved,
   so each run starts where the last one stopped);
2. **drop**, counted by reason, never silently: unreadable records (``invalid_record``), rows without
   content (``content_missing``: the audit kept only a hash), response-level rows without a response
   (``response_missing``), policy versions whose exact text is not stored (``unknown_policy_version``),
   messages that belong to an evaluation set (``evaluation_overlap``, with ``--exclude-hashes``);
3. **deduplicate** by content + policy version (``content_hash``): the same message judged under the
   same policy text counts once (``duplicate``); when trusted labels for it disagree, none is used
   (``conflicting_labels``);
4. **mix in replay** rows from a base training set (``--replay FILE``, or ``demo``: the synthetic
   corpus's training templates, ``rsafe.demo.drift.demo_replay``, which the ``rsafe`` command plugs in)
   to avoid forgetting, ``replay_ratio`` × as many as disagreements, chosen by class so that the
   whole set is **balanced** (when the replay sample cannot balance it, the majority class is sampled
   down, counted as ``class_balance``);
5. **render** every row with the exact RSafe user turn of the policy version it was judged under
   (``rsafe.models.prompt.build_user_turn``), as a one-message conversation — the model's own chat
   template completes the prompt at training time, exactly as ``render_prompt`` does at inference.

The dataset (``datasets.save_to_disk``) has the columns of ``TrainingRow.record`` (``prompt`` and
``label`` are what GRPO and the reward read). ``manifest.json`` beside it records the sources
(topic offsets, file hashes), the counts, every dropped row with its reason, the policy versions,
the seed, and per-row ``content_hash`` / ``message_hash`` so that the promotion gate can prove that
no training row is an evaluation row (``message_hash`` is ``rsafe.evaluation.Example.content_hash``).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from rsafe.evaluation import Example
from rsafe.models.prompt import build_user_turn
from rsafe.policies import BUNDLED_DIR, Level, Policy, PolicyError, PolicyRegistry, load_policy
from rsafe.policies.store import PolicyStore, policy_key
from rsafe.schemas.common import utcnow
from rsafe.schemas.feedback import DisagreementRecord
from rsafe.schemas.kafka import KafkaReadError, read_to_end, servers
from rsafe.schemas.topics import DISAGREEMENTS_TOPIC, POLICIES_TOPIC

MANIFEST = "manifest.json"
DATA_DIR = "data"
DEFAULT_TOPIC = DISAGREEMENTS_TOPIC
DEFAULT_GROUP_ID = "rsafe-train-dataset"
DEFAULT_POLICIES_TOPIC = POLICIES_TOPIC
LABELS = ("safe", "unsafe")

PolicyLookup = Callable[[str, str], Policy]
"""``(name, version) -> Policy``: the exact policy text a decision was judged under."""


class DatasetError(ValueError):
    """The dataset cannot be built (nothing usable, bad input file); the message says why."""


class PolicyVersionError(PolicyError):
    """No stored policy text has this name and version."""


# --------------------------------------------------------------------------- policy versions


@lru_cache(maxsize=8)
def _policy_index(dirs: tuple[str, ...]) -> dict[tuple[str, str], Policy]:
    """Every policy YAML of the bundled folder and ``dirs``, by (name, version). Unlike the
    registry, several versions of one name may coexist (old texts kept for old decisions)."""
    index: dict[tuple[str, str], Policy] = {}
    for d in (BUNDLED_DIR, *map(Path, dirs)):
        if not d.is_dir():
            raise PolicyError(f"{d}: policy directory does not exist")
        for f in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]):
            policy = load_policy(f)
            index.setdefault((policy.name, policy.version), policy)
    return index


def resolve_policy(name: str, version: str, *, policy_dirs: Sequence[str | Path] = (),
                   store: PolicyStore | None = None) -> Policy:
    """The policy text ``name@version`` was judged under.

    First the policy store (``store``: what the workers published on ``rsafe.policies``, every
    version that judged anything; its content is re-hashed on read, a mismatch is an error), then
    the bundled policies and ``policy_dirs`` (a policy of that name whose content hash is
    ``version``). Raises ``PolicyVersionError``.
    """
    if store is not None and policy_key(name, version) in store:
        return store.get(name, version)  # PolicyIntegrityError on tampered content
    index = _policy_index(tuple(str(d) for d in policy_dirs))
    found = index.get((name, version))
    if found is None:
        known = sorted({v for n, v in index if n == name} | {r.version for r in (store.history(name) if store else [])})
        raise PolicyVersionError(
            f"no stored text for policy {name}@{version} (known versions of {name!r}: "
            f"{', '.join(known) or 'none'}); is it on the policies topic (--policies-topic)? "
            "or add the YAML it was judged under with --policy-dir")
    return found


# --------------------------------------------------------------------------- rows


def content_hash(policy_version: str, level: str, prompt: str, response: str | None) -> str:
    """sha256 of what was judged and under which policy text (the deduplication key).

    ``response`` counts only at response level (a prompt-level judgement never showed it).
    """
    shown = [policy_version, level, prompt, response if level == Level.RESPONSE.value else None]
    return hashlib.sha256(json.dumps(shown, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()


def message_hash(level: str, prompt: str, response: str | None) -> str:
    """sha256 of the message alone, the same as ``rsafe.evaluation.Example.content_hash``, so a
    training row and an evaluation row of the same message have the same hash."""
    return Example(id="-", prompt=prompt, response=response, label="safe", level=level).content_hash  # type: ignore[arg-type]


@dataclass(frozen=True)
class TrainingRow:
    """One rendered training example."""

    id: str
    prompt: str
    response: str | None
    level: str
    policy: Policy
    label: str
    source: Literal["disagreement", "replay"]

    @property
    def content_hash(self) -> str:
        return content_hash(self.policy.version, self.level, self.prompt, self.response)

    @property
    def message_hash(self) -> str:
        return message_hash(self.level, self.prompt, self.response)

    @property
    def user_turn(self) -> str:
        """The exact RSafe user turn under this row's policy version."""
        return build_user_turn(self.policy, self.prompt, self.response, self.level)

    def record(self) -> dict[str, Any]:
        """The dataset row: ``prompt`` (a one-message conversation) and ``label`` feed GRPO."""
        return {
            "prompt": [{"role": "user", "content": self.user_turn}],
            "label": self.label,
            "id": self.id,
            "source": self.source,
            "policy": self.policy.name,
            "policy_version": self.policy.version,
            "level": self.level,
            "message_prompt": self.prompt,
            "message_response": self.response if self.level == Level.RESPONSE.value else None,
            "content_hash": self.content_hash,
            "message_hash": self.message_hash,
        }


class ReplayExample(BaseModel):
    """One line of a replay (base training set) JSONL file. ``policy`` is a name; with
    ``policy_version`` the exact stored text of that version is used, else the current one."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    response: str | None = None
    label: Literal["safe", "unsafe"]
    policy: str
    policy_version: str | None = None
    level: Literal["prompt", "response"] | None = None
    id: str | None = None


@dataclass
class Dropped:
    """Rows left out, by reason, with enough to find each one again."""

    counts: Counter[str] = field(default_factory=Counter)
    rows: list[dict[str, str]] = field(default_factory=list)

    def add(self, reason: str, key: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self.rows.append({"reason": reason, "key": key, "detail": detail})


# --------------------------------------------------------------------------- readers


@dataclass
class Source:
    """Where records came from (for the manifest), and how to acknowledge them once saved."""

    description: dict[str, Any]
    lines: list[tuple[str, str | bytes]]
    """(position, raw JSON) of every record read; the position names it in the manifest."""
    commit: Callable[[], None] = lambda: None


def read_file(path: str | Path) -> Source:
    """Disagreement records from a JSONL file (one JSON object per line; blank lines skipped)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        lines = [(f"{path.name}:{i}", line) for i, line in enumerate(raw.decode("utf-8").splitlines(), 1)
                 if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read: {err}") from None
    return Source({"kind": "file", "path": str(path.resolve()), "sha256": hashlib.sha256(raw).hexdigest(),
                   "records": len(lines)}, lines)


def read_topic(bootstrap: str | Sequence[str], topic: str = DEFAULT_TOPIC, *, group_id: str | None = DEFAULT_GROUP_ID,
               client_kwargs: dict[str, Any] | None = None, timeout_s: float = 60.0) -> Source:
    """Disagreement records on ``topic`` after ``group_id``'s committed offsets, up to the end
    offsets seen at the start (records written meanwhile are left for the next run).

    The partitions are assigned by hand (no group membership, so no rebalance can stall a batch
    job); the group only stores offsets. ``Source.commit`` commits the read positions: call it
    after the dataset is saved, so a failed run reads the same records again.
    """
    try:
        reader = read_to_end(bootstrap, [topic], group_id=group_id, client_id="rsafe-train-dataset",
                             client_kwargs=client_kwargs, timeout_s=timeout_s)
    except KafkaReadError as err:
        raise DatasetError(str(err)) from None
    try:
        lines = [(f"{r.topic}[{r.partition}]@{r.offset}", r.value) for r in reader]
    except BaseException as err:
        reader.close()
        if isinstance(err, KafkaReadError):
            raise DatasetError(f"{err}; nothing was committed") from None
        raise
    if group_id is None:  # nothing to commit: close now
        reader.close()
    description = {"kind": "topic", "bootstrap": servers(bootstrap), "topic": topic, "group_id": group_id,
                   "offsets": {str(p): list(span) for (_, p), span in reader.offsets.items()},
                   "records": len(lines)}
    return Source(description, lines, reader.commit if group_id is not None else lambda: None)


def parse_records(lines: Iterable[tuple[str, str | bytes]], dropped: Dropped) -> Iterator[DisagreementRecord]:
    """Validated records; unreadable ones are counted as ``invalid_record``."""
    for where, raw in lines:
        try:
            yield DisagreementRecord.model_validate_json(raw)
        except ValidationError as err:
            first = err.errors()[0]
            dropped.add("invalid_record", where, f"{'.'.join(map(str, first['loc']))}: {first['msg']}"[:300])


@dataclass
class ReplaySource:
    """One replay pool (``--replay SRC[:SHARE]``): a file or a named pool, and the share of the
    replay rows drawn from it (None: an equal part of what the given shares leave)."""

    name: str
    examples: list[ReplayExample]
    share: float | None = None


def resolve_shares(sources: Sequence[ReplaySource]) -> list[float]:
    """Each source's share of the replay rows: the given ones, the rest split evenly among the others."""
    given = [s.share for s in sources if s.share is not None]
    if any(x < 0 for x in given) or sum(given) > 1 + 1e-9:
        raise DatasetError(f"replay shares {given} must be >= 0 and add up to at most 1")
    rest = [s for s in sources if s.share is None]
    left = max(0.0, 1 - sum(given))
    if not rest and given and sum(given) <= 0:
        raise DatasetError("replay shares add up to 0: give at least one a share above 0")
    return [s.share if s.share is not None else left / len(rest) for s in sources]


def parse_replay_arg(value: str) -> tuple[str, float | None]:
    """``SRC[:SHARE]`` → (SRC, SHARE): the share is what follows the last colon when it is a number."""
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return value, None


def read_replay(path: str | Path) -> list[ReplayExample]:
    """A replay file (JSONL of ``ReplayExample``); an unreadable line is an error, not a skip."""
    out = []
    for where, line in read_file(path).lines:
        try:
            out.append(ReplayExample.model_validate_json(line))
        except ValidationError as err:
            raise DatasetError(f"{where}: not a replay example: {err.errors()[0]['msg']}") from None
    return out


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class BuildSettings:
    """How the rows are mixed."""

    replay_ratio: float = 1.0
    """Replay rows per disagreement row (0: none)."""
    balance: bool = True
    """Choose replay rows by class so the set is balanced: more replay of the minority class (beyond
    ``replay_ratio`` when the disagreements lean one way), fewer of the majority. A disagreement is
    never dropped for balance; when the replay cannot balance the set, it stays unbalanced and
    ``counts["balance"]`` says so."""
    pair_by_message: bool = False
    """Order the rows in units of two, the rows of one message (e.g. a reviewed message and the
    same message under another policy) side by side, so that with an even number of prompts per
    step and an unshuffled sampler (``shuffle_dataset: false``) both land in the same GRPO step."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.replay_ratio < 0:
            raise ValueError(f"replay_ratio={self.replay_ratio}: must be >= 0")


@dataclass
class Built:
    rows: list[TrainingRow]
    dropped: Dropped
    counts: dict[str, Any]


def _disagreement_rows(records: Iterable[DisagreementRecord], lookup: PolicyLookup, exclude: frozenset[str],
                       dropped: Dropped) -> list[TrainingRow]:
    """Usable, deduplicated disagreement rows (the latest feedback of duplicates is kept), ordered
    by content hash."""
    by_hash: dict[str, list[tuple[DisagreementRecord, TrainingRow]]] = {}
    for rec in records:
        if rec.prompt is None:
            dropped.add("content_missing", rec.key, rec.content_missing or "no prompt")
            continue
        if rec.level not in (Level.PROMPT.value, Level.RESPONSE.value):
            dropped.add("invalid_level", rec.key, f"level {rec.level!r} is not prompt or response")
            continue
        if rec.level == Level.RESPONSE.value and rec.response is None:
            dropped.add("response_missing", rec.key, rec.content_missing or "response-level record without response")
            continue
        try:
            policy = lookup(rec.policy, rec.policy_version)
        except PolicyError as err:
            dropped.add("unknown_policy_version", rec.key, str(err))
            continue
        row = TrainingRow(id=rec.key, prompt=rec.prompt, response=rec.response, level=rec.level, policy=policy,
                          label=rec.human_label, source="disagreement")
        if row.message_hash in exclude:
            dropped.add("evaluation_overlap", rec.key, row.message_hash)
            continue
        by_hash.setdefault(row.content_hash, []).append((rec, row))
    rows = []
    for group in by_hash.values():
        labels = {r.label for _, r in group}
        if len(labels) > 1:
            for rec, _ in group:
                dropped.add("conflicting_labels", rec.key, f"{group[0][1].content_hash[:12]}: labels {sorted(labels)}")
            continue
        group.sort(key=lambda g: g[0].feedback_at)
        for rec, _ in group[:-1]:
            dropped.add("duplicate", rec.key, f"same content and policy version as {group[-1][0].key}")
        rows.append(group[-1][1])
    # in content order: the same records make the same training set (rows, order, manifest hash)
    # whatever order the topic's partitions delivered them in
    rows.sort(key=lambda r: r.content_hash)
    return rows


def _replay_rows(examples: Iterable[ReplayExample], lookup: PolicyLookup, current: Callable[[str], Policy],
                 taken: dict[str, str], exclude: frozenset[str], dropped: Dropped, prefix: str = "replay"
                 ) -> list[TrainingRow]:
    """Replay rows not already in the set (by content hash) and not in an evaluation set. A row
    without ``policy_version`` is rendered with the current version of its policy (``current``)."""
    rows = []
    for i, ex in enumerate(examples):
        key = ex.id or f"{prefix}-{i}"
        try:
            policy = lookup(ex.policy, ex.policy_version) if ex.policy_version else current(ex.policy)
        except PolicyError as err:
            dropped.add("unknown_policy" if ex.policy_version is None else "unknown_policy_version", key, str(err))
            continue
        level = ex.level or (Level.RESPONSE.value if ex.response is not None else Level.PROMPT.value)
        row = TrainingRow(id=key, prompt=ex.prompt, response=ex.response, level=level, policy=policy,
                          label=ex.label, source="replay")
        if row.message_hash in exclude:
            dropped.add("evaluation_overlap", key, row.message_hash)
        elif row.content_hash in taken:
            dropped.add("replay_duplicate", key, f"same content and policy version as {taken[row.content_hash]}")
        else:
            taken[row.content_hash] = key
            rows.append(row)
    return rows


def _draw(pools: Sequence[tuple[float, list[TrainingRow]]], k: int) -> list[TrainingRow]:
    """``k`` rows taken from the front of the pools in proportion to their shares (largest
    remainder); a pool that runs short leaves its part to the others."""
    avail = [(share, list(rows)) for share, rows in pools]
    out: list[TrainingRow] = []
    while k > 0:
        live = [i for i, (share, rows) in enumerate(avail) if rows and share > 0] or \
               [i for i, (_, rows) in enumerate(avail) if rows]
        if not live:
            break
        total = sum(avail[i][0] for i in live) or len(live)
        exact = {i: k * ((avail[i][0] or 1) / total) for i in live}
        quota = {i: int(x) for i, x in exact.items()}
        for i in sorted(live, key=lambda i: quota[i] - exact[i])[: k - sum(quota.values())]:
            quota[i] += 1
        took = 0
        for i in live:
            n = min(quota[i], len(avail[i][1]))
            out += avail[i][1][:n]
            avail[i] = (avail[i][0], avail[i][1][n:])
            took += n
        k -= took
    return out


def _mix(disagreements: list[TrainingRow], pools: Sequence[tuple[float, list[TrainingRow]]], settings: BuildSettings,
         rng: random.Random) -> tuple[list[TrainingRow], dict[str, Any]]:
    """Every disagreement plus about ``replay_ratio`` × as many replay rows from the pools (by their
    shares), chosen by class so that the set is balanced when ``settings.balance``."""
    shuffled = []
    for share, rows in pools:
        rows = rows[:]
        rng.shuffle(rows)
        shuffled.append((share, rows))
    available = sum(len(rows) for _, rows in shuffled)
    n_replay = min(available, round(settings.replay_ratio * len(disagreements)))
    have = Counter(r.label for r in disagreements)
    info: dict[str, Any] = {"replay_pool": available, "replay_wanted": n_replay}
    if settings.balance:
        by_label = {lab: [(share, [r for r in rows if r.label == lab]) for share, rows in shuffled] for lab in LABELS}
        avail = {lab: sum(len(rows) for _, rows in by_label[lab]) for lab in LABELS}
        # each class up to the same count: half the set, or the larger class of disagreements when
        # they lean further than the replay ratio can make up (never fewer disagreements)
        target = max((len(disagreements) + n_replay) / 2, max(have.values()))
        want = {lab: min(avail[lab], max(0, round(target - have[lab]))) for lab in LABELS}
        reached = {lab: have[lab] + want[lab] for lab in LABELS}
        low = min(reached.values())
        for lab in LABELS:  # the majority's replay no higher than the other class reaches
            want[lab] = max(0, min(want[lab], low - have[lab])) if reached[lab] > low else want[lab]
        replay = [r for lab in LABELS for r in _draw(by_label[lab], want[lab])]
        counts = Counter(r.label for r in disagreements + replay)
        if len({counts[lab] for lab in LABELS}) > 1:
            info["balance"] = (f"not met: {', '.join(f'{counts[lab]} {lab}' for lab in LABELS)} (the replay "
                               "pools hold too few rows of the smaller class; every disagreement is kept)")
        else:
            info["balance"] = "met"
    else:
        replay = _draw(shuffled, n_replay)
    info["replay_used"] = len(replay)
    rows = disagreements + replay
    if settings.pair_by_message:
        return _paired_order(rows, rng), {**info, "paired_messages": _count_pairs(rows)}
    rng.shuffle(rows)
    return rows, info


def _paired_order(rows: list[TrainingRow], rng: random.Random) -> list[TrainingRow]:
    """Rows in shuffled units of two: the rows of one message together, lone rows two by two
    (a message with more than two rows makes a larger unit; odd-sized units come last, so that with
    an even number of prompts per step no unit straddles two steps)."""
    by_message: dict[str, list[TrainingRow]] = {}
    for r in rows:
        by_message.setdefault(r.message_hash, []).append(r)
    groups = list(by_message.values())
    rng.shuffle(groups)
    lone = [g[0] for g in groups if len(g) == 1]
    units = [g for g in groups if len(g) > 1] + [lone[i: i + 2] for i in range(0, len(lone), 2)]
    rng.shuffle(units)
    units.sort(key=lambda u: len(u) % 2)  # odd-sized units last: every pair starts at an even position
    return [r for unit in units for r in unit]


def _count_pairs(rows: list[TrainingRow]) -> int:
    counts = Counter(r.message_hash for r in rows)
    return sum(1 for n in counts.values() if n > 1)


def _as_sources(replay: Sequence[ReplayExample] | Sequence[ReplaySource]) -> list[ReplaySource]:
    if all(isinstance(s, ReplaySource) for s in replay):
        return list(replay)  # type: ignore[arg-type]
    return [ReplaySource("replay", list(replay))]  # type: ignore[arg-type]


def build(records: Iterable[DisagreementRecord], *, replay: Sequence[ReplayExample] | Sequence[ReplaySource] = (),
          settings: BuildSettings = BuildSettings(), lookup: PolicyLookup | None = None,
          registry: PolicyRegistry | None = None, current: Callable[[str], Policy] | None = None,
          exclude_hashes: Iterable[str] = (), dropped: Dropped | None = None) -> Built:
    """Training rows from disagreement records and replay pools (see the module docstring).

    ``replay``: one pool of examples, or several ``ReplaySource`` with their shares. ``lookup``
    resolves ``name@version`` (default ``resolve_policy``); a replay row without a version uses
    ``current(name)`` (default: the policy of that name in ``registry``, itself by default the
    bundled policies). ``exclude_hashes``: message hashes (``Example.content_hash``) of evaluation
    rows that must not be trained on.
    """
    lookup = lookup or resolve_policy
    if current is None:
        registry = registry or PolicyRegistry.from_dirs()
        current = registry.get
    sources = _as_sources(replay)
    shares = resolve_shares(sources) if sources else []
    dropped = dropped if dropped is not None else Dropped()
    exclude = frozenset(exclude_hashes)
    records = list(records)
    disagreements = _disagreement_rows(records, lookup, exclude, dropped)
    if not disagreements:
        raise DatasetError(f"no usable disagreement among {len(records)} records "
                           f"(dropped: {dict(dropped.counts) or 'none'})")
    taken = {r.content_hash: r.id for r in disagreements}
    pools = [_replay_rows(src.examples, lookup, current, taken, exclude, dropped,
                          prefix="replay" if len(sources) == 1 else f"replay{i}")
             for i, src in enumerate(sources)]
    rows, info = _mix(disagreements, list(zip(shares, pools)), settings, random.Random(settings.seed))
    used = {id(r) for r in rows}
    info["replay_sources"] = [{"source": src.name, "share": round(share, 6), "pool": len(pool),
                               "used": sum(id(r) in used for r in pool)}
                              for src, share, pool in zip(sources, shares, pools)]
    counts = {
        "records": len(records),
        "disagreements": sum(r.source == "disagreement" for r in rows),
        "replay": sum(r.source == "replay" for r in rows),
        "rows": len(rows),
        "labels": dict(Counter(r.label for r in rows)),
        "by_source": {s: dict(Counter(r.label for r in rows if r.source == s)) for s in ("disagreement", "replay")},
        "levels": dict(Counter(r.level for r in rows)),
        "dropped": dict(sorted(dropped.counts.items())),
        **info,
    }
    return Built(rows, dropped, counts)


# --------------------------------------------------------------------------- saving


def save(built: Built, out_dir: str | Path, *, sources: Sequence[dict[str, Any]], settings: BuildSettings,
         extra: dict[str, Any] | None = None) -> Path:
    """Write the dataset (``out_dir/data``, ``save_to_disk``) and ``out_dir/manifest.json``."""
    from datasets import Dataset

    out = Path(out_dir)
    if (out / MANIFEST).exists() or (out / DATA_DIR).exists():
        raise DatasetError(f"{out} already holds a dataset; choose a new --out (datasets are immutable)")
    out.mkdir(parents=True, exist_ok=True)
    records = [r.record() for r in built.rows]
    Dataset.from_list(records).save_to_disk(str(out / DATA_DIR))
    versions = Counter(f"{r.policy.name}@{r.policy.version}" for r in built.rows)
    manifest = {
        "schema_version": 1,
        "created_at": utcnow().isoformat(),
        "data": DATA_DIR,
        "columns": list(records[0]),
        "settings": asdict(settings),
        "sources": list(sources),
        "counts": built.counts,
        "policy_versions": dict(sorted(versions.items())),
        "dropped": built.dropped.rows,
        "rows": [{"id": r.id, "source": r.source, "label": r.label, "policy_version": r.policy.version,
                  "content_hash": r.content_hash, "message_hash": r.message_hash} for r in built.rows],
        **(extra or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def load_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    path = Path(dataset_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: not a training dataset manifest ({err})") from None


def trained_hashes(manifest: dict[str, Any]) -> set[str]:
    """The ``message_hash`` of every row a dataset (its manifest) trains on."""
    return {r.get("message_hash") for r in manifest.get("rows", [])}


def load_rows(dataset_dir: str | Path) -> Any:
    """The saved dataset (``datasets.Dataset``)."""
    from datasets import load_from_disk

    load_manifest(dataset_dir)
    return load_from_disk(str(Path(dataset_dir) / DATA_DIR))


def evaluation_hashes(data_dir: str | Path | None = None) -> tuple[set[str], list[dict[str, Any]]]:
    """Message hashes of every registered evaluation set whose rows are here — built in process (the
    demo sets, when the command registered them) or a local copy under ``data_dir`` — and a listing
    for the manifest. Sets that are not here (hub only, no copy) are not loaded."""
    from rsafe.evaluation.benchmarks import BENCHMARKS, BenchmarkError, load_benchmark

    hashes: set[str] = set()
    listed = []
    for name in sorted(BENCHMARKS):
        try:
            data = load_benchmark(name, data_dir, hub=False)
        except BenchmarkError:
            continue
        found = {e.content_hash for e in data}
        hashes |= found
        listed.append({"name": name, "source": data.source, "examples": len(found)})
    return hashes, listed


def current_policy(policy_dirs: Sequence[str | Path] = (), store: PolicyStore | None = None
                   ) -> Callable[[str], Policy]:
    """``name`` → the policy a replay row without ``policy_version`` is rendered with: the file of
    that name (``policy_dirs``, then the bundled ones), else the newest version in the store."""
    registry = PolicyRegistry.from_dirs(*policy_dirs)

    def current(name: str) -> Policy:
        if name in registry:
            return registry.get(name)
        stored = store.history(name) if store is not None else []
        if stored:
            return store.get(name, stored[-1].version)  # type: ignore[union-attr]
        raise PolicyError(f"unknown policy {name!r}: not bundled, not in --policy-dir"
                          + (", not in the policy store" if store is not None else "")
                          + f" (known: {', '.join(registry.names())})")

    return current


def read_hashes(path: str | Path) -> set[str]:
    """Hashes to exclude: one hex digest per line, or a JSONL of rows with ``message_hash``."""
    out = set()
    for where, line in read_file(path).lines:
        line = line.strip() if isinstance(line, str) else line.decode().strip()
        if line.startswith("{"):
            value = json.loads(line).get("message_hash")
        else:
            value = line
        if not isinstance(value, str) or len(value) != 64:
            raise DatasetError(f"{where}: expected a sha256 hex digest")
        out.add(value)
    return out
