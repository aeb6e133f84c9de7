"""Evaluation harness: the RSafe benchmarks, metrics, adaptive policies, robustness, reports.

Python API (what the retraining gate uses)::

    from rsafe.evaluation import evaluate, load_benchmark
    result = evaluate(guard, load_benchmark("toxicchat", data_dir="data"), "rsafe-default")
    result.metrics.f1, result.metrics.unknown_rate

The command is ``rsafe eval`` (``rsafe.evaluation.cli``); see docs/EVALUATION.md.
"""

from rsafe.evaluation.benchmarks import (
    BENCHMARKS,
    PAPER_BENCHMARKS,
    BenchmarkData,
    BenchmarkError,
    BenchmarkNotFound,
    BenchmarkSpec,
    Example,
    load_benchmark,
)
from rsafe.evaluation.jailbreak import WRAPPERS, jailbreak_variant
from rsafe.evaluation.metrics import Metrics, average_precision, compute_metrics, precision_recall_f1
from rsafe.evaluation.runner import (
    AdaptiveResult,
    EvalResult,
    Prediction,
    RobustnessResult,
    compare_policies,
    evaluate,
    evaluate_robustness,
)

__all__ = [
    "BENCHMARKS", "PAPER_BENCHMARKS", "WRAPPERS", "AdaptiveResult", "BenchmarkData", "BenchmarkError",
    "BenchmarkNotFound", "BenchmarkSpec", "EvalResult", "Example", "Metrics", "Prediction", "RobustnessResult",
    "average_precision", "compare_policies", "compute_metrics", "evaluate", "evaluate_robustness",
    "jailbreak_variant", "load_benchmark", "precision_recall_f1",
]
