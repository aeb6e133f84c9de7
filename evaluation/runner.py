"""``evaluate(engine, dataset, policy) -> EvalResult``: run a guard over a labelled set.

The engine is a ``Guard`` (or an ``EngineConfig``, from which a guard is started and closed).
Examples are sent with ``Guard.classify`` in batches (64 by default) at their own level, with
their ``context`` (earlier turns of a multi-turn example; ``context=False`` drops it), under
one policy; verdicts come back in order, are cached per example when a cache directory is given
(``rsafe.evaluation.cache``) and are scored with ``rsafe.evaluation.metrics``. This is the API
the retraining gate uses; ``rsafe eval`` is a thin command over it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict

from rsafe.evaluation.benchmarks import BenchmarkData, Example, load_benchmark
from rsafe.evaluation.cache import VerdictCache, example_key, run_identity
from rsafe.evaluation.jailbreak import VARIANT as JAILBREAK, jailbreak_variant
from rsafe.evaluation.metrics import Metrics, compute_metrics, per_category, percentile
from rsafe.models.verdict import Verdict
from rsafe.policies import Level, Policy

DEFAULT_BATCH_SIZE = 64


class Prediction(BaseModel):
    """One example's gold label next to the guard's verdict."""

    model_config = ConfigDict(extra="forbid")

    id: str
    level: str
    gold: Literal["safe", "unsafe"]
    label: str
    """The verdict: safe, unsafe, unknown or error."""
    unsafe_probability: float | None = None
    gold_categories: list[str] = []
    predicted_categories: list[str] = []
    cached: bool = False
    """Read from the verdict cache instead of computed in this run."""
    latency_ms: float = 0.0
    completion_tokens: int = 0
    format_ok: bool = False
    error_reason: str | None = None
    raw_output: str | None = None
    context_turns: int = 0
    """Earlier turns shown with the message (the newest that fit the model's context)."""


class Timing(BaseModel):
    """Speed of the examples computed in this run (cached ones cost nothing)."""

    model_config = ConfigDict(extra="forbid")

    n_computed: int = 0
    n_cached: int = 0
    wall_s: float = 0.0
    """The whole ``evaluate`` call, cache reads included."""
    engine_s: float = 0.0
    """Time inside ``Guard.classify`` calls."""
    throughput: float | None = None
    """Computed examples per second of engine time."""
    latency_ms_mean: float | None = None
    """Per-request latency as the guard reports it (a batch's requests share their batch's time)."""
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    completion_tokens_mean: float | None = None


class EvalResult(BaseModel):
    """A guard's results on one set under one policy."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    benchmark: str
    title: str = ""
    variant: str = "clean"
    """``clean``, or ``jailbreak`` for the wrapped robustness variant."""
    model: str
    adapter: str | None = None
    policy: str
    policy_version: str
    n: int
    total: int
    """Examples in the set before ``limit``."""
    source: str = ""
    skipped: dict[str, int] = {}
    context: bool = True
    """Multi-turn examples were judged with their earlier turns (``False``: ``--no-context``)."""
    n_context: int = 0
    """Examples sent with earlier turns."""
    metrics: Metrics
    categories: dict[str, Metrics] = {}
    timing: Timing = Timing()
    cache_file: str | None = None
    predictions: list[Prediction] = []

    @property
    def name(self) -> str:
        """``benchmark``, with ``+<variant>`` for a variant (``toxicchat+jailbreak``)."""
        return self.benchmark + ("" if self.variant == "clean" else f"+{self.variant}")

    def summary(self) -> dict[str, Any]:
        """The result as JSON-ready data, without the per-example predictions."""
        return self.model_dump(mode="json", exclude={"predictions"})


def score(predictions: Sequence[Prediction]) -> tuple[Metrics, dict[str, Metrics]]:
    """Overall and per-category metrics of a list of predictions."""
    golds = [p.gold == "unsafe" for p in predictions]
    labels = [p.label for p in predictions]
    probs = [p.unsafe_probability for p in predictions]
    cats = [p.gold_categories for p in predictions]
    return compute_metrics(golds, labels, probs), per_category(cats, golds, labels, probs)


def _resolve_policy(guard: Any, policy: Policy | str | None) -> Policy:
    registry = guard.policies
    if policy is None:
        return registry.get(guard.default_policy)
    if isinstance(policy, str):
        policy = registry.resolve(policy)
    if policy.name in registry:
        known = registry.get(policy.name)
        if known.version != policy.version:
            raise ValueError(f"policy {policy.name!r} version {policy.version} differs from the guard's "
                             f"registered {policy.name!r} version {known.version}; rename one of them")
    else:
        registry.add(policy, "<evaluation>")
    return policy


def _request(ex: Example, policy: Policy, adapter: str | None) -> dict[str, Any]:
    req = {"id": ex.id, "prompt": ex.prompt, "response": ex.response if ex.level == "response" else None,
           "policy": policy.name, "level": Level(ex.level), "adapter": adapter}
    if ex.context:
        req["context"] = list(ex.context)
    return req


def without_context(examples: Sequence[Example]) -> list[Example]:
    """The examples as single messages: earlier turns dropped (their content hash, and so their
    cache key, is then that of the message alone)."""
    return [e.model_copy(update={"context": []}) if e.context else e for e in examples]


def _prediction(ex: Example, v: Verdict, cached: bool) -> Prediction:
    return Prediction(
        id=ex.id, level=ex.level, gold=ex.label, label=v.label.value, unsafe_probability=v.unsafe_probability,
        gold_categories=list(ex.categories), predicted_categories=list(v.categories), cached=cached,
        latency_ms=v.latency_ms, completion_tokens=v.completion_tokens, format_ok=v.format_ok,
        error_reason=v.error_reason, raw_output=v.raw_output, context_turns=v.context_turns,
    )


def evaluate(engine: Any, dataset: BenchmarkData | Sequence[Example] | str, policy: Policy | str | None = None, *,
             batch_size: int = DEFAULT_BATCH_SIZE, cache_dir: str | Path | None = None, adapter: str | None = None,
             progress: bool = False, variant: str = "clean", benchmark: str | None = None,
             context: bool = True) -> EvalResult:
    """Judge every example of ``dataset`` with ``engine`` under ``policy``; return the metrics.

    ``engine``: a ``Guard`` (kept open) or an ``EngineConfig`` (a guard is started and closed).
    ``dataset``: a benchmark name, a loaded ``BenchmarkData`` or a list of ``Example``.
    ``policy``: a ``Policy``, a registered name or a YAML path; default: the guard's default.
    ``cache_dir``: reuse and store verdicts there, so an interrupted run resumes.
    ``context``: send multi-turn examples with their earlier turns; ``False`` judges the last
    message alone (to compare recall with and without context on the same set).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    from rsafe.models import EngineConfig, Guard

    if isinstance(engine, EngineConfig):
        with Guard.from_config(engine) as guard:
            return evaluate(guard, dataset, policy, batch_size=batch_size, cache_dir=cache_dir, adapter=adapter,
                            progress=progress, variant=variant, benchmark=benchmark, context=context)
    guard = engine
    if isinstance(dataset, str):
        dataset = load_benchmark(dataset)
    examples = list(dataset) if context else without_context(list(dataset))
    if isinstance(dataset, BenchmarkData):
        name, title, source, skipped, total = (dataset.name, dataset.spec.title, dataset.source,
                                               dict(dataset.skipped), dataset.total)
    else:
        name = examples[0].source if examples and examples[0].source else "examples"
        title, source, skipped, total = benchmark or name, "", {}, len(examples)
    name = benchmark or name
    policy = _resolve_policy(guard, policy)
    cache = VerdictCache(cache_dir, run_identity(guard, policy, adapter)) if cache_dir else None

    started = time.perf_counter()
    keys = [example_key(e.id, e.content_hash) for e in examples]
    verdicts: list[Verdict | None] = [cache.get(k) if cache is not None else None for k in keys]
    cached = [v is not None for v in verdicts]
    todo = [i for i, v in enumerate(verdicts) if v is None]
    from tqdm import tqdm

    label = name if variant == "clean" else f"{name}+{variant}"
    engine_s = 0.0
    with tqdm(total=len(examples), initial=len(examples) - len(todo), unit="ex", desc=label,
              disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start: start + batch_size]
            t0 = time.perf_counter()
            out = guard.classify([_request(examples[i], policy, adapter) for i in chunk])
            engine_s += time.perf_counter() - t0
            if len(out) != len(chunk):
                raise RuntimeError(f"guard returned {len(out)} verdicts for {len(chunk)} requests")
            for i, v in zip(chunk, out):
                verdicts[i] = v
            if cache is not None:
                cache.put_many((keys[i], verdicts[i]) for i in chunk)  # type: ignore[misc]
            bar.update(len(chunk))

    predictions = [_prediction(e, v, c) for e, v, c in zip(examples, verdicts, cached)]  # type: ignore[arg-type]
    metrics, categories = score(predictions)
    fresh = [p for p in predictions if not p.cached]
    answered = [p for p in fresh if p.label != "error"]
    lat = [p.latency_ms for p in answered]
    timing = Timing(
        n_computed=len(fresh), n_cached=len(predictions) - len(fresh),
        wall_s=time.perf_counter() - started, engine_s=engine_s,
        throughput=len(fresh) / engine_s if fresh and engine_s > 0 else None,
        latency_ms_mean=statistics.fmean(lat) if lat else None,
        latency_ms_p50=percentile(lat, 50), latency_ms_p95=percentile(lat, 95),
        completion_tokens_mean=statistics.fmean(p.completion_tokens for p in answered) if answered else None,
    )
    return EvalResult(
        benchmark=name, title=title, variant=variant, model=guard.model_id, adapter=adapter, policy=policy.name,
        policy_version=policy.version, n=len(examples), total=total, source=source, skipped=skipped,
        context=context, n_context=sum(bool(e.context) for e in examples), metrics=metrics, categories=categories,
        timing=timing, cache_file=str(cache.path) if cache is not None else None, predictions=predictions,
    )


# --------------------------------------------------------------------------- comparisons


class AdaptiveResult(BaseModel):
    """The same set under the default and a tailored policy (RSafe's adaptive use)."""

    model_config = ConfigDict(extra="forbid")

    benchmark: str
    default: EvalResult
    tailored: EvalResult

    @property
    def delta_f1(self) -> float | None:
        a, b = self.default.metrics.f1, self.tailored.metrics.f1
        return None if a is None or b is None else b - a

    def summary(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "default_policy": self.default.policy,
                "default_policy_version": self.default.policy_version, "tailored_policy": self.tailored.policy,
                "tailored_policy_version": self.tailored.policy_version, "f1_default": self.default.metrics.f1,
                "f1_tailored": self.tailored.metrics.f1, "delta_f1": self.delta_f1}


def compare_policies(engine: Any, dataset: BenchmarkData | Sequence[Example] | str,
                     default: Policy | str | None, tailored: Policy | str, **kwargs: Any) -> AdaptiveResult:
    """``evaluate`` the same set under ``default`` and ``tailored``."""
    a = evaluate(engine, dataset, default, **kwargs)
    b = evaluate(engine, dataset, tailored, **kwargs)
    return AdaptiveResult(benchmark=a.benchmark, default=a, tailored=b)


class RobustnessResult(BaseModel):
    """F1 on the clean prompts against F1 on their jailbreak-wrapped copies."""

    model_config = ConfigDict(extra="forbid")

    benchmark: str
    clean: Metrics
    """On the prompt-level examples that were wrapped."""
    wrapped: EvalResult

    @property
    def f1_drop(self) -> float | None:
        a, b = self.clean.f1, self.wrapped.metrics.f1
        return None if a is None or b is None else a - b

    def summary(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "policy": self.wrapped.policy, "n_clean": self.clean.n,
                "n_wrapped": self.wrapped.n, "f1_clean": self.clean.f1, "f1_wrapped": self.wrapped.metrics.f1,
                "f1_drop": self.f1_drop,
                "f1_by_wrapper": {w: m.f1 for w, m in self.wrapped.categories.items()}}


def evaluate_robustness(engine: Any, dataset: BenchmarkData | Sequence[Example] | str,
                        policy: Policy | str | None = None, *, clean: EvalResult | None = None,
                        wrappers: Sequence[str] | None = None, mode: Literal["cycle", "all"] = "cycle",
                        **kwargs: Any) -> RobustnessResult:
    """F1 drop out of distribution: the prompt-level examples, clean and jailbreak-wrapped.

    ``clean``: an ``evaluate`` result on the same set (its prompt-level predictions are reused);
    when absent, the clean prompts are evaluated here.
    """
    if isinstance(dataset, str):
        dataset = load_benchmark(dataset)
    given = kwargs.pop("benchmark", None)
    prompts = [e for e in dataset if e.level == "prompt"]
    if isinstance(dataset, BenchmarkData):
        name = given or dataset.name
    else:
        name = given or (clean.benchmark if clean else None) or (prompts[0].source if prompts else "") or "examples"
    if not prompts:
        raise ValueError(f"{name}: no prompt-level examples to wrap")
    if clean is None:
        clean = evaluate(engine, prompts, policy, benchmark=name, **kwargs)
    ids = {e.id for e in prompts}
    clean_metrics, _ = score([p for p in clean.predictions if p.id in ids])
    wrapped = evaluate(engine, jailbreak_variant(prompts, wrappers, mode), policy or clean.policy,
                       benchmark=name, variant=JAILBREAK, **kwargs)
    wrapped.title = f"{clean.title or name} (jailbreak-wrapped)"
    return RobustnessResult(benchmark=name, clean=clean_metrics, wrapped=wrapped)
