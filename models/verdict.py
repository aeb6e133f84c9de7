"""Verdicts and the parser that reads them out of generated text.

The parser follows the RSafe reference: a format check (``<think>…</think>…\\boxed{…}``), the
answer is the content of the **last** ``\\boxed{…}`` found with brace matching, compared
case-insensitively to ``safe`` / ``unsafe``. It tolerates ``\\boxed{\\text{safe}}``, spaces and a
missing backslash; anything else is ``unknown``, never a guess. It reads only generated text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from rsafe.policies import Policy

FORMAT_RE = re.compile(r"^<think>.*</think>.*\\boxed\{.*\}.*$", re.DOTALL)
_BOX_RE = re.compile(r"\\?boxed\s*\{")
_TEXT_WRAP_RE = re.compile(r"^\\?(?:text|textbf|mathrm|texttt)\s*\{(.*)\}$", re.DOTALL)


class Label(str, Enum):
    SAFE = "safe"
    UNSAFE = "unsafe"
    UNKNOWN = "unknown"
    """The model's answer could not be read (no box, odd content, truncated)."""
    ERROR = "error"
    """No answer was produced: bad input, engine failure. ``error_reason`` says why."""


@dataclass(frozen=True)
class ParsedOutput:
    format_ok: bool
    """The whole output matches the reference format regex (starts with ``<think>``)."""
    answer: Label
    """safe / unsafe / unknown."""
    reasoning: str | None
    """Text inside ``<think>…</think>`` (or before the box if ``</think>`` is missing)."""
    box_content: str | None
    """Raw content of the last box, if any."""
    answer_start: int | None
    """Character offset in the text where the answer word starts (for logprob lookup)."""


def format_matches(text: str) -> bool:
    """``FORMAT_RE.match(text)``, as ordered substring searches (the regex backtracks through the
    whole reasoning once per ``.*``; this is linear). ``tests/test_verdict.py`` checks they agree."""
    if not text.startswith("<think>"):
        return False
    i = text.find("</think>", 7)
    if i < 0:
        return False
    j = text.find("\\boxed{", i + 8)
    return j >= 0 and text.find("}", j + 7) >= 0


def _last_box(text: str) -> tuple[str, int] | None:
    """Content and start offset of the last ``\\boxed{…}`` (or ``boxed{…}``), with brace matching."""
    found = None
    for m in _BOX_RE.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth == 0:
            found = (text[m.end(): i - 1], m.end())
    return found


def parse_output(text: str) -> ParsedOutput:
    """Parse one generated answer. Never raises."""
    if not isinstance(text, str):
        return ParsedOutput(False, Label.UNKNOWN, None, None, None)
    format_ok = format_matches(text.strip())
    before, sep, after = text.partition("</think>")
    if sep:
        reasoning = before.split("<think>", 1)[-1].strip()
    else:
        # Unclosed reasoning: keep what is there for review, but the answer must come from a box.
        reasoning = text.split("<think>", 1)[-1]
        box_at = _BOX_RE.search(reasoning)
        reasoning = (reasoning[: box_at.start()] if box_at else reasoning).strip() or None
    box = _last_box(text)
    if box is None:
        return ParsedOutput(format_ok, Label.UNKNOWN, reasoning, None, None)
    content, offset = box
    inner, start = content, offset
    stripped = inner.strip()
    m = _TEXT_WRAP_RE.match(stripped)
    if m:
        start += inner.index(stripped) + m.start(1)
        inner = m.group(1)
    word = inner.strip()
    start += inner.find(word) if word else 0
    answer = {"safe": Label.SAFE, "unsafe": Label.UNSAFE}.get(word.lower(), Label.UNKNOWN)
    return ParsedOutput(format_ok, answer, reasoning, content, start if answer != Label.UNKNOWN else None)


# --------------------------------------------------------------------------- probabilities

TokenCandidates = Sequence[tuple[str, float]]
"""Top candidates at one generated position: (decoded token text, logprob)."""


def token_at(token_texts: Sequence[str], offset: int) -> tuple[int, int] | None:
    """The token of ``token_texts`` (generated in order) whose text holds character ``offset`` of
    their concatenation, and where that token starts: ``(index, start)``; None past the end."""
    pos = 0
    for i, tok in enumerate(token_texts):
        if pos <= offset < pos + len(tok):
            return i, pos
        pos += len(tok)
    return None


def unsafe_probability(
    token_texts: Sequence[str],
    candidates: Sequence[TokenCandidates] | None,
    parsed: ParsedOutput | None = None,
) -> float | None:
    """P(unsafe) / (P(unsafe) + P(safe)) at the generated token where the answer word starts.

    ``token_texts`` are the decoded generated tokens, ``candidates[i]`` the top logprobs at
    position ``i``. The answer is located by parsing the joined token texts (the same rules as
    ``parse_output``). A candidate counts for ``unsafe`` when its text, after the prefix the chosen
    token had before the answer (e.g. ``{``), starts the word ``unsafe`` (``u``, ``un``, ``unsafe``,
    any case), likewise for ``safe``. ``None`` when the answer or both classes are missing.
    ``parsed``: the parse of exactly ``"".join(token_texts)``, when the caller has it already.
    """
    if not candidates or len(candidates) != len(token_texts):
        return None
    answer_start = (parsed or parse_output("".join(token_texts))).answer_start
    if answer_start is None:
        return None
    found = token_at(token_texts, answer_start)
    if found is None:
        return None
    i, pos = found
    prefix = token_texts[i][: answer_start - pos]
    p_safe = p_unsafe = 0.0
    for text, logprob in candidates[i]:
        if not text.startswith(prefix) or logprob is None or math.isnan(logprob):
            continue
        rest = text[len(prefix):].lower()
        if not rest:
            continue
        if "unsafe".startswith(rest) or rest.startswith("unsafe"):
            p_unsafe += math.exp(logprob)
        elif "safe".startswith(rest) or rest.startswith("safe"):
            p_safe += math.exp(logprob)
    total = p_safe + p_unsafe
    return None if total <= 0 else p_unsafe / total


# --------------------------------------------------------------------------- verdict


def categories_in(reasoning: str | None, policy: Policy) -> list[str]:
    """Codes of the policy's categories named in the reasoning (by code or by name), policy order."""
    if not reasoning:
        return []
    low = reasoning.lower()
    found = []
    for cat in policy.categories:
        by_code = re.search(rf"(?<![A-Za-z0-9]){re.escape(cat.code.lower())}(?![0-9A-Za-z])", low)
        if by_code or cat.name.lower() in low:
            found.append(cat.code)
    return found


class Timings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queued_ms: float = 0.0
    """From the request's arrival (e.g. consumed from Kafka) to its engine call."""
    engine_ms: float = 0.0
    """The engine call that produced this verdict (the whole batch's call)."""
    total_ms: float = 0.0


TOO_LARGE = "too_large"
"""``error_reason`` of a message over ``InputLimits.max_chars`` under ``on_oversize: reject``."""


class CharRange(BaseModel):
    """A character range ``[start, end)`` of one field of a message (``prompt`` or ``response``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    field: Literal["prompt", "response"]
    start: Annotated[int, Field(ge=0)]
    end: Annotated[int, Field(ge=0)]


class ModelRef(BaseModel):
    """Which model judged: its id and version, and the LoRA adapter with its version."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = None
    """The engine's model id."""
    model_version: str | None = None
    """Content version of the model's weights, when the server knows it (the worker's ``models`` setting)."""
    adapter: str | None = None
    """LoRA adapter name, when one was used."""
    adapter_version: str | None = None
    """Content version of that adapter as it judged this message (adapters can be swapped at run time)."""


class JudgedBy(ModelRef):
    """Who judged a message and how it was cut: declared once, inherited by ``Verdict`` and by the
    worker's ``VerdictRecord`` and ``AuditRecord`` (the feedback records embed ``ModelRef``)."""

    level: str | None = None
    """prompt or response: which template judged the message."""
    policy: str | None = None
    """Name of the policy that judged it."""
    policy_version: str | None = None
    """Content hash of that policy (``Policy.version``)."""
    windows: int = 1
    """Engine sequences (token windows) the message was judged in; 1 when it fit the context."""
    window: int = 0
    """Index of the deciding window (the unsafe one with the highest P(unsafe), else the highest)."""


class Verdict(JudgedBy):
    """The guard's decision on one message, with everything needed to review it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    id: str | None = None
    """The request's id (echoed)."""
    label: Label
    """safe / unsafe (the policy threshold on ``unsafe_probability`` when known), unknown, error."""
    unsafe_probability: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    """From the logprobs at the answer token, normalised over safe/unsafe; None if unavailable.
    For a windowed message: the maximum over its windows."""
    categories: list[str] = []
    """Category codes named in the reasoning (best effort; only for unsafe verdicts)."""
    reasoning: str | None = None
    """The text inside ``<think>…</think>`` (of the deciding window)."""
    raw_output: str | None = None
    """The whole generation (of the deciding window)."""
    format_ok: bool = False
    """The output passes the reference format check (``<think>…</think>…\\boxed{…}``)."""
    prompt_tokens: int = 0
    """Prompt tokens of the deciding window's engine request."""
    completion_tokens: int = 0
    """Generated tokens of the deciding window."""
    finish_reason: str | None = None
    """The engine's reason to stop (``stop``; ``length`` when ``max_tokens`` ran out)."""
    answer_forced: bool = False
    """Generation ran out of tokens in the reasoning and the answer was forced right after it
    (``GenerationConfig.force_answer``); the reasoning is cut."""
    truncated_input: bool = False
    """The message was longer than ``max_chars`` (``on_oversize: truncate``); only its head and
    tail were judged."""
    unjudged_ranges: list[CharRange] = []
    """The characters the model never saw (``truncate``): the middle of an over-long field, or the
    head of a long user turn shown as a response's context."""
    window_field: str | None = None
    """prompt or response: the field cut into windows (None when not windowed)."""
    window_span: tuple[int, int] | None = None
    """Character span ``[start, end)`` of ``window_field`` the deciding window showed."""
    context_turns: int = 0
    """Earlier turns of the conversation shown with the message (the newest that fit)."""
    context_tokens: int | None = 0
    """Prompt tokens those turns took (None: the backend counts no tokens)."""
    prompt_hash: str | None = None
    """sha256 of the exact prompt the engine received for the deciding window."""
    error_reason: str | None = None
    """Why there is no answer (``error`` verdicts): ``too_large`` for a message over the size
    limit, otherwise the reason in words."""
    error_detail: str | None = None
    """More about ``error_reason`` when it is a code (``too_large``: which field, how long, the limit)."""
    latency_ms: float = 0.0
    """From the request's arrival to its verdict."""
    timings: Timings = Timings()
    """Where the time went."""


def decide(parsed: ParsedOutput, probability: float | None, threshold: float) -> Label:
    """The verdict label: the policy threshold on the probability when the answer was readable."""
    if parsed.answer == Label.UNKNOWN:
        return Label.UNKNOWN
    if probability is None:
        return parsed.answer
    return Label.UNSAFE if probability >= threshold else Label.SAFE
