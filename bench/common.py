"""Shared by the benchmark scripts (run as ``python bench/NAME.py``, so this imports as ``common``)."""

from __future__ import annotations

from typing import Any


def percentile(values: list[float], q: int) -> float:
    """The ``q``-th percentile (``q`` in 1–100), nearest rank: the smallest value with at least
    ``q`` % of the values at or below it."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[rank - 1]


def worker_config(bootstrap: str, prefix: str, inputs: list[dict[str, Any]], *, batch: dict[str, Any],
                  engine: Any = None, telemetry: dict[str, Any] | None = None, group_id: str | None = None) -> Any:
    """A ``StreamConfig`` for a benchmark worker: output topics under ``prefix``, and nothing the run
    does not measure (no static membership, model following, HTTP server or policy file watch)."""
    from rsafe.stream.config import load_config

    return load_config(data={
        "broker": bootstrap, "group_id": group_id or prefix, "static_membership": False,
        **({"engine": engine.model_dump(mode="json")} if engine is not None else {}),
        "inputs": inputs,
        "outputs": {"audit_topic": f"{prefix}.audit", "dlq_topic": f"{prefix}.dlq", "policies_topic": f"{prefix}.pol"},
        "models": {"follow": False}, "http": {"enabled": False}, "policy_reload": {"watch": False},
        "batch": batch, "telemetry": telemetry or {},
    }, env={})
