"""The embedded broker's child process dies with its parent: ``rsafe broker`` or a worker that
started the broker, killed with SIGKILL, leaves no ``noida-db`` behind (nor its port taken)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rsafe.stream.broker import free_port, noida_binary, port_open, reachable
from streamkit import own, wait_logged

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    """Pids of the live processes whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            out.append(int(entry.name))
    return out


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for a reaper that may be slow)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def noida_child(parent: int, port: int, timeout: float = 120.0) -> int:
    """The pid of ``parent``'s noida-db child, once it listens on ``port``."""
    deadline = time.monotonic() + timeout
    binary = str(noida_binary())
    while time.monotonic() < deadline:
        found = [pid for pid in children(parent) if _exe_args(pid)[:1] == [binary]]
        if found and port_open("127.0.0.1", port):
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no noida-db child of {parent} listening on {port} within {timeout:.0f} s")


def _exe_args(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def assert_dies_with(parent: subprocess.Popen, child: int, port: int) -> None:
    """SIGKILL ``parent``; its noida-db ``child`` must exit (it gets SIGTERM) and free ``port``."""
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 60  # noida-db stops on SIGTERM in well under a second
        while running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(child), f"noida-db {child} outlived its parent {parent.pid}"
        assert not port_open("127.0.0.1", port), f"port {port} still taken"
    finally:
        if running(child):  # the test owns it too: nothing outlives a failed assertion
            os.kill(child, signal.SIGKILL)


def test_rsafe_broker_killed_with_sigkill_takes_its_noida_db_along(tmp_path):
    port = free_port()
    broker = own(subprocess.Popen([sys.executable, "-m", "rsafe.cli", "broker", "--data-dir", str(tmp_path / "b"),
                                   "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    child = noida_child(broker.pid, port)
    assert os.getsid(child) == child != os.getsid(broker.pid)  # still its own session (Ctrl-C isolation)
    assert_dies_with(broker, child, port)


def test_a_worker_killed_with_sigkill_takes_its_embedded_broker_along(tmp_path):
    """The worker starts the broker from a thread of its event loop's executor: the parent-death
    signal follows that thread, which lives as long as the worker."""
    if reachable(["127.0.0.1:9092"]):
        pytest.skip("a broker answers on 127.0.0.1:9092; the worker would use it")
    port = free_port()
    raw = {"inputs": [{"topic": "t", "policy": "rsafe-default"}], "http": {"port": 0},
           "engine": {"backend": "null", "model": "null-engine"}, "policy_reload": {"watch": False},
           "embedded_broker": {"data_dir": str(tmp_path / "b"), "port": port}}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(raw))
    with open(tmp_path / "w.log", "w") as log:
        worker = own(subprocess.Popen([sys.executable, "-m", "rsafe.cli", "worker", "-c", str(tmp_path / "w.yaml")],
                                      stdout=log, stderr=subprocess.STDOUT))
    wait_logged(tmp_path, "w", "consuming", worker)
    assert_dies_with(worker, noida_child(worker.pid, port), port)
