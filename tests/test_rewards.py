"""The RSafe rule reward: the reference's strict format check and last-box answer, as TRL rewards."""

from __future__ import annotations

import doctest

import pytest

from rsafe.training import rewards
from rsafe.training.rewards import (
    REWARDS,
    accuracy_reward,
    format_reward,
    reward_functions,
    rsafe_reward,
    strict_answer,
)

R = "<think>\nThe user asks about lasagna. The content is safe.\n</think>\n"

#: (id, completion, format ok, strict answer). The label used for accuracy is ``safe``.
CASES = [
    ("reference", R + "\\boxed{safe}", True, "safe"),
    ("reference unsafe", R + "\\boxed{unsafe}", True, "unsafe"),
    ("upper case", R + "\\boxed{SAFE}", True, "safe"),
    ("mixed case", R + "\\boxed{Unsafe}", True, "unsafe"),
    ("no newline before box", "<think>r</think>\\boxed{safe}", True, "safe"),
    ("trailing text", R + "\\boxed{safe} I hope this helps.", True, "safe"),
    ("trailing whitespace", R + "\\boxed{safe}\n\n", True, "safe"),
    ("space inside box", R + "\\boxed{ safe }", True, None),
    ("text wrapper", R + "\\boxed{\\text{safe}}", True, None),
    ("textbf wrapper", R + "\\boxed{\\textbf{unsafe}}", True, None),
    ("no backslash", R + "boxed{safe}", False, None),
    ("space before brace", R + "\\boxed {safe}", False, None),
    ("missing </think>", "<think>\nThe content is safe.\n\\boxed{safe}", False, "safe"),
    ("box only inside think", "<think>\\boxed{safe}</think> done", False, "safe"),
    ("text before <think>", "Sure. " + R + "\\boxed{safe}", False, "safe"),
    ("whitespace before <think>", "\n" + R + "\\boxed{safe}", False, "safe"),
    ("two boxes: last wins", R + "\\boxed{safe} or rather \\boxed{unsafe}", True, "unsafe"),
    ("two boxes: last is safe", R + "\\boxed{unsafe}\\boxed{safe}", True, "safe"),
    ("nested braces", R + "\\boxed{{safe}}", True, None),
    ("nested braces then box", R + "\\boxed{a{b}c} \\boxed{safe}", True, "safe"),
    ("unclosed box", R + "\\boxed{safe", False, None),
    ("unclosed last box", R + "\\boxed{safe} \\boxed{unsafe", True, "safe"),
    ("other word", R + "\\boxed{Normal}", True, None),
    ("empty box", R + "\\boxed{}", True, None),
    ("no box", R + "The answer is safe.", False, None),
    ("empty", "", False, None),
    ("think never closes, no box", "<think>\nThe user asks", False, None),
]


@pytest.mark.parametrize("completion, fmt, answer", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_reward_table(completion: str, fmt: bool, answer: str | None) -> None:
    assert strict_answer(completion) == answer
    assert format_reward([completion]) == [float(fmt)]
    correct = fmt and answer == "safe"
    assert accuracy_reward([completion], label=["safe"]) == [float(correct)]
    assert rsafe_reward([completion], label=["safe"]) == [pytest.approx(0.9 * correct + 0.1 * fmt)]


def test_conversational_completions_and_batch() -> None:
    """TRL passes a conversational completion as a list of message dicts; label arrives as a column."""
    batch = [[{"role": "assistant", "content": R + "\\boxed{unsafe}"}],
             [{"role": "assistant", "content": R + "\\boxed{safe}"}],
             [{"role": "assistant", "content": "boxed{unsafe}"}],
             []]
    labels = ["unsafe", "unsafe", "unsafe", "safe"]
    assert accuracy_reward(batch, label=labels, prompts=["p"] * 4, trainer_state=None) == [1.0, 0.0, 0.0, 0.0]
    assert format_reward(batch, label=labels) == [1.0, 1.0, 0.0, 0.0]
    assert rsafe_reward(batch, label=labels) == pytest.approx([1.0, 0.1, 0.0, 0.0])


def test_the_serving_parser_is_more_tolerant() -> None:
    """What the serving parser reads as an answer, the reward does not pay for."""
    from rsafe.models.verdict import Label, parse_output

    for text in (R + "boxed{safe}", R + "\\boxed{\\text{safe}}", R + "\\boxed{ safe }", " " + R + "\\boxed{safe}"):
        parsed = parse_output(text)
        assert parsed.answer == Label.SAFE
        assert rsafe_reward([text], label=["safe"])[0] < 0.9


def test_label_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="'label' column"):
        accuracy_reward([R])
    with pytest.raises(ValueError, match="safe or unsafe"):
        accuracy_reward([R], label=["harmful"])
    with pytest.raises(ValueError, match="1 completions but 2 labels"):
        accuracy_reward([R], label=["safe", "safe"])


def test_registry_by_name() -> None:
    assert set(REWARDS) == {"accuracy", "format", "rsafe"}
    assert reward_functions(["accuracy", "format"]) == [accuracy_reward, format_reward]
    with pytest.raises(ValueError, match="unknown reward"):
        reward_functions(["length"])
    assert [w for _, w in rewards.REFERENCE_REWARDS] == [0.9, 0.1]


def test_doctests() -> None:
    result = doctest.testmod(rewards)
    assert result.attempted >= 7 and result.failed == 0
