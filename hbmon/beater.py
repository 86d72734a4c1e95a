"""The beater (heartbeat check 101a): writes this site's heartbeat records to its PVOLs.

Every ``[[beat]]`` gets a new record each interval: the same random incarnation for the
life of the process, the serial one higher each time.  The first write to a volume
claims the slot: a missing regular file is created and a zeroed slot is taken, but a
slot holding another pair's record or foreign data is never overwritten; the beat keeps
reporting ``slot_taken`` instead.  Write errors are counted and retried at the next
interval, never fatal.  :meth:`Beater.stop` writes a ``stopping`` record so that readers
show ``stopped`` rather than a death.
"""

from __future__ import annotations

import heapq
import logging
import math
import secrets
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc

from hbmon.clock import Clock
from hbmon.config import BeatConfig
from hbmon.errors import SlotTakenError, VolumeError
from hbmon.netbeat import BEAT, NetSender, resolve_peers
from hbmon.record import Record, State
from hbmon.status import StatusTable, WriterStats
from hbmon.volume import Volume, claim_slot, open_volume, sync_files, write_slot
from hbmon.workers import WorkerPool

log = logging.getLogger(__name__)

# Beats due within 50 ms are written in one batch (one thread hand-off): at 1,000 beats a
# second, 20 hand-offs instead of 100 (each costs ~50-100 us of CPU).  A beat is written
# at most 50 ms early, never late; readers allow for it (status.POLL_JITTER).
COALESCE = 0.05


def new_incarnation() -> int:
    """A random, non-zero 64-bit incarnation for one writer start."""
    return secrets.randbits(64) or 1


@dataclass(eq=False, slots=True)
class BeatTarget:
    config: BeatConfig
    stats: WriterStats
    volume: Volume | None = None
    claimed: bool = False
    peers: list[tuple[str, int]] = field(default_factory=list)
    inflight: bool = False
    submitted: float = 0.0
    hung: bool = False
    paused: bool = False  # no beats on either path (stop, lab fault injection)
    removed: bool = False
    record: Record | None = None  # the record being written


@dataclass(slots=True)
class WriteOutcome:
    reason: str  # "" when written
    detail: str = ""


def write_beat(target: BeatTarget) -> WriteOutcome:
    """Claim the slot if needed and write ``target.record``.  Worker thread; never raises."""
    cfg, record = target.config, target.record
    assert record is not None
    assert cfg.volume is not None
    try:
        if target.volume is None:
            target.volume = open_volume(str(cfg.volume), write=True, create=True)
        if not target.claimed:
            claim_slot(target.volume, cfg.slot, cfg.id)
            target.claimed = True
        # Files are synced once per group by write_group(); block devices are O_DSYNC.
        write_slot(target.volume, cfg.slot, record.encode_block(target.volume.io_size), sync=False)
    except SlotTakenError as err:
        return WriteOutcome(err.reason, err.problem)
    except (VolumeError, OSError) as err:
        if target.volume is not None:
            target.volume.close()
        target.volume, target.claimed = None, False
        reason = err.reason if isinstance(err, VolumeError) else "io_error"
        return WriteOutcome(reason, str(err))
    return WriteOutcome("")


Group = tuple[BeatTarget, ...]  # the beats of one batch that go to one volume path


def write_group(group: Group) -> list[WriteOutcome]:
    """Write the beats of one volume and make them durable with one fdatasync (worker
    thread; never raises).  One job per volume: a volume whose write or sync hangs stalls
    its own job only, which the pool detaches; other volumes' beats are not held back."""
    outs = [write_beat(target) for target in group]
    written = [t.volume for t, out in zip(group, outs, strict=True) if not out.reason and t.volume]
    failed = sync_files(written)
    if failed:
        for i, target in enumerate(group):
            err = failed.get(id(target.volume))
            if err is not None and not outs[i].reason:
                outs[i] = WriteOutcome(err.reason, f"fdatasync: {err}")
    return outs


def by_volume(targets: list[BeatTarget]) -> list[Group]:
    """``targets`` grouped by volume path, in first-seen order."""
    groups: dict[str, list[BeatTarget]] = {}
    for target in targets:
        groups.setdefault(str(target.config.volume), []).append(target)
    return [tuple(g) for g in groups.values()]


class Beater:
    """Writes (and sends) the heartbeats of every ``[[beat]]`` of a site.

    Each interval a beat gets a new record: it goes to the network peers at once and to
    the PVOL through the worker pool (a beat without a volume goes to its peers only).
    The two paths are independent: a hung PVOL write does not stop the network beats
    (the watcher then says ``link_down``, not ``host_down``).
    """

    def __init__(
        self,
        table: StatusTable,
        clock: Clock,
        beats: tuple[BeatConfig, ...],
        *,
        threads: int = 4,
        write_timeout: float = 2.0,
        sender: NetSender | None = None,
        on_written: Callable[[str], None] | None = None,
        owned: Callable[[str, float], bool] | None = None,
    ) -> None:
        self.table = table
        # Asked before every beat (with an arbiter): may this site still serve the pair?
        # When not, the record says ``standby`` instead of ``active``.
        self.owned = owned
        self.clock = clock
        self.write_timeout = write_timeout
        self.sender = sender
        self.on_written = on_written
        self.targets: dict[str, BeatTarget] = {}
        self.stopping = False
        self._drained: anyio.Event | None = None
        self._inflight = 0  # targets with a write in flight (no scan of 10,000 per write)
        self._heap: list[tuple[float, int, BeatTarget]] = []
        self._seq = 0
        self._wake = anyio.Event()
        self.pool: WorkerPool[Group, list[WriteOutcome]] = WorkerPool(
            write_group, self._deliver_group, clock=clock, threads=threads
        )
        self.configure(beats)

    def configure(self, beats: tuple[BeatConfig, ...]) -> list[BeatTarget]:
        """Beat for ``beats``; a beat whose id, volume and slot are unchanged keeps its
        incarnation and serial.  Returns the targets no longer configured."""
        wanted = {cfg.id: cfg for cfg in beats}
        gone = []
        for pair, target in list(self.targets.items()):
            cfg = wanted.get(pair)
            if cfg is None or (cfg.volume, cfg.slot) != (target.config.volume, target.config.slot):
                target.removed = True
                gone.append(self.targets.pop(pair))
                self.table.writers.pop(pair, None)
        now = self.clock.monotonic()
        for cfg in beats:
            peers = resolve_peers(cfg.peers) if self.sender is not None else []
            existing = self.targets.get(cfg.id)
            if existing is not None:
                existing.config, existing.peers = cfg, peers
                continue
            volume = str(cfg.volume) if cfg.volume is not None else None
            stats = WriterStats(cfg.id, volume, cfg.slot, new_incarnation())
            self.table.writers[cfg.id] = stats
            fresh = self.targets[cfg.id] = BeatTarget(cfg, stats, peers=peers)
            self._seq += 1
            # Spread first beats over one interval: 1,000 datagrams in one burst overflow
            # a peer's receive buffer, and 1,000 writes in one batch wait on one thread.
            phase = (zlib.crc32(cfg.id.encode()) % 1000) / 1000 * cfg.interval
            heapq.heappush(self._heap, (now + phase, self._seq, fresh))
        self._wake.set()
        return gone

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        heap = self._heap
        self._keep_phases(self.clock.monotonic())  # (configured long before: claims first)
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                self.pool.harvest()
                now = self.clock.monotonic()
                batch = []
                later = []  # pushed back after the loop: each beat is taken once a tick
                while heap and heap[0][0] <= now + COALESCE:
                    due, seq, target = heapq.heappop(heap)
                    if target.removed:
                        continue
                    if due > now + target.config.interval / 4:  # a short interval: not yet
                        later.append((due, seq, target))
                        continue
                    if not target.paused and not self.stopping:
                        owned = self.owned is None or self.owned(target.config.id, now)
                        record = self._next_record(target, State.ACTIVE if owned else State.STANDBY)
                        self._send(target, BEAT, record)
                        if target.config.volume is None:
                            pass  # (network beats only: sent above)
                        elif target.inflight:
                            if not target.hung:
                                self._check_hung(target, now)
                        else:
                            batch.append(self._submit(target, record))
                    later.append((_next_due(due, target.config.interval, now), seq, target))
                for entry in later:
                    heapq.heappush(heap, entry)
                if batch:
                    tg.start_soon(self.pool.run, by_volume(batch))
                now = self.clock.monotonic()
                until = heap[0][0] if heap else now + 1.0
                if self.pool.detached:
                    until = min(until, now + 0.05)
                self._wake = anyio.Event()
                await self.clock.sleep_until(until, self._wake)

    def _keep_phases(self, now: float) -> None:
        """Move beats due over an interval before ``now`` to their next due time in their
        own phase: a site that starts beating well after it was configured (its arbiter's
        start claims took seconds) spreads its first beats over the interval, not all in
        one burst (at 10,000 pairs, 10,000 datagrams at once)."""
        heap = self._heap
        for n, (due, seq, target) in enumerate(heap):
            interval = target.config.interval
            if due < now - interval:  # (late by less: its first beat is on its way)
                heap[n] = (_next_due(due - interval, interval, now), seq, target)
        heapq.heapify(heap)

    def _next_record(self, target: BeatTarget, state: State) -> Record:
        stats = target.stats
        stats.serial += 1
        return Record(
            pair_id=target.config.id,
            incarnation=stats.incarnation,
            serial=stats.serial,
            writer_time=self.clock.wall(),
            interval=target.config.interval,
            state=state,
        )

    def _submit(self, target: BeatTarget, record: Record) -> BeatTarget:
        target.record = record
        self._inflight += not target.inflight
        target.inflight, target.submitted = True, self.clock.monotonic()
        return target

    def _send(self, target: BeatTarget, kind: int, record: Record) -> None:
        if self.sender is None or not target.peers:
            return
        errors = self.sender.send(kind, record, target.peers)
        stats = target.stats
        if errors:
            stats.errors["net_send"] += 1
            if stats.last_error != errors[0]:
                log.warning("beat %s: network beat not sent: %s", stats.pair, "; ".join(errors))
                stats.last_error = errors[0]
        else:
            stats.sent += 1

    def pause(self, pair: str) -> None:
        """No more beats for ``pair`` on either path, and no stopping record (the lab's
        killed or frozen host)."""
        self.targets[pair].paused = True

    def resume(self, pair: str, *, new_incarnation_: bool = False) -> None:
        """Beat again: as the same writer (a frozen host thawed) or as a new one (a
        restarted host)."""
        target = self.targets[pair]
        if new_incarnation_:
            target.stats.incarnation, target.stats.serial = new_incarnation(), 0
        target.paused = False

    def _check_hung(self, target: BeatTarget, now: float) -> None:
        waited = now - target.submitted
        if waited > self.write_timeout:
            target.hung = True
            target.stats.errors["io_hung"] += 1
            target.stats.last_error = f"write to {target.stats.volume} stuck for {waited:.1f} s"
            log.error("beat %s: %s", target.stats.pair, target.stats.last_error)

    def _deliver_group(self, group: Group, outs: list[WriteOutcome]) -> None:
        for target, out in zip(group, outs, strict=True):
            self._deliver(target, out)

    def _deliver(self, target: BeatTarget, out: WriteOutcome) -> None:
        self._inflight -= target.inflight
        target.inflight = target.hung = False
        if self._drained is not None and not self._inflight:
            self._drained.set()
        stats = target.stats
        if not out.reason:
            if self.on_written is not None:
                self.on_written(stats.pair)
            stats.written += 1
            stats.last_write = self.clock.monotonic()
            if stats.last_error:
                log.info("beat %s: writing again to %s", stats.pair, stats.volume)
                stats.last_error = ""
            return
        stats.errors[out.reason] += 1
        if out.detail != stats.last_error:
            log.error(
                "beat %s: %s (not fatal: retried every %g s)",
                stats.pair,
                out.detail,
                target.config.interval,
            )
            stats.last_error = out.detail

    async def stop(self) -> None:
        """Stop beating and write a ``stopping`` record for every beat.

        Writes still in flight are waited for first, so the stopping record is the last
        one written; the whole stop is bounded by ``write_timeout``.
        """
        self.stopping = True
        await self.stop_targets(list(self.targets.values()))

    async def stop_targets(self, targets: list[BeatTarget]) -> None:
        """Write (and send) a ``stopping`` record for each of ``targets``."""
        for target in targets:
            target.paused = True
        with anyio.move_on_after(self.write_timeout) as scope:
            if any(t.inflight for t in targets):
                self._drained = anyio.Event()
                try:
                    with anyio.move_on_after(self.pool.stall_after * 2):
                        await self._drained.wait()
                finally:
                    self._drained = None
            batch = []
            for target in targets:
                record = self._next_record(target, State.STOPPING)
                self._send(target, BEAT, record)
                if not target.inflight and target.config.volume is not None:
                    batch.append(self._submit(target, record))
            if batch:
                await self.pool.run(by_volume(batch))
        if scope.cancelled_caught:
            log.warning("stopping records not all written within %.1f s", self.write_timeout)
        elif targets:
            log.info("wrote stopping records for %d beat(s)", len(targets))

    def close(self) -> None:
        for target in self.targets.values():
            if target.volume is not None and not target.inflight:
                target.volume.close()
                target.volume = None


def _next_due(due: float, interval: float, now: float) -> float:
    """The beat after one due at ``due``: an interval later, or, fallen behind (a stall),
    the first time after ``now`` in the same phase."""
    following = due + interval
    if following <= now:
        following += (math.floor((now - following) / interval) + 1) * interval
    return following
