"""The RSafe rule reward, as plain callables in TRL's reward signature.

``GRPOTrainer`` calls every reward function as ``func(prompts=..., completions=..., **columns)``
and expects one float per completion. With a conversational dataset a completion is a list of
message dicts (``[{"role": "assistant", "content": "..."}]``); with a plain-text dataset it is a
string. Dataset columns arrive as keyword arguments: the training label arrives as ``label=``.

The check is the reference's **strict** one (``../shared/RSAFE_REFERENCE.md``, "Verdict
extraction and reward"), not the serving parser (``rsafe.models.verdict.parse_output``), which is
tolerant on purpose so that a deployed model's odd-but-readable answers still become verdicts.
Training must not pay for what serving merely tolerates, or the model learns to rely on it.

=================================  ======  ========  =============================================
completion                         format  answer    why
=================================  ======  ========  =============================================
``<think>r</think>\\boxed{safe}``   1       safe      the reference format
``<think>r</think>\\boxed{SAFE}``   1       safe      the answer compares case-insensitively
``<think>r</think>\\boxed{ safe }`` 1       none      no whitespace trimming inside the box
``<think>r</think>\\boxed{\\text{safe}}``  1  none    the box holds ``\\text{safe}``, not ``safe``
``<think>r</think>boxed{safe}``     0       none      no backslash: the format regex needs ``\\boxed{``
``<think>r</think>\\boxed {safe}``  0       none      nor a space before the brace
``<think>r\\boxed{safe}``           0       none      ``</think>`` never closes
``x <think>r</think>\\boxed{safe}`` 0       safe      must *start* with ``<think>`` (no strip, not
                                                      even whitespace)
``<think>r</think>\\boxed{safe} \\boxed{unsafe}``  1  unsafe  the **last** box counts
``<think>r</think>\\boxed{{safe}}`` 1       none      brace matching: the box holds ``{safe}``
``<think>r</think>\\boxed{safe``    0       none      an unclosed box is no box
``<think>r</think>\\boxed{Normal}`` 1       none      only safe / unsafe are answers
=================================  ======  ========  =============================================

*format* is ``FORMAT_RE`` (the same regex the serving parser reports as ``format_ok``) matched
against the completion as it is — the serving parser strips it first. *answer* is the content of
the last ``\\boxed{…}`` (backslash required, braces matched), lower-cased and compared exactly.
The accuracy reward counts only when the format holds; the reward is 0.9·accuracy + 0.1·format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rsafe.models.verdict import FORMAT_RE

ACCURACY_WEIGHT = 0.9
FORMAT_WEIGHT = 0.1
_BOX = "\\boxed{"
ANSWERS = ("safe", "unsafe")

Completion = str | Sequence[dict[str, Any]]
RewardFunc = Callable[..., list[float]]


def completion_text(completion: Completion) -> str:
    """The generated text of one completion: a string, or the content of its last message.

    >>> completion_text([{"role": "assistant", "content": "<think>x</think>"}])
    '<think>x</think>'
    """
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    content = completion[-1].get("content", "")
    return content if isinstance(content, str) else ""


def strict_format_ok(text: str) -> bool:
    """The reference format check on the text as generated (no stripping).

    >>> strict_format_ok("<think>\\nfine\\n</think>\\n\\\\boxed{safe}")
    True
    >>> strict_format_ok(" <think>fine</think>\\\\boxed{safe}")
    False
    """
    return bool(FORMAT_RE.match(text))


def last_box(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` with brace matching (None: no closed box).

    >>> last_box("\\\\boxed{safe} then \\\\boxed{\\\\text{unsafe}}")
    '\\\\text{unsafe}'
    >>> last_box("boxed{safe}") is None
    True
    """
    found = None
    start = text.find(_BOX)
    while start != -1:
        depth, i = 1, start + len(_BOX)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[start + len(_BOX): i - 1]
        start = text.find(_BOX, start + len(_BOX))
    return found


def strict_answer(text: str) -> str | None:
    """``'safe'``/``'unsafe'`` when the last box holds exactly that word (any case), else None.

    >>> strict_answer("<think>r</think>\\\\boxed{Unsafe}")
    'unsafe'
    >>> strict_answer("<think>r</think>\\\\boxed{ safe }") is None
    True
    """
    box = last_box(text)
    word = box.lower() if box is not None else None
    return word if word in ANSWERS else None


def _labels(label: Sequence[str] | None, n: int) -> list[str]:
    if label is None:
        raise ValueError("the accuracy reward needs the dataset's 'label' column (safe/unsafe), got none")
    labels = [str(x).lower() for x in label]
    if len(labels) != n:
        raise ValueError(f"{n} completions but {len(labels)} labels")
    bad = sorted({x for x in labels if x not in ANSWERS})
    if bad:
        raise ValueError(f"label must be safe or unsafe, got {bad}")
    return labels


def format_reward(completions: Sequence[Completion], **_: Any) -> list[float]:
    """1.0 when the completion passes the reference's strict format check, else 0.0.

    >>> format_reward(["<think>ok</think>\\\\boxed{safe}", "<think>ok\\\\boxed{safe}"])
    [1.0, 0.0]
    """
    return [float(strict_format_ok(completion_text(c))) for c in completions]


def accuracy_reward(completions: Sequence[Completion], label: Sequence[str] | None = None,
                    **_: Any) -> list[float]:
    """1.0 when the format holds and the last box's answer equals ``label``, else 0.0.

    >>> accuracy_reward(["<think>a</think>\\\\boxed{safe}", "<think>a\\\\boxed{safe}"], label=["safe", "safe"])
    [1.0, 0.0]
    """
    labels = _labels(label, len(completions))
    out = []
    for c, gold in zip(completions, labels):
        text = completion_text(c)
        out.append(float(strict_format_ok(text) and strict_answer(text) == gold))
    return out


def rsafe_reward(completions: Sequence[Completion], label: Sequence[str] | None = None,
                 **kwargs: Any) -> list[float]:
    """The reference reward in one function: 0.9·accuracy + 0.1·format.

    >>> rsafe_reward(["<think>a</think>\\\\boxed{unsafe}", "<think>a</think>\\\\boxed{safe}", "safe"],
    ...              label=["unsafe", "unsafe", "safe"])
    [1.0, 0.1, 0.0]
    """
    acc = accuracy_reward(completions, label=label, **kwargs)
    fmt = format_reward(completions, **kwargs)
    return [ACCURACY_WEIGHT * a + FORMAT_WEIGHT * f for a, f in zip(acc, fmt)]


#: Reward functions by name (``rsafe train grpo --reward NAME``).
REWARDS: dict[str, RewardFunc] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "rsafe": rsafe_reward,
}

#: The reference objective as TRL reward functions and weights: logged apart (TRL's
#: ``rewards/accuracy_reward/mean`` is the accuracy, ``rewards/format_reward/mean`` the format rate),
#: summed with these weights into exactly ``rsafe_reward``.
REFERENCE_REWARDS: tuple[tuple[str, float], ...] = (("accuracy", ACCURACY_WEIGHT), ("format", FORMAT_WEIGHT))


def reward_functions(names: Sequence[str]) -> list[RewardFunc]:
    """The reward functions called ``names`` (``REWARDS``); unknown names are an error."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward {unknown}; known: {', '.join(REWARDS)}")
    return [REWARDS[n] for n in names]
