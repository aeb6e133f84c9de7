"""Results of an ``rsafe eval`` run: one JSON file, one markdown table, per-example predictions
and PNG plots, side by side with the published figures (``BenchmarkSpec.published``).

Layout of the output directory::

    results.json                    everything (metrics, per category, timing, comparisons)
    results.md                      the tables below
    <run>.predictions.jsonl         one line per example: gold, verdict, probability, output
    <run>.{pr,confusion,scores}.png plots

``<run>`` is the benchmark name, ``<name>+jailbreak`` for the robustness variant and
``<name>@<policy>`` for a run under a tailored policy.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from rsafe.evaluation.benchmarks import BENCHMARKS
from rsafe.evaluation.metrics import Metrics
from rsafe.evaluation.runner import AdaptiveResult, EvalResult, RobustnessResult

SYSTEMS = ("RSafe", "GuardReasoner-8B", "gpt-oss-safeguard")
"""Published systems, in column order."""


class Report(BaseModel):
    """One ``rsafe eval`` invocation."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    created: str = ""
    model: str
    engine: str | None = None
    adapter: str | None = None
    policy: str
    policy_version: str
    limit: int | None = None
    settings: dict[str, Any] = {}
    """Generation settings, input limits, batch size, engine start-up seconds."""
    runs: list[EvalResult] = []
    """Every run: clean sets under the policy, tailored-policy runs, jailbreak variants."""
    adaptive: list[AdaptiveResult] = []
    robustness: list[RobustnessResult] = []

    def model_post_init(self, _: Any) -> None:
        if not self.created:
            self.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def summary(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"runs", "adaptive", "robustness"})
        data["runs"] = [{"run": run_stem(r, self.policy), **r.summary()} for r in self.runs]
        data["adaptive"] = [a.summary() for a in self.adaptive]
        data["robustness"] = [r.summary() for r in self.robustness]
        data["published"] = {name: {"f1": dict(s.published.f1), "adaptive": dict(s.published.adaptive)}
                             for name, s in BENCHMARKS.items() if s.published.f1 or s.published.adaptive}
        return data


def run_stem(result: EvalResult, main_policy: str | None = None) -> str:
    stem = result.name
    if main_policy is not None and result.policy != main_policy:
        stem += f"@{result.policy}"
    return stem


# --------------------------------------------------------------------------- formatting


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def published_f1(benchmark: str, system: str) -> float | None:
    """A system's published F1 (%) on ``benchmark``, under the default policy."""
    spec = BENCHMARKS.get(benchmark)
    if spec is None:
        return None
    if system in spec.published.f1:
        return spec.published.f1[system]
    if system in spec.published.adaptive:
        return spec.published.adaptive[system][0]
    return None


def _level(result: EvalResult) -> str:
    levels = {p.level for p in result.predictions}
    return "/".join(sorted(levels)) if levels else "-"


def _f1_row(m: Metrics) -> list[str]:
    return [str(m.n), pct(m.f1), pct(m.precision), pct(m.recall), pct(m.accuracy), pct(m.unknown_rate),
            pct(m.error_rate), num(m.auprc)]


def markdown_report(report: Report) -> str:
    """The results as markdown tables (F1 etc. in %, AUPRC in [0, 1])."""
    main = [r for r in report.runs if r.variant == "clean" and r.policy == report.policy]
    systems = [s for s in SYSTEMS if any(published_f1(r.benchmark, s) is not None for r in main)]
    lines = [
        f"# RSafe evaluation: `{report.model}`",
        "",
        f"Policy `{report.policy}` (version `{report.policy_version}`), engine {report.engine or 'n/a'}"
        + (f", adapter `{report.adapter}`" if report.adapter else "")
        + (f", limit {report.limit} per set" if report.limit else "") + f", {report.created}."
        + ("" if all(r.context for r in report.runs) else
           " Multi-turn examples judged without their earlier turns (`--no-context`)."),
        "",
        "## F1 of the unsafe class (%) against published figures",
        "",
        "Unknown (unreadable) and error verdicts are excluded from P, R, F1 and accuracy and "
        "reported as rates over all examples.",
        "",
    ]
    with_delta = "RSafe" in systems
    rows = []
    for r in main:
        pub = {s: published_f1(r.benchmark, s) for s in systems}
        cells = [r.benchmark, _level(r)] + _f1_row(r.metrics) + ["-" if pub[s] is None else f"{pub[s]:.1f}"
                                                                for s in systems]
        if with_delta:
            paper, f1 = pub["RSafe"], r.metrics.f1
            cells.append("-" if paper is None else "n/a" if f1 is None else f"{100 * f1 - paper:+.1f}")
        rows.append(cells)
    header = ["benchmark", "level", "n", "F1", "precision", "recall", "accuracy", "unknown", "error", "AUPRC"]
    header += [f"{s} (paper)" for s in systems] + (["Δ F1 vs RSafe"] if with_delta else [])
    lines += _table(header, rows)
    partial = [r for r in main if BENCHMARKS.get(r.benchmark) and r.n < r.total]
    if partial:
        lines += ["", "Subsets (`--limit`): " + ", ".join(f"{r.benchmark} {r.n} of {r.total}" for r in partial)
                  + ". Published figures are on the full test sets with 7-8B models."]
    skipped = [r for r in report.runs if r.skipped and r.variant == "clean" and r.policy == report.policy]
    if skipped:
        lines += ["", "Rows skipped while loading: " + "; ".join(
            f"{r.benchmark}: " + ", ".join(f"{n} {why}" for why, n in r.skipped.items()) for r in skipped) + "."]

    if report.adaptive:
        lines += ["", "## Adaptive taxonomy: default against tailored policy (F1 %)", ""]
        rows = []
        for a in report.adaptive:
            spec = BENCHMARKS.get(a.benchmark)
            paper = spec.published.adaptive.get("RSafe") if spec else None
            rows.append([a.benchmark, f"`{a.default.policy}`", pct(a.default.metrics.f1), f"`{a.tailored.policy}`",
                         pct(a.tailored.metrics.f1),
                         "n/a" if a.delta_f1 is None else f"{100 * a.delta_f1:+.1f}",
                         f"{paper[0]:.1f} → {paper[1]:.1f}" if paper else "-"])
        lines += _table(["benchmark", "default policy", "F1", "tailored policy", "F1", "Δ F1",
                         "RSafe paper (default → tailored)"], rows)

    if report.robustness:
        lines += ["", "## Robustness: jailbreak-wrapped prompts (F1 %)", ""]
        rows = []
        for rb in report.robustness:
            per = ", ".join(f"{w} {pct(m.f1)}" for w, m in rb.wrapped.categories.items())
            rows.append([rb.benchmark, str(rb.clean.n), pct(rb.clean.f1), str(rb.wrapped.n),
                         pct(rb.wrapped.metrics.f1), "n/a" if rb.f1_drop is None else f"{100 * rb.f1_drop:.1f}",
                         pct(rb.wrapped.metrics.unknown_rate), per])
        lines += _table(["benchmark", "n clean", "F1 clean", "n wrapped", "F1 wrapped", "F1 drop",
                         "unknown wrapped", "F1 by wrapper"], rows)

    lines += ["", "## Speed", ""]
    rows = []
    for r in report.runs:
        t = r.timing
        rows.append([run_stem(r, report.policy), str(t.n_computed), str(t.n_cached), num(t.throughput, 2),
                     num(t.latency_ms_mean, 0), num(t.latency_ms_p50, 0), num(t.latency_ms_p95, 0),
                     num(t.completion_tokens_mean, 1)])
    lines += _table(["run", "computed", "cached", "examples/s", "latency ms mean", "p50", "p95",
                     "tokens/answer"], rows)

    cat_runs = [r for r in report.runs if r.categories]
    if cat_runs:
        lines += ["", "## Per category", ""]
        for r in cat_runs:
            lines += [f"### {run_stem(r, report.policy)}", ""]
            rows = [[c, str(m.n), str(m.n_unsafe), pct(m.f1), pct(m.precision), pct(m.recall), pct(m.unknown_rate)]
                    for c, m in sorted(r.categories.items(), key=lambda kv: (-kv[1].n, kv[0]))]
            lines += _table(["category", "n", "unsafe", "F1", "precision", "recall", "unknown"], rows) + [""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- files


def write_predictions(result: EvalResult, path: Path) -> Path:
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        for p in result.predictions:
            f.write(p.model_dump_json() + "\n")
    return path


def write_report(report: Report, out_dir: str | Path, *, plots: bool = True,
                 thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Write results.json, results.md, predictions and (unless ``plots`` is off) the PNGs.

    Returns ``{"json": path, "markdown": path, "predictions": [...], "plots": [...]}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {"predictions": [], "plots": []}
    for r in report.runs:
        stem = run_stem(r, report.policy)
        written["predictions"].append(write_predictions(r, out / f"{stem}.predictions.jsonl"))
        if plots:
            from rsafe.evaluation.plots import plot_run

            written["plots"] += plot_run(r, out, stem, (thresholds or {}).get(r.policy))
    json_path = out / "results.json"
    json_path.write_text(json.dumps(report.summary(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path = out / "results.md"
    md_path.write_text(markdown_report(report), encoding="utf-8")
    written.update(json=json_path, markdown=md_path)
    return written
