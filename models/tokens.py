"""Token budgets: count a rendered prompt's tokens and cut content into windows that fit.

A request is sent only when ``prompt tokens + max_tokens + ANSWER_RESERVE <= max_model_len``, so
the engine never refuses a prompt or cuts generation short for length. Content whose prompt would
not fit is judged in overlapping windows (``plan_windows``), each rendered with the full policy.

``TokenCounter`` is what a backend offers for this: ``HFTokenCounter`` uses the model's own
tokenizer (vLLM and transformers backends, and the ``openai`` backend when a tokenizer is
available locally); ``ServerTokenCounter`` asks an OpenAI-compatible vLLM server (``/tokenize``).
A backend without a counter (a test double, the null engine) has no token budget; only the
character cap applies then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from rsafe.models.conversation import Judge, Turn
from rsafe.models.prompt import build_user_turn, context_line, render_prompt
from rsafe.policies import Level, Policy

ANSWER_RESERVE = 16
"""Tokens kept free beyond ``max_tokens``: room to force the answer (``</think>\\n\\boxed{…}``)
when generation ran out of tokens in the reasoning (see ``GenerationConfig.force_answer``)."""
WINDOW_MARGIN = 8
"""Tokens a window leaves unused, for tokenization differences at its borders."""


class WindowError(ValueError):
    """The policy (or the user turn) leaves no room for content in the model's context."""


class TokenCounter(Protocol):
    max_model_len: int
    """The engine's context length (prompt + generated tokens)."""

    def count(self, user_turns: Sequence[str]) -> list[int]:
        """Tokens of each user turn once rendered with the chat template (what the engine sees)."""

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character span of each token of ``text`` tokenized alone (for cutting windows)."""


class HFTokenCounter:
    """Counts with a Hugging Face tokenizer (exactly what vLLM and transformers tokenize)."""

    def __init__(self, tokenizer: Any, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def count(self, user_turns: Sequence[str]) -> list[int]:
        texts = [render_prompt(self.tokenizer, t) for t in user_turns]
        enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in enc]

    def spans(self, text: str) -> list[tuple[int, int]]:
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return [(int(s), int(e)) for s, e in enc["offset_mapping"]]
        except (NotImplementedError, ValueError, KeyError):  # a slow tokenizer: no offsets
            return approximate_spans(text, len(self.tokenizer(text, add_special_tokens=False)["input_ids"]))


def approximate_spans(text: str, n_tokens: int) -> list[tuple[int, int]]:
    """Evenly sized character spans when the tokenizer gives no offsets (windows are verified by
    counting afterwards, so an estimate only costs a retry)."""
    if n_tokens <= 0 or not text:
        return []
    step = len(text) / n_tokens
    cuts = [round(i * step) for i in range(n_tokens + 1)]
    cuts[-1] = len(text)
    return [(cuts[i], cuts[i + 1]) for i in range(n_tokens) if cuts[i + 1] > cuts[i]]


@dataclass(frozen=True)
class Window:
    """One engine sequence for a request: a user turn and where its content came from."""

    user_turn: str
    field: str = "prompt"
    """The text that was cut into windows: ``prompt`` or ``response``."""
    span: tuple[int, int] | None = None
    """Character span of ``field`` this window shows (None: the whole field)."""
    text: str | None = None
    """The windowed part of ``field`` (None: the whole field)."""


def _turn(policy: Policy, level: Level, prompt: str, response: str | None, context: Sequence[Turn] = (),
          judge: Judge = "last") -> str:
    return build_user_turn(policy, prompt, response if level == Level.RESPONSE else None, level, context, judge)


@dataclass(frozen=True)
class ContextFit:
    """The earlier turns that fit beside a judged message, and what they cost."""

    turns: tuple[Turn, ...] = ()
    """The newest turns that fit, oldest first."""
    tokens: int | None = 0
    """Prompt tokens they add (None: the backend counts no tokens)."""
    user_turn: str | None = None
    """The rendered user turn with them (None when no turn fits, or nothing was counted)."""


def fit_context(policy: Policy, level: Level, prompt: str, response: str | None, context: Sequence[Turn], *,
                counter: TokenCounter | None, max_tokens: int, max_context_tokens: int | None,
                judge: Judge = "last") -> ContextFit:
    """The newest earlier turns that fit beside the whole judged message: at most
    ``max_context_tokens`` and what the model's context leaves after the judged message (dropped
    oldest first; a turn is kept whole or not at all). A judged message that does not fit alone
    gets no context (it is judged in windows). Without a token counter every turn is kept."""
    if not context:
        return ContextFit()
    if counter is None:
        return ContextFit(tuple(context), None)
    budget = counter.max_model_len - max_tokens - ANSWER_RESERVE
    base = counter.count([_turn(policy, level, prompt, response)])[0]
    room = budget - base
    if max_context_tokens is not None:
        room = min(room, max_context_tokens)
    kept: list[Turn] = []
    used = 0
    for turn in reversed(context):  # newest first; each line's tokens counted alone (an estimate)
        used += len(counter.spans(context_line(turn)))
        if used > room:
            break
        kept.append(turn)
    kept.reverse()
    while kept:  # verify with the rendered prompt (the judge words and line joins count too)
        turn = _turn(policy, level, prompt, response, kept, judge)
        n = counter.count([turn])[0]
        if n - base <= room:
            return ContextFit(tuple(kept), n - base, turn)
        kept = kept[1:]
    return ContextFit()


def plan_windows(policy: Policy, level: Level, prompt: str, response: str | None, *,
                 counter: TokenCounter | None, max_tokens: int, overlap: int,
                 segments: Sequence[tuple[int, int]] | None = None,
                 max_window_tokens: int | None = None, context: ContextFit = ContextFit(),
                 judge: Judge = "last") -> list[Window]:
    """The windows that judge one message, each fitting ``max_model_len - max_tokens - reserve``.

    ``context`` (from ``fit_context``): the earlier turns shown with a message judged whole; a
    message judged in windows is shown without them.

    The judged field is the prompt (prompt level) or the response (response level; the user turn
    is kept whole when it fits, else its tail). ``segments``: character ranges of the judged field
    to cover (default: all of it); the over-long ``truncate`` mode passes its head and tail.
    ``max_window_tokens`` caps the content per window below what the context allows (a model that
    judges shorter texts better). Raises ``WindowError`` when the policy leaves no room.
    """
    field = "response" if level == Level.RESPONSE else "prompt"
    text = response if field == "response" else prompt
    assert text is not None
    whole = segments is None or list(segments) == [(0, len(text))]
    if counter is None:  # no token budget: one window per segment
        if whole:
            return [Window(_turn(policy, level, prompt, response, context.turns, judge), field)]
        return [_window(policy, level, prompt, response, field, text, s, e) for s, e in segments or []]
    budget = counter.max_model_len - max_tokens - ANSWER_RESERVE
    if whole and context.user_turn is not None and max_window_tokens is None:
        return [Window(context.user_turn, field)]  # fit_context counted it
    if whole:
        turn = context.user_turn or _turn(policy, level, prompt, response)
        fits = counter.count([turn])[0] <= budget
        if fits and max_window_tokens is not None:
            fits = len(counter.spans(text)) <= max_window_tokens
        if fits:
            return [Window(turn, field)]
    if field == "response":
        prompt = _fit_user_turn(policy, prompt, counter, budget)
    empty = _turn(policy, level, "" if field == "prompt" else prompt, "" if field == "response" else response)
    room = budget - counter.count([empty])[0] - WINDOW_MARGIN
    if max_window_tokens is not None:
        room = min(room, max_window_tokens)
    if room < max(16, 2 * overlap):
        raise WindowError(f"the policy {policy.name!r} leaves {max(room, 0)} tokens for content in a "
                          f"{counter.max_model_len}-token context with max_tokens {max_tokens}; raise "
                          "max_model_len or shorten the policy")
    windows: list[Window] = []
    for seg_start, seg_end in (segments or [(0, len(text))]):
        spans = [(s + seg_start, e + seg_start) for s, e in counter.spans(text[seg_start:seg_end])]
        windows += _cut(policy, level, prompt, response, field, text, spans, room, overlap, counter, budget)
    return windows


def _window(policy: Policy, level: Level, prompt: str, response: str | None, field: str, text: str,
            start: int, end: int) -> Window:
    part = text[start:end]
    p, r = (part, response) if field == "prompt" else (prompt, part)
    return Window(_turn(policy, level, p, r), field, (start, end), part)


def _cut(policy: Policy, level: Level, prompt: str, response: str | None, field: str, text: str,
         spans: list[tuple[int, int]], room: int, overlap: int, counter: TokenCounter,
         budget: int) -> list[Window]:
    """Overlapping windows of at most ``room`` tokens over ``spans``; each verified to fit."""
    out: list[Window] = []
    n = len(spans)
    if n == 0:
        return out
    start = 0
    while True:
        size = min(room, n - start)
        while True:
            end = start + size
            w = _window(policy, level, prompt, response, field, text, spans[start][0], spans[end - 1][1])
            excess = counter.count([w.user_turn])[0] - budget
            if excess <= 0:
                break
            if size <= overlap + 1:
                raise WindowError(f"cannot fit a window of {field} into {budget} prompt tokens")
            size = max(overlap + 1, size - excess - 4)
        out.append(w)
        if end >= n:
            return out
        start = end - min(overlap, size - 1)


def _fit_user_turn(policy: Policy, prompt: str, counter: TokenCounter, budget: int) -> str:
    """The user's message for a response-level prompt: whole when it leaves half the room for the
    response, else its tail (the part right before the response matters most)."""
    empty = counter.count([_turn(policy, Level.RESPONSE, "", "")])[0]
    half = (budget - empty) // 2
    spans = counter.spans(prompt)
    if len(spans) <= half:
        return prompt
    keep = max(half - WINDOW_MARGIN, 1)
    return prompt[spans[-keep][0]:]
