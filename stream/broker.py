"""The embedded Kafka-protocol broker (``noida-db``) for development and tests, and topic admin.

``EmbeddedBroker`` starts ``noida-db start --only kafka`` as a child process in its own data
directory, waits until the port accepts connections and stops it (SIGTERM, then SIGKILL) on
``stop()`` / context exit. On Linux the child also gets SIGTERM when its parent dies (even by
SIGKILL), so a crashed worker, test or demo leaves no broker behind. Production points ``broker``
at a real Kafka cluster instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

log = logging.getLogger("rsafe.stream.broker")

PR_SET_PDEATHSIG = 1
"""``prctl`` option (linux/prctl.h): the signal the calling process gets when its parent dies."""


class BrokerError(RuntimeError):
    """The embedded broker could not start, or a broker is unreachable."""


def noida_binary() -> Path:
    """Path of the ``noida-db`` binary shipped by the ``noida-db`` wheel."""
    try:
        import importlib.resources as resources

        path = Path(str(resources.files("noida_db") / "noida-db"))
    except ModuleNotFoundError:
        found = shutil.which("noida-db")
        if not found:
            raise BrokerError("the embedded broker needs the noida-db package: pip install noida-db") from None
        return Path(found)
    if not path.is_file():
        raise BrokerError(f"noida-db binary not found at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get ``sig`` when the process that started it dies, or
    None where ``prctl`` is not available (not Linux).

    The parent-death signal follows the *thread* that forked: start the child from a thread that
    lives as long as the child should (the main thread, or a pool thread that is only shut down
    at exit). libc is looked up here, in the parent: the child only makes the one call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def free_port(host: str = "127.0.0.1") -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def reachable(bootstrap: Sequence[str], timeout: float = 0.5) -> bool:
    """True when any ``host:port`` accepts a TCP connection."""
    for hp in bootstrap:
        host, _, port = hp.rpartition(":")
        if port.isdigit() and port_open(host.strip("[]"), int(port), timeout):
            return True
    return False


class EmbeddedBroker:
    """``noida-db`` Kafka broker as a child process. Use as a context manager or start()/stop()."""

    def __init__(self, data_dir: str | Path, port: int = 0, host: str = "127.0.0.1",
                 log_file: str | Path | None = None, startup_timeout_s: float = 30.0):
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.log_file = Path(log_file) if log_file else self.data_dir / "broker.log"
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def command(self) -> list[str]:
        return [str(noida_binary()), "start", "--only", "kafka", "--host", self.host,
                "--kafka-port", str(self.port), "--data-dir", str(self.data_dir)]

    def start(self) -> EmbeddedBroker:
        if self.proc is not None:
            return self
        if port_open(self.host, self.port):
            raise BrokerError(f"port {self.bootstrap} is already in use; pick another --port")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_file, "ab")
        try:
            # Own session: a Ctrl-C meant for the parent does not kill the broker before the worker
            # has committed; stop() ends it. And it dies with its parent (SIGTERM: it keeps its data).
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=die_with_parent())
        finally:
            out.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-2000:]
                self.proc = None
                raise BrokerError(f"embedded broker exited at start (see {self.log_file}):\n{tail}")
            if port_open(self.host, self.port, timeout=0.2):
                log.info("embedded broker ready on %s (data dir %s)", self.bootstrap, self.data_dir)
                return self
            time.sleep(0.1)
        self.stop()
        raise BrokerError(f"embedded broker did not open {self.bootstrap} within {self.startup_timeout_s:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def wait(self) -> int:
        """Block until the broker exits (foreground ``rsafe broker``)."""
        assert self.proc is not None
        return self.proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- topics


def ensure_topics(bootstrap: Sequence[str], topics: Iterable[tuple[str, int, dict[str, str]]],
                  client_kwargs: dict[str, Any] | None = None, timeout_s: float = 30.0) -> list[str]:
    """Create the missing topics ``(name, partitions, configs)``; returns the names created.

    Existing topics are left as they are (their partition count is not changed).
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    wanted = {name: (parts, cfg) for name, parts, cfg in topics}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=list(bootstrap), client_id="rsafe-admin",
                                     **(client_kwargs or {}))
            break
        except KafkaError as err:
            if time.monotonic() > deadline:
                raise BrokerError(f"cannot reach broker {','.join(bootstrap)}: {err}") from err
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, parts, -1, topic_configs=cfg or {})  # -1: the broker's default.replication.factor
               for name, (parts, cfg) in wanted.items() if name not in existing]
        if not new:
            return []
        try:
            admin.create_topics(new)
        except TopicAlreadyExistsError:  # another worker won the race
            pass
        return [t.name for t in new]
    finally:
        admin.close()


class _Stop(Exception):
    pass


def main_foreground(data_dir: str, port: int, host: str = "127.0.0.1") -> int:
    """``rsafe broker``: run in the foreground until Ctrl-C / SIGTERM."""
    broker = EmbeddedBroker(data_dir, port=port, host=host)
    broker.start()
    print(f"embedded broker on {broker.url} (data dir {broker.data_dir}); Ctrl-C stops it", flush=True)

    def stop(signum: int, frame: Any) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        code = broker.wait()
    except _Stop:
        broker.stop()
        print("embedded broker stopped", flush=True)
        return 0
    print(f"embedded broker exited with {code}", file=sys.stderr)
    return 1
