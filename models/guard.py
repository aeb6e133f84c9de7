"""``Guard``: the thin user-facing class over an engine — requests in, verdicts out, input order.

Every request gets exactly one verdict. Bad input (empty text, lone surrogates, unknown policy,
over the size limit when configured to reject) and engine failures become ``error`` verdicts that
say why; unreadable model answers become ``unknown``. Nothing is dropped, nothing crashes the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rsafe.models.config import EngineConfig, GenerationConfig, InputLimits
from rsafe.models.engines import Backend, Completion, EngineError, make_backend
from rsafe.models.prompt import build_user_turn, prompt_hash, resolve_level
from rsafe.models.verdict import Label, Timings, Verdict, categories_in, decide, parse_output, unsafe_probability
from rsafe.policies import DEFAULT_POLICY, Level, Policy, PolicyError, PolicyRegistry


class GuardRequest(BaseModel):
    """One message to judge. ``response`` present → response-level moderation."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    response: str | None = None
    id: str | None = None
    policy: str | None = Field(default=None, description="Policy name; the guard's default when absent.")
    level: Level | None = None
    adapter: str | None = Field(default=None, description="LoRA adapter name (engine config lora_adapters).")


def _validation_reason(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in err.errors())


def _text_problem(name: str, text: str) -> str | None:
    if not text.strip():
        return f"{name} is empty or whitespace only"
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            return f"{name} is not valid unicode: lone surrogate U+{ord(ch):04X} at position {i}"
    return None


@dataclass
class _Prepared:
    index: int
    request: GuardRequest
    policy: Policy
    level: Level
    user_turn: str
    truncated: bool
    arrived: float


class Guard:
    """Classify chat messages against safety policies with an RSafe model."""

    def __init__(self, backend: Backend, *, policies: PolicyRegistry | None = None,
                 default_policy: str = DEFAULT_POLICY, generation: GenerationConfig | None = None,
                 limits: InputLimits | None = None):
        self.backend = backend
        self.policies = policies or PolicyRegistry.from_dirs()
        self.default_policy = self.policies.get(default_policy).name
        self.generation = generation or GenerationConfig()
        self.limits = limits or InputLimits()

    @classmethod
    def from_config(cls, cfg: EngineConfig, *, policies: PolicyRegistry | None = None,
                    default_policy: str = DEFAULT_POLICY) -> Guard:
        return cls(make_backend(cfg), policies=policies, default_policy=default_policy,
                   generation=cfg.generation, limits=cfg.limits)

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    # ------------------------------------------------------------------ preparation

    def _error(self, index_id: str | None, reason: str, policy: Policy | None = None, **extra: Any) -> Verdict:
        return Verdict(id=index_id, label=Label.ERROR, error_reason=reason, model=self.model_id,
                       policy=policy.name if policy else None,
                       policy_version=policy.version if policy else None, **extra)

    def _clip(self, text: str) -> tuple[str, bool]:
        if len(text) <= self.limits.max_chars:
            return text, False
        return text[: self.limits.max_chars], True

    def prepare(self, req: GuardRequest | dict, index: int = 0,
                arrived: float | None = None) -> _Prepared | Verdict:
        """Validate one request and build its user turn, or return the ``error`` verdict saying why."""
        arrived = time.perf_counter() if arrived is None else arrived
        if not isinstance(req, GuardRequest):
            raw_id = req.get("id") if isinstance(req, dict) else None
            try:
                req = GuardRequest.model_validate(req)
            except ValidationError as err:
                return self._error(raw_id if isinstance(raw_id, str) else None,
                                   f"invalid request: {_validation_reason(err)}")
        try:
            policy = self.policies.get(req.policy or self.default_policy)
        except PolicyError as err:
            return self._error(req.id, str(err))
        texts = {"prompt": req.prompt, **({"response": req.response} if req.response is not None else {})}
        truncated = False
        for name, text in texts.items():
            problem = _text_problem(name, text)
            if problem:
                return self._error(req.id, problem, policy)
            if len(text) > self.limits.max_chars and self.limits.on_oversize == "reject":
                return self._error(req.id, f"{name} is {len(text)} characters, over the limit of "
                                           f"{self.limits.max_chars}", policy)
        prompt, t1 = self._clip(req.prompt)
        response, t2 = self._clip(req.response) if req.response is not None else (None, False)
        truncated = t1 or t2
        try:
            level = resolve_level(policy, response, req.level)
            turn = build_user_turn(policy, prompt, response, level)
        except ValueError as err:
            return self._error(req.id, str(err), policy)
        return _Prepared(index, req, policy, level, turn, truncated, arrived)

    # ------------------------------------------------------------------ results

    def _verdict(self, p: _Prepared, c: Completion, engine_ms: float, started: float) -> Verdict:
        now = time.perf_counter()
        common = dict(
            id=p.request.id, level=p.level.value, policy=p.policy.name, policy_version=p.policy.version,
            model=self.model_id, adapter=p.request.adapter, truncated_input=p.truncated,
            prompt_hash=prompt_hash(c.prompt) if c.prompt else None,
            timings=Timings(queued_ms=(started - p.arrived) * 1e3, engine_ms=engine_ms,
                            total_ms=(now - p.arrived) * 1e3),
            latency_ms=(now - p.arrived) * 1e3,
        )
        if c.error:
            return Verdict(label=Label.ERROR, error_reason=c.error, **common)
        parsed = parse_output(c.text)
        prob = unsafe_probability(c.token_texts, c.candidates) if parsed.answer != Label.UNKNOWN else None
        label = decide(parsed, prob, p.policy.unsafe_threshold)
        return Verdict(
            label=label, unsafe_probability=prob,
            categories=categories_in(parsed.reasoning, p.policy) if label == Label.UNSAFE else [],
            reasoning=parsed.reasoning, raw_output=c.text, format_ok=parsed.format_ok,
            prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
            finish_reason=c.finish_reason, **common,
        )

    def _split(self, requests: Iterable[GuardRequest | dict], arrived: Sequence[float] | None):
        verdicts: list[Verdict | None] = []
        prepared: list[_Prepared] = []
        for i, req in enumerate(requests):
            p = self.prepare(req, i, arrived[i] if arrived else None)
            if isinstance(p, Verdict):
                verdicts.append(p)
            else:
                verdicts.append(None)
                prepared.append(p)
        return verdicts, prepared

    def _finish(self, verdicts, prepared, completions, engine_ms, started) -> list[Verdict]:
        if len(completions) != len(prepared):
            completions = [Completion(error=f"engine returned {len(completions)} results for "
                                            f"{len(prepared)} requests")] * len(prepared)
        for p, c in zip(prepared, completions):
            verdicts[p.index] = self._verdict(p, c, engine_ms, started)
        return verdicts

    def _failed(self, prepared: list[_Prepared], err: Exception) -> list[Completion]:
        return [Completion(error=f"engine failure: {err}") for _ in prepared]

    def classify(self, requests: Sequence[GuardRequest | dict], *,
                 arrived: Sequence[float] | None = None) -> list[Verdict]:
        """Judge a batch; one verdict per request, in input order."""
        verdicts, prepared = self._split(requests, arrived)
        started = time.perf_counter()
        if prepared:
            try:
                completions = self.backend.generate([p.user_turn for p in prepared], self.generation,
                                                    [p.request.adapter for p in prepared])
            except (EngineError, Exception) as err:  # noqa: BLE001 - every request gets its verdict
                completions = self._failed(prepared, err)
            engine_ms = (time.perf_counter() - started) * 1e3
            verdicts = self._finish(verdicts, prepared, completions, engine_ms, started)
        return verdicts  # type: ignore[return-value]

    async def aclassify(self, requests: Sequence[GuardRequest | dict], *,
                        arrived: Sequence[float] | None = None, raise_engine_errors: bool = False) -> list[Verdict]:
        """Async ``classify``. With ``raise_engine_errors`` a whole-batch engine failure raises
        ``EngineError`` instead of becoming ``error`` verdicts (the stream worker retries)."""
        verdicts, prepared = self._split(requests, arrived)
        started = time.perf_counter()
        if prepared:
            try:
                completions = await self.backend.agenerate([p.user_turn for p in prepared], self.generation,
                                                           [p.request.adapter for p in prepared])
            except Exception as err:  # noqa: BLE001
                if raise_engine_errors:
                    raise EngineError(str(err)) from err
                completions = self._failed(prepared, err)
            engine_ms = (time.perf_counter() - started) * 1e3
            verdicts = self._finish(verdicts, prepared, completions, engine_ms, started)
        return verdicts  # type: ignore[return-value]

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
