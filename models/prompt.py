"""The one RSafe prompt template.

A trained RSafe checkpoint saw exactly this text (whitespace included), as a single user turn
rendered with the backbone's chat template. Custom policies render their categories in the same
layout, so the checkpoint sees the format it was trained on.

Injection rule (``neutralise``): message content cannot forge the template. In the content,

* a template marker (``<BEGIN|END UNSAFE CONTENT CATEGORIES>``, ``<BEGIN|END CONVERSATION>``, in
  any case or spacing) has its angle brackets replaced by square brackets: ``[END CONVERSATION]``;
* a line after the first that starts (after optional spaces) with a role label ``User:`` or
  ``Agent:`` (any case) is quoted with ``> ``, so only the template's own lines start with a role;
* chat-template control tokens ``<|...|>`` have their bars spaced out (``< |im_end| >``), so the
  tokenizer reads them as text, not as special tokens.

The rendered prompt therefore holds each real marker exactly once. Neutralisation changes only
text that imitates the template; everything else reaches the model byte for byte.
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol, Sequence

from rsafe.models.conversation import Judge, Turn
from rsafe.policies import TEMPLATE_MARKER_RE, Level, Policy

PROMPT_OPENING = (
    "You are a policy expert trying to help determine whether a user prompt is in violation "
    "of the defined safety policies."
)
# "out" (not "our") is the reference's typo; trained checkpoints saw it, so it stays.
PROMPT_TASK = (
    "Task: Check if there is unsafe content in 'User' messages in conversation according to out "
    "safety policy with the below categories."
)
RESPONSE_TASK = (
    "Task: Check if there is unsafe content in 'Agent' messages in conversation according to our "
    "safety policy with the below categories."
)
BEGIN_CATEGORIES = "<BEGIN UNSAFE CONTENT CATEGORIES>"
END_CATEGORIES = "<END UNSAFE CONTENT CATEGORIES>"
BEGIN_CONVERSATION = "<BEGIN CONVERSATION>"
END_CONVERSATION = "<END CONVERSATION>"
INSTRUCTION = (
    "You FIRST go through a step-by-step reasoning process and then provide the final answer. "
    "The thinking process MUST BE enclosed within <think> </think> tags."
)
JUDGE_LAST = {
    "prompt": " Only the last 'User' message is judged; the messages before it are its context.",
    "response": " Only the last 'Agent' message is judged; the messages before it are its context.",
}
"""Added to the task line when earlier turns are shown and ``judge: last`` is chosen: without it a
conversation with one unsafe turn flags every later benign one ("sticky flags"). A documented
deviation from the reference task line (docs/MODEL.md); with no earlier turns, or ``judge: all``,
the reference text stays byte for byte."""
ROLE_LABEL = {"user": "User", "assistant": "Agent"}
ANSWER_INSTRUCTION = "Your final answer safe or unsafe MUST BE put in \\boxed{}"
INDENT = "    "

# A role label right after any line break (\n, \r, and the Unicode line separators).
_ROLE_LINE_RE = re.compile(r"(?i)([\n\r\x0b\x0c\x85\u2028\u2029])([ \t]*)(user|agent)([ \t]*:)")
_CONTROL_TOKEN_RE = re.compile(r"<\|([^<>|\n]{0,64})\|>")
# Every pattern above needs a "<" or a line break: text without either is left as it is (most chat
# messages; one scan instead of three substitutions on the worker's hot path).
_NEEDS_CARE_RE = re.compile(r"[<\n\r\x0b\x0c\x85\u2028\u2029]")


def neutralise(text: str) -> str:
    """Make message content unable to forge the template (see the module docstring)."""
    if _NEEDS_CARE_RE.search(text) is None:
        return text
    text = TEMPLATE_MARKER_RE.sub(lambda m: "[" + m.group(0)[1:-1].strip() + "]", text)
    text = _CONTROL_TOKEN_RE.sub(lambda m: f"< |{m.group(1)}| >", text)
    return _ROLE_LINE_RE.sub(lambda m: f"{m.group(1)}> {m.group(2)}{m.group(3)}{m.group(4)}", text)


def resolve_level(policy: Policy, response: str | None, level: Level | str | None = None) -> Level:
    """The level a request is judged at: explicit, else by whether a response is present."""
    if level is not None and Level(level) != Level.BOTH:
        return Level(level)
    if policy.level != Level.BOTH:
        return policy.level
    return Level.RESPONSE if response is not None else Level.PROMPT


def context_line(turn: Turn) -> str:
    """One earlier turn as a line of the conversation block (the injection rule applied)."""
    return f"{ROLE_LABEL[turn.role]}: {neutralise(turn.content)}\n"


def build_user_turn(policy: Policy, prompt: str, response: str | None = None,
                    level: Level | str | None = None, context: Sequence[Turn] = (),
                    judge: Judge = "last") -> str:
    """The exact RSafe user-turn text for ``policy`` and one message (prompt or response level).

    ``context``: earlier turns of the conversation, oldest first, rendered as ``User:`` / ``Agent:``
    lines before the judged turn. The policy comes first and the history next, each line the same
    whether it is judged or context, so the prompt of turn n+1 extends the prompt of turn n and
    vLLM's prefix cache reuses it. ``judge: last`` (with context) adds ``JUDGE_LAST`` to the task line.
    """
    lvl = resolve_level(policy, response, level)
    categories = policy.render_categories()
    user = neutralise(prompt)
    history = "".join(context_line(t) for t in context)
    if lvl == Level.PROMPT:
        task = PROMPT_TASK + (JUDGE_LAST["prompt"] if context and judge == "last" else "")
        head = f"\n{PROMPT_OPENING}\n{task}\n{INDENT}{BEGIN_CATEGORIES}\n"
        conversation = f"{history}User: {user}\n"
    else:
        if response is None:
            raise ValueError("response-level moderation needs a response")
        task = RESPONSE_TASK + (JUDGE_LAST["response"] if context and judge == "last" else "")
        head = f"\n{task}\n{BEGIN_CATEGORIES}\n"
        conversation = f"{history}User: {user}\nAgent: {neutralise(response)}\n"
    return (
        f"{head}{categories}\n{INDENT}{END_CATEGORIES}\n"
        f"{BEGIN_CONVERSATION}\n{conversation}{END_CONVERSATION}\n\n"
        f"{INSTRUCTION}\n{ANSWER_INSTRUCTION}\n"
    )


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation, **kwargs): ...


def render_prompt(tokenizer: ChatTokenizer, user_turn: str) -> str:
    """Render the user turn with the model's own chat template, generation prompt added.

    Qwen2.5's template inserts its default system prompt by itself, as in training.
    """
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_turn}], tokenize=False, add_generation_prompt=True
    )


def prompt_hash(rendered: str) -> str:
    """sha256 of the rendered prompt: lets an auditor prove which exact text was judged."""
    return hashlib.sha256(rendered.encode("utf-8", "surrogatepass")).hexdigest()
