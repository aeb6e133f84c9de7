"""``NullBackend``: answers a fixed verdict at once (tests, soak runs, pipeline benchmarks)."""

from __future__ import annotations

from rsafe.models.config import EngineConfig
from rsafe.models.engines.base import Completion


class NullBackend:
    """Answers ``cfg.null_label`` at once, with a fixed reasoning and certain logprobs.

    For tests of the pipeline's mechanics, soak runs and pipeline benchmarks: it measures
    everything but the model. Never use it to moderate traffic.
    """

    token_counter = None

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.model_id = cfg.display_id
        label = cfg.null_label
        self._text = f"<think>null engine: fixed answer</think>\n\\boxed{{{label}}}"
        other = "safe" if label == "unsafe" else "unsafe"
        self._tokens = ["<think>null engine: fixed answer</think>\n\\boxed{", label, "}"]
        self._candidates = [[(self._tokens[0], 0.0)], [(label, 0.0), (other, -30.0)], [("}", 0.0)]]
        self._adapters: dict[str, str | None] = {}

    def _one(self, turn: str) -> Completion:
        return Completion(text=self._text, token_texts=list(self._tokens), candidates=self._candidates,
                          prompt=turn, prompt_tokens=len(turn) // 4, completion_tokens=3, finish_reason="stop")

    def load_adapter(self, name: str, path: str, version: str) -> None:
        self._adapters[name] = version

    def _all(self, user_turns, adapters) -> list[Completion]:
        out = [self._one(t) for t in user_turns]
        for c, a in zip(out, adapters):
            c.adapter_version = self._adapters.get(a) if a else None
        return out

    def generate(self, user_turns, gen, adapters):
        return self._all(user_turns, adapters)

    async def agenerate(self, user_turns, gen, adapters):
        return self._all(user_turns, adapters)

    def close(self) -> None:
        pass
