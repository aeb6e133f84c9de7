"""Helpers shared by the tests that run real worker processes on the embedded broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import pytest
import yaml

from rsafe.stream.broker import EmbeddedBroker, die_with_parent
from rsafe.stream.clients import Message, committed_offsets, end_offsets, read_all


REAL_KAFKA = os.environ.get("RSAFE_TEST_BROKER")
"""``host:port`` of a real Apache Kafka to run the broker tests against (else the embedded broker)."""


@pytest.fixture(scope="module")
def kafka(tmp_path_factory):
    """The broker of a test module: ``RSAFE_TEST_BROKER`` when set, else an embedded one."""
    if REAL_KAFKA:
        yield REAL_KAFKA
        return
    with EmbeddedBroker(tmp_path_factory.mktemp("broker"), port=0) as broker:
        yield broker.bootstrap


def worker_config(bootstrap: str, prefix: str, **over) -> dict:
    cfg = {
        "broker": bootstrap, "group_id": f"{prefix}-group",
        "inputs": [{"topic": f"{prefix}.in", "policy": "rsafe-default", "partitions": 3}],
        "outputs": {"audit_topic": f"{prefix}.audit", "dlq_topic": f"{prefix}.dlq",
                    "policies_topic": f"{prefix}.policies", "partitions": 3},
        "batch": {"size": 16, "linger_ms": 20, "max_inflight": 2},
        "engine": {"backend": "null", "model": "null-engine"},
        "policy_reload": {"watch": False}, "commit_interval_s": 0.5, "shutdown_timeout_s": 20,
        "http": {"port": 0},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


_STARTED: list[tuple[subprocess.Popen, bool]] = []
"""Processes the current test started (``start_worker``, ``own``), each with whether it leads its
own process group; ``end_started`` ends them."""


def own(proc: subprocess.Popen, group: bool = False) -> subprocess.Popen:
    """Hand ``proc`` to the test's teardown: it is ended when the test ends, pass or fail. ``group``:
    it was started in its own session, and what it started (vLLM's engine process) is ended too."""
    _STARTED.append((proc, group))
    return proc


def end_started(grace_s: float = 30.0) -> list[int]:
    """End every process the test started that still runs: SIGTERM, then SIGKILL after ``grace_s``;
    for a process group leader, also what is left of its group (a worker killed with SIGKILL leaves
    vLLM's EngineCore behind). Called after each test by the autouse fixture in conftest.py; returns
    the pids it had to end."""
    ended = []
    procs, _STARTED[:] = list(_STARTED), []
    for proc, _ in procs:
        if proc.poll() is None:
            ended.append(proc.pid)
            proc.send_signal(signal.SIGTERM)
    for proc, group in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if group:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # nothing left of it
                pass
    return ended


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a worker of ``start_worker`` with everything it started, as a container runtime or
    systemd does (on a bare host vLLM's EngineCore outlives a worker killed alone: docs/RELIABILITY.md)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def start_worker(tmp_path: Path, raw: dict, name: str, env: dict | None = None) -> subprocess.Popen:
    """``rsafe worker`` on ``raw`` (config written to ``<name>.yaml``, output to ``<name>.log``),
    owned by the test: still running when the test ends, it is stopped with what it started
    (``end_started``). It leads its own process group, and gets SIGTERM if the test process dies."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    with open(tmp_path / f"{name}.log", "w") as log:
        return own(subprocess.Popen([sys.executable, "-m", "rsafe.cli", "worker", "-c", str(path)],
                                    stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                    start_new_session=True, preexec_fn=die_with_parent()), group=True)


def wait_until(pred, timeout: float, interval: float = 0.2) -> bool:
    """A fixed deadline: only for waits that measure the product (a promised recovery time) or
    wait for something that must happen at once. Waits for work to get done use ``wait_progress``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


STALL_S = 120.0
"""How long a test waits without progress before it fails. It must cover the longest quiet phase:
a worker's start on the null engine (imports, group join: ~3 s idle, ~25 s on a 2-core machine
beside 6 busy processes) or a rebalance (a heartbeat interval, 3 s, and the rejoin; Faust's 60 s
rebalance timeout when a member does not rejoin)."""


ENGINE_STALL_S = 600.0
"""``STALL_S`` for a phase that starts a real engine (vLLM on the demo model: 50-130 s here, quiet)."""


class Stalled(AssertionError):
    """A wait saw no progress for its ``stall_s`` (or a process it needs exited)."""


def wait_progress(count: Callable[[], int], target: int, *, stall_s: float = STALL_S, interval: float = 0.2,
                  what: str = "count", alive: Sequence[subprocess.Popen] = (),
                  log: Path | Sequence[Path] | None = None) -> int:
    """Wait until ``count() >= target`` for as long as the count keeps moving.

    Fails (``Stalled``) only when the count has not changed for ``stall_s`` seconds, or at once when
    a process of ``alive`` exited: a busy machine makes the work slower, not the test fail.
    ``stall_s`` must cover the longest quiet phase the product has (a worker's start, a rebalance).
    Returns the count reached. ``log``: the tail of each goes into the failure message."""
    last = count()
    moved = time.monotonic()
    while last < target:
        for proc in alive:
            if proc.poll() is not None:
                raise Stalled(f"{what}: {last} of {target}; process {proc.pid} exited with {proc.returncode}"
                              + _tail(log))
        time.sleep(interval)
        now = count()
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > stall_s:
            raise Stalled(f"{what}: {last} of {target}, no progress for {stall_s:.0f} s" + _tail(log))
    return last


async def progress(count: Callable[[], int], target: int, *, stall_s: float = STALL_S, interval: float = 0.1,
                   what: str = "count") -> int:
    """``wait_progress`` for a worker running in this event loop (``GuardWorker`` in the test's
    process): ``count`` is read in the loop; fails only after ``stall_s`` without progress."""
    last, moved = count(), time.monotonic()
    while last < target:
        await asyncio.sleep(interval)
        now = count()
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > stall_s:
            raise Stalled(f"{what}: {last} of {target}, no progress for {stall_s:.0f} s")
    return last


def wait_caught_up(bootstrap: str, group_id: str, topics: list[str], *, stall_s: float = STALL_S,
                   alive: Sequence[subprocess.Popen] = (), interval: float = 1.0) -> bool:
    """Wait until the group has committed every partition of ``topics`` to its end (``caught_up``)
    for as long as its committed offsets keep moving. False when they did not move for ``stall_s``
    or a process of ``alive`` exited (a scenario records that, then asserts on it)."""
    def committed() -> int:
        return sum((o or 0) for o in committed_offsets([bootstrap], group_id, topics).values())

    last, moved = committed(), time.monotonic()
    while not caught_up(bootstrap, group_id, topics):
        if any(p.poll() is not None for p in alive) or time.monotonic() - moved > stall_s:
            return False
        time.sleep(interval)
        now = committed()
        if now != last:
            last, moved = now, time.monotonic()
    return True


def wait_logged(tmp_path: Path, name: str, text: str, proc: subprocess.Popen, stall_s: float = STALL_S) -> float:
    """Wait until ``<name>.log`` shows ``text``, for as long as the log keeps growing: fails when
    ``proc`` exits first or the log has not grown for ``stall_s``. Returns when the text was seen
    (``time.monotonic()``)."""
    path = tmp_path / f"{name}.log"
    size, moved = -1, time.monotonic()
    while not logged(tmp_path, name, text):
        if proc.poll() is not None:
            raise Stalled(f"{name} exited with {proc.returncode} before logging {text!r}" + _tail(path))
        now = path.stat().st_size if path.exists() else 0
        if now != size:
            size, moved = now, time.monotonic()
        elif time.monotonic() - moved > stall_s:
            raise Stalled(f"{name}.log: no {text!r} and no new line for {stall_s:.0f} s" + _tail(path))
        time.sleep(0.2)
    return time.monotonic()


def _tail(log: Path | Sequence[Path] | None, chars: int = 3000) -> str:
    logs = [] if log is None else [log] if isinstance(log, Path) else list(log)
    return "".join(f"\n--- {p.name} (tail) ---\n" + p.read_text(errors="replace")[-chars:] for p in logs if p.exists())


def logged(tmp_path: Path, name: str, text: str) -> bool:
    return text in (tmp_path / f"{name}.log").read_text(errors="replace")


def events(topic: str, prefix: str, n: int, start: int = 0) -> list[Message]:
    return [Message(topic, f"c{i % 11}".encode(), json.dumps({"id": f"{prefix}-{i}", "prompt": f"message {i}"}).encode())
            for i in range(start, start + n)]


def published(bootstrap: str, cfg) -> int:
    """Verdict records on the broker (end offsets: cheap to poll)."""
    return sum(end_offsets([bootstrap], list(cfg.verdict_topics().values())).values())


def verdict_ids(bootstrap: str, cfg) -> Counter:
    return Counter(json.loads(r.value)["id"] for r in read_all([bootstrap], list(cfg.verdict_topics().values()),
                                                                idle_timeout_s=1.0))




def caught_up(bootstrap: str, group_id: str, topics: list[str]) -> bool:
    """Every partition of ``topics`` committed to its end. An empty partition (end offset 0) has
    no committed offset at all, and counts as caught up (the producer's partitioner may leave a
    partition empty: comparing ``None`` with 0 once made a finished run look stalled)."""
    committed = committed_offsets([bootstrap], group_id, topics)
    return all((committed.get(tp) or 0) >= end for tp, end in end_offsets([bootstrap], topics).items())
