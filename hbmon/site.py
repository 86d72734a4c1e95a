"""One site process: beater, poller and HTTP under one root task group.

``Site.run`` starts each part with ``tg.start()`` so it is ready before the next one
starts.  :func:`run_daemon` adds the signal handling of ``hbmon run``: SIGTERM or SIGINT
writes ``stopping`` records (bounded by a grace period) and cancels everything.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import threading
from collections.abc import Callable

import anyio
import anyio.abc
import anyio.to_thread

from hbmon.arbiter.etcd import EtcdStore
from hbmon.arbiter.keeper import Keeper
from hbmon.beater import Beater
from hbmon.clock import Clock, SystemClock
from hbmon.config import SiteConfig, demote_command, load_config, parse_hostport
from hbmon.errors import ConfigError, HbmonError
from hbmon.failover import JOURNAL_NAME, FailoverGuard, Journal
from hbmon.http import HttpApi, serve_http
from hbmon.metrics import Components, site_registry
from hbmon.netbeat import NetListener, NetSender, load_secret
from hbmon.poller import Poller
from hbmon.status import StatusTable
from hbmon.tls import server_context
from hbmon.webhook import Webhook

log = logging.getLogger(__name__)

STOP_GRACE = 3.0  # seconds allowed for stopping records after SIGTERM
ARBITER_STATE = "arbiter.json"  # the site's lease id, so a restart keeps its ownership


class Site:
    """The parts of one site, wired to one status table."""

    def __init__(
        self,
        config: SiteConfig,
        *,
        clock: Clock | None = None,
        listen: str | None = None,
        on_written: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.listen = listen or config.listen
        self.table = StatusTable(self.clock, site=config.site)
        self.table.changes.burst = config.log_changes
        key = load_secret(config.network.key_file) if config.network.key_file else None
        self.sender = NetSender(key) if key is not None else None
        self.listener = (
            NetListener(self.table, self.clock, key, config.network.listen)
            if key is not None
            else None
        )
        journal = Journal(config.state_dir / JOURNAL_NAME)
        self.keeper: Keeper | None = None
        if config.arbiter is not None:  # the third vote (DESIGN.md, "Arbiter")
            self.keeper = Keeper(
                EtcdStore.from_config(config.arbiter),
                config.site,
                config.beats,
                config.arbiter.timing,
                self.clock,
                journal,
                state_file=config.state_dir / ARBITER_STATE,
                demote_for=self._demote_for,
            )
            self.table.set_owner_source(self.keeper.owner_state)
        self.poller = Poller(self.table, self.clock, threads=config.io_threads)
        self.poller.configure(config)
        self.beater = Beater(
            self.table,
            self.clock,
            config.beats,
            write_timeout=config.timing.read_timeout,
            sender=self.sender,
            on_written=on_written,
            owned=self.keeper.owned if self.keeper is not None else None,
        )
        self.ssl_context = server_context(config)
        token = (
            load_secret(config.webhook_token_file, "webhook.token_file")
            if config.webhook_token_file
            else None
        )
        client_certs = config.tls_client_ca_file is not None
        # The webhook may act, or the keeper demote: the journal must work.
        if token is not None or client_certs or self.keeper is not None:
            problem = journal.unwritable()
            if problem is not None:
                raise ConfigError(
                    config.source,
                    "state_dir",
                    f"the failover journal cannot be written by this user (uid {os.getuid()}): "
                    f"{problem}; give it write access to {config.state_dir} "
                    "(hbmon.service: StateDirectory=)",
                )
        self.guard = FailoverGuard(
            self.table,
            self.clock,
            journal,
            hold_down=config.failover_hold_down,
            timeout=config.failover_timeout,
            arbiter=self.keeper,
            arbiter_wait=self.keeper.takeover_wait if self.keeper is not None else 0.0,
        )
        if self.keeper is not None:
            self.keeper.on_gained = self._handed_over
            self.keeper.on_change = self.table.rejudge
        components = Components(
            poller=self.poller.statistics,
            listener=self.listener.statistics if self.listener is not None else None,
            guard=self.guard.statistics,
            arbiter=self.keeper.statistics if self.keeper is not None else None,
            beats=lambda: self.beater.targets,
        )
        self.registry = site_registry(self.table, components)
        self.api = HttpApi(
            self.table,
            self.registry,
            self.poller.statistics,
            arbiter=self.keeper.status if self.keeper is not None else None,
        )
        self.webhook = Webhook(
            self.guard, token, self._task_group, client_certs=client_certs, keeper=self.keeper
        )
        self.api.extra_routes.extend(self.webhook.routes())
        self._tg: anyio.abc.TaskGroup | None = None
        self.address: tuple[str, int] | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        host, port = parse_hostport(self.listen)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                serve = functools.partial(serve_http, ssl_context=self.ssl_context)
                self.address = await tg.start(serve, self.api.app(), host, port)
                if self.listener is not None:
                    await tg.start(self.listener.run)
                if self.keeper is not None:  # ownership is known before the first beat
                    await tg.start(self.keeper.run)
                await tg.start(self.poller.run)
                await tg.start(self.beater.run)
                await tg.start(self.table.run_timers)
                log.info(
                    "site %s: %d beat(s), %d watched pair(s)",
                    self.config.site,
                    len(self.config.beats),
                    len(self.table.pairs),
                )
                task_status.started(self.address)
                tg.start_soon(self._freeze_heap)
                if self.keeper is not None:
                    tg.start_soon(self._rejudge_silent)
        finally:
            self.beater.close()
            if self.sender is not None:
                self.sender.close()
            if self.keeper is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await self.keeper.store.aclose()

    async def _freeze_heap(self) -> None:
        """Once every watched volume has been read, hide the long-lived objects from the
        cyclic garbage collector (``gc.freeze``).  At 10,000 pairs a full collection
        walks ~170,000 objects that live as long as the process and holds the event loop
        ~60 ms (a late poll tick); frozen, it takes ~5 ms.  hbmon's objects hold no
        reference cycles, so reference counting still frees whatever a reload drops."""
        with anyio.move_on_after(60):
            await self.poller.all_read.wait()
        gc.collect()
        gc.freeze()

    async def _rejudge_silent(self) -> None:
        """Once a second, the verdict of every pair whose every path is stale, again: it
        turns on what the arbiter says of the owner (``isolated`` or ``host_down``), which
        can change with no new row state (the owner's key deleted, the arbiter lost)."""
        while True:
            await self.clock.sleep_until(self.clock.monotonic() + 1.0)
            now = self.clock.monotonic()
            for pair in list(self.table.pairs.values()):
                if pair.verdict in ("isolated", "host_down"):
                    pair.rejudge(now)

    def _demote_for(self, pair: str) -> tuple[str, ...]:
        watched = self.table.pairs.get(pair)
        return demote_command(self.config, pair, watched.volume if watched else None)

    def _handed_over(self, pair: str, term: int) -> None:
        self._task_group().start_soon(self.guard.handed_over, pair, term)

    def _task_group(self) -> anyio.abc.TaskGroup:
        if self._tg is None:
            raise RuntimeError("the site is not running")
        return self._tg

    async def reload(self, config: SiteConfig) -> None:
        """Apply a new configuration: pairs added and removed, the others keep their state.

        ``[webhook] hold_down`` and ``failover_timeout`` apply from the next alert on (a
        command already running keeps the timeout it started with).  The network key, the
        webhook token, the TLS files and the HTTP and UDP listen addresses are taken at
        start only.
        """
        self.table.changes.burst = config.log_changes
        self._reload_guard(config)
        self.poller.configure(config)
        await self.poller.rescan(refresh=True)
        if self._tg is not None:
            self._tg.start_soon(self._freeze_heap)
        explicit = {w.id for w in config.watches}
        for pair in list(self.table.pairs):
            if pair not in explicit and not self.poller.matches_glob(pair):
                self.poller.unwatch(pair)
        gone = self.beater.configure(config.beats)
        self.config = config
        log.info(
            "configuration reloaded: %d beat(s), %d watched pair(s)%s",
            len(config.beats),
            len(self.table.pairs),
            f"; {len(gone)} beat(s) stopped" if gone else "",
        )
        if gone:
            await self.beater.stop_targets(gone)

    def _reload_guard(self, config: SiteConfig) -> None:
        guard = self.guard
        changed = [
            f"{name} {old:g} s -> {new:g} s"
            for name, old, new in (
                ("hold_down", guard.hold_down, config.failover_hold_down),
                ("failover_timeout", guard.timeout, config.failover_timeout),
            )
            if old != new
        ]
        guard.hold_down = config.failover_hold_down
        guard.timeout = config.failover_timeout
        if changed:
            log.info("failover settings reloaded: %s", ", ".join(changed))

    async def stop(self) -> None:
        """Announce a planned stop on every PVOL (the caller cancels afterwards)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_GRACE):
            await self.beater.stop()


async def run_daemon(site: Site, config_path: str | None = None) -> None:
    """``hbmon run``: serve until SIGTERM/SIGINT, then stop gracefully.

    SIGHUP re-reads ``config_path``; a configuration that does not validate is logged
    and ignored, and the running one stays in force.
    """
    try:
        await _serve_until_signalled(site, config_path)
    except BaseExceptionGroup as group:
        # One failure (a port that cannot be bound, say) reaches the CLI as itself, so it
        # becomes one line and an exit code instead of a traceback of task groups.
        sole = _sole_error(group)
        if isinstance(sole, HbmonError | OSError):
            raise sole from None
        raise


def _sole_error(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


async def _serve_until_signalled(site: Site, config_path: str | None) -> None:
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            await tg.start(site.run)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await _reload(site, config_path)
                    continue
                log.info("%s received: stopping", signal.Signals(signum).name)
                break
        await site.stop()
        tg.cancel_scope.cancel()


async def _reload(site: Site, config_path: str | None) -> None:
    if config_path is None:
        log.warning("SIGHUP: no configuration file to reload")
        return
    try:
        config = await anyio.to_thread.run_sync(load_config, config_path)
        await site.reload(config)
    except HbmonError as err:
        log.error("SIGHUP: new configuration rejected, the running one stays: %s", err)


def threads_left_stuck(wait: float = 0.5) -> int:
    """Worker threads still blocked in I/O (a hung device) after the loop has ended.

    Idle workers exit as soon as the loop ends; each gets ``wait`` seconds to do so.
    """
    workers = [t for t in threading.enumerate() if t.name == "AnyIO worker thread"]
    for t in workers:
        t.join(wait)
    return sum(1 for t in workers if t.is_alive())
