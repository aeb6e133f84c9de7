"""Static group membership: one live worker per ``group_instance_id``.

With static membership (Kafka ``group.instance.id``) a worker restarted with the same id takes its
partitions back at once. Two *live* workers with one id would take the partitions from each other
in turn (each join fences the other, which rejoins), both processing the same partitions. Two
guards prevent it:

* at start, ``live_duplicate`` reads the group's members: a member with our instance id whose
  Kafka client id (``rsafe-<host>-<pid>``) names a live process of this host is another worker
  — this one refuses to start (exit 1) and says to set distinct ids;
* while running, ``FencingWatch`` sees the group coordinator report that this member is no longer
  known (another member joined with our id, or the broker expired us): the worker exits at once
  with status 5 (``EXIT_FENCED``) *before* its client rejoins and fences the other. Its
  unacknowledged batches are redelivered; an orchestrator restarts it if it should run.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from typing import Any, Sequence

from rsafe.stream.exit_codes import EXIT_FENCED

log = logging.getLogger("rsafe.stream.membership")

_CLIENT_RE = re.compile(r"^rsafe-(?P<host>.+)-(?P<pid>\d+)$")
_FENCED_PATTERNS = ("member_id was not recognized", "UnknownMemberId", "FencedInstanceId", "FENCED_INSTANCE_ID",
                    "[Error 82]")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        return b"python" in cmdline or b"rsafe" in cmdline
    except OSError:
        return True


def live_duplicate(bootstrap: Sequence[str], group_id: str, instance_id: str,
                   client_kwargs: dict[str, Any] | None = None) -> str | None:
    """A description of another live worker of this host that holds ``instance_id``, else None."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=list(bootstrap), client_id="rsafe-admin", **(client_kwargs or {}))
    try:
        groups = admin.describe_groups([group_id])
    finally:
        admin.close()
    members = (groups.get(group_id) or {}).get("members") or []
    host = socket.gethostname()
    for m in members:
        if m.get("group_instance_id") != instance_id:
            continue
        match = _CLIENT_RE.match(m.get("client_id") or "")
        if match and match["host"] == host and int(match["pid"]) != os.getpid() and _alive(int(match["pid"])):
            return f"process {match['pid']} on this host ({m.get('member_id')})"
    return None


class FencingWatch(logging.Handler):
    """Exits the process (status 5) when the group coordinator says this member was fenced."""

    LOGGER = "aiokafka.consumer.group_coordinator"

    def __init__(self, group_id: str, instance_id: str):
        super().__init__(level=logging.DEBUG)
        self.group_id = group_id
        self.instance_id = instance_id
        self.armed = False
        """Set once the worker holds its partitions (joining may see these errors harmlessly)."""

    def install(self) -> FencingWatch:
        logger = logging.getLogger(self.LOGGER)
        logger.addHandler(self)
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)
        return self

    def remove(self) -> None:
        logging.getLogger(self.LOGGER).removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.armed:
            return
        text = record.getMessage()
        if not any(p in text for p in _FENCED_PATTERNS):
            return
        message = (f"rsafe worker: fenced — another member of group {self.group_id!r} joined with this "
                   f"worker's group_instance_id {self.instance_id!r} (or the broker expired this member). "
                   "Exiting now, before rejoining would take the partitions back from it; unacknowledged "
                   "events are redelivered. Two workers of one group need distinct ids: set "
                   f"group_instance_id (RSAFE_GROUP_INSTANCE_ID). Broker said: {text}")
        log.critical("%s", message)
        print(message, file=sys.stderr, flush=True)
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(EXIT_FENCED)
