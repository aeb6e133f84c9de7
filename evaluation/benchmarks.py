"""The RSafe benchmarks: one ``BenchmarkSpec`` per set, loaders, and the label mapping of each.

Every set is read in the schema it is published in (hub id, config, split and column names as in
``RSAFE_REFERENCE.md``), from a local file when one is there, else through
``datasets.load_dataset``. Each row becomes one ``Example`` (PKU-SafeRLHF: two, one per
response) with an explicit ``safe``/``unsafe`` label. Rows whose label is missing are skipped and
counted by reason (``BenchmarkData.skipped``); a label value outside the published vocabulary
is an error that names the row, never a guess.

Label mapping (unsafe = the positive class):

==========================  ==============================================================
toxicchat                   ``toxicity`` 1 → unsafe, 0 → safe (text: ``user_input``)
openai_moderation           unsafe if any of S, H, V, HR, SH, S3, H2, V2 is 1; a missing
                            (null) category counts as not flagged (text: ``prompt``)
aegis2                      ``prompt_label`` unsafe/safe (text: ``prompt``)
wildguardtest_prompt        ``prompt_harm_label`` harmful → unsafe, unharmful → safe
wildguardtest_response      ``response_harm_label`` harmful/unharmful; rows without it skipped
saferlhf                    each row → (prompt, response_0) and (prompt, response_1);
                            ``is_response_i_safe`` true → safe, false → unsafe
beavertails                 ``is_safe`` true → safe, false → unsafe
xstest_response             ``label`` harmful → unsafe, unharmful → safe (split
                            ``response_harmfulness``); rows without a label skipped
mhj                         every row → unsafe (each is a successful human jailbreak); judged:
                            the last user message of ``message_0`` … ``message_N``; context:
                            the user messages before it; system messages dropped
safedialbench               every dialogue → unsafe (attack dialogues; the files carry no
                            safe/unsafe label); judged: the last ``history`` turn's ``user``;
                            context: the earlier turns' ``user`` and ``bot`` messages
==========================  ==============================================================

Multi-turn sets (``mhj``, ``safedialbench``) give each example ``context``: the earlier turns of
its conversation, oldest first, shown to the guard with the judged message (``rsafe eval
--no-context`` drops them, to compare recall with and without them). They are not in
``--benchmark all`` (the paper's sets).

Where their schemas were confirmed:

* MHJ (Multi-Turn Human Jailbreaks, Scale AI, arXiv 2408.15221; hub ``ScaleAI/mhj``, gated,
  CC BY-NC 4.0). Not confirmed from the file itself (gated, not reachable here) but from three
  public loaders of it, which agree: the data is one CSV, ``harmbench_behaviors.csv``, one
  conversation per row (537 rows, 2,912 messages, as the dataset card says); columns ``Source``,
  ``tactic``, ``question_id``, ``submission_message`` and ``message_0`` … ``message_100``, each a
  JSON object string ``{"role": ..., "body": ...}``, role ``system`` or ``user`` (the model's
  replies are not in the release), empty after a conversation's last message. One loader reports
  that the hub's format detection sees only an image in the repository, another names the file
  explicitly; so does this one (``BenchmarkSpec.data_files``). ``temperature`` and
  ``time_spent`` were not confirmed and are not read; ``question_id`` is not assumed unique per
  row (ids are the row number). An ``assistant`` message, should one appear, is kept as context.
* SafeDialBench (arXiv 2502.11090; GitHub ``drivetosouth/SafeDialBench-Dataset``; no hub
  copy known). Confirmed from the repository's own files (``data/by_task/chinese/*.jsonl``, 1249
  dialogues read) and its ``gen_model_answer.py``: JSONL, one dialogue per line, keys ``task``
  (dimension: Ethics, Fairness, Legality, Privacy, ...), ``method`` (the jailbreak attack, e.g.
  ``Reference Attack``; spellings as published, ``Scence Construct`` included), ``model_type``,
  ``scene``, ``id`` (an int, unique across the files read) and ``history``, a list of
  ``{"user": ..., "bot": ...}`` turns (3 to 10 in the files read). The English files
  (``data/by_task/english/``, ``data/complete/datasets_en.jsonl``) were not readable in the copy
  fetched; they are assumed to share the schema.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rsafe.models.conversation import Turn
from rsafe.policies import Level
from rsafe.schemas.jsonl import read_jsonl

Row = Mapping[str, Any]
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")


class BenchmarkError(ValueError):
    """A benchmark that cannot be loaded or read; the message says which file, row and column."""


class BenchmarkNotFound(BenchmarkError):
    """Neither a local copy nor the hub copy of a benchmark could be read."""


# --------------------------------------------------------------------------- examples


class Example(BaseModel):
    """One labelled message of a benchmark."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    """Stable within its source (the set's own id column, else the row number)."""
    prompt: str
    response: str | None = None
    """The assistant reply; judged (response level) when ``level`` is ``response``."""
    label: Literal["safe", "unsafe"]
    level: Literal["prompt", "response"] = "prompt"
    categories: list[str] = []
    """Harm categories (or other slices, e.g. the jailbreak wrapper) for per-category results."""
    source: str = ""
    """Benchmark name."""
    meta: dict[str, Any] = Field(default_factory=dict)
    context: list[Turn] = []
    """The earlier turns of the conversation, oldest first, shown with the judged message
    (multi-turn sets); empty for a single message."""

    @model_validator(mode="after")
    def _check(self) -> Example:
        if self.level == "response" and self.response is None:
            raise ValueError(f"example {self.id!r}: response level needs a response")
        return self

    @property
    def unsafe(self) -> bool:
        return self.label == "unsafe"

    @property
    def content_hash(self) -> str:
        """sha256 of what the guard is shown (level, prompt, response used at that level, and the
        context turns when there are any: a single message hashes as it always did)."""
        shown: list[Any] = [self.level, self.prompt, self.response if self.level == "response" else None]
        if self.context:
            shown.append([[t.role, t.content] for t in self.context])
        blob = json.dumps(shown, ensure_ascii=False).encode("utf-8", "surrogatepass")
        return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- value readers


def is_missing(value: object) -> bool:
    """None, NaN, or an empty / whitespace-only string (CSV cells)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def as_flag(value: object, column: str) -> bool | None:
    """A 0/1 or boolean cell (JSON, parquet or CSV spelling) → bool; ``None`` when missing."""
    if is_missing(value):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "1.0", "true", "t", "yes"):
            return True
        if v in ("0", "0.0", "false", "f", "no"):
            return False
    raise BenchmarkError(f"column {column!r}: expected 0/1 or true/false, got {value!r}")


def as_word(value: object, column: str, unsafe: str, safe: str) -> str | None:
    """A two-word label cell (e.g. harmful/unharmful) → ``unsafe``/``safe``; ``None`` when missing."""
    if is_missing(value):
        return None
    v = str(value).strip().lower()
    if v == unsafe:
        return "unsafe"
    if v == safe:
        return "safe"
    raise BenchmarkError(f"column {column!r}: expected {unsafe!r} or {safe!r}, got {value!r}")


def as_mapping(value: object, column: str) -> dict[str, Any]:
    """A dict cell; CSV stores it as JSON or as a Python literal. Missing → ``{}``."""
    if is_missing(value):
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(value)
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, dict):
                return parsed
    raise BenchmarkError(f"column {column!r}: expected a mapping of category → bool, got {value!r}")


def true_keys(value: object, column: str) -> list[str]:
    """Keys of a category → bool mapping whose value is true, in the mapping's order."""
    return [k for k, v in as_mapping(value, column).items() if as_flag(v, f"{column}.{k}")]


def text(row: Row, column: str) -> str:
    """A text cell as a string; null becomes ``""`` (the guard then answers ``error``: empty)."""
    value = row.get(column)
    return value if isinstance(value, str) else "" if is_missing(value) else str(value)


# --------------------------------------------------------------------------- label functions


def toxicchat_label(row: Row) -> str | None:
    flag = as_flag(row.get("toxicity"), "toxicity")
    return None if flag is None else ("unsafe" if flag else "safe")


OPENAI_MODERATION_CODES = ("S", "H", "V", "HR", "SH", "S3", "H2", "V2")
"""sexual, hate, violence, harassment, self-harm, sexual/minors, hate/threatening, violence/graphic."""


def openai_moderation_flags(row: Row) -> list[str]:
    return [c for c in OPENAI_MODERATION_CODES if as_flag(row.get(c), c)]


def openai_moderation_label(row: Row) -> str | None:
    return "unsafe" if openai_moderation_flags(row) else "safe"


def aegis2_label(row: Row) -> str | None:
    return as_word(row.get("prompt_label"), "prompt_label", "unsafe", "safe")


def aegis2_categories(row: Row) -> list[str]:
    value = row.get("violated_categories")
    if is_missing(value) or aegis2_label(row) != "unsafe":
        return []
    return [c.strip() for c in str(value).split(",") if c.strip()]


def wildguard_prompt_label(row: Row) -> str | None:
    return as_word(row.get("prompt_harm_label"), "prompt_harm_label", "harmful", "unharmful")


def wildguard_response_label(row: Row) -> str | None:
    return as_word(row.get("response_harm_label"), "response_harm_label", "harmful", "unharmful")


def wildguard_categories(row: Row) -> list[str]:
    cats = [] if is_missing(row.get("subcategory")) else [str(row["subcategory"])]
    adversarial = as_flag(row.get("adversarial"), "adversarial")
    if adversarial is not None:
        cats.append("adversarial" if adversarial else "vanilla")
    return cats


def saferlhf_label(row: Row, i: int) -> str | None:
    flag = as_flag(row.get(f"is_response_{i}_safe"), f"is_response_{i}_safe")
    return None if flag is None else ("safe" if flag else "unsafe")


def beavertails_label(row: Row) -> str | None:
    flag = as_flag(row.get("is_safe"), "is_safe")
    return None if flag is None else ("safe" if flag else "unsafe")


def xstest_response_label(row: Row) -> str | None:
    return as_word(row.get("label"), "label", "harmful", "unharmful")


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Published:
    """Published F1 of the unsafe class (%), per system."""

    f1: Mapping[str, float] = field(default_factory=dict)
    adaptive: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """system → (F1 under the default policy, F1 under the tailored policy)."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives and how its rows become labelled examples."""

    name: str
    """Registry name (``rsafe eval --benchmark NAME``) and local file stem."""
    title: str
    level: Level
    """prompt, response, or both (each example carries its own level)."""
    hub_id: str | None = None
    config: str | None = None
    split: str | None = None
    columns: tuple[str, ...] = ()
    """Columns a row must have (the published schema)."""
    prompt_column: str = "prompt"
    response_column: str | None = None
    """Judged response (response level only)."""
    id_column: str | None = None
    label: Callable[[Row], str | None] | None = None
    """Row → ``safe``/``unsafe``; ``None`` when the row has no label (the row is skipped)."""
    categories: Callable[[Row], list[str]] | None = None
    expand: Callable[[Row, int, BenchmarkSpec], Iterable[Example | str]] | None = None
    """Replaces the column mapping when one row yields several examples (SafeRLHF); yields
    examples, or a string: the reason one of them was skipped."""
    build: Callable[[], list[Example]] | None = None
    """Builds the set in process (the synthetic demo sets) instead of reading files."""
    source: str | None = None
    """Where a built set comes from (reported as its source)."""
    local_names: tuple[str, ...] = ()
    """Other file stems accepted for a local copy (both WildGuardTest levels read ``wildguardtest``)."""
    data_files: str | None = None
    """The data file of the hub repository, where the hub's format detection would miss it (MHJ);
    also what is read from a clone of the repository (``<data-dir>/<hub id>/``)."""
    homepage: str | None = None
    """Where to get the files of a set that is not on the hub."""
    expected_size: int | None = None
    """Published size of the evaluation split (a sanity note, not enforced)."""
    published: Published = Published()
    tailored_policy: str | None = None
    """Policy the adaptive comparison uses for this set (``rsafe eval --adaptive``)."""
    notes: str = ""

    def row_to_examples(self, row: Row, index: int) -> Iterator[Example | str]:
        """The examples of one row, or strings saying why a part was skipped."""
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise BenchmarkError(
                f"row {index}: missing column(s) {', '.join(missing)}; the {self.title} schema has "
                f"{', '.join(self.columns)} (got {', '.join(sorted(map(str, row))) or 'none'})")
        if self.expand is not None:
            yield from self.expand(row, index, self)
            return
        assert self.label is not None
        try:
            label = self.label(row)
        except BenchmarkError as err:
            raise BenchmarkError(f"row {index}: {err}") from None
        if label is None:
            yield "missing label"
            return
        rid = row.get(self.id_column) if self.id_column else None
        yield Example(
            id=str(rid) if not is_missing(rid) else f"{self.name}-{index}",
            prompt=text(row, self.prompt_column),
            response=text(row, self.response_column) if self.response_column else None,
            label=label, level="response" if self.level == Level.RESPONSE else "prompt",
            categories=self.categories(row) if self.categories else [], source=self.name,
        )


def _saferlhf_expand(row: Row, index: int, spec: BenchmarkSpec) -> Iterator[Example | str]:
    for i in (0, 1):
        try:
            label = saferlhf_label(row, i)
        except BenchmarkError as err:
            raise BenchmarkError(f"row {index}: {err}") from None
        if label is None:
            yield f"missing is_response_{i}_safe"
            continue
        cats = true_keys(row.get(f"response_{i}_harm_category"), f"response_{i}_harm_category")
        yield Example(id=f"{spec.name}-{index}-r{i}", prompt=text(row, "prompt"),
                      response=text(row, f"response_{i}"), label=label, level="response",
                      categories=cats, source=spec.name)


MHJ_MESSAGE = re.compile(r"message_(\d+)")
MHJ_ROLES = ("system", "user", "assistant")


def json_cell(value: object, column: str) -> object:
    """A cell that holds JSON as text (a CSV cell) decoded; any other value as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise BenchmarkError(f"column {column!r}: not valid JSON ({err.msg}): {value[:80]!r}") from None


def mhj_messages(row: Row) -> list[tuple[str, str]]:
    """(role, body) of the non-empty ``message_<i>`` cells of an MHJ row, in ``i`` order.

    A cell is a JSON object string ``{"role": ..., "body": ...}`` (a mapping when the row was
    read from JSON); empty cells (after the last message) and empty bodies are skipped."""
    columns = sorted((int(m.group(1)), k) for k in row if (m := MHJ_MESSAGE.fullmatch(str(k))))
    out = []
    for _, column in columns:
        cell = row[column]
        if is_missing(cell):
            continue
        message = json_cell(cell, column)
        if not isinstance(message, Mapping):
            raise BenchmarkError(f"column {column!r}: expected a JSON object with role and body, got {cell!r:.80}")
        role, body = message.get("role"), message.get("body")
        if role not in MHJ_ROLES:
            raise BenchmarkError(f"column {column!r}: role {role!r}; expected one of {', '.join(MHJ_ROLES)}")
        if not isinstance(body, str):
            raise BenchmarkError(f"column {column!r}: body must be a string, got {type(body).__name__}")
        if body.strip():
            out.append((role, body))
    return out


def _mhj_expand(row: Row, index: int, spec: BenchmarkSpec) -> Iterator[Example | str]:
    try:
        messages = mhj_messages(row)
    except BenchmarkError as err:
        raise BenchmarkError(f"row {index}: {err}") from None
    turns = [Turn(role=role, content=body) for role, body in messages if role != "system"]  # type: ignore[arg-type]
    users = [i for i, t in enumerate(turns) if t.role == "user"]
    if not users:
        yield "no user message"
        return
    last = users[-1]
    tactic = row.get("tactic")
    meta = {c: row[c] for c in ("question_id", "Source") if not is_missing(row.get(c))}
    yield Example(id=f"{spec.name}-{index}", prompt=turns[last].content, context=turns[:last], label="unsafe",
                  level="prompt", categories=[] if is_missing(tactic) else [str(tactic)], source=spec.name,
                  meta={**meta, "system_messages": sum(role == "system" for role, _ in messages)})


def safedialbench_history(value: object, column: str = "history") -> list[tuple[str, str | None]]:
    """(user, bot) of each turn of a SafeDialBench ``history`` (a list, or its JSON in a CSV cell)."""
    value = json_cell(value, column)
    if not isinstance(value, list):
        raise BenchmarkError(f"column {column!r}: expected a list of {{user, bot}} turns, "
                             f"got {type(value).__name__}")
    out = []
    for j, turn in enumerate(value):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("user"), str):
            raise BenchmarkError(f"column {column!r}, turn {j}: expected an object with a 'user' string, "
                                 f"got {turn!r:.80}")
        bot = turn.get("bot")
        if not (bot is None or isinstance(bot, str)):
            raise BenchmarkError(f"column {column!r}, turn {j}: 'bot' must be a string, got {type(bot).__name__}")
        out.append((turn["user"], bot))
    return out


def _safedialbench_expand(row: Row, index: int, spec: BenchmarkSpec) -> Iterator[Example | str]:
    try:
        history = safedialbench_history(row.get("history"))
    except BenchmarkError as err:
        raise BenchmarkError(f"row {index}: {err}") from None
    if not history:
        yield "empty history"
        return
    context: list[Turn] = []
    for user, bot in history[:-1]:
        context.append(Turn(role="user", content=user))
        if not is_missing(bot):
            context.append(Turn(role="assistant", content=str(bot)))
    rid = row.get("id")
    yield Example(
        id=str(rid) if not is_missing(rid) else f"{spec.name}-{index}", prompt=history[-1][0], context=context,
        label="unsafe", level="prompt", source=spec.name,
        categories=[str(row[c]) for c in ("task", "method") if not is_missing(row.get(c))],
        meta={c: row[c] for c in ("scene", "model_type") if not is_missing(row.get(c))},
    )


# --------------------------------------------------------------------------- registry

BENCHMARKS: dict[str, BenchmarkSpec] = {}


def register(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Add a benchmark (other rooms register their own sets, e.g. ``rsafe.demo`` the demo sets)."""
    if spec.name in BENCHMARKS:
        raise ValueError(f"benchmark {spec.name!r} is already registered")
    BENCHMARKS[spec.name] = spec
    return spec


register(BenchmarkSpec(
    name="toxicchat", title="ToxicChat", level=Level.PROMPT, hub_id="lmsys/toxic-chat",
    config="toxicchat0124", split="test", columns=("user_input", "toxicity"), prompt_column="user_input",
    id_column="conv_id", label=toxicchat_label,
    categories=lambda row: ["jailbreaking"] if as_flag(row.get("jailbreaking"), "jailbreaking") else [],
    expected_size=5083,
    published=Published({"RSafe": 72.8, "GuardReasoner-8B": 78.8, "gpt-oss-safeguard": 79.9}),
    notes="`jailbreaking` rows are reported as a category.",
))
register(BenchmarkSpec(
    name="openai_moderation", title="OpenAI Moderation", level=Level.PROMPT,
    hub_id="mmathys/openai-moderation-api-evaluation", config=None, split="train",
    columns=("prompt",), label=openai_moderation_label, categories=openai_moderation_flags,
    expected_size=1680, published=Published({"RSafe": 76.4, "GuardReasoner-8B": 72.0}),
    notes="The hub copy has a single `train` split (the 1680 evaluation samples). Null category "
          "cells (unlabelled in the source) count as not flagged.",
))
register(BenchmarkSpec(
    name="aegis2", title="Aegis 2.0", level=Level.PROMPT, hub_id="nvidia/Aegis-AI-Content-Safety-Dataset-2.0",
    config=None, split="test", columns=("prompt", "prompt_label"), id_column="id", label=aegis2_label,
    categories=aegis2_categories, expected_size=1964,
    published=Published({"RSafe": 83.1, "GuardReasoner-8B": 90.2}),
    notes="Categories come from `violated_categories` (conversation level) on unsafe prompts.",
))
register(BenchmarkSpec(
    name="wildguardtest_prompt", title="WildGuardTest (prompt)", level=Level.PROMPT,
    hub_id="allenai/wildguardmix", config="wildguardtest", split="test",
    columns=("prompt", "prompt_harm_label"), label=wildguard_prompt_label, categories=wildguard_categories,
    expected_size=1689, published=Published(adaptive={"RSafe": (77.2, 82.3)}),
    tailored_policy="wildguard-taxonomy", local_names=("wildguardtest",),
    notes="Rows without `prompt_harm_label` are skipped. Categories: `subcategory` and "
          "adversarial/vanilla.",
))
register(BenchmarkSpec(
    name="wildguardtest_response", title="WildGuardTest (response)", level=Level.RESPONSE,
    hub_id="allenai/wildguardmix", config="wildguardtest", split="test",
    columns=("prompt", "response", "response_harm_label"), response_column="response",
    label=wildguard_response_label, categories=wildguard_categories, tailored_policy="wildguard-taxonomy",
    local_names=("wildguardtest",),
    notes="Rows without `response_harm_label` are skipped.",
))
register(BenchmarkSpec(
    name="saferlhf", title="PKU-SafeRLHF", level=Level.RESPONSE, hub_id="PKU-Alignment/PKU-SafeRLHF",
    config=None, split="test",
    columns=("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe"),
    expand=_saferlhf_expand, published=Published({"RSafe": 91.8, "GuardReasoner-8B": 70.0}),
    notes="Each row gives two (prompt, response) examples. Categories: `response_i_harm_category` "
          "entries that are true, when present.",
))
register(BenchmarkSpec(
    name="beavertails", title="BeaverTails", level=Level.RESPONSE, hub_id="PKU-Alignment/BeaverTails",
    config=None, split="30k_test", columns=("prompt", "response", "is_safe"), response_column="response",
    label=beavertails_label, categories=lambda row: true_keys(row.get("category"), "category"),
    expected_size=3021, published=Published({"RSafe": 82.2, "GuardReasoner-8B": 87.6}),
    notes="Categories: the `category` entries that are true.",
))
register(BenchmarkSpec(
    name="xstest_response", title="XSTest-response", level=Level.RESPONSE, hub_id="allenai/xstest-response",
    config=None, split="response_harmfulness", columns=("prompt", "response", "label"),
    response_column="response", label=xstest_response_label,
    categories=lambda row: [] if is_missing(row.get("prompt_type")) else [str(row["prompt_type"])],
    published=Published({"RSafe": 79.2, "GuardReasoner-8B": 94.3}),
    notes="Split `response_harmfulness` (harmful/unharmful `label`; the `response_refusal` split "
          "labels refusal/compliance and is not used). Rows without a label are skipped.",
))

PAPER_BENCHMARKS: tuple[str, ...] = tuple(BENCHMARKS)
"""What ``--benchmark all`` runs."""

register(BenchmarkSpec(
    name="mhj", title="MHJ (Multi-Turn Human Jailbreaks)", level=Level.PROMPT, hub_id="ScaleAI/mhj",
    config=None, split="train", data_files="harmbench_behaviors.csv", columns=("tactic", "question_id", "message_0"),
    expand=_mhj_expand, expected_size=537,
    notes="Gated (CC BY-NC 4.0). One CSV, harmbench_behaviors.csv; every conversation is a successful "
          "jailbreak (label unsafe). Judged: the last user message; context: the user messages before it "
          "(the release has no model replies); system messages dropped. Categories: `tactic`.",
))
register(BenchmarkSpec(
    name="safedialbench", title="SafeDialBench", level=Level.PROMPT, hub_id=None, config=None, split=None,
    columns=("id", "task", "method", "history"), expand=_safedialbench_expand,
    homepage="https://github.com/drivetosouth/SafeDialBench-Dataset (data/complete/datasets_{en,zh}.jsonl)",
    notes="Attack dialogues, no safe/unsafe label: every dialogue is unsafe. Judged: the last turn's user "
          "message; context: the earlier turns (user and bot). Categories: `task` (dimension) and `method` "
          "(attack). Not on the hub.",
))

def get_spec(name: str) -> BenchmarkSpec:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} (the synthetic "
                             "demo sets are registered by rsafe.demo.benchmarks.register_demo_benchmarks, "
                             "which the rsafe command calls)") from None


# --------------------------------------------------------------------------- reading


@dataclass
class BenchmarkData(Sequence[Example]):
    """A loaded benchmark: its examples and where they came from."""

    spec: BenchmarkSpec
    examples: list[Example]
    source: str
    """The file, folder or hub id read."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason → number of examples not produced (e.g. ``missing label``)."""
    total: int = 0
    """Examples before ``limit``."""

    @property
    def name(self) -> str:
        return self.spec.name

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):  # type: ignore[override]
        return self.examples[i]

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)


def _read_jsonl(path: Path) -> Iterator[dict]:
    for _, row in read_jsonl(path):
        if isinstance(row, str):
            raise BenchmarkError(f"{path}: {row}")
        yield row


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a local ``.jsonl`` (optionally gzipped), ``.json`` (a list), ``.parquet`` or ``.csv``."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            return list(_read_jsonl(path))
        if name.endswith(".json"):
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise BenchmarkError(f"{path}: expected a JSON list of objects")
            return data
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if name.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as err:
        raise BenchmarkError(f"{path}: cannot read: {err}") from None
    raise BenchmarkError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")


def _read_folder(folder: Path, spec: BenchmarkSpec) -> list[dict]:
    """A folder written by ``save_to_disk``, or a hub-like folder of data files (a local clone)."""
    import datasets

    if spec.data_files and (folder / spec.data_files).is_file():  # a clone of a one-file hub repository
        return read_rows(folder / spec.data_files)
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict) and spec.split is None and len(ds) == 1:
            ds = next(iter(ds.values()))  # a set published without splits
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise BenchmarkError(f"{folder}: no split {spec.split!r}; splits: {', '.join(ds)}")
            ds = ds[spec.split]
        return ds.to_list()
    try:
        if spec.split is not None:
            return datasets.load_dataset(str(folder), spec.config, split=spec.split).to_list()
    except ValueError:  # no such config or split: a folder of plain data files
        pass
    splits = datasets.load_dataset(str(folder))
    if spec.split in splits:
        return splits[spec.split].to_list()
    if len(splits) == 1:
        return next(iter(splits.values())).to_list()
    raise BenchmarkError(f"{folder}: no split {spec.split!r} among {', '.join(splits)}")


def local_candidates(spec: BenchmarkSpec, data_dir: str | Path) -> list[Path]:
    """Where a local copy of ``spec`` may be, in lookup order."""
    d = Path(data_dir)
    paths = [d / f"{stem}{suffix}" for stem in (spec.name, *spec.local_names) for suffix in LOCAL_SUFFIXES]
    paths += [d / stem for stem in (spec.name, *spec.local_names)]
    if spec.hub_id:
        paths.append(d / spec.hub_id)
    return paths


def _hub_rows(spec: BenchmarkSpec) -> list[dict]:
    import datasets

    extra = {"data_files": spec.data_files} if spec.data_files else {}
    return datasets.load_dataset(spec.hub_id, spec.config, split=spec.split, **extra).to_list()


def download_benchmark(name: str, data_dir: str | Path) -> Path:
    """Save the published split of ``name`` from the hub as ``<data_dir>/<stem>.jsonl``, raw rows
    in the published schema (run on a machine with internet; copy the folder to the offline one)."""
    spec = get_spec(name)
    if spec.hub_id is None:
        raise BenchmarkError(f"benchmark {name!r} is built in process; nothing to download" if spec.build else
                             f"benchmark {name!r} is not on the hub; get its files from {spec.homepage}")
    rows = _hub_rows(spec)
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{(spec.local_names or (spec.name,))[0]}.jsonl"
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)
    return path


def rows_to_examples(spec: BenchmarkSpec, rows: Iterable[Row],
                     source: str = "") -> tuple[list[Example], dict[str, int]]:
    """Map published rows to examples; returns (examples, skipped reason → count)."""
    examples: list[Example] = []
    skipped: dict[str, int] = {}
    for index, row in enumerate(rows):
        try:
            for item in spec.row_to_examples(row, index):
                if isinstance(item, str):
                    skipped[item] = skipped.get(item, 0) + 1
                else:
                    examples.append(item)
        except BenchmarkError as err:
            raise BenchmarkError(f"{spec.name} ({source or 'rows'}): {err}") from None
    return examples, skipped


def sample(examples: list[Example], limit: int | None, name: str) -> list[Example]:
    """A deterministic subset of ``limit`` examples, in their original order (classes mixed)."""
    if limit is None or limit >= len(examples):
        return examples
    if limit < 1:
        raise BenchmarkError(f"limit={limit}: must be at least 1")
    keep = sorted(random.Random(f"rsafe-eval-{name}").sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def load_benchmark(name: str, data_dir: str | Path | None = None, limit: int | None = None, *,
                   hub: bool = True) -> BenchmarkData:
    """Load benchmark ``name``: a local copy under ``data_dir`` first, else the hub.

    Local copies, in lookup order: ``<data_dir>/<name>.{jsonl,jsonl.gz,json,parquet,csv}``, a
    folder ``<data_dir>/<name>/`` or ``<data_dir>/<hub id>/`` (``save_to_disk`` output or a clone
    of the hub repository). Otherwise ``datasets.load_dataset(hub_id, config, split=split)``
    (skipped with ``hub=False``). ``limit`` keeps a deterministic sample of that many examples.
    """
    spec = get_spec(name)
    if spec.build is not None:
        examples, source, skipped = spec.build(), f"synthetic ({spec.source or spec.name})", {}
    else:
        rows, source = None, ""
        looked = local_candidates(spec, data_dir) if data_dir is not None else []
        for path in looked:
            if path.is_file():
                rows, source = read_rows(path), str(path)
                break
            if path.is_dir():
                rows, source = _read_folder(path, spec), str(path)
                break
        if rows is None:
            where = f"config {spec.config}, split {spec.split}" if spec.config else f"split {spec.split}"
            where += f", file {spec.data_files}" if spec.data_files else ""
            tried = ("no local copy (looked for " + ", ".join(str(p) for p in looked) + ")"
                     if looked else "no --data-dir given")
            if spec.hub_id is None:
                raise BenchmarkNotFound(f"benchmark {name!r}: {tried}; it is not on the hub: get its files from "
                                        f"{spec.homepage} (see docs/EVALUATION.md)")
            if not hub:
                raise BenchmarkNotFound(f"benchmark {name!r}: {tried}; hub loading is off. "
                                        "See docs/EVALUATION.md for how to save the set locally.")
            try:
                rows, source = _hub_rows(spec), f"hub:{spec.hub_id}"
            except Exception as err:  # noqa: BLE001 - offline, gated, missing: all say the same thing
                raise BenchmarkNotFound(
                    f"benchmark {name!r}: {tried}, and the hub copy {spec.hub_id} ({where}) could not "
                    f"be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                    f"The hub is unreachable from machines without internet: on a connected machine "
                    f"save the split to <data-dir>/{name}.jsonl (see docs/EVALUATION.md)."
                ) from None
        examples, skipped = rows_to_examples(spec, rows, source)
    total = len(examples)
    return BenchmarkData(spec, sample(examples, limit, name), source, skipped, total)
