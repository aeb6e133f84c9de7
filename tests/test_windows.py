"""Long messages: token budgets and windows (``rsafe.models.tokens``, ``Guard.prepare``).

The mechanics are tested with a scripted backend that answers ``unsafe`` exactly when a window
shows a marker, and a character-level token counter (one character = one token, a fixed chat
template), so the test checks the windowing, not a model's judgement. The demo model's behaviour
on long messages is tested in ``test_windows_demo`` (slow).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsafe.models import GenerationConfig, Guard, InputLimits, Label
from rsafe.models.engines import Completion
from rsafe.models.prompt import build_user_turn
from rsafe.models.tokens import ANSWER_RESERVE, WINDOW_MARGIN, WindowError, approximate_spans, plan_windows
from rsafe.policies import Level, PolicyRegistry

MARKER = "PIPEBOMB"
TEMPLATE = "<|system|>be careful<|user|>{turn}<|assistant|>"


class CharCounter:
    """One token per character of the rendered prompt."""

    def __init__(self, max_model_len: int):
        self.max_model_len = max_model_len
        self.calls = 0

    def count(self, user_turns):
        self.calls += 1
        return [len(TEMPLATE.format(turn=t)) for t in user_turns]

    def spans(self, text):
        return [(i, i + 1) for i in range(len(text))]


def conversation(turn: str) -> str:
    return turn.split("<BEGIN CONVERSATION>", 1)[1].split("<END CONVERSATION>", 1)[0]


class MarkerBackend:
    """unsafe (p=0.99) when the window's conversation shows MARKER, else safe (p=0.01). Every
    prompt it receives must fit the context: a request over it fails the test."""

    model_id = "marker"

    def __init__(self, max_model_len: int = 2000):
        self.token_counter = CharCounter(max_model_len)
        self.calls: list[list[str]] = []

    def _one(self, turn: str, gen) -> Completion:
        n = self.token_counter.count([turn])[0]
        assert n + gen.max_tokens <= self.token_counter.max_model_len, f"{n} + {gen.max_tokens} tokens sent"
        label = "unsafe" if MARKER in conversation(turn) else "safe"
        other = "safe" if label == "unsafe" else "unsafe"
        return Completion(text=f"<think>saw {label}</think>\\boxed{{{label}}}",
                          token_texts=["<think>x</think>\\boxed{", label, "}"],
                          candidates=[[("x", 0.0)], [(label, -0.01), (other, -4.6)], [("}", 0.0)]],
                          prompt=TEMPLATE.format(turn=turn), prompt_tokens=n, completion_tokens=3,
                          finish_reason="stop")

    def generate(self, user_turns, gen, adapters):
        self.calls.append(list(user_turns))
        return [self._one(t, gen) for t in user_turns]

    async def agenerate(self, user_turns, gen, adapters):
        return self.generate(user_turns, gen, adapters)

    def close(self):
        pass


def guard(max_model_len: int = 2000, max_tokens: int = 64, **limits) -> Guard:
    return Guard(MarkerBackend(max_model_len), generation=GenerationConfig(max_tokens=max_tokens),
                 limits=InputLimits(**limits))


FILLER = "The weather was mild and the market opened late. " * 200  # 10,000 characters


def test_a_message_that_fits_is_one_window():
    g = guard()
    [v] = g.classify([{"prompt": f"How do I build a {MARKER}?"}])
    assert v.label == Label.UNSAFE and v.windows == 1 and v.window_span is None and v.window_field is None


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_harmful_request_anywhere_in_filler_is_found(where):
    request = f" Now tell me how to build a {MARKER} at home. "
    at = {"start": 0, "middle": len(FILLER) // 2, "end": len(FILLER)}[where]
    text = FILLER[:at] + request + FILLER[at:]
    g = guard()
    [v] = g.classify([{"prompt": text}])
    assert v.label == Label.UNSAFE and v.windows > 5
    start, end = v.window_span
    assert MARKER in text[start:end]
    assert v.window_field == "prompt" and v.unsafe_probability == pytest.approx(0.99, abs=0.01)
    assert len(g.backend.calls) == 1 and len(g.backend.calls[0]) == v.windows  # one engine call


def test_filler_alone_is_safe_and_its_windows_cover_the_text_with_overlap():
    g = guard(window_overlap_tokens=20)
    p = g.prepare({"prompt": FILLER})
    spans = [w.span for w in p.windows]
    assert spans[0][0] == 0 and spans[-1][1] == len(FILLER)
    for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
        assert s2 < e1 and e1 - s2 == 20  # consecutive windows share the overlap
    [v] = g.classify([{"prompt": FILLER}])
    assert v.label == Label.SAFE and v.windows == len(spans)


def test_a_marker_across_a_window_border_is_seen_whole_in_one_window():
    g = guard(window_overlap_tokens=len(MARKER) + 2)
    p = g.prepare({"prompt": FILLER})
    border = p.windows[0].span[1]
    text = FILLER[: border - 4] + MARKER + FILLER[border - 4:]
    [v] = g.classify([{"prompt": text}])
    assert v.label == Label.UNSAFE


def test_over_max_chars_truncate_judges_head_and_tail_windows():
    huge = "x" * 100_000 + f" {MARKER} " + "y" * 100_000
    g = guard(max_chars=20_000, on_oversize="truncate")
    [v] = g.classify([{"prompt": huge}])
    assert v.truncated_input and v.label == Label.SAFE  # the middle is not judged: why it is opt-in
    assert [(u.field, u.start, u.end) for u in v.unjudged_ranges] == [("prompt", 10_000, len(huge) - 10_000)]
    tail = "z" * 199_000 + f" {MARKER} " + "w" * 500
    [v] = g.classify([{"prompt": tail}])
    assert v.truncated_input and v.label == Label.UNSAFE and v.window_span[0] >= len(tail) - 10_000
    p = g.prepare({"prompt": huge})
    assert p.windows[0].span[0] == 0 and p.windows[-1].span[1] == len(huge)
    assert sum(e - s for s, e in (w.span for w in p.windows)) < 25_000


def test_over_max_chars_reject_is_an_error_verdict():
    for g in (guard(max_chars=1000, on_oversize="reject"), guard(max_chars=1000)):  # reject is the default
        [v] = g.classify([{"prompt": "a" * 1001}])
        assert v.label == Label.ERROR and v.error_reason == "too_large" and not v.unjudged_ranges
        assert "prompt is 1,001 characters, over the limit of 1,000" in v.error_detail
        assert not g.backend.calls  # nothing of it reached the engine


def test_response_level_keeps_the_user_turn_and_windows_the_response():
    g = guard()
    prompt = "Tell me a story about the sea."
    response = FILLER + f" Also here is how to build a {MARKER}."
    [v] = g.classify([{"prompt": prompt, "response": response}])
    assert v.label == Label.UNSAFE and v.level == "response" and v.window_field == "response" and v.windows > 1
    p = g.prepare({"prompt": prompt, "response": response})
    assert all(f"User: {prompt}\n" in w.user_turn for w in p.windows)
    # a user turn too long to fit is cut to its tail
    long_prompt = "begin " + FILLER + " END-OF-PROMPT"
    p = g.prepare({"prompt": long_prompt, "response": response})
    assert all("END-OF-PROMPT" in w.user_turn and "begin" not in w.user_turn for w in p.windows)


def test_windows_of_a_message_share_one_engine_call_when_calls_are_bounded():
    g = guard()
    items = [g.prepare({"prompt": t}) for t in ("short one", FILLER, "short two", "short three")]
    n = [len(p.windows) for p in items]
    assert n[1] > 4
    verdicts = g.classify_prepared(items, max_sequences=3)
    assert [len(c) for c in g.backend.calls] == [1, n[1], 2]  # the long one alone, never split
    assert [v.windows for v in verdicts] == n


def test_policy_too_long_for_the_context_is_a_clear_error():
    g = guard(max_model_len=400)
    [v] = g.classify([{"prompt": "hello"}])
    assert v.label == Label.ERROR and "leaves" in v.error_reason and "max_model_len" in v.error_reason


def test_unknown_or_error_windows_are_not_hidden_by_safe_ones():
    g = guard()

    class Garbling(MarkerBackend):
        def _one(self, turn, gen):
            c = super()._one(turn, gen)
            if "GARBLE" in conversation(turn):
                c.text, c.token_texts, c.candidates = "<think>cut", ["<think>cut"], [[("x", 0.0)]]
            return c

    g.backend = Garbling()
    [v] = g.classify([{"prompt": FILLER + " GARBLE " + FILLER}])
    assert v.label == Label.UNKNOWN and v.windows > 1
    [v] = g.classify([{"prompt": FILLER + " GARBLE " + FILLER + f" {MARKER}"}])
    assert v.label == Label.UNSAFE  # unsafe anywhere wins


def room_for_content(policy, level: Level, prompt: str, counter: CharCounter, max_tokens: int) -> tuple[int, int]:
    """(budget, content room) as ``plan_windows`` documents them, for the one-token-per-character
    counter: the budget is ``max_model_len - max_tokens - ANSWER_RESERVE``; the room is the budget
    less the turn without content and ``WINDOW_MARGIN`` — at response level the user's message is
    kept whole when it leaves half the room for the response, else its last ``half - margin``
    characters."""
    budget = counter.max_model_len - max_tokens - ANSWER_RESERVE
    if level == Level.PROMPT:
        empty = counter.count([build_user_turn(policy, "", None, level)])[0]
    else:
        half = (budget - counter.count([build_user_turn(policy, "", "", level)])[0]) // 2
        kept = prompt if len(prompt) <= half else prompt[-max(half - WINDOW_MARGIN, 1):]
        empty = counter.count([build_user_turn(policy, kept, "", level)])[0]
    return budget, budget - empty - WINDOW_MARGIN


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 30_000), max_model_len=st.integers(1200, 4000), max_tokens=st.integers(8, 300),
       overlap=st.integers(0, 64), response_level=st.booleans(), prompt_len=st.integers(1, 3000))
def test_no_request_ever_exceeds_the_context(length, max_model_len, max_tokens, overlap, response_level,
                                             prompt_len):
    """Every window fits the context, the windows cover the text, and ``WindowError`` comes exactly
    when the code says it does: the message does not fit whole and the policy (with the user turn
    kept) leaves less than ``max(16, 2 * overlap)`` tokens for content."""
    policy = PolicyRegistry.from_dirs().get("kids-platform")
    counter = CharCounter(max_model_len)
    text = ("lorem ipsum " * (length // 12 + 1))[:length]
    prompt, response, level = (("q" * prompt_len, text, Level.RESPONSE) if response_level
                               else (text, None, Level.PROMPT))
    budget, room = room_for_content(policy, level, prompt, counter, max_tokens)
    fits_whole = counter.count([build_user_turn(policy, prompt, response, level)])[0] <= budget
    no_room = not fits_whole and room < max(16, 2 * overlap)
    try:
        windows = plan_windows(policy, level, prompt, response, counter=counter, max_tokens=max_tokens,
                               overlap=overlap)
    except WindowError as err:
        assert no_room, f"unjustified WindowError ({err}): {room} tokens of room, overlap {overlap}"
        assert f"leaves {max(room, 0)} tokens for content" in str(err)
        return
    assert not no_room, f"windowed with {room} tokens of room (overlap {overlap}): should have been refused"
    assert all(n <= budget for n in counter.count([w.user_turn for w in windows]))
    spans = [w.span for w in windows if w.span]
    assert fits_whole or spans, "a message that does not fit whole is cut into windows"
    if spans:  # the windows cover the judged text from its start to its end
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(s2 <= e1 for (_, e1), (s2, _) in zip(spans, spans[1:]))


def test_approximate_spans_cover_the_text():
    spans = approximate_spans("abcdefghij", 3)
    assert spans[0][0] == 0 and spans[-1][1] == 10 and len(spans) == 3
    assert approximate_spans("", 3) == [] and approximate_spans("abc", 0) == []


def test_the_verdict_names_the_deciding_window_and_its_hash():
    g = guard()
    text = FILLER + f" {MARKER} " + FILLER
    [v] = g.classify([{"prompt": text}])
    p = g.prepare({"prompt": text})
    from rsafe.models.prompt import prompt_hash

    assert v.prompt_hash == prompt_hash(TEMPLATE.format(turn=p.windows[v.window].user_turn))
    assert re.search(MARKER, p.windows[v.window].text)


def test_max_window_tokens_caps_the_windows_below_the_context():
    g = guard(max_model_len=4000, max_window_tokens=200)
    text = "word " * 150  # 750 characters: fits the context, but over 200 tokens of content
    p = g.prepare({"prompt": text})
    assert len(p.windows) > 1 and all(e - s <= 200 for s, e in (w.span for w in p.windows))
    assert len(guard(max_model_len=4000).prepare({"prompt": text}).windows) == 1
