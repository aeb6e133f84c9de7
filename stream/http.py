"""The worker's one HTTP server (aiohttp, already a Faust dependency).

* ``GET /healthz`` — liveness: the worker's event loop answers (200), also while starting.
* ``GET /readyz`` — readiness: 200 when the engine is loaded, the consumer holds partitions and no
  restart is required; else 503 with the reasons as JSON.
* ``GET /metrics`` — Prometheus text (``telemetry.prometheus``, on by default).

Bound to ``http.host`` (default 127.0.0.1; ``0.0.0.0`` in a container) and ``http.port``.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

log = logging.getLogger("rsafe.stream.http")

Readiness = Callable[[], dict[str, bool | str]]
"""name → True (ready) or a reason string (not ready)."""


class HttpServer:
    def __init__(self, host: str, port: int, readiness: Readiness, metrics: Callable[[], bytes] | None = None):
        self.host, self.port = host, port
        self.readiness = readiness
        self.metrics = metrics
        self._runner = None

    async def start(self) -> int:
        """Start serving; returns the bound port."""
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        addresses = self._runner.addresses  # the bound sockets' addresses (port 0: the one chosen)
        if addresses:
            self.port = addresses[0][1]
        log.info("http: /healthz /readyz /metrics on http://%s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request):
        from aiohttp import web

        return web.json_response({"status": "ok"})

    async def _readyz(self, request):
        from aiohttp import web

        checks = self.readiness()
        ready = all(v is True for v in checks.values())
        return web.Response(status=200 if ready else 503, content_type="application/json",
                            text=json.dumps({"ready": ready, "checks": checks}))

    async def _metrics(self, request):
        from aiohttp import web

        if self.metrics is None:
            return web.Response(status=404, text="metrics are not exported (telemetry.prometheus: false)\n")
        return web.Response(body=self.metrics(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})
