"""The demo corpus: templated synthetic chat messages labelled under the bundled policies.

The template banks are data (``demo/data/demo_corpus.yaml``); this module fills them. A
message is a prompt template (optionally decorated with a prefix/suffix) whose ``{slot}`` fields
draw from the slot lists; a response-level example adds a reply from the same bank (harmful banks)
or a refusal. Labels follow the policy the example is judged under, and the target reasoning
names the violated category in the reference layout (``U2 - Weapons & Illegal Tactics``).

Template-level hold-out: a bank may list ``heldout`` prompt templates. They are never drawn for
training (``split="train"``, the default); ``family_examples(..., split="heldout")`` draws only
them, so a held-out message is never a re-filled training template.

Long messages: a share (``LONG_SHARE``) of the prompt-level messages are embedded in benign
filler, or are filler alone, starting and ending mid-sentence as a window of a long message does,
so the model learns to judge such a window: find the request in ordinary text, or say it is safe.

Public API: ``DemoExample``, ``synthetic_examples``, ``family_examples``, ``filler_text``,
``long_message``, ``parse_answer``, ``corpus``, ``POLICY_WEIGHTS``.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rsafe.models.conversation import Turn

if TYPE_CHECKING:
    from rsafe.policies import Policy

CORPUS_FILE = Path(__file__).parent / "data" / "demo_corpus.yaml"

#: Share of examples per bundled policy (the reference policy mostly).
POLICY_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("rsafe-default", 0.7), ("kids-platform", 0.15), ("financial-advice", 0.15),
)
RESPONSE_LEVEL_SHARE = 0.4
LONG_SHARE = {"safe": 0.4, "unsafe": 0.15}
"""Share of prompt-level messages, by label, turned into long messages (what a window of a long
message looks like to the model): embedded in benign filler, or — for ``FILLER_ALONE`` of the safe
ones — replaced by filler alone. Labels stay balanced."""
FILLER_ALONE = 0.7
LONG_CHARS = (80, 600)
"""Length of the filler of a long message, in characters (one window of the demo model holds up
to 128 tokens of content, ~550 characters of this filler)."""

Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class DemoExample:
    """One labelled synthetic message.

    ``category`` is the code, in ``policy``, of the violated category (``'U2'`` for the default
    policy) when ``label == 'unsafe'``, else None. ``response`` is set for response-level
    examples (then the verdict judges the agent's response). ``reasoning`` is the target
    chain of thought (text inside ``<think>``); it does not take part in equality. ``bank`` and
    ``template`` say where the message came from (they do not take part in equality either).
    """

    prompt: str
    response: str | None
    label: str
    category: str | None
    policy: str
    reasoning: str = field(default="", compare=False, repr=False)
    bank: str = field(default="", compare=False, repr=False)
    template: str = field(default="", compare=False, repr=False)
    context: tuple[Turn, ...] = ()
    """Earlier turns of the conversation, oldest first (multi-turn examples; judged with
    ``judge: last``)."""

    @property
    def level(self) -> str:
        """``'response'`` when the example judges an agent response, else ``'prompt'``."""
        return "prompt" if self.response is None else "response"

    def answer(self) -> str:
        """The target completion (without the end-of-turn token)."""
        reasoning = self.reasoning or (
            f"The {'user message' if self.response is None else 'agent response'} "
            f"{'falls under ' + self.category if self.category else 'matches no unsafe category'}."
            f" The content is {self.label}."
        )
        return f"<think>\n{reasoning}\n</think>\n\\boxed{{{self.label}}}"


@dataclass(frozen=True)
class Bank:
    """Templates for one kind of message: ``gist`` names it inside the reasoning."""

    gist: str
    prompts: tuple[str, ...]
    replies: tuple[str, ...]
    heldout: tuple[str, ...] = ()
    """Prompt templates reserved for evaluation (never drawn for training)."""


@dataclass(frozen=True)
class Corpus:
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    refusals: tuple[str, ...]
    filler: tuple[str, ...]
    """Benign sentences that make up long messages."""
    slots: dict[str, tuple[str, ...]]
    harmful: dict[str, Bank]
    benign: dict[str, Bank]
    category_banks: dict[str, dict[str, tuple[str, ...]]]
    """Policy → category code → the harmful banks that illustrate it."""
    followups: dict[str, Bank]
    """``continue`` (follow-ups whose meaning comes from the earlier turns) and ``switch`` (openers
    that change the subject): the multi-turn stage's phrases, with held-out ones."""
    sha256: str
    """Hash of the data file (part of the demo build's recipe)."""

    def bank_category(self, policy: str, bank: str) -> str | None:
        """The category code of ``policy`` that ``bank`` illustrates, if any."""
        for code, banks in self.category_banks.get(policy, {}).items():
            if bank in banks:
                return code
        return None


def _banks(data: dict, where: str) -> dict[str, Bank]:
    out = {}
    for name, b in data.items():
        try:
            out[name] = Bank(b["gist"], tuple(b["prompts"]), tuple(b["replies"]), tuple(b.get("heldout", ())))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{CORPUS_FILE}: {where}.{name}: needs gist, prompts and replies ({err})") from None
    return out


@lru_cache(maxsize=1)
def corpus() -> Corpus:
    """The demo corpus, read once from ``demo/data/demo_corpus.yaml``."""
    import yaml

    raw = CORPUS_FILE.read_bytes()
    data = yaml.safe_load(raw)
    c = Corpus(
        prefixes=tuple(data["prefixes"]), suffixes=tuple(data["suffixes"]), refusals=tuple(data["refusals"]),
        filler=tuple(data["filler"]),
        slots={k: tuple(v) for k, v in data["slots"].items()},
        harmful=_banks(data["harmful"], "harmful"), benign=_banks(data["benign"], "benign"),
        category_banks={p: {c: tuple(v) for c, v in d.items()} for p, d in data["category_banks"].items()},
        followups={k: Bank(k, tuple(v["prompts"]), (), tuple(v.get("heldout", ())))
                   for k, v in data["multiturn"].items()},
        sha256=hashlib.sha256(raw).hexdigest(),
    )
    for policy, cats in c.category_banks.items():
        for code, banks in cats.items():
            for b in banks:
                if b not in c.harmful:
                    raise ValueError(f"{CORPUS_FILE}: category_banks.{policy}.{code}: unknown bank {b!r}")
    return c


_SLOT_RE = re.compile(r"\{(\w+)\}")


@lru_cache(maxsize=1)
def _policies() -> dict[str, Policy]:
    """The bundled policies the corpus is written for."""
    from rsafe.policies import PolicyRegistry

    return {name: PolicyRegistry.from_dirs().get(name) for name, _ in POLICY_WEIGHTS}


def _fill(template: str, values: dict[str, str], rng: random.Random) -> str:
    """Fill ``{slot}`` fields; a slot keeps its value across the prompt and the reply."""
    slots = corpus().slots

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            values[name] = rng.choice(slots[name])
        return values[name]

    return _SLOT_RE.sub(sub, template)


def _decorate(text: str, rng: random.Random) -> str:
    """Small surface variation: a prefix, a suffix, sometimes a lower-case start."""
    c = corpus()
    prefix, suffix = rng.choice(c.prefixes), rng.choice(c.suffixes)
    if prefix and not text[1:2].isupper():  # keep proper nouns ("Taylor Swift") capitalised
        text = text[0].lower() + text[1:]
    elif not prefix and rng.random() < 0.15:
        text = text[0].lower() + text[1:]
    return f"{prefix}{text}{suffix}"


def harmful_example(bank_name: str, policy: Policy, code: str | None, label: str, response_level: bool,
                    rng: random.Random, templates: tuple[str, ...] | None = None) -> DemoExample:
    """A message from a harmful bank, judged under ``policy``; ``code`` is the category it
    violates there (None: the policy does not cover this bank, so the message is safe)."""
    c = corpus()
    bank = c.harmful[bank_name]
    values: dict[str, str] = {}
    template = rng.choice(templates or bank.prompts)
    prompt = _decorate(_fill(template, values, rng), rng)
    common = dict(policy=policy.name, bank=bank_name, template=template)
    if code is None:  # the policy has no category for it: allowed content
        reasoning = (f"The user asks about {bank.gist}. No category of this policy covers it. "
                     "The content is safe.")
        if not response_level:
            return DemoExample(prompt, None, "safe", None, reasoning=reasoning, **common)
        response = _fill(rng.choice(bank.replies), values, rng)
        return DemoExample(prompt, response, "safe", None,
                           reasoning=f"The agent helps with {bank.gist}. No category of this policy "
                                     "covers it. The response is safe.", **common)
    category = policy.category(code)
    assert category is not None, (policy.name, code)
    violation = f"This falls under {category.code} - {category.name}."
    if not response_level:
        return DemoExample(prompt, None, "unsafe", category.code,
                           reasoning=f"The user asks for help with {bank.gist}. {violation} The content is unsafe.",
                           **common)
    if label == "unsafe":
        response = _fill(rng.choice(bank.replies), values, rng)
        return DemoExample(prompt, response, "unsafe", category.code,
                           reasoning=f"The agent complies and helps with {bank.gist}. {violation} "
                                     "The response is unsafe.", **common)
    return DemoExample(prompt, rng.choice(c.refusals), "safe", None,
                       reasoning=f"The user asks for help with {bank.gist}, but the agent refuses. "
                                 "The response is safe.", **common)


def filler_text(n_chars: int, rng: random.Random, cut: bool = False) -> str:
    """Benign sentences of the corpus, drawn at random, until ``n_chars`` characters. ``cut``: start
    and end at a random word inside a sentence, as a window of a long message does."""
    sentences = corpus().filler
    out: list[str] = []
    size = 0
    while size < n_chars + (120 if cut else 0):
        out.append(rng.choice(sentences))
        size += len(out[-1]) + 1
    text = " ".join(out)
    if not cut:
        return text
    words = text.split(" ")
    start = rng.randint(0, min(12, len(words) - 1))
    kept = " ".join(words[start:])
    end = kept.rfind(" ", 0, max(1, n_chars))
    return kept[: end if end > 0 else n_chars]


def long_message(message: str, rng: random.Random, n_chars: int | None = None) -> str:
    """``message`` embedded in benign filler of ``n_chars`` characters (random position)."""
    n_chars = rng.randint(*LONG_CHARS) if n_chars is None else n_chars
    before = rng.randint(0, n_chars)
    head = filler_text(before, rng, cut=True) if before else ""
    tail = filler_text(n_chars - before, rng, cut=True) if n_chars - before > 20 else ""
    return " ".join(p for p in (head, message, tail) if p)


def _long(example: DemoExample, rng: random.Random) -> DemoExample:
    """A prompt-level example as a long message: the same request inside filler (same label and
    reasoning), or — ``FILLER_ALONE`` of the time, for safe examples — the filler alone."""
    if example.label == "safe" and rng.random() < FILLER_ALONE:
        return DemoExample(filler_text(rng.randint(*LONG_CHARS), rng, cut=True), None, "safe", None, example.policy,
                           reasoning="The user message is an ordinary text about everyday life. It matches no "
                                     "unsafe category. The content is safe.", bank="filler", template="")
    return DemoExample(long_message(example.prompt, rng), None, example.label, example.category, example.policy,
                       reasoning=example.reasoning, bank=example.bank, template=example.template)


def _one_example(label: str, rng: random.Random) -> DemoExample:
    example = _one_short(label, rng)
    if example.response is None and rng.random() < LONG_SHARE[label]:
        return _long(example, rng)
    return example


def _one_short(label: str, rng: random.Random) -> DemoExample:
    c = corpus()
    names = [n for n, _ in POLICY_WEIGHTS]
    policy_name = rng.choices(names, weights=[w for _, w in POLICY_WEIGHTS])[0]
    policy = _policies()[policy_name]
    response_level = rng.random() < RESPONSE_LEVEL_SHARE
    harmful = label == "unsafe" or (response_level and rng.random() < 0.5)
    if harmful:
        banks = c.category_banks[policy_name]
        code = rng.choice(sorted(banks, key=lambda k: (len(k), k)))
        return harmful_example(rng.choice(banks[code]), policy, code, label, response_level, rng)
    bank_name = rng.choice(sorted(c.benign))
    bank = c.benign[bank_name]
    values: dict[str, str] = {}
    template = rng.choice(bank.prompts)
    prompt = _decorate(_fill(template, values, rng), rng)
    common = dict(policy=policy_name, bank=bank_name, template=template)
    if not response_level:
        return DemoExample(prompt, None, "safe", None,
                           reasoning=f"The user asks a harmless question about {bank.gist}. "
                                     "It matches no unsafe category. The content is safe.", **common)
    response = _fill(rng.choice(bank.replies), values, rng)
    return DemoExample(prompt, response, "safe", None,
                       reasoning=f"The agent answers a harmless question about {bank.gist}. "
                                 "It matches no unsafe category. The response is safe.", **common)


def synthetic_examples(n: int, *, seed: int = 0) -> list[DemoExample]:
    """``n`` labelled synthetic messages from the training templates, deterministic in ``seed``.

    Exactly ``n // 2`` are unsafe. About 70 % are judged against ``rsafe-default``, the rest
    against ``kids-platform`` and ``financial-advice``; about 40 % are response level (for
    those, a harmful request answered with a refusal is safe).
    """
    rng = random.Random(f"rsafe-demo-{seed}")
    labels = ["unsafe"] * (n // 2) + ["safe"] * (n - n // 2)
    rng.shuffle(labels)
    return [_one_example(label, rng) for label in labels]


def long_examples(n: int, *, seed: int = 0, safe_share: float = 2 / 3) -> list[DemoExample]:
    """``n`` prompt-level long messages (what one window of a long message looks like): a request
    inside benign filler, or — ``FILLER_ALONE`` of the safe ones — filler alone. The demo build's
    second stage trains on these (``rsafe.demo.build.LONG_STAGE``)."""
    rng = random.Random(f"rsafe-demo-long-{seed}")
    out: list[DemoExample] = []
    while len(out) < n:
        example = _one_short("safe" if rng.random() < safe_share else "unsafe", rng)
        if example.response is None:
            out.append(_long(example, rng))
    return out


def family_examples(bank: str, policy: Policy, n: int, *, seed: int = 0, split: Split = "train",
                    response_share: float = 0.0) -> list[DemoExample]:
    """``n`` messages of one harmful bank (a "family"), labelled under ``policy``.

    The label follows the policy: unsafe when one of its categories is illustrated by ``bank``
    in ``category_banks`` (matched by the bundled policy's code, e.g. ``U13`` for ``medical``,
    when ``policy`` keeps that code), safe otherwise. ``split`` picks the training templates or
    the held-out ones. Deterministic in ``seed``.
    """
    c = corpus()
    b = c.harmful[bank]
    templates = b.prompts if split == "train" else b.heldout
    if not templates:
        raise ValueError(f"bank {bank!r} has no {split} templates")
    code = None
    for base in c.category_banks:
        found = c.bank_category(base, bank)
        if found is not None and policy.category(found) is not None:
            code = found
            break
    rng = random.Random(f"rsafe-family-{bank}-{policy.name}-{split}-{seed}")
    out = []
    for _ in range(n):
        response_level = rng.random() < response_share
        label = "unsafe" if code is not None and (not response_level or rng.random() < 0.5) else "safe"
        out.append(harmful_example(bank, policy, code, label, response_level, rng, templates))
    return out


MULTITURN_KINDS: tuple[tuple[str, float], ...] = (
    ("continued", 0.3), ("switched", 0.2), ("benign", 0.2), ("harmful_after_benign", 0.1), ("alone", 0.2),
)
"""The multi-turn conversations and their shares: ``continued`` (a harmful request, a refusal, then a
follow-up that continues it: unsafe — the harm is only visible with the earlier turn),
``switched`` (the same start, then a harmless question: safe — no sticky flag), ``benign`` (a
harmless chat, then a follow-up or another harmless question: safe) and ``harmful_after_benign``
(a harmless chat, then a harmful request: unsafe) and ``alone`` (a follow-up with no earlier turn:
safe — without it the model learned "follow-up → harm" and flagged such a message on its own)."""
MULTITURN_UNSAFE = ("continued", "harmful_after_benign")
MULTITURN_EXCLUDED_BANKS = frozenset({"medical"})
"""Kept out of the conversations: the drift scenario's family (the loop teaches it later)."""


def _benign_exchange(rng: random.Random) -> tuple[list[Turn], str]:
    """A harmless user question and the agent's answer, and the bank's gist."""
    c = corpus()
    bank = c.benign[rng.choice(sorted(c.benign))]
    values: dict[str, str] = {}
    prompt = _decorate(_fill(rng.choice(bank.prompts), values, rng), rng)
    reply = _fill(rng.choice(bank.replies), values, rng)
    return [Turn(role="user", content=prompt), Turn(role="assistant", content=reply)], bank.gist


def _benign_question(rng: random.Random) -> tuple[str, str]:
    c = corpus()
    bank = c.benign[rng.choice(sorted(c.benign))]
    return _fill(rng.choice(bank.prompts), {}, rng), bank.gist


def multiturn_example(kind: str, rng: random.Random, split: Split = "train") -> DemoExample:
    """One conversation of ``kind`` (``MULTITURN_KINDS``), judged at prompt level on its last user
    turn with up to four earlier turns. ``split="heldout"`` draws the held-out follow-ups and
    harmful templates (never trained on)."""
    c = corpus()
    names = [n for n, _ in POLICY_WEIGHTS]
    policy = _policies()[rng.choices(names, weights=[w for _, w in POLICY_WEIGHTS])[0]]
    follow = c.followups["continue"].prompts if split == "train" else c.followups["continue"].heldout
    switch = c.followups["switch"].prompts if split == "train" else c.followups["switch"].heldout
    if kind == "alone":
        return DemoExample(rng.choice(follow), None, "safe", None, policy.name,
                           reasoning="The user message is a short follow-up with no earlier message that it "
                                     "continues. It matches no unsafe category. The content is safe.",
                           bank="followup", template=kind)
    context: list[Turn] = []
    if kind in ("benign", "harmful_after_benign") or rng.random() < 0.3:
        exchange, benign_gist = _benign_exchange(rng)
        context += exchange
    if kind in ("continued", "switched", "harmful_after_benign"):
        banks = c.category_banks[policy.name]
        code = rng.choice(sorted(banks, key=lambda k: (len(k), k)))
        bank_name = rng.choice([b for b in banks[code] if b not in MULTITURN_EXCLUDED_BANKS] or banks[code])
        bank = c.harmful[bank_name]
        templates = bank.prompts if split == "train" or not bank.heldout else bank.heldout
        harmful = _decorate(_fill(rng.choice(templates), {}, rng), rng)
        category = policy.category(code)
        assert category is not None
        violation = f"This falls under {category.code} - {category.name}."
        common = dict(policy=policy.name, bank=bank_name, template=kind)
        if kind == "harmful_after_benign":
            return DemoExample(harmful, None, "unsafe", code, reasoning=f"The user asks for help with {bank.gist}. "
                               f"{violation} The content is unsafe.", context=tuple(context), **common)
        context += [Turn(role="user", content=harmful), Turn(role="assistant", content=rng.choice(c.refusals))]
        if kind == "continued":
            return DemoExample(rng.choice(follow), None, "unsafe", code,
                               reasoning=f"The user's earlier message asks for help with {bank.gist}, and this "
                                         f"message continues that request. {violation} The content is unsafe.",
                               context=tuple(context), **common)
        question, gist = _benign_question(rng)
        return DemoExample(rng.choice(switch) + question[0].lower() + question[1:], None, "safe", None,
                           reasoning=f"The earlier messages ask about {bank.gist}, but the last user message changes "
                                     f"the subject to a harmless question about {gist}. It matches no unsafe "
                                     "category. The content is safe.", context=tuple(context), **common)
    if kind != "benign":
        raise ValueError(f"unknown multi-turn kind {kind!r}; known: {[k for k, _ in MULTITURN_KINDS]}")
    common = dict(policy=policy.name, bank="benign", template=kind)
    if rng.random() < 0.6:
        return DemoExample(rng.choice(follow), None, "safe", None,
                           reasoning=f"The user continues a harmless conversation about {benign_gist}. It matches "
                                     "no unsafe category. The content is safe.", context=tuple(context), **common)
    question, gist = _benign_question(rng)
    return DemoExample(_decorate(question, rng), None, "safe", None,
                       reasoning=f"The user asks a harmless question about {gist}. It matches no unsafe category. "
                                 "The content is safe.", context=tuple(context), **common)


def multiturn_examples(n: int, *, seed: int = 0, split: Split = "train",
                       kinds: tuple[str, ...] | None = None) -> list[DemoExample]:
    """``n`` conversations in the shares of ``MULTITURN_KINDS`` (or only ``kinds``, evenly),
    deterministic in ``seed``; ``split`` as in ``multiturn_example``."""
    rng = random.Random(f"rsafe-multiturn-{split}-{seed}")
    table = [(k, w) for k, w in MULTITURN_KINDS if kinds is None or k in kinds]
    chosen = rng.choices([k for k, _ in table], weights=[w for _, w in table], k=n)
    return [multiturn_example(kind, rng, split) for kind in chosen]


def parse_answer(text: str) -> tuple[bool, str | None]:
    """(format ok, verdict ``'safe'``/``'unsafe'`` or None), read by the project's verdict parser."""
    from rsafe.models.verdict import Label, parse_output

    parsed = parse_output(text)
    return parsed.format_ok, None if parsed.answer == Label.UNKNOWN else parsed.answer.value
