"""Engine cold start: where the seconds of the guard's vLLM engine start go, variant by variant.

    .venv/bin/python bench/cold_start.py --model demo/model --rounds 3 \\
        --variants before default --caches cold --out docs/bench-results/cold-start-DATE.json

Each (round, variant) runs in a fresh Python process (this script with ``--child``); within a
round the variants alternate, and the order flips every round, so a noisy shared machine loads
them alike. The child starts the engine as the stream worker does (``local_engine_config`` +
``make_backend``, with the demo settings of tests/conftest.py ``demo_engine_config``:
``max_tokens`` 128, ``max_window_tokens`` 128), answers one request, then judges a batch of the
demo's sample messages twice (generation speed: a cut must not slow the engine down) and closes.

Every phase is a difference of two measured timestamps (epoch seconds):

* the child's own clock around its steps (the ``import vllm`` of this process, ``make_backend``,
  the first request);
* the start time of every process the child's engine starts (found every 20 ms; the time from
  /proc, to the clock tick);
* vLLM's log records, which the child has vLLM write with their epoch time and process id
  (``VLLM_LOGGING_CONFIG_PATH``): "Initializing a V1 LLM engine" (the engine core's imports are
  done), "Starting to load model", "Loading weights took", the KV cache size line, "init engine
  (profile, create kv cache, warmup model) took".

``--caches cold`` gives each child empty torch-inductor and vLLM cache folders (the first start
on a fresh machine); ``warm`` leaves this machine's. ``VARIANTS`` says what each variant changes.
The raw result (``--out``) holds every setting, the versions, the machine and each round's
phases, clocks, markers, processes and speed; the table printed at the end (min–max and median
per phase) is what docs/BENCHMARKS.md "Cold start" shows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import sample_requests

ROOT = Path(__file__).resolve().parents[1]

#: What each variant changes (environment of the child process, engine config overrides).
#: ``default`` is whatever the project's code does now; the others name one setting each.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {"env": {}, "engine": {},
                "about": "the project's own settings (rsafe.models.config and engines as they are)"},
    "before": {"env": {"RSAFE_VLLM_CPU_START": "vllm"}, "engine": {"cpu_worker_process": True},
               "about": "the engine start as it was before 2026-12-07: vLLM-CPU's own process layout "
                        "(cpu_worker_process) and vLLM's own start-up path (no plugin start cuts)"},
    "vllm-start": {"env": {"RSAFE_VLLM_CPU_START": "vllm"}, "engine": {},
                   "about": "default, but vLLM's own start-up path: compiled rank count (a C++ build at the "
                            "first request without a warm inductor cache), model inspection in a subprocess "
                            "(without a warm vLLM cache)"},
    "spawned-worker": {"env": {}, "engine": {"cpu_worker_process": True},
                       "about": "vLLM-CPU's own layout: the engine core process spawns a worker process for the "
                                "model (multiprocess executor, OpenMP threads bound by vLLM); the default "
                                "before 2026-12-07"},
    "in-process-worker": {"env": {}, "engine": {"cpu_worker_process": False},
                          "about": "the model in the engine core process (uni executor, "
                                   "VLLM_ENABLE_V1_MULTIPROCESSING=0), spawned with the OpenMP settings vLLM "
                                   "gives its worker process (rsafe.models.engines.start_cpu_engine); the "
                                   "default since 2026-12-07"},
    "in-process-worker-nobind": {"env": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"},
                                 "engine": {"cpu_worker_process": False},
                                 "about": "the model in the engine core process with no OpenMP settings (torch's "
                                          "default: one thread per core, unbound)"},
    "in-process-worker-1thread": {"env": {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
                                  "engine": {"cpu_worker_process": False},
                                  "about": "the model in the engine core process, one OpenMP thread, unbound "
                                           "(OMP_NUM_THREADS=1 in every process of the run)"},
    "no-inductor": {"env": {"TORCHDYNAMO_DISABLE": "1"}, "engine": {},
                    "about": "torch.compile off (TORCHDYNAMO_DISABLE=1): vLLM's sampler compiles its logprob-rank "
                             "count with inductor (a C++ build) at the first request that asks for logprobs"},
    "max-seqs-32": {"env": {}, "engine": {"max_num_seqs": 32},
                    "about": "max_num_seqs 32 instead of vLLM's default (128 for AsyncLLM here)"},
    "kv-2gib": {"env": {"VLLM_CPU_KVCACHE_SPACE": "2"}, "engine": {},
                "about": "KV cache 2 GiB instead of 1 (the slope of KV allocation; vLLM-CPU reads whole GiB)"},
}

#: vLLM log records that mark a phase boundary (the first record matching each, any process).
MARKERS: dict[str, str] = {
    "engine_core_init": r"Initializing a V1 LLM engine",
    "load_start": r"Starting to load model",
    "load_done": r"Loading weights took",
    "kv_sized": r"for KV cache on node|Auto set .* for KV cache",
    "kv_tokens": r"KV cache size: .* tokens",
    "engine_init_done": r"init engine \(profile, create kv cache, warmup model\) took",
}

LOG_FORMAT = "@@ %(created).3f %(process)d %(levelname)s %(filename)s:%(lineno)d %(message)s"
LOG_LINE = re.compile(r"^@@ (?P<t>\d+\.\d+) (?P<pid>\d+) (?P<level>\w+) (?P<where>\S+) (?P<msg>.*)$")

SPEED_MESSAGES = 32


# --------------------------------------------------------------------------- child


def boot_time() -> float:
    """When this machine booted, in epoch seconds, to the clock tick (/proc/uptime; psutil's
    boot time is whole seconds, which would shift every process start by up to a second)."""
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    return time.time() - up


def started_at(pid: int, boot: float) -> float:
    """A process's start time in epoch seconds (Linux: /proc/PID/stat field 22, clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


class ProcessWatcher(threading.Thread):
    """Records every descendant process of this one (pid → start time, parent, command line)."""

    def __init__(self) -> None:
        super().__init__(name="cold-start-watcher", daemon=True)
        import psutil

        self._me = psutil.Process()
        self.boot = boot_time()
        self.seen: dict[int, dict[str, Any]] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._halt.is_set():
            try:
                children = self._me.children(recursive=True)
            except psutil.Error:
                children = []
            for p in children:
                try:
                    info = {"created": started_at(p.pid, self.boot), "ppid": p.ppid(),
                            "cmdline": " ".join(p.cmdline())[:200]}
                except (psutil.Error, OSError):
                    continue
                known = self.seen.setdefault(p.pid, info)
                if info["cmdline"]:  # vLLM renames its processes after they start; an exited one reads empty
                    known["cmdline"] = info["cmdline"]
            self._halt.wait(0.02)

    def stop(self) -> dict[int, dict[str, Any]]:
        self._halt.set()
        self.join(timeout=2)
        return self.seen


def run_child(variant: str, model: str, result_path: Path) -> None:
    """One engine start, one request, the speed batch, the close; clocks to ``result_path``."""
    main_at = time.time()
    watcher = ProcessWatcher()
    watcher.start()
    clock: dict[str, float] = {"process_created": started_at(os.getpid(), watcher.boot), "main": main_at}

    clock["import_start"] = time.time()
    import vllm  # noqa: F401 - what the worker's process imports for its engine (models/engines/vllm.py)
    from vllm import AsyncEngineArgs  # noqa: F401
    from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401
    clock["import_done"] = time.time()

    from rsafe.models import GenerationConfig, Guard, InputLimits
    from rsafe.models.config import local_engine_config
    from rsafe.models.engines import make_backend

    cfg = local_engine_config(model, "vllm", model_id="rsafe-demo", generation=GenerationConfig(max_tokens=128),
                              limits=InputLimits(max_window_tokens=128), **VARIANTS[variant]["engine"])
    requests = sample_requests(SPEED_MESSAGES)
    clock["engine_start"] = time.time()
    backend = make_backend(cfg)
    clock["engine_ready"] = time.time()
    guard = Guard(backend, generation=cfg.generation, limits=cfg.limits)
    verdicts = guard.classify(requests[:1])
    clock["first_verdict"] = time.time()
    speed = []
    for _ in range(2):
        t = time.perf_counter()
        batch = guard.classify(requests)
        wall = time.perf_counter() - t
        tokens = sum(v.completion_tokens for v in batch)
        speed.append({"messages": len(batch), "seconds": round(wall, 3), "messages_per_s": round(len(batch) / wall, 2),
                      "generated_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
                      "labels": [v.label.value for v in batch]})
    clock["speed_done"] = time.time()
    guard.close()
    clock["closed"] = time.time()
    processes = watcher.stop()
    import torch

    result_path.write_text(json.dumps({
        "variant": variant, "clock": clock, "processes": {str(k): v for k, v in processes.items()},
        "first_verdict": verdicts[0].label.value, "speed": speed, "pid": os.getpid(),
        "engine_config": cfg.model_dump(mode="json"), "torch_threads": torch.get_num_threads(),
    }))


# --------------------------------------------------------------------------- parent


def logging_config(path: Path, level: str) -> Path:
    """A vLLM logging config whose records carry their epoch time and process id."""
    path.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"timed": {"format": LOG_FORMAT}},
        "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "timed", "level": level,
                             "stream": "ext://sys.stdout"}},
        "loggers": {"vllm": {"handlers": ["out"], "level": level, "propagate": False}},
    }))
    return path


def log_records(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = LOG_LINE.match(line)
        if m:
            out.append({"t": float(m["t"]), "pid": int(m["pid"]), "level": m["level"], "where": m["where"],
                        "msg": m["msg"]})
    return out


def phases(child: dict[str, Any], records: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, Any]]:
    """Seconds per phase of one start, and the markers they come from."""
    clock = child["clock"]
    me = child["pid"]
    marks: dict[str, dict[str, Any]] = {}
    for name, pattern in MARKERS.items():
        hit = next((r for r in records if re.search(pattern, r["msg"])), None)
        if hit is not None:
            marks[name] = {"t": hit["t"], "pid": hit["pid"], "msg": hit["msg"][:160]}
    procs = {int(k): v for k, v in child["processes"].items() if "resource_tracker" not in v["cmdline"]}
    core_pid = marks.get("engine_core_init", {}).get("pid")
    load_pid = marks.get("load_start", {}).get("pid")
    core_created = procs.get(core_pid, {}).get("created") if core_pid else None
    worker_created = procs.get(load_pid, {}).get("created") if load_pid not in (None, core_pid, me) else None
    t = {k: v["t"] for k, v in marks.items()}
    p: dict[str, float] = {
        "python start (interpreter, site)": clock["main"] - clock["process_created"],
        "import vllm (this process)": clock["import_done"] - clock["import_start"],
    }
    if core_created is not None:
        p["engine config, tokenizer (this process)"] = core_created - clock["engine_start"]
        p["engine core process up (spawn, imports)"] = t["engine_core_init"] - core_created
    if worker_created is not None:
        p["engine core → worker process started"] = worker_created - t["engine_core_init"]
        p["worker process up (spawn, imports, device init)"] = t["load_start"] - worker_created
    elif "load_start" in t:
        p["worker init in the engine core process"] = t["load_start"] - t["engine_core_init"]
    if {"load_start", "load_done"} <= t.keys():
        p["model load"] = t["load_done"] - t["load_start"]
    if {"load_done", "kv_sized"} <= t.keys():  # no warm-up pass on CPU with eager + an explicit KV size
        p["weights → KV size (CPU kernel set-up of the weights)"] = t["kv_sized"] - t["load_done"]
    if {"kv_sized", "engine_init_done"} <= t.keys():
        p["KV cache allocation"] = t["engine_init_done"] - t["kv_sized"]
    if "engine_init_done" in t:
        p["engine core ready → engine ready (handshake)"] = clock["engine_ready"] - t["engine_init_done"]
    p["engine start (make_backend)"] = clock["engine_ready"] - clock["engine_start"]
    p["first request"] = clock["first_verdict"] - clock["engine_ready"]
    p["process start → first verdict"] = clock["first_verdict"] - clock["process_created"]
    p["close"] = clock["closed"] - clock["speed_done"]
    cmdlines = [v["cmdline"] for v in child["processes"].values()]
    details = {"markers": marks, "engine_core_pid": core_pid, "worker_pid": load_pid,
               "compiler_processes": sum(("cc1plus" in c or c.startswith("g++")) for c in cmdlines),
               "model_inspection_subprocesses": sum("vllm.model_executor.models.registry" in c for c in cmdlines),
               "processes": child["processes"]}
    return {k: round(v, 3) for k, v in p.items()}, details


def run_one(variant: str, model: str, run_dir: Path, tag: str, log_level: str, timeout: float,
            caches: str) -> dict[str, Any]:
    log = run_dir / f"{tag}.log"
    result = run_dir / f"{tag}.json"
    env = {**os.environ, **VARIANTS[variant]["env"], "PYTHONUNBUFFERED": "1",
           "VLLM_LOGGING_CONFIG_PATH": str(logging_config(run_dir / f"{tag}-logging.json", log_level))}
    if caches == "cold":  # as on a fresh machine: no compiled kernels, no vLLM model-info cache
        env["TORCHINDUCTOR_CACHE_DIR"] = str(run_dir / f"{tag}-inductor-cache")
        env["VLLM_CACHE_ROOT"] = str(run_dir / f"{tag}-vllm-cache")
    started = time.time()
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--model", model,
                               "--result", str(result)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout)
    row: dict[str, Any] = {"variant": variant, "tag": tag, "exit_status": proc.returncode,
                           "wall_s": round(time.time() - started, 2), "log": str(log)}
    if proc.returncode != 0 or not result.exists():
        row["error"] = log.read_text(errors="replace").splitlines()[-30:]
        return row
    child = json.loads(result.read_text())
    row["phases"], details = phases(child, log_records(log))
    row.update(details)
    row.update({k: child[k] for k in ("clock", "speed", "first_verdict", "engine_config", "torch_threads")})
    return row


def table(rows: list[dict[str, Any]], variants: list[str]) -> str:
    """Markdown: each phase's min–max (median) seconds per variant."""
    names: list[str] = []
    for r in rows:
        for k in r.get("phases", {}):
            if k not in names:
                names.append(k)
    head = "| phase | " + " | ".join(variants) + " |\n|---|" + "---|" * len(variants) + "\n"
    lines = []

    def cell(values: list[float], digits: int = 1) -> str:
        if not values:
            return "–"
        lo, hi, med = min(values), max(values), statistics.median(values)
        return f"{lo:.{digits}f}–{hi:.{digits}f} ({med:.{digits}f})" if len(values) > 1 else f"{lo:.{digits}f}"

    for name in names:
        cells = [cell([r["phases"][name] for r in rows if r["variant"] == v and name in r.get("phases", {})])
                 for v in variants]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for what in ("compiler_processes", "model_inspection_subprocesses"):
        cells = [cell([float(r[what]) for r in rows if r["variant"] == v and what in r], 0) for v in variants]
        lines.append(f"| {what.replace('_', ' ')} started | " + " | ".join(cells) + " |")
    for what in ("messages_per_s", "tokens_per_s"):
        cells = [cell([s[what] for r in rows if r["variant"] == v for s in r.get("speed", [])]) for v in variants]
        lines.append(f"| speed after start: {what.replace('_per_s', '/s')} ({SPEED_MESSAGES} messages) | "
                     + " | ".join(cells) + " |")
    return head + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("RSAFE_DEMO_MODEL", "demo/model"))
    ap.add_argument("--variants", nargs="+", default=["spawned-worker", "default"], choices=sorted(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="raw result (default .cache/bench-results/cold-start-DATE.json)")
    ap.add_argument("--log-level", default="INFO", choices=["INFO", "DEBUG"],
                    help="vLLM's log level in the children (INFO: as the worker runs)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one child may take")
    ap.add_argument("--caches", default="warm", choices=["warm", "cold"],
                    help="cold: each child gets empty torch inductor and vLLM cache folders (a fresh machine); "
                         "warm: this machine's own (what a second start sees)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args.child, args.model, Path(args.result))
        return

    sys.path.insert(0, str(ROOT / "bench"))
    from common import run_metadata, write_result

    if not (Path(args.model) / "config.json").exists():
        ap.error(f"--model {args.model}: no config.json there")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    out = Path(args.out or ROOT / ".cache" / "bench-results" / f"cold-start-{stamp}.json")
    run_dir = ROOT / ".cache" / "cold-start" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = run_metadata(sys.argv)
    rows = []
    for rnd in range(args.rounds):
        order = args.variants if rnd % 2 == 0 else list(reversed(args.variants))
        for variant in order:
            tag = f"r{rnd}-{variant}"
            print(f"[cold-start] round {rnd + 1}/{args.rounds}: {variant} …", file=sys.stderr, flush=True)
            row = run_one(variant, args.model, run_dir, tag, args.log_level, args.timeout, args.caches)
            row["round"] = rnd
            rows.append(row)
            summary = row.get("phases", {}).get("engine start (make_backend)")
            print(f"[cold-start]   engine start {summary} s" if summary is not None
                  else f"[cold-start]   failed (exit {row['exit_status']}), see {row['log']}", file=sys.stderr,
                  flush=True)
            write_result(out, {**meta, "model": args.model, "rounds": args.rounds, "log_level": args.log_level, "caches": args.caches,
                               "variants": {v: VARIANTS[v] for v in args.variants}, "runs": rows})
    print(table(rows, args.variants))
    print(f"[cold-start] raw result: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
