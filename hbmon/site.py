"""One site process: beater, poller and HTTP under one root task group.

``Site.run`` starts each part with ``tg.start()`` so it is ready before the next one
starts.  :func:`run_daemon` adds the signal handling of ``hbmon run``: SIGTERM or SIGINT
writes ``stopping`` records (bounded by a grace period) and cancels everything.
"""

from __future__ import annotations

import logging
import signal
import threading

import anyio
import anyio.abc

from hbmon.beater import Beater
from hbmon.clock import Clock, SystemClock
from hbmon.config import SiteConfig, parse_hostport
from hbmon.http import HttpApi, serve_http
from hbmon.metrics import make_registry
from hbmon.poller import Poller
from hbmon.status import StatusTable

log = logging.getLogger(__name__)

STOP_GRACE = 3.0  # seconds allowed for stopping records after SIGTERM


class Site:
    """The parts of one site, wired to one status table."""

    def __init__(
        self, config: SiteConfig, *, clock: Clock | None = None, listen: str | None = None
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.listen = listen or config.listen
        self.table = StatusTable(self.clock, site=config.site)
        self.registry = make_registry(self.table)
        self.poller = Poller(self.table, self.clock, threads=config.io_threads)
        self.poller.configure(config)
        self.beater = Beater(
            self.table,
            self.clock,
            config.beats,
            write_timeout=config.timing.read_timeout,
        )
        self.api = HttpApi(self.table, self.registry)
        self.address: tuple[str, int] | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        host, port = parse_hostport(self.listen)
        try:
            async with anyio.create_task_group() as tg:
                self.address = await tg.start(serve_http, self.api.app(), host, port)
                await tg.start(self.poller.run)
                await tg.start(self.beater.run)
                log.info(
                    "site %s: %d beat(s), %d watched pair(s)",
                    self.config.site,
                    len(self.config.beats),
                    len(self.table.pairs),
                )
                task_status.started(self.address)
        finally:
            self.beater.close()

    async def stop(self) -> None:
        """Announce a planned stop on every PVOL (the caller cancels afterwards)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_GRACE):
            await self.beater.stop()


async def run_daemon(site: Site) -> None:
    """``hbmon run``: serve until SIGTERM/SIGINT, then stop gracefully."""
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await tg.start(site.run)
            async for signum in signals:
                log.info("%s received: stopping", signal.Signals(signum).name)
                break
        await site.stop()
        tg.cancel_scope.cancel()


def threads_left_stuck(wait: float = 0.5) -> int:
    """Worker threads still blocked in I/O (a hung device) after the loop has ended.

    Idle workers exit as soon as the loop ends; each gets ``wait`` seconds to do so.
    """
    workers = [t for t in threading.enumerate() if t.name == "AnyIO worker thread"]
    for t in workers:
        t.join(wait)
    return sum(1 for t in workers if t.is_alive())
