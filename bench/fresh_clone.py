"""What a new user meets: a fresh clone, then ``make demo`` or ``.ci/run``, timed line by line.

    .venv/bin/python bench/fresh_clone.py demo --out docs/bench-results/fresh-clone-demo.json
    .venv/bin/python bench/fresh_clone.py ci --out docs/bench-results/fresh-clone-ci.json

Clones this repository's committed HEAD (``git clone``: no ``.venv``, no ``.cache``, nothing
untracked) into an empty temporary folder, points ``XDG_CACHE_HOME`` at an empty folder (so pip,
uv, vLLM and torch start with empty caches), empties the page cache when it may
(``/proc/sys/vm/drop_caches``, root only; recorded either way), and runs the target with every
output line stamped with the seconds since the clone started. The JSON result holds the
milestones (environment built, engine started, first and last verdict, the test summary), the
exit status and every stamped line. Run it on a quiet machine: both targets are CPU-bound.

``--log FILE`` summarises a log already stamped the same way (``SECONDS LINE`` per line) instead of
running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"demo": ["make", "demo"], "ci": [".ci/run"]}

MILESTONES = {
    "environment_built": re.compile(r"^rsafe env ok: torch"),
    "engine_start_begins": re.compile(r"starting the worker: vLLM engine"),
    "worker_ready": re.compile(r"• worker .* ready after"),
    "first_verdict": re.compile(r"^chat\.\S+\s+\S+\s+(prompt|resp)\s+(SAFE|UNSAFE|UNKNOWN|ERROR)"),
    "demo_summary": re.compile(r"^total [0-9.]+ s"),
    "tests_started": re.compile(r"-m pytest"),
    "tests_summary": re.compile(r"\d+ (passed|failed).* in [0-9.]+s"),
}
"""First line matching each (the last for ``tests_summary``)."""


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run(target: str) -> tuple[list[tuple[float, str]], int, dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="rsafe-fresh-"))
    cache = work / "xdg-cache"
    cache.mkdir()
    dropped = drop_page_cache()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "RSAFE_"))}
    env.update(XDG_CACHE_HOME=str(cache), PYTHONUNBUFFERED="1")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    t0 = time.time()
    lines: list[tuple[float, str]] = []
    clone = subprocess.run(["git", "clone", "-q", str(ROOT), str(work / "clone")], capture_output=True, text=True)
    lines.append((time.time() - t0, f"cloned (exit {clone.returncode})"))
    proc = subprocess.Popen(TARGETS[target], cwd=work / "clone", env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.time() - t0, line.rstrip("\n")))
        print(f"{lines[-1][0]:7.1f} {lines[-1][1]}", flush=True)
    rc = proc.wait()
    settings = {"target": target, "command": TARGETS[target], "commit": commit, "workdir": str(work),
                "XDG_CACHE_HOME": str(cache), "page_cache_dropped": dropped}
    return lines, rc, settings


def read_log(path: Path) -> list[tuple[float, str]]:
    out = []
    for raw in path.read_text(errors="replace").splitlines():
        head, _, rest = raw.lstrip().partition(" ")
        try:
            out.append((float(head), rest))
        except ValueError:
            if out:  # a line that wrapped
                out[-1] = (out[-1][0], out[-1][1] + "\n" + raw)
    return out


def milestones(lines: list[tuple[float, str]]) -> dict[str, float]:
    found: dict[str, float] = {}
    for t, line in lines:
        text = line.strip()
        for name, pattern in MILESTONES.items():
            if pattern.search(text) and (name not in found or name == "tests_summary"):
                found[name] = round(t, 1)
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=sorted(TARGETS))
    ap.add_argument("--out", type=Path, required=True, help="the JSON result")
    ap.add_argument("--log", type=Path, help="summarise this stamped log instead of running")
    ap.add_argument("--note", default="", help="recorded as is (e.g. what else ran)")
    args = ap.parse_args()
    if args.log:
        lines, rc = read_log(args.log), None
        settings = {"target": args.target, "command": TARGETS[args.target], "from_log": str(args.log)}
    else:
        lines, rc, settings = run(args.target)
    result = {
        "benchmark": "fresh_clone", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": settings, "note": args.note, "exit_status": rc,
        "seconds_after_clone": milestones(lines), "total_s": round(lines[-1][0], 1) if lines else None,
        "lines": [f"{t:.1f} {line}" for t, line in lines],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds_after_clone", "total_s", "exit_status")}))
    return 0 if rc in (0, None) else 1


if __name__ == "__main__":
    raise SystemExit(main())
