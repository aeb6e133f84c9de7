"""Policy hot reload: on a change of a policy file (polled) or on SIGHUP.

A reload builds a whole new ``PolicyRegistry``, publishes its versions to the policy store
(``before_use``), then swaps it into the guard in one assignment, so a batch is judged entirely
with the old or entirely with the new policies, and every version that judges anything is in the
store first; every verdict names the version that judged it. A reload that fails (invalid YAML, a
topic's policy gone, the store unreachable) is logged and the running policies stay.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Awaitable, Callable

from rsafe.models.guard import Guard
from rsafe.policies import BUNDLED_DIR, PolicyError, PolicyRegistry
from rsafe.stream.config import StreamConfig

log = logging.getLogger("rsafe.stream.policies")


def load_registry(cfg: StreamConfig) -> PolicyRegistry:
    """Bundled policies + ``policy_dirs``; every input topic's policy must be there."""
    registry = PolicyRegistry.from_dirs(*cfg.policy_dirs)
    missing = sorted({t.policy for t in cfg.inputs if t.policy not in registry})
    if cfg.default_policy not in registry:
        missing.append(cfg.default_policy)
    if missing:
        raise PolicyError(f"unknown policy {missing[0]!r} in the worker config; known: "
                          f"{', '.join(registry.names())}")
    return registry


class PolicyWatcher:
    def __init__(self, cfg: StreamConfig, guard: Guard, on_reload: Callable[[dict[str, str]], None] | None = None,
                 before_use: Callable[[PolicyRegistry], Awaitable[None]] | None = None):
        self.cfg = cfg
        self.guard = guard
        self.on_reload = on_reload
        self.before_use = before_use
        self.dirs = [BUNDLED_DIR, *[Path(d) for d in cfg.policy_dirs]]
        self._wake = asyncio.Event()
        self._seen = self._snapshot()
        self.reloads = 0

    def _snapshot(self) -> dict[str, tuple[int, int]]:
        snap = {}
        for d in self.dirs:
            if not d.is_dir():
                continue
            for f in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]):
                try:
                    st = f.stat()
                except OSError:
                    continue
                snap[str(f)] = (st.st_mtime_ns, st.st_size)
        return snap

    def request_reload(self) -> None:
        """Reload soon (SIGHUP handler; safe to call from a signal handler on the loop)."""
        self._wake.set()

    async def reload(self, why: str) -> bool:
        self._seen = self._snapshot()
        try:
            registry = load_registry(self.cfg)
        except PolicyError as err:
            log.error("policy reload (%s) rejected, keeping the running policies: %s", why, err)
            return False
        if self.before_use is not None:
            try:
                await self.before_use(registry)
            except Exception as err:  # noqa: BLE001 - e.g. the policy store is unreachable
                log.error("policy reload (%s) not applied, keeping the running policies: publishing to "
                          "the policy store failed: %s", why, err)
                self._seen = {}  # try again at the next poll
                return False
        old = self.guard.policies
        changed = {name: registry.get(name).version for name in registry.names()
                   if name not in old or old.get(name).version != registry.get(name).version}
        self.guard.policies = registry
        self.reloads += 1
        log.info("policies reloaded (%s): %s", why,
                 ", ".join(f"{n}@{v}" for n, v in sorted(changed.items())) or "no version changed")
        if self.on_reload is not None:
            self.on_reload(changed)
        return True

    async def run(self) -> None:
        interval = self.cfg.policy_reload.interval_s
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
                self._wake.clear()
                await self.reload("SIGHUP")
                continue
            except asyncio.TimeoutError:
                pass
            if self.cfg.policy_reload.watch and self._snapshot() != self._seen:
                await self.reload("policy file changed")
