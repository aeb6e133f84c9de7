"""What every generation backend shares: the ``Completion`` it returns per request, the
``Backend`` protocol, ``EngineError``, the forced answer after a cut reasoning, the decoding of the
answer's candidates, and the checks and tokenizer loading done at start.

Backends never parse verdicts; ``rsafe.models.guard`` does. A failure of one request comes back
as a ``Completion`` with ``error`` set; a failure of the whole call raises ``EngineError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from rsafe.models.config import EngineConfig, GenerationConfig

#: Structured answer grammar used to force the answer after a cut reasoning (``force_answer``).
FORCED_ANSWER_REGEX = r"\\boxed\{(safe|unsafe)\}"


class EngineError(RuntimeError):
    """The engine could not run a batch (not started, crashed, unreachable)."""


@dataclass
class Completion:
    text: str = ""
    token_texts: list[str] = field(default_factory=list)
    """The generated tokens' texts (with candidates only; ``[]`` otherwise)."""
    candidates: list[list[tuple[str, float]]] | None = None
    """Top (text, logprob) per generated token; what ``unsafe_probability`` reads is the position
    where the answer starts (the vLLM backend fills that one alone, other positions are ``[]``)."""
    prompt: str = ""
    """The exact prompt the engine received (rendered chat template, or the user turn for chat APIs)."""
    prompt_tokens: int = 0
    cached_prompt_tokens: int | None = None
    """Prompt tokens the engine took from its prefix cache (vLLM; None where the engine does not say)."""
    completion_tokens: int = 0
    finish_reason: str | None = None
    answer_forced: bool = False
    """The reasoning ran out of tokens and the answer was forced after it (``force_answer``)."""
    adapter_version: str | None = None
    """The content version of the LoRA adapter that judged it (adapters can be swapped at run time)."""
    error: str | None = None


def needs_forced_answer(gen: GenerationConfig, text: str, finish_reason: str | None) -> bool:
    """Structured decoding was cut by ``max_tokens`` before a readable answer."""
    if not (gen.structured and gen.force_answer and finish_reason == "length"):
        return False
    from rsafe.models.verdict import Label, parse_output

    return parse_output(text).answer == Label.UNKNOWN


def forced_head(text: str) -> str:
    """The generated reasoning, closed: what the forced answer continues from."""
    reasoning = text.split("</think>", 1)[0].rstrip()
    if not reasoning.startswith("<think>"):
        reasoning = "<think>" + reasoning
    return reasoning + "\n</think>\n"


def decode_text(tokenizer, token_ids: Sequence[int]) -> str:
    """A completion's text, decoded once, as vLLM's detokenizer would (special tokens skipped, no
    clean-up of spaces). The vLLM backend generates with ``detokenize=False``: vLLM's incremental
    detokenization runs token by token in the worker's own process, and on a GPU that one core,
    not the GPU, set the throughput (docs/BENCHMARKS.md, "GPU")."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def answer_token(tokenizer, token_ids: Sequence[int]) -> tuple[list[str], int | None]:
    """The texts of the single generated tokens (one batched decode) and the index of the token in
    which the answer word starts (``parse_output(...).answer_start``), or None."""
    from rsafe.models.verdict import parse_output, token_at

    pieces = tokenizer.batch_decode([[i] for i in token_ids], skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False)
    start = parse_output("".join(pieces)).answer_start
    found = None if start is None else token_at(pieces, start)
    return pieces, None if found is None else found[0]


def candidate_texts(tokenizer, position: dict) -> list[tuple[str, float]]:
    """One position's top candidates (vLLM ``{token_id: Logprob}``) as (decoded text, logprob)."""
    ids = list(position)
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return [(t, position[i].logprob) for t, i in zip(texts, ids)]


class Backend(Protocol):
    model_id: str
    token_counter: Any
    """A ``rsafe.models.tokens.TokenCounter``, or None (no token budget)."""

    def generate(self, user_turns: Sequence[str], gen: GenerationConfig,
                 adapters: Sequence[str | None]) -> list[Completion]: ...

    async def agenerate(self, user_turns: Sequence[str], gen: GenerationConfig,
                        adapters: Sequence[str | None]) -> list[Completion]: ...

    def load_adapter(self, name: str, path: str, version: str) -> None:
        """Serve ``name`` from the adapter at ``path`` from now on (requests in flight finish on the
        previous one); its verdicts carry ``version``."""
        ...

    def close(self) -> None: ...


def adapter_versions(cfg: EngineConfig) -> dict[str, str | None]:
    """The content versions of the configured (static) adapters."""
    from rsafe.models.versions import artifact_version

    return {name: artifact_version(path) for name, path in cfg.lora_adapters.items()}


def _check_model_path(model: str) -> None:
    """Fail early and clearly on a bad local model path; ``org/name`` hub ids pass through."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise EngineError(f"model directory {model!r} has no config.json (not a Hugging Face model dir)")
        return
    is_hub_id = not model.startswith((".", "/", "~")) and model.count("/") == 1
    if not is_hub_id:
        raise EngineError(f"model path {model!r} does not exist")


def _load_tokenizer(cfg: EngineConfig):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    except Exception as err:  # noqa: BLE001 - surfaced as a clear engine error
        raise EngineError(f"cannot load tokenizer for {cfg.tokenizer or cfg.model!r}: {err}") from err
