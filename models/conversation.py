"""Conversations: the earlier turns a message is judged with, and the OpenAI ``messages`` format.

A judged message (``prompt``, or ``prompt`` + ``response``) may come with ``context``: the earlier
turns of its conversation, oldest first. The prompt renders them as ``User:`` / ``Agent:`` lines of
the template's conversation block before the judged turn (``rsafe.models.prompt``).

``messages`` is how a conversation arrives from outside (a chat event, a ``rsafe classify`` input
row): ``[{"role": "user" | "assistant", "content": "..."}]``, the judged turn last. A last ``user``
message is judged at prompt level; a last ``assistant`` message is judged at response level, with
the ``user`` message before it as its prompt.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Role = Literal["user", "assistant"]
Judge = Literal["last", "all"]
"""``last``: the model is told to judge only the last message (the earlier turns are context);
``all``: the reference task line, byte for byte (the whole conversation is judged)."""

MAX_MESSAGES = 1000
"""Most messages one request or event may carry (more is a validation error, not a silent cut)."""


class Turn(BaseModel):
    """One earlier message of a conversation."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Role
    content: str


Messages = Annotated[list[Turn], Field(min_length=1, max_length=MAX_MESSAGES)]


class Conversation(BaseModel):
    """A ``messages`` list split into the judged turn and its context."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    response: str | None = None
    context: list[Turn] = []


def split_messages(messages: Sequence[Turn | dict[str, Any]]) -> Conversation:
    """``messages`` (judged turn last) → the judged prompt (and response) and the turns before.

    Raises ``ValueError`` saying what is wrong and where (empty list, an unknown role, an assistant message
    with no user message before it)."""
    turns = []
    for i, m in enumerate(messages):
        if isinstance(m, Turn):
            turns.append(m)
            continue
        try:
            turns.append(Turn.model_validate(m))
        except ValidationError as err:
            where = "; ".join(f"[{i}].{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ValueError(where) from None
    if not turns:
        raise ValueError("messages is empty: the judged turn must be its last message")
    last = turns[-1]
    if last.role == "user":
        return Conversation(prompt=last.content, context=turns[:-1])
    if len(turns) < 2 or turns[-2].role != "user":
        raise ValueError("the last message is the assistant's: the message before it must be the user's "
                         "(its prompt)")
    return Conversation(prompt=turns[-2].content, response=last.content, context=turns[:-2])
