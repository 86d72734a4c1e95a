"""The poller (heartbeat check 101b): reads every watched SVOL each interval.

One scheduler over a timer wheel (not a task per volume, see :mod:`hbmon.wheel`):
volumes of one period due within the same ``COALESCE`` bucket form a
:class:`~hbmon.target.Group`, and the wheel holds the groups.  Each tick takes the
groups that are due, reads their volumes, hands what it cannot read at once to the
:class:`~hbmon.workers.WorkerPool` in batches, and feeds what comes back into the
status table.  A kept-open regular file on a local file system is first read right on
the loop with ``RWF_NOWAIT`` (see :attr:`~hbmon.volume.Volume.nowait`): the kernel
copies the cached page or refuses at once, so nothing waits, and the thread hand-off
(and the GIL hand-offs of eight threads each releasing the GIL for every read) is spared
for the common case.  Anything else --
block devices (O_DIRECT), FUSE and network file systems, a page not in the cache, a
record that does not decode -- goes to the threads, which also name every error.
Block devices are read with O_DIRECT through io_uring where the machine allows it
(:mod:`hbmon.ringreads`: one system call a tick, no thread per read), else on threads;
``hbmon_build_info{io_backend}`` says which, and ``HBMON_IO_BACKEND=threads`` forces
threads.

A volume whose read is still out is not read again; once its read has been out longer
than its ``read_timeout`` the row shows ``io_hung`` and the worker is counted as stuck,
while every other volume keeps its cadence.  That moment has a timer of its own (the
``_deadlines`` wheel: one entry per tick and read timeout, not per read), so a volume
polled every minute still turns ``io_hung`` one tick after ``read_timeout``, not at its
next poll.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import time
import zlib
from bisect import bisect_left as _bisect
from collections import deque
from dataclasses import dataclass, field

import anyio
import anyio.abc
import anyio.to_thread

from hbmon.clock import Clock
from hbmon.config import SiteConfig, Timing, WatchGlobConfig
from hbmon.errors import RecordError
from hbmon.record import RECORD_SIZE
from hbmon.ringreads import RingReads
from hbmon.status import Histogram, HistogramSnapshot, PathRow, StatusTable
from hbmon.target import Group, ReadOutcome, Target, forget, open_file_budget, read_target
from hbmon.verdict import PathState
from hbmon.volume import (
    nowait_refused,
    volume_error,
)
from hbmon.wheel import Wheel
from hbmon.workers import WorkerPool

log = logging.getLogger(__name__)

LAG_SAMPLES = 4096  # recent tick lags kept for /status.json's poll_lag_p99


@dataclass(frozen=True, slots=True)
class PollerStatistics:
    """What the poller tells about itself (read at scrape time, never written to)."""

    io_backend: str = "threads"
    read_duration: HistogramSnapshot = field(default_factory=HistogramSnapshot)
    tick_lag: HistogramSnapshot = field(default_factory=HistogramSnapshot)
    poll_lag: float = 0.0  # how late the latest tick ran
    poll_lag_p99: float = 0.0  # over the last LAG_SAMPLES ticks
    workers_stuck: int = 0
    last_tick: float = 0.0  # monotonic time of the latest tick


CACHED_RUN = 256  # cached reads made back to back before they are judged (128 KiB of buffers)
BATCH = 1024  # reads per worker-thread call (more threads only add GIL hand-offs)
COALESCE = 0.05  # volumes due within 50 ms are read in one batch (<= 20 batches a second)
# A kept-open volume is opened afresh this often by default (config key ``reopen``; at
# once after any error), so that a detached loop device is not pinned by hbmon, and a
# replaced file or a re-pointed /dev/disk/by-id link is followed, even while the old open
# file still reads fine.  Each reopen is a read on a thread; those due in a second go
# in one batch (see _reopen_due).
REOPEN_AFTER = 60.0
# A cached page of a regular file on a local file system is read right on the loop with
# RWF_NOWAIT (see Volume.nowait): the kernel copies it at once or refuses with EAGAIN.
_preadv = os.preadv
_BOUNDS = Histogram.BOUNDS


# What a pattern matched: (its folder's inode, mtime and ctime in ns), the wall time the
# scan began, pair id -> path.
ScanCache = dict[str, tuple[tuple[int, int, int], float, dict[str, str]]]


def scan_globs(
    globs: tuple[WatchGlobConfig, ...], cache: ScanCache | None = None
) -> list[dict[str, str]]:
    """For each pattern, pair id (file stem) -> path of what it matches now (blocking).

    Runs on a thread every ``rescan`` seconds, so kept to string operations: a Path
    object per file at 10,000 volumes held the GIL (and so the poll loop) ~20 ms.  With
    a ``cache``, a pattern with wildcards only in its last part is not expanded again
    while its folder is unchanged: a file created, removed or renamed there changes the
    folder's mtime.  A scan that began within a second of that mtime is not trusted (a
    change in the same clock tick would not show).
    """
    splitext, basename = os.path.splitext, os.path.basename
    out = []
    for g in globs:
        folder = os.path.dirname(g.pattern)
        stamp = None
        if cache is not None and not glob.has_magic(folder):
            try:
                st = os.stat(folder)
            except OSError:
                pass  # glob finds nothing, or names the problem in what it finds
            else:
                stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
                hit = cache.get(g.pattern)
                if hit is not None and hit[0] == stamp and hit[1] - st.st_mtime_ns / 1e9 > 1.0:
                    out.append(hit[2])
                    continue
        began = time.time()
        found = {splitext(basename(p))[0]: p for p in sorted(glob.glob(g.pattern))}
        if cache is not None and stamp is not None:
            cache[g.pattern] = (stamp, began, found)
        out.append(found)
    return out


def _spread(pair: str) -> float:
    """Where in its period (0 to 1) a pair's reads fall: first polls of 10,000 volumes
    spread over one period, first reopens over one reopen period."""
    return (zlib.crc32(pair.encode()) % 1000) / 1000


class Poller:
    """Polls the watched volumes of one site into its status table."""

    def __init__(
        self,
        table: StatusTable,
        clock: Clock,
        *,
        threads: int = 8,
        inline: bool = True,
        ring: bool | None = None,
    ) -> None:
        self.table = table
        self.clock = clock
        self.targets: dict[str, Target] = {}
        # Groups of targets by due time, in buckets of COALESCE seconds; ``_open_groups``
        # finds the group a new target of (period, bucket) joins.
        self._wheel: Wheel[Group] = Wheel(COALESCE)
        self._open_groups: dict[tuple[float, int], Group] = {}
        self._reopens: Wheel[Target] = Wheel(1.0)  # targets by reopen_at
        # The reads a tick sent out, by when they count as hung: (submitted, targets)
        # at submitted + read_timeout (see _check_deadlines).
        self._deadlines: Wheel[tuple[float, list[Target]]] = Wheel(COALESCE)
        self._scans: ScanCache = {}  # touched only by scan_globs, on its thread
        self.pool: WorkerPool[Target, ReadOutcome] = WorkerPool(
            read_target, self._deliver, clock=clock, threads=threads
        )
        self.globs: tuple[WatchGlobConfig, ...] = ()
        self.started = clock.monotonic()
        self._unseen = 0  # targets not read yet since start (start-up progress)
        self.all_read = anyio.Event()  # set whenever every watched volume has been read
        self.open_budget = open_file_budget()
        self._kept_open = 0
        self.reopen_after = REOPEN_AFTER
        self.inline = inline  # try RWF_NOWAIT reads on the loop first
        self.inline_reads = 0  # reads served that way (the rest went to threads)
        # _read_cached's buffers: for each of a run of reads, ([view], view, its first
        # 124 bytes, what the checksum covers)
        space = memoryview(bytearray(RECORD_SIZE * CACHED_RUN))
        self._slots = [
            ([view], view, view[: RECORD_SIZE - 4])
            for view in (space[i : i + RECORD_SIZE] for i in range(0, len(space), RECORD_SIZE))
        ]
        if ring is None:
            ring = os.environ.get("HBMON_IO_BACKEND", "auto") != "threads"
        self.ring = RingReads.create() if ring else None
        self.io_backend = "io_uring" if self.ring is not None else "threads"
        # what this poller tells about itself (see statistics())
        self.read_duration = Histogram()
        self.poll_lag = 0.0
        self.lag_samples: deque[float] = deque(maxlen=LAG_SAMPLES)  # recent tick lags
        self.lag_histogram = Histogram()  # every tick's lag, for quantiles over any window
        self.workers_stuck = 0
        self.last_tick = self.started
        self._tg: anyio.abc.TaskGroup | None = None

    def statistics(self) -> PollerStatistics:
        samples = sorted(self.lag_samples)
        p99 = samples[min(len(samples) - 1, int(0.99 * len(samples)))] if samples else 0.0
        return PollerStatistics(
            io_backend=self.io_backend,
            read_duration=self.read_duration.snapshot(),
            tick_lag=self.lag_histogram.snapshot(),
            poll_lag=self.poll_lag,
            poll_lag_p99=p99,
            workers_stuck=self.workers_stuck,
            last_tick=self.last_tick,
        )

    # -- what to watch ------------------------------------------------------------

    def configure(self, config: SiteConfig) -> None:
        """Watch what ``config`` lists (glob patterns are expanded by :meth:`rescan`)."""
        self.reopen_after = config.reopen
        for w in config.watches:
            self.watch(
                w.id,
                str(w.volume) if w.volume is not None and w.method != "network" else None,
                w.slot,
                w.method,
                w.timing,
                w.failover,
                w.failover_single_path,
                w.failover_without_arbiter,
            )
        self.globs = config.watch_globs

    def watch(
        self,
        pair: str,
        path: str | None,
        slot: int,
        method: str,
        timing: Timing,
        failover: tuple[str, ...] = (),
        failover_single_path: bool = False,
        failover_without_arbiter: bool = False,
    ) -> None:
        existing = self.targets.get(pair)
        if existing is not None and (
            (existing.path, existing.slot) != (path, slot) or method == "network"
        ):
            self._drop_target(pair)
            existing = None
        self.table.add_pair(
            pair,
            method,
            timing,
            volume=path,
            slot=slot,
            failover=failover,
            failover_single_path=failover_single_path,
            failover_without_arbiter=failover_without_arbiter,
        )
        if method == "network":
            return
        assert path is not None, f"{pair}: method {method!r} needs a volume"
        if existing is not None:
            existing.read_timeout = timing.read_timeout
            existing.row = self.table.row(pair, "volume")
            if existing.period != timing.interval:  # on to a group of the new period
                self._leave(existing)
                existing.period = timing.interval
                self._join(existing, self.clock.monotonic() + _spread(pair) * timing.interval)
            return
        target = Target(pair, path, slot, timing.interval, timing.read_timeout)
        target.row = self.table.row(pair, "volume")
        target.keep_open = self._kept_open < self.open_budget
        self._kept_open += target.keep_open
        self.targets[pair] = target
        if not self._unseen and self.all_read.is_set():
            self.all_read = anyio.Event()
        self._unseen += 1
        # Spread first polls over one period so 10,000 volumes do not all fall due at once,
        # and first reopens over one REOPEN_AFTER, so they come a few a tick, not all at once.
        spread, now = _spread(pair), self.clock.monotonic()
        target.reopen_at = now + self.reopen_after * (1 + spread)
        self._reopens.push(target.reopen_at, target)
        self._join(target, now + spread * timing.interval)

    def unwatch(self, pair: str) -> None:
        self._drop_target(pair)
        self.table.remove_pair(pair)

    def _drop_target(self, pair: str) -> None:
        target = self.targets.pop(pair, None)
        if target is not None:
            target.active = False
            self._leave(target)
            if not target.seen:
                self._unseen -= 1
                if not self._unseen:
                    self.all_read.set()
            self._kept_open -= target.keep_open
            if not target.inflight:
                forget(target)

    def matches_glob(self, pair: str) -> bool:
        target = self.targets.get(pair)
        return target is not None and any(
            fnmatch.fnmatch(target.path, g.pattern) for g in self.globs
        )

    async def rescan(self, *, refresh: bool = False) -> None:
        """Expand the ``[[watch_glob]]`` patterns (on a thread) and watch what they match.

        Volumes already watched are left alone unless ``refresh`` (after a reload, when
        their settings may have changed): a rescan of 10,000 volumes must not hold the
        poll loop.
        """
        globs = self.globs
        found = await anyio.to_thread.run_sync(scan_globs, globs, self._scans)
        self.apply_scan(globs, found, refresh=refresh)

    def apply_scan(
        self,
        globs: tuple[WatchGlobConfig, ...],
        found: list[dict[str, str]],
        *,
        refresh: bool = True,
    ) -> None:
        for g, matches in zip(globs, found, strict=True):
            targets, pairs = self.targets, self.table.pairs
            if refresh:
                chosen = [(p, v) for p, v in matches.items() if p in targets or p not in pairs]
            else:  # (an explicit [[watch]] of the same id wins)
                chosen = [(p, v) for p, v in matches.items() if p not in targets and p not in pairs]
            # New ones in the order they are read in: each group's targets, rows and buffers
            # are then allocated side by side, and a tick reads through memory in order.
            chosen.sort(key=lambda m: _spread(m[0]))
            for pair, path in chosen:
                current = targets.get(pair)
                if current is None or current.path == path:
                    self.watch(
                        pair,
                        path,
                        g.slot,
                        g.method,
                        g.timing,
                        g.failover,
                        g.failover_single_path,
                        g.failover_without_arbiter,
                    )
            paths = set(matches.values())
            gone = [(p, t) for p, t in self.targets.items() if t.path not in paths]
            for pair, target in gone:  # (usually none: a rescan of 10,000 stays cheap)
                row = target.row
                if (
                    fnmatch.fnmatch(target.path, g.pattern)
                    and row is not None
                    and row.state == "retired"
                ):
                    log.info(
                        "pair %s: retired volume %s is gone, no longer watched", pair, target.path
                    )
                    self.unwatch(pair)

    def _join(self, target: Target, due: float) -> None:
        """Schedule ``target``'s next read at ``due``, with the group of its period that
        falls due in the same bucket (a new one if there is none)."""
        where = (target.period, self._wheel.key(due))
        group = self._open_groups.get(where)
        if group is None:
            group = self._open_groups[where] = Group(target.period, due)
            self._wheel.push(due, group)
        elif due < group.due:
            group.due = due  # (same bucket: the wheel entry stands)
        group.members.append(target)
        target.group = group

    def _leave(self, target: Target) -> None:
        """Take ``target`` out of its group (it is dropped from the member list when the
        group next falls due)."""
        if target.group is not None:
            target.group.dropped += 1
            target.group = None

    def _reschedule(self, group: Group, now: float) -> None:
        """After a group's reads: due again one period on, in the same phase (whole
        periods later if the loop was held up, so groups do not bunch up after a stall)."""
        period, due = group.period, group.due
        following = due + period
        if following <= now:
            following += period * ((now - following) // period + 1)
        key = self._wheel.key(due)
        if self._open_groups.get((period, key)) is group:
            del self._open_groups[(period, key)]
        if group.dropped:
            group.members = [t for t in group.members if t.group is group]
            group.dropped = 0
            if not group.members:
                return
        group.due = following
        where = (period, self._wheel.push(following, group))
        self._open_groups.setdefault(where, group)

    # -- the loop -------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if self.ring is not None:
                tg.start_soon(self.ring.run, self._ring_result)
            if self.globs:
                await self.rescan()
            tg.start_soon(self._rescan_loop)
            if not self._unseen:
                self.all_read.set()  # nothing to read
            task_status.started()
            clock = self.clock
            while True:
                self._tick(tg)
                await clock.sleep_until(self._wake_at())

    def _tick(self, tg: anyio.abc.TaskGroup) -> None:
        self.pool.harvest()
        now = self.clock.monotonic()
        self.last_tick = now
        take, reschedule = self._wheel.take, self._reschedule
        cached: list[Target] = []  # read right here (see _read_cached)
        batch: list[Target] = []  # for the worker threads
        direct: list[Target] = []  # block devices, for the ring
        ring, inline = self.ring, self.inline
        lag: float | None = None  # how late the latest group taken ran (None: none taken)
        self._check_deadlines(now)
        # A bucket is taken once it has begun: its reads run at most COALESCE early.
        while (taken := take(now)) is not None:
            for group in taken[1]:
                if lag is None or now - group.due > lag:
                    lag = now - group.due
                members = group.members
                reschedule(group, now)
                for target in members:
                    if target.group is not group:
                        continue  # it left the group (unwatched, or a new period)
                    if target.inflight:
                        if not target.hung and now - target.submitted > target.read_timeout:
                            self._mark_hung(target, now)
                        continue
                    vol = None if target.reopen else target.volume  # (reopen: a thread)
                    if inline and vol is not None and vol.nowait and target.seen:
                        cached.append(target)
                        continue
                    target.inflight, target.submitted = True, now
                    if ring is not None and vol is not None and vol.is_block and target.seen:
                        direct.append(target)
                    else:
                        batch.append(target)
        self._reopen_due(now, batch)
        if cached:
            wall = self.clock.wall()
            for i in range(0, len(cached), CACHED_RUN):
                self._read_cached(cached[i : i + CACHED_RUN], now, wall, batch)
        if lag is not None:  # a tick taken early (COALESCE) ran on time: lag 0
            self.poll_lag = max(lag, 0.0)
            self.lag_samples.append(self.poll_lag)
            self.lag_histogram.observe(self.poll_lag)
        self.workers_stuck = sum(
            1 for t in self.pool.stuck(0.0) if now - t.submitted > t.read_timeout
        )
        if batch or direct:
            self._watch_deadlines(now, batch, direct)
        if direct:
            assert ring is not None
            batch += ring.submit(direct)  # what the ring has no room for goes to threads
        for i in range(0, len(batch), BATCH):
            tg.start_soon(self.pool.run, batch[i : i + BATCH])

    def _watch_deadlines(self, now: float, *sent: list[Target]) -> None:
        """Remember when the reads sent out at ``now`` count as hung.  The entry's bucket
        begins after the deadline (by at most COALESCE): taken then, a read still out is
        past its ``read_timeout``."""
        by_timeout: dict[float, list[Target]] = {}
        for targets in sent:
            for target in targets:
                by_timeout.setdefault(target.read_timeout, []).append(target)
        for timeout, targets in by_timeout.items():
            self._deadlines.push(now + timeout + COALESCE, (now, targets))

    def _check_deadlines(self, now: float) -> None:
        """Reads sent out a ``read_timeout`` ago and still out: their rows turn ``io_hung``
        now, whenever their volume is next due."""
        later: list[tuple[float, float, list[Target]]] = []
        while (taken := self._deadlines.take(now)) is not None:
            for submitted, targets in taken[1]:
                waiting = []
                for target in targets:
                    if not (
                        target.inflight
                        and not target.hung
                        and target.active
                        and target.submitted == submitted
                    ):
                        continue  # returned (or sent out again since)
                    if now - submitted > target.read_timeout:
                        self._mark_hung(target, now)
                    else:  # (a longer read_timeout since a reload, or rounding)
                        waiting.append(target)
                if waiting:
                    due = max(submitted + waiting[0].read_timeout, now) + COALESCE
                    later.append((due, submitted, waiting))
        for due, submitted, waiting in later:  # (after: a bucket begun is not taken twice)
            self._deadlines.push(due, (submitted, waiting))

    def _reopen_due(self, now: float, batch: list[Target]) -> None:
        """Volumes kept open for a reopen period are read once on a thread, opened
        afresh (see REOPEN_AFTER).  Taken once a second from their own wheel, so they go
        to the threads in one batch a second, not a few in every tick; a volume whose
        read is still out is reopened by its next read (the flag sends it to a thread)."""
        reopens, later = self._reopens, []
        while (taken := reopens.take(now)) is not None:
            for target in taken[1]:
                if not target.active:
                    continue
                if target.volume is not None:  # (else its next read opens it anyway)
                    target.reopen = True
                    if not target.inflight:
                        target.inflight, target.submitted = True, now
                        batch.append(target)
                target.reopen_at = now + self.reopen_after
                later.append(target)
        for target in later:  # (after: a bucket begun is not taken twice)
            reopens.push(target.reopen_at, target)

    def _read_cached(
        self, targets: list[Target], now: float, wall: float, batch: list[Target]
    ) -> None:
        """Read ``targets`` (kept-open regular files on local file systems) right here.

        With ``RWF_NOWAIT`` the kernel copies a cached page at once or refuses; what it
        refuses, and whatever is not a record of the pair, goes on ``batch`` for the
        threads, which read it again and name what it is.  The reads are made back to
        back and judged after: system calls in a row run warm, where each one between
        two rows' bookkeeping cost twice as much.  This is the poller's hot path (10,000
        reads a second), so it calls nothing it need not.
        """
        perf, preadv, nowait = time.perf_counter, _preadv, os.RWF_NOWAIT
        slots, size = self._slots, RECORD_SIZE
        sizes: list[int] = []
        stamps = [perf()]  # each read took from the stamp before it to its own
        for target, (buffers, _, _) in zip(targets, slots, strict=False):
            vol = target.volume
            assert vol is not None
            try:
                sizes.append(preadv(vol.fd, buffers, target.offset, nowait))
            except OSError as err:
                sizes.append(nowait_refused(vol, err))  # not cached, say
            stamps.append(perf())
        durations = self.read_duration
        counts, bounds, first_bound = durations.counts, _BOUNDS, _BOUNDS[0]
        reads, fast, fastest, total = 0, 0, 0, 0.0
        for target, n, start, end, (_, data, head) in zip(
            targets, sizes, stamps, stamps[1:], slots, strict=False
        ):
            seconds = end - start
            if n == size:
                row = target.row
                fields = target.decoder.active(data, head)
                if fields is not None and row is not None and row.observe_next(*fields, now, wall):
                    # The next beat of a healthy row (or the same one again): that is all.
                    if seconds <= first_bound:
                        fastest += 1  # (most reads: counted once for the run)
                    else:
                        counts[_bisect(bounds, seconds)] += 1
                    if seconds >= 0.001 or row.slowest_read >= 0.001:
                        row.observe_latency(seconds)
                    target.hung = False
                    fast += 1
                    total += seconds
                    continue
                if self._take(target, data, head, seconds, now, wall):
                    reads += 1  # (another record of the pair: judged and counted by _take)
                    continue
            target.inflight, target.submitted = True, now
            batch.append(target)
        counts[0] += fastest
        durations.total += total
        durations.n += fast
        self.inline_reads += reads + fast

    def _ring_result(
        self, target: Target, data: memoryview | None, error: int, duration: float
    ) -> None:
        """A read through the ring is done: judge it like an inline read."""
        now, wall = self.clock.monotonic(), self.clock.wall()
        if data is None:
            forget(target)  # reopened (on a thread) by the next read
            err = volume_error(target.path, OSError(error, os.strerror(error)))
            self._deliver(target, ReadOutcome("io_error", None, err.reason, err.problem, duration))
            return
        if not self._take(target, data, data[: RECORD_SIZE - 4], duration, now, wall):
            # Not a plain next beat: read it again on a thread, which names what it is.
            if self._tg is not None:
                self._tg.start_soon(self.pool.run, [target])

    def _take(
        self,
        target: Target,
        data: bytearray | memoryview,
        head: memoryview,
        duration: float,
        now: float,
        wall: float,
    ) -> bool:
        """Judge what a read found, if it is a valid record of the pair; False if not
        (the caller then has a thread read it again, which names what is wrong)."""
        if len(data) < RECORD_SIZE:
            return False
        row = target.row
        fields = target.decoder.active(data, head)
        if fields is not None and row is not None and target.active:
            target.inflight = False
            incarnation, serial, writer_time, interval = fields
            if row.observe_next(incarnation, serial, writer_time, interval, now, wall):
                self._read_done(target, row, duration)
                return True
        try:
            record = target.decoder(bytes(data))
        except RecordError:
            return False
        self._deliver(target, ReadOutcome("record", record, "", "", duration))
        return True

    def _read_done(self, target: Target, row: PathRow, duration: float) -> None:
        """The bookkeeping of a read that found the next beat (the row took it)."""
        self.read_duration.observe(duration)
        row.observe_latency(duration)
        target.hung = False

    def _wake_at(self) -> float:
        """When the loop ticks next (a reading of the clock it sleeps on)."""
        now = self.clock.monotonic()
        first = self._wheel.first()
        deadline = self._deadlines.first()
        if deadline is not None and (first is None or deadline < first):
            first = deadline
        wait = 1.0 if first is None else first - now
        if self.pool.detached:
            wait = min(wait, 0.05)  # harvest late results promptly
        return now + min(max(wait, 0.0), 1.0)

    async def _rescan_loop(self) -> None:
        clock = self.clock
        while True:
            await clock.sleep_until(
                clock.monotonic() + min((g.rescan for g in self.globs), default=10.0)
            )
            if self.globs:
                await self.rescan()

    # -- results --------------------------------------------------------------------

    def _mark_hung(self, target: Target, now: float) -> None:
        target.hung = True
        row = self.table.row(target.pair, "volume")
        if row is None:
            return
        waited = now - target.submitted
        row.observe_problem("io_hung", "io_hung", f"read has not returned for {waited:.1f} s", now)
        self.table.touch(row, now)

    def _deliver(self, target: Target, out: ReadOutcome) -> None:
        target.inflight = False
        row, record = target.row, out.record
        if record is not None and row is not None and target.seen and target.active:
            now = self.clock.monotonic()
            if row.observe_next_beat(record, now, self.clock.wall()):
                self._read_done(target, row, out.duration)
                return
        if not target.active:
            forget(target)
            return
        target.hung = False
        if not target.seen:
            target.seen = True
            self._unseen -= 1
            if not self._unseen:
                self.all_read.set()
                log.info(
                    "all %d watched volume(s) read %.2f s after start",
                    len(self.targets),
                    self.clock.monotonic() - self.started,
                )
        row = target.row
        if row is None or row.timer < 0:  # the pair was removed meanwhile
            return
        now = self.clock.monotonic()
        self.read_duration.observe(out.duration)
        row.observe_latency(out.duration)
        if out.record is not None:
            seen = row.observe_record(out.record, now, self.clock.wall())
            if seen in ("regression", "undead"):
                log.warning("pair %s: %s", target.pair, row.note)
        elif out.kind == "zeroed":
            row.observe_zeroed(now)
        else:
            problem: PathState = "invalid" if out.kind == "invalid" else "io_error"
            row.observe_problem(problem, out.reason, out.detail, now)
        self.table.touch(row, now)  # logs a change of state
