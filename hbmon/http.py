"""The HTTP endpoints of a site, served by aiohttp from the same process.

``GET /metrics`` (Prometheus text format), ``GET /status.json`` (the status table),
``GET /status`` (a self-contained live HTML view of that table, see docs/dashboards.md),
``GET /healthz`` (200 while the poll loop is running, 503 when it has stopped ticking).
aiohttp is a well-kept asyncio server with keep-alive, limits and graceful shutdown, so
hbmon does not hand-write HTTP.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from hbmon import __version__
from hbmon.exposition import Renderer
from hbmon.poller import PollerStatistics
from hbmon.status import StatusTable, row_view, worst_first

log = logging.getLogger(__name__)

HEALTHY_TICK = 5.0  # seconds without a poll-loop tick before /healthz says 503
STATUS_CACHE = 0.25  # seconds a /status.json document is shared between requests
SLICE = 500  # pairs (rows) handled between two pauses while building /status.json

#: The status page fetches only ``status.json`` from its own origin; inline CSS and JS,
#: nothing from anywhere else (the browser enforces it).
STATUS_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def status_page() -> bytes:
    """The status page (``hbmon/static/status.html``), read once per process."""
    return importlib.resources.files("hbmon").joinpath("static/status.html").read_bytes()


class HttpApi:
    """Handlers over one status table and the registry that exports it."""

    def __init__(
        self,
        table: StatusTable,
        registry: CollectorRegistry,
        poller: Callable[[], PollerStatistics],
        arbiter: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.table = table
        self.arbiter = arbiter  # the keeper's status(): owners, terms, lease (None: none)
        self.poller = poller  # the poller's statistics(): lag, stuck workers, last tick
        self.registry = registry  # site-wide families; the pairs are rendered by Renderer
        self.renderer = Renderer(table, registry)
        self.render_limiter = anyio.CapacityLimiter(1)
        self._cached: tuple[float, bytes] | None = None
        self.extra_routes: list[web.RouteDef] = []  # e.g. the demo's /lab endpoints
        self.page = status_page()  # read once: a missing file fails at start, not per request

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/status", self.status_html)
        app.router.add_get("/status.json", self.status_json)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/", self.index)
        app.router.add_routes(self.extra_routes)
        return app

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        # Formatted on the loop in slices, with polling running between them: a thread
        # would hold the GIL just as long, and each thread's malloc arena would keep the
        # high-water mark of a large render.  Sent in pieces as they are made (chunked),
        # so the page is never whole in memory.  One scrape at a time.
        async with self.render_limiter:
            response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE_LATEST})
            await response.prepare(request)
            async for piece in self.renderer.stream(self.renderer.inputs()):
                await response.write(piece)
            await response.write_eof()
        return response

    async def status_html(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.page,
            content_type="text/html",
            charset="utf-8",
            headers=STATUS_PAGE_HEADERS,
        )

    async def status_json(self, request: web.Request) -> web.Response:
        # Every open status page asks once a second; at thousands of pairs the document
        # costs tens of milliseconds of loop time, so pages share one copy for a moment.
        now = self.table.clock.monotonic()
        if self._cached is None or now - self._cached[0] > STATUS_CACHE:
            async with self.render_limiter:
                if self._cached is None or now - self._cached[0] > STATUS_CACHE:
                    self._cached = (now, await self.status_body())
        return web.Response(body=self._cached[1], content_type="application/json")

    async def status_body(self) -> bytes:
        """``/status.json`` built on the loop in slices, like ``/metrics``: at 10,000 pairs
        building and encoding the rows takes far longer than a poll may wait."""
        table = self.table
        now = table.clock.monotonic()
        table.run_due(now)
        views: list[dict[str, Any]] = []
        for count, pair in enumerate(list(table.pairs.values()), 1):
            views.extend(row_view(pair, row, now) for row in list(pair.rows.values()))
            if not count % SLICE:
                await anyio.lowlevel.checkpoint()
        views.sort(key=worst_first)
        head = self.status_document(rows=views)  # (adds each row's owner and term)
        head["rows"] = []
        encoded = []
        for start in range(0, len(views), SLICE):
            encoded.append(json.dumps(views[start : start + SLICE])[1:-1])
            await anyio.lowlevel.checkpoint()
        rows = ",".join(part for part in encoded if part)
        counts: dict[str, int] = {}
        for view in views:
            counts[str(view["state"])] = counts.get(str(view["state"]), 0) + 1
        head["states"] = counts
        text = json.dumps(head)
        marker = '"rows": []'
        return text.replace(marker, f'"rows": [{rows}]', 1).encode()

    def status_document(self, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        table, polls = self.table, self.poller()
        rows = table.snapshot() if rows is None else rows
        counts: dict[str, int] = {}
        for row in rows:
            counts[str(row["state"])] = counts.get(str(row["state"]), 0) + 1
        arbiter = None
        if self.arbiter is not None:  # each row says its pair's owner and term
            arbiter = dict(self.arbiter())
            owners = arbiter.pop("pairs", {})
            arbiter["owned"] = sorted(p for p, seen in owners.items() if seen.get("owned"))
            for row in rows:
                seen = owners.get(row["pair"], {})
                row["owner"], row["term"] = seen.get("owner"), seen.get("term")
        return {
            "arbiter": arbiter,
            "site": table.site,
            "version": __version__,
            "generated_at": time.time(),
            "uptime": round(table.clock.monotonic() - table.started, 3),
            "poll_lag": polls.poll_lag,
            "poll_lag_p99": polls.poll_lag_p99,
            "polled": list(table.polled()),
            "workers_stuck": polls.workers_stuck,
            "states": counts,
            "rows": rows,
            "writers": [
                {
                    "pair": w.pair,
                    "volume": w.volume,
                    "slot": w.slot,
                    "incarnation": f"{w.incarnation:016x}",
                    "serial": w.serial,
                    "written": w.written,
                    "errors": dict(w.errors),
                    "last_error": w.last_error,
                }
                for w in table.writers.values()
            ],
        }

    async def healthz(self, request: web.Request) -> web.Response:
        quiet = self.table.clock.monotonic() - self.poller().last_tick
        if quiet > HEALTHY_TICK:
            return web.Response(status=503, text=f"poll loop silent for {quiet:.1f} s\n")
        return web.Response(text="ok\n")

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(
            text=f"hbmon {__version__} site {self.table.site}: "
            "/status /status.json /metrics /healthz\n"
        )


async def serve_http(
    app: web.Application,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: anyio.abc.TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; reports the bound (host, port) when listening.

    With ``ssl_context`` (:func:`hbmon.tls.server_context`) the port speaks HTTPS only.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
        await site.start()
        bound = runner.addresses[0]
        scheme = "https" if ssl_context is not None else "http"
        clients = (
            ", client certificates required"
            if ssl_context is not None and ssl_context.verify_mode == ssl.CERT_REQUIRED
            else ""
        )
        log.info(
            "HTTP on %s://%s:%d/ (/status /status.json /metrics /healthz)%s",
            scheme,
            bound[0],
            bound[1],
            clients,
        )
        task_status.started((str(bound[0]), int(bound[1])))
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            await runner.cleanup()
