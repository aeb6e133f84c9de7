"""The verdict parser (reference rules and the failure modes seen in real outputs), probabilities."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsafe.models.verdict import Label, categories_in, decide, parse_output, unsafe_probability
from rsafe.policies import default_policy

S, U, K = Label.SAFE, Label.UNSAFE, Label.UNKNOWN


@pytest.mark.parametrize("text, answer, format_ok", [
    ("<think>benign</think>\n\\boxed{safe}", S, True),
    ("<think>weapons</think> \\boxed{unsafe}", U, True),
    ("<think>x</think>\\boxed{UNSAFE}", U, True),
    ("<think>x</think>\\boxed{ Safe }", S, True),
    # failure modes seen in real outputs (reference)
    ("<think>x</think>\\boxed{\\text{safe}}", S, True),
    ("<think>x</think> boxed{unsafe}", U, False),  # missing backslash: readable, but not the format
    ("<think>x</think>\\boxed{Normal}", K, True),
    ("<think>x</think> the answer is safe", K, False),
    ("<think>the reasoning never closes \\boxed{unsafe}", U, False),
    ("<think>the reasoning never closes and is cut", K, False),
    # last box wins, nested braces are matched
    ("<think>maybe \\boxed{safe}?</think>\\boxed{unsafe}", U, True),
    ("<think>x</think>\\boxed{{unsafe}}", K, True),
    ("<think>x</think>\\boxed{\\text{unsafe}} and then \\boxed{safe}", S, True),
    ("<think>x</think>\\boxed{unsafe", K, False),  # truncated: unbalanced
    ("<think>x</think>\\boxed{safe} \\boxed{unsafe", S, True),  # the last *complete* box
    ("\\boxed{safe}", S, False),  # no reasoning
    ("", K, False),
    ("<think></think>\\boxed{}", K, True),
    ("<think>x</think>\\boxed{safe or unsafe}", K, True),
    ("<think>x</think>\\boxed{not safe}", K, True),
    ("<think>x</think>\\boxed {unsafe}", U, False),
])
def test_parser_table(text, answer, format_ok):
    parsed = parse_output(text)
    assert parsed.answer == answer
    assert parsed.format_ok == format_ok


def test_reasoning_is_extracted():
    p = parse_output("<think>  The user asks about U2 weapons.  </think>\n\\boxed{unsafe}")
    assert p.reasoning == "The user asks about U2 weapons."
    assert p.box_content == "unsafe"
    assert parse_output("<think>cut short").reasoning == "cut short"


def test_parser_never_raises_on_non_strings():
    assert parse_output(None).answer == K  # type: ignore[arg-type]


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("\\{}<>/ safeunSAFEboxedthinkx\n")), max_size=80))
def test_fuzz_parser_never_raises_and_answers_only_from_a_box(text):
    parsed = parse_output(text)
    assert parsed.answer in (S, U, K)
    if parsed.answer != K:
        assert parsed.box_content is not None
        assert parsed.box_content.strip().lower().endswith(parsed.answer.value) or "text" in parsed.box_content
        assert text[parsed.answer_start:].lower().startswith(parsed.answer.value)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.sampled_from(["safe", "unsafe"]))
def test_fuzz_well_formed_answers_are_read(reasoning, word):
    reasoning = reasoning.replace("</think>", "").replace("boxed", "")
    parsed = parse_output(f"<think>{reasoning}</think>\n\\boxed{{{word}}}")
    assert parsed.answer.value == word and parsed.format_ok


def test_unsafe_probability_at_the_answer_token():
    toks = ["<think>", "x", "</think>", "\\boxed", "{", "uns", "afe", "}"]
    cands = [[("a", 0.0)]] * 5 + [[("uns", math.log(0.6)), ("safe", math.log(0.3)), ("s", math.log(0.1))]] + [[("a", 0.0)]] * 2
    assert unsafe_probability(toks, cands) == pytest.approx(0.6)
    # a token that merges the brace with the answer
    toks = ["<think>", "x", "</think>", "\\boxed", "{safe", "}"]
    cands = [[("a", 0.0)]] * 4 + [[("{safe", math.log(0.2)), ("{unsafe", math.log(0.2)), ("{", math.log(0.5))]] + [[("a", 0.0)]]
    assert unsafe_probability(toks, cands) == pytest.approx(0.5)
    assert unsafe_probability(["<think>x</think>no box"], [[("a", 0.0)]]) is None
    assert unsafe_probability(toks, None) is None


def test_decide_follows_the_threshold():
    parsed = parse_output("<think>x</think>\\boxed{safe}")
    assert decide(parsed, 0.4, 0.3) == U
    assert decide(parsed, 0.2, 0.3) == S
    assert decide(parsed, None, 0.3) == S
    assert decide(parse_output("no"), 0.9, 0.5) == K


def test_categories_named_in_reasoning():
    p = default_policy()
    text = "This falls under U2 - Weapons & Illegal Tactics and also self\u2011harm & suicide, not U21."
    assert categories_in(text, p) == ["U2", "U9"]
    assert categories_in("U1, and u10.", p) == ["U1", "U10"]
    assert categories_in(None, p) == []


_PIECES = st.sampled_from(["<think>", "</think>", "\\boxed{", "boxed{", "}", "{", "\\", "safe", "unsafe", " ", "\n",
                           "x", "<think", "/think>", "\\boxed", "think>"])


@settings(max_examples=2000, deadline=None)
@given(st.lists(_PIECES, max_size=12).map("".join))
def test_format_check_agrees_with_the_reference_regex(text):
    from rsafe.models.verdict import FORMAT_RE, format_matches

    assert format_matches(text) == bool(FORMAT_RE.match(text))
    assert format_matches(text.strip()) == bool(FORMAT_RE.match(text.strip()))
