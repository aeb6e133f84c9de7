"""End to end on the demo model: ``evaluate`` on the shared vLLM engine (with resume from cache)
and ``rsafe eval`` on the transformers engine."""

from __future__ import annotations

import json

import pytest

from rsafe.evaluation import evaluate, load_benchmark

pytestmark = pytest.mark.slow


def test_evaluate_demo_on_vllm_and_resume(vllm_guard, tmp_path):
    data = load_benchmark("demo", limit=48)
    cache = tmp_path / "cache"
    r = evaluate(vllm_guard, data, "rsafe-default", batch_size=16, cache_dir=cache)
    m = r.metrics
    assert r.n == 48 and r.timing.n_computed == 48 and r.timing.throughput > 0
    assert m.n_error == 0 and m.unknown_rate == 0.0
    assert m.f1 == 1.0, m  # the committed demo model on 48 rows of its own benchmark
    assert m.auprc is not None and m.auprc_n == 48  # vLLM returns logprobs at the answer token
    assert all(p.format_ok for p in r.predictions)

    again = evaluate(vllm_guard, data, "rsafe-default", batch_size=16, cache_dir=cache)
    assert again.timing.n_cached == 48 and again.timing.n_computed == 0
    assert again.metrics == m


def test_rsafe_eval_command_on_demo_model(demo_model_dir, tmp_path, capsys):
    import rsafe.cli

    out = tmp_path / "out"
    argv = ["eval", "--model", str(demo_model_dir), "--model-id", "rsafe-demo", "--engine", "transformers",
            "--benchmark", "demo", "--limit", "12", "--max-tokens", "96", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as exit_:
        rsafe.cli.main(argv)
    assert exit_.value.code == 0
    stdout = capsys.readouterr().out
    assert "| demo |" in stdout and "# RSafe evaluation: `rsafe-demo`" in stdout
    result = json.loads((out / "results.json").read_text())
    run = result["runs"][0]
    assert run["run"] == "demo" and run["n"] == 12 and run["model"] == "rsafe-demo"
    assert run["metrics"]["n_error"] == 0 and run["metrics"]["unknown_rate"] <= 0.25
    assert run["metrics"]["auprc_n"] > 0  # transformers backend reports logprobs too
    assert result["settings"]["generation"]["max_tokens"] == 96
    for suffix in ("pr.png", "confusion.png", "scores.png", "predictions.jsonl"):
        assert (out / f"demo.{suffix}").stat().st_size > 0
    assert (out / "results.md").read_text().startswith("# RSafe evaluation")
