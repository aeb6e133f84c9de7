"""PNG plots of one evaluation run (matplotlib, Agg backend: no display needed).

* ``<stem>.pr.png`` — precision-recall curve of ``unsafe_probability`` with its AUPRC, and the
  operating point of the hard verdicts;
* ``<stem>.confusion.png`` — gold safe/unsafe against predicted safe/unsafe/unknown/error;
* ``<stem>.scores.png`` — histogram of ``unsafe_probability`` per gold class.
"""

from __future__ import annotations

from pathlib import Path

from rsafe.evaluation.metrics import precision_recall_curve
from rsafe.evaluation.runner import EvalResult

PREDICTED = ("safe", "unsafe", "unknown", "error")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _title(result: EvalResult) -> str:
    return f"{result.name} — {result.model} — policy {result.policy}"


def plot_pr_curve(result: EvalResult, path: Path) -> Path:
    plt = _pyplot()
    golds = [p.gold == "unsafe" for p in result.predictions]
    scores = [p.unsafe_probability if p.label in ("safe", "unsafe") else None for p in result.predictions]
    precisions, recalls, _ = precision_recall_curve(golds, scores)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    if precisions:
        ax.step([0.0] + recalls, [precisions[0]] + precisions, where="pre",
                label=f"AUPRC {result.metrics.auprc:.3f} (n={result.metrics.auprc_n})")
        base = sum(g for g, s in zip(golds, scores) if s is not None) / max(1, result.metrics.auprc_n)
        ax.axhline(base, color="grey", linestyle=":", label=f"prevalence {base:.2f}")
    else:
        ax.text(0.5, 0.5, "no unsafe_probability\n(or no unsafe example)", ha="center", va="center",
                transform=ax.transAxes)
    m = result.metrics
    if m.precision is not None and m.recall is not None:
        ax.plot([m.recall], [m.precision], "o", color="C3", label=f"verdicts (F1 {m.f1:.3f})")
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="recall (unsafe)", ylabel="precision (unsafe)")
    ax.set_title(_title(result), fontsize=8)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(result: EvalResult, path: Path) -> Path:
    plt = _pyplot()
    counts = [[sum(1 for p in result.predictions if p.gold == gold and p.label == pred) for pred in PREDICTED]
              for gold in ("safe", "unsafe")]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.imshow(counts, cmap="Blues")
    peak = max(max(row) for row in counts) or 1
    for r, row in enumerate(counts):
        for c, value in enumerate(row):
            ax.text(c, r, str(value), ha="center", va="center",
                    color="white" if value > peak / 2 else "black")
    ax.set_xticks(range(len(PREDICTED)), PREDICTED)
    ax.set_yticks(range(2), ["safe", "unsafe"])
    ax.set(xlabel="predicted", ylabel="gold")
    ax.set_title(_title(result), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_score_histogram(result: EvalResult, path: Path, threshold: float | None = None) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    bins = [i / 20 for i in range(21)]
    any_score = False
    for gold, color in (("safe", "C0"), ("unsafe", "C3")):
        xs = [p.unsafe_probability for p in result.predictions
              if p.gold == gold and p.unsafe_probability is not None]
        any_score |= bool(xs)
        if xs:
            ax.hist(xs, bins=bins, alpha=0.6, color=color, label=f"gold {gold} (n={len(xs)})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"policy threshold {threshold:g}")
    if not any_score:
        ax.text(0.5, 0.5, "no unsafe_probability", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlim=(0, 1), xlabel="unsafe_probability", ylabel="examples")
    ax.set_title(_title(result), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(result: EvalResult, out_dir: str | Path, stem: str, threshold: float | None = None) -> list[Path]:
    """All three plots of ``result`` as ``<out_dir>/<stem>.{pr,confusion,scores}.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_pr_curve(result, out / f"{stem}.pr.png"),
            plot_confusion(result, out / f"{stem}.confusion.png"),
            plot_score_histogram(result, out / f"{stem}.scores.png", threshold)]
