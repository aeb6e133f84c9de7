"""``Guard``: the thin user-facing class over an engine — requests in, verdicts out, input order.

Every request gets exactly one verdict. Bad input (empty text, lone surrogates, unknown policy,
over the size limit — ``too_large``, unless ``on_oversize: truncate`` is chosen) and engine
failures become ``error`` verdicts that say why; unreadable model answers become ``unknown``. Nothing is dropped, nothing crashes the batch.

Two steps, usable apart: ``prepare`` validates a request and plans its engine sequences (one, or
overlapping token windows when the prompt would not fit the context, see ``rsafe.models.tokens``);
``classify_prepared`` / ``aclassify_prepared`` run prepared requests — all windows of a message in
the same engine batch — and combine each message's windows into one verdict. ``classify`` does both.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rsafe.models.config import EngineConfig, GenerationConfig, InputLimits
from rsafe.models.conversation import MAX_MESSAGES, Judge, Turn, split_messages
from rsafe.models.engines import Backend, Completion, EngineError, make_backend
from rsafe.models.prompt import prompt_hash, resolve_level
from rsafe.models.tokens import ContextFit, Window, WindowError, fit_context, plan_windows
from rsafe.models.verdict import (
    TOO_LARGE,
    CharRange,
    Label,
    Verdict,
    categories_in,
    decide,
    parse_output,
    unsafe_probability,
)
from rsafe.models.versions import artifact_version
from rsafe.policies import DEFAULT_POLICY, Level, Policy, PolicyError, PolicyRegistry


class GuardRequest(BaseModel):
    """One message to judge. ``response`` present → response-level moderation.

    ``context``: the earlier turns of its conversation, oldest first. Or, instead of ``prompt`` /
    ``response`` / ``context``, ``messages`` in the OpenAI chat format, the judged turn last
    (``rsafe.models.conversation.split_messages``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    response: str | None = None
    id: str | None = None
    policy: str | None = Field(default=None, description="Policy name; the guard's default when absent.")
    level: Level | None = None
    adapter: str | None = Field(default=None, description="LoRA adapter name (engine config lora_adapters).")
    context: list[Turn] = Field(default=[], max_length=MAX_MESSAGES,
                                description="Earlier turns of the conversation, oldest first.")
    judge: Judge = Field(default="last", description="With context: judge only the last message (last) "
                         "or the whole conversation (all, the reference wording).")
    max_context_tokens: int | None = Field(default=None, ge=0, description="Most prompt tokens the context "
                                           "may take (default: what the model's context leaves).")

    @model_validator(mode="before")
    @classmethod
    def _from_messages(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "messages" not in data:
            return data
        given = [k for k in ("prompt", "response", "context") if data.get(k) is not None]
        if given:
            raise ValueError(f"give either messages or {'/'.join(given)}, not both")
        messages = data["messages"]
        if not isinstance(messages, list):
            raise ValueError("messages must be a list of {role, content}")
        if len(messages) > MAX_MESSAGES:
            raise ValueError(f"messages has {len(messages)} entries, over the limit of {MAX_MESSAGES}")
        try:
            conv = split_messages(messages)
        except ValueError as err:
            raise ValueError(f"messages{err}" if str(err).startswith("[") else f"messages: {err}") from None
        rest = {k: v for k, v in data.items() if k != "messages"}
        return {**rest, "prompt": conv.prompt, "response": conv.response, "context": list(conv.context)}


def _validation_reason(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in err.errors())


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def oversize_detail(over: dict[str, int], cap: int) -> str:
    """What a ``too_large`` verdict says: which fields, how long, the limit, and that nothing was judged."""
    fields = ", ".join(f"{name} is {n:,} characters" for name, n in over.items())
    return (f"{fields}, over the limit of {cap:,} (limits.max_chars); nothing of the message was judged "
            "(limits.on_oversize: reject)")


def _text_problem(name: str, text: str) -> str | None:
    if not text.strip():
        return f"{name} is empty or whitespace only"
    bad = _SURROGATE_RE.search(text)
    if bad:
        return f"{name} is not valid unicode: lone surrogate U+{ord(bad.group()):04X} at position {bad.start()}"
    return None


@dataclass
class Prepared:
    """A validated request and the engine sequences (windows) that will judge it."""

    request: GuardRequest
    policy: Policy
    level: Level
    windows: list[Window]
    truncated: bool
    arrived: float
    """``time.perf_counter()`` when the request arrived (latency accounting)."""
    index: int = 0
    unjudged: list[CharRange] = field(default_factory=list)
    """Characters the model will not see (``on_oversize: truncate``); empty otherwise."""
    context: ContextFit = ContextFit()
    """The earlier turns shown with the message (the newest of ``request.context`` that fit)."""

    @property
    def user_turn(self) -> str:
        """The first window's user turn (the whole message when it fits the context)."""
        return self.windows[0].user_turn


@dataclass(frozen=True)
class _Judged:
    """One window's engine result, parsed."""

    completion: Completion
    label: Label
    probability: float | None
    reasoning: str | None
    format_ok: bool


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

    @functools.cached_property
    def model_version(self) -> str | None:
        """Content version of the weights when the engine runs a local directory (else None)."""
        cfg = getattr(self.backend, "cfg", None)
        return artifact_version(cfg.model) if cfg is not None and cfg.backend != "openai" else None

    # ------------------------------------------------------------------ preparation

    def _error(self, index_id: str | None, reason: str, policy: Policy | None = None, **extra: Any) -> Verdict:
        return Verdict(id=index_id, label=Label.ERROR, error_reason=reason, model=self.model_id,
                       model_version=self.model_version, policy=policy.name if policy else None,
                       policy_version=policy.version if policy else None, **extra)

    def _segments(self, text: str) -> list[tuple[int, int]] | None:
        """Character ranges judged of an over-long text (``truncate``): its head and its tail."""
        cap = self.limits.max_chars
        if len(text) <= cap:
            return None
        half = cap // 2
        return [(0, half), (len(text) - (cap - half), len(text))]

    def prepare(self, req: GuardRequest | dict, index: int = 0,
                arrived: float | None = None) -> Prepared | Verdict:
        """Validate one request and plan its windows, or return the ``error`` verdict saying why."""
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
        for name, text in texts.items():
            problem = _text_problem(name, text)
            if problem:
                return self._error(req.id, problem, policy)
        for i, turn in enumerate(req.context):  # an empty earlier turn is harmless; broken unicode is not
            bad = _SURROGATE_RE.search(turn.content)
            if bad:
                return self._error(req.id, f"context[{i}].content is not valid unicode: lone surrogate "
                                   f"U+{ord(bad.group()):04X} at position {bad.start()}", policy)
        cap = self.limits.max_chars
        over = {name: len(text) for name, text in texts.items() if len(text) > cap}
        if over and self.limits.on_oversize == "reject":  # fail closed: never judge part of a message
            return self._error(req.id, TOO_LARGE, policy, error_detail=oversize_detail(over, cap))
        try:
            level = resolve_level(policy, req.response, req.level)
            if level == Level.RESPONSE and req.response is None:
                raise ValueError("response-level moderation needs a response")
            prompt, unjudged = req.prompt, []
            if level == Level.RESPONSE and len(prompt) > cap:
                unjudged.append(CharRange(field="prompt", start=0, end=len(prompt) - cap))
                prompt = prompt[-cap:]  # the user turn's tail (windows fit it further)
            judged_field = "response" if level == Level.RESPONSE else "prompt"
            judged: str = req.response if level == Level.RESPONSE else req.prompt  # type: ignore[assignment]
            segments = self._segments(judged)
            if segments is not None:
                unjudged.append(CharRange(field=judged_field, start=segments[0][1], end=segments[1][0]))
            context = ContextFit()
            if req.context and segments is None and not unjudged:
                context = fit_context(policy, level, prompt, req.response, req.context, counter=self.token_counter,
                                      max_tokens=self.generation.max_tokens,
                                      max_context_tokens=req.max_context_tokens, judge=req.judge)
            windows = plan_windows(policy, level, prompt, req.response, counter=self.token_counter,
                                   max_tokens=self.generation.max_tokens,
                                   overlap=self.limits.window_overlap_tokens, segments=segments,
                                   max_window_tokens=self.limits.max_window_tokens, context=context,
                                   judge=req.judge)
            if len(windows) > 1 or windows[0].span is not None:  # judged in windows: without context
                context = ContextFit()
        except (ValueError, WindowError, EngineError) as err:  # EngineError: a server that counts tokens is down
            return self._error(req.id, str(err), policy)
        return Prepared(req, policy, level, windows, bool(unjudged), arrived, index, unjudged, context)

    @property
    def token_counter(self) -> Any:
        """The backend's token counter (None: no token budget, only the character cap)."""
        return getattr(self.backend, "token_counter", None)

    def prepare_all(self, requests: Iterable[GuardRequest | dict],
                    arrived: Sequence[float] | None = None) -> list[Prepared | Verdict]:
        return [self.prepare(r, i, arrived[i] if arrived else None) for i, r in enumerate(requests)]

    # ------------------------------------------------------------------ results

    def _judge(self, p: Prepared, c: Completion) -> _Judged:
        if c.error:
            return _Judged(c, Label.ERROR, None, None, False)
        parsed = parse_output(c.text)
        prob = None
        if parsed.answer != Label.UNKNOWN:  # reuse the parse when the tokens spell exactly the text
            same = "".join(c.token_texts) == c.text
            prob = unsafe_probability(c.token_texts, c.candidates, parsed if same else None)
        return _Judged(c, decide(parsed, prob, p.policy.unsafe_threshold), prob, parsed.reasoning, parsed.format_ok)

    @staticmethod
    def _deciding(judged: Sequence[_Judged]) -> int:
        """The window that decides: an unsafe one (highest P(unsafe)); else, when any window could
        not be judged (error, unknown), that one — the message is not safe without it; else the
        safe window closest to unsafe."""
        def p(i: int) -> float:
            return judged[i].probability if judged[i].probability is not None else -1.0

        unsafe = [i for i, j in enumerate(judged) if j.label == Label.UNSAFE]
        if unsafe:
            return max(unsafe, key=p)
        for bad in (Label.ERROR, Label.UNKNOWN):
            found = [i for i, j in enumerate(judged) if j.label == bad]
            if found:
                return found[0]
        return max(range(len(judged)), key=p)

    def _verdict(self, p: Prepared, completions: Sequence[Completion], engine_ms: float, started: float) -> Verdict:
        return Verdict(**self._verdict_fields(p, completions, engine_ms, started))

    def _verdict_fields(self, p: Prepared, completions: Sequence[Completion], engine_ms: float,
                        started: float) -> dict[str, Any]:
        """The verdict of one message as the keyword arguments of ``Verdict`` (not validated)."""
        now = time.perf_counter()
        judged = [self._judge(p, c) for c in completions]
        k = self._deciding(judged)
        d, c, w = judged[k], judged[k].completion, p.windows[k]
        probs = [j.probability for j in judged if j.probability is not None]
        windowed = len(p.windows) > 1 or w.span is not None
        common = dict(
            id=p.request.id, level=p.level.value, policy=p.policy.name, policy_version=p.policy.version,
            model=self.model_id, model_version=self.model_version, adapter=p.request.adapter,
            adapter_version=c.adapter_version,
            truncated_input=p.truncated, unjudged_ranges=list(p.unjudged),
            windows=len(p.windows), window=k, window_field=w.field if windowed else None,
            window_span=w.span if windowed else None,
            context_turns=len(p.context.turns), context_tokens=p.context.tokens,
            prompt_hash=prompt_hash(c.prompt) if c.prompt else None,
            timings={"queued_ms": (started - p.arrived) * 1e3, "engine_ms": engine_ms,
                     "total_ms": (now - p.arrived) * 1e3},
            latency_ms=(now - p.arrived) * 1e3,
        )
        if d.label == Label.ERROR:
            return dict(label=Label.ERROR, error_reason=c.error, **common)
        return dict(
            label=d.label, unsafe_probability=max(probs) if probs and d.label != Label.UNKNOWN else d.probability,
            categories=categories_in(d.reasoning, p.policy) if d.label == Label.UNSAFE else [],
            reasoning=d.reasoning, raw_output=c.text, format_ok=d.format_ok,
            prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
            finish_reason=c.finish_reason, answer_forced=c.answer_forced, **common,
        )

    def _calls(self, prepared: Sequence[Prepared], max_sequences: int | None) -> list[list[Prepared]]:
        """Engine calls: all windows of a message in one call, at most ``max_sequences`` sequences
        per call (a message with more windows gets a call of its own)."""
        if not max_sequences:
            return [list(prepared)] if prepared else []
        calls: list[list[Prepared]] = []
        size = 0
        for p in prepared:
            if calls and size + len(p.windows) <= max_sequences:
                calls[-1].append(p)
                size += len(p.windows)
            else:
                calls.append([p])
                size = len(p.windows)
        return calls

    @staticmethod
    def _flat(call: Sequence[Prepared]) -> tuple[list[str], list[str | None]]:
        turns, adapters = [], []
        for p in call:
            turns += [w.user_turn for w in p.windows]
            adapters += [p.request.adapter] * len(p.windows)
        return turns, adapters

    def _assign(self, call: Sequence[Prepared], completions: list[Completion], engine_ms: float,
                started: float, as_dicts: bool = False) -> list[Any]:
        n = sum(len(p.windows) for p in call)
        if len(completions) != n:
            completions = [Completion(error=f"engine returned {len(completions)} results for {n} requests")] * n
        make = self._verdict_fields if as_dicts else self._verdict
        out, i = [], 0
        for p in call:
            out.append(make(p, completions[i: i + len(p.windows)], engine_ms, started))
            i += len(p.windows)
        return out

    @staticmethod
    def _failed(n: int, err: Exception) -> list[Completion]:
        return [Completion(error=f"engine failure: {err}") for _ in range(n)]

    def classify_prepared(self, prepared: Sequence[Prepared], *, max_sequences: int | None = None) -> list[Verdict]:
        """Judge prepared requests; one verdict each, in order."""
        out: list[Verdict] = []
        for call in self._calls(prepared, max_sequences):
            turns, adapters = self._flat(call)
            started = time.perf_counter()
            try:
                completions = self.backend.generate(turns, self.generation, adapters)
            except Exception as err:  # noqa: BLE001 - every request gets its verdict
                completions = self._failed(len(turns), err)
            out += self._assign(call, completions, (time.perf_counter() - started) * 1e3, started)
        return out

    async def aclassify_prepared(self, prepared: Sequence[Prepared], *, max_sequences: int | None = None,
                                 raise_engine_errors: bool = False, as_dicts: bool = False) -> list[Any]:
        """Async ``classify_prepared``. With ``raise_engine_errors`` a whole-call engine failure
        raises ``EngineError`` instead of becoming ``error`` verdicts (the stream worker retries).
        ``as_dicts``: each verdict as the dict of its ``Verdict`` fields (keyword arguments, not
        validated; absent fields take the model's defaults): the stream worker's hot path, where
        the model costs ~7 µs per message for values the guard computed itself."""
        out: list[Any] = []
        for call in self._calls(prepared, max_sequences):
            turns, adapters = self._flat(call)
            started = time.perf_counter()
            try:
                completions = await self.backend.agenerate(turns, self.generation, adapters)
            except Exception as err:  # noqa: BLE001
                if raise_engine_errors:
                    raise EngineError(str(err)) from err
                completions = self._failed(len(turns), err)
            out += self._assign(call, completions, (time.perf_counter() - started) * 1e3, started, as_dicts)
        return out

    def classify(self, requests: Sequence[GuardRequest | dict], *,
                 arrived: Sequence[float] | None = None) -> list[Verdict]:
        """Judge a batch; one verdict per request, in input order."""
        items = self.prepare_all(requests, arrived)
        ready = [p for p in items if isinstance(p, Prepared)]
        verdicts = iter(self.classify_prepared(ready))
        return [next(verdicts) if isinstance(p, Prepared) else p for p in items]

    async def aclassify(self, requests: Sequence[GuardRequest | dict], *,
                        arrived: Sequence[float] | None = None, raise_engine_errors: bool = False) -> list[Verdict]:
        """Async ``classify`` (see ``aclassify_prepared`` for ``raise_engine_errors``)."""
        items = self.prepare_all(requests, arrived)
        ready = [p for p in items if isinstance(p, Prepared)]
        verdicts = iter(await self.aclassify_prepared(ready, raise_engine_errors=raise_engine_errors))
        return [next(verdicts) if isinstance(p, Prepared) else p for p in items]

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
