"""The demo model's tokenizer: byte-level BPE trained on the demo corpus, Qwen2-compatible.

transformers and vLLM load a ``qwen2`` model's tokenizer as ``Qwen2Tokenizer``, which applies NFC
normalisation and Qwen2's pre-tokenizer regex before byte-level BPE. The tokenizer is trained with
exactly those components (``QWEN2_PRETOKENIZE_REGEX``), so the splits seen in training are the
splits seen at inference (``tests/test_demo_model.py`` checks it on the corpus).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

    from rsafe.demo.corpus import DemoExample

DEFAULT_SYSTEM_MESSAGE = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
VOCAB_SIZE = 3000
MODEL_MAX_LENGTH = 1024

#: Qwen2's pre-tokenizer regex (``transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX``).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Qwen2.5-style chat template (tools left out): the default system message when none is given.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_MESSAGE + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


class PlainChat:
    """Renders the chat template without a tokenizer (to make the tokenizer's training text)."""

    def apply_chat_template(self, conversation: Sequence[Mapping[str, str]], **_: Any) -> str:
        text = f"{IM_START}system\n{DEFAULT_SYSTEM_MESSAGE}{IM_END}\n"
        for message in conversation:
            text += f"{IM_START}{message['role']}\n{message['content']}{IM_END}\n"
        return text + f"{IM_START}assistant\n"


def user_turn(example: DemoExample) -> str:
    """The RSafe user turn of a demo example, under its policy."""
    from rsafe.models.prompt import build_user_turn

    return build_user_turn(_registry().get(example.policy), example.prompt, example.response,
                           context=example.context, judge="last")


@lru_cache(maxsize=1)
def _registry() -> Any:
    from rsafe.policies import PolicyRegistry

    return PolicyRegistry.from_dirs()


def training_texts(examples: Sequence[DemoExample]) -> list[str]:
    """What the tokenizer is trained on: rendered prompts with answers, plus every template."""
    from rsafe.demo.corpus import corpus
    from rsafe.models.prompt import render_prompt

    plain = PlainChat()
    texts = []
    for ex in examples:
        text = render_prompt(plain, user_turn(ex)) + ex.answer()
        for special in SPECIAL_TOKENS:
            text = text.replace(special, "\n")
        texts.append(text)
    c = corpus()
    # every slot filler and template once, so rare words still get merged tokens
    texts += [" ".join(v) for v in c.slots.values()]
    texts += [" ".join(b.prompts + b.replies) for b in (*c.harmful.values(), *c.benign.values())]
    return texts


def _components() -> tuple[Any, Any, Any]:
    """Normaliser, pre-tokenizer and decoder exactly as ``Qwen2Tokenizer`` builds them."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return normalizers.NFC(), pre, decoders.ByteLevel()


def train_bpe(texts: Sequence[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A raw ``tokenizers`` BPE trained with Qwen2's normaliser and pre-tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer, tok.pre_tokenizer, tok.decoder = _components()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_tokenizer(examples: Sequence[DemoExample]) -> PreTrainedTokenizerBase:
    """Train the demo tokenizer on ``examples`` and wrap it as ``Qwen2Tokenizer`` — the class
    transformers and vLLM load it as — with the demo chat template."""
    import json

    from rsafe.models.prompt import render_prompt
    from transformers import Qwen2Tokenizer

    raw = train_bpe(training_texts(examples))
    model = json.loads(raw.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    hf = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, unk_token=PAD_TOKEN, eos_token=IM_END, pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START], model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.raw_training_tokenizer = raw  # type: ignore[attr-defined] - for the agreement check
    check = user_turn(examples[0])
    if render_prompt(hf, check) != render_prompt(PlainChat(), check):
        raise RuntimeError("demo tokenizer: chat template renders differently from the plain renderer")
    return hf


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The demo model's tokenizer from a built directory (as inference loads it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def verdict_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the single tokens that carry the answer in ``\\boxed{safe}`` / ``\\boxed{unsafe}``.

    With Qwen2's pre-tokenizer the brace joins the word (``{safe``, ``{unsafe``); the two answers
    must differ in exactly one token, so P(unsafe) can be read at that position.
    """
    enc = {w: tokenizer.encode(f"\\boxed{{{w}}}", add_special_tokens=False) for w in ("safe", "unsafe")}
    a, b = enc["safe"], enc["unsafe"]
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if i is None or len(a) != len(b) or a[i + 1:] != b[i + 1:]:
        raise ValueError("the answers safe/unsafe do not differ in exactly one token in this tokenizer")
    return {"safe": a[i], "unsafe": b[i]}
