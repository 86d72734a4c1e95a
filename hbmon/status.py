"""The heartbeat status table: one row per pair and path, judged on an injected clock.

This is the one source of truth: metrics, ``/status.json``, the CLI and (later) the
failover guard all read it.  Freshness is the reader's monotonic time since the serial
or incarnation last changed (DESIGN.md principle 1); the writer's wall clock is kept for
skew diagnosis only.

Rules (documented for operators in docs/metrics.md):

* The first record a row sees is a baseline, not a beat: its age is unknown.  A beat is a
  change of serial (same incarnation) or a new incarnation.
* ``missed`` for the current gap is ``floor((age - poll_period) / interval)``: beats due
  more than one poll period ago that have not been seen.  ``late`` means at least one.
* ``stale`` when the age reaches ``miss_threshold * interval``.
* A row that has never seen a beat is ``awaiting`` during the start-up grace period and
  ``stale`` after it, unless the record is an install record (serial 0), which waits for
  its first beat for as long as it takes.
* A pair announced over the network (activation) or installed by ``hbmon volume
  init`` waits in ``awaiting`` for its first beat without a time limit.
* After any failure state (stale, invalid, io_error, io_hung) the row keeps showing it
  until ``recover_beats`` new beats have arrived (hysteresis).
* A writer that beats again with the *same* incarnation after its row was declared
  ``stale`` is flagged ``undead`` (a frozen host that resumed, perhaps after its pair
  failed over) until a new incarnation appears; an incarnation that had been replaced
  writing again is counted as ``undead_writer`` and not taken as a beat.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from hbmon.changes import ChangeLog
from hbmon.clock import Clock
from hbmon.config import Timing
from hbmon.row import FAILED, PATHS, SEVERITY, STATES, PathRow
from hbmon.verdict import FRESH, OwnerState, Verdict, single_path_note, verdict
from hbmon.wheel import Wheel

__all__ = [
    "FAILED",
    "FRESH",
    "PATHS",
    "SEVERITY",
    "STATES",
    "Histogram",
    "HistogramSnapshot",
    "Pair",
    "PathRow",
    "StatusTable",
    "WriterStats",
]

log = logging.getLogger(__name__)

_AHEAD_MATTERS = frozenset({"degraded", "network_partition", "link_down"})
TIMER_GRAIN = 0.01  # row timers are kept in buckets this wide (fired at most this late)
POLL_JITTER = 0.1  # seconds a volume read may land off its period (see poller.COALESCE)


@dataclass(slots=True)
class Pair:
    """A watched pair: identity and policy from configuration, rows per path."""

    id: str
    method: str
    timing: Timing
    volume: str | None = None
    slot: int = 0
    failover: tuple[str, ...] = ()
    failover_single_path: bool = False
    failover_without_arbiter: bool = False
    rows: dict[str, PathRow] = field(default_factory=dict)
    verdict: Verdict = "unknown"
    changes: ChangeLog | None = None  # the table's bounded log of changes
    owner: Callable[[str], OwnerState] | None = None  # the arbiter's word (None: no arbiter)

    def judge(self, now: float) -> Verdict:
        """Evaluate every path at ``now`` and derive the verdict (changes are logged)."""
        for row in self.rows.values():
            row.evaluate(now)
        return self.rejudge(now)

    def derive(self, now: float) -> Verdict:
        """The verdict the paths' current states give (nothing is changed or logged)."""
        owner = None if self.owner is None else self.owner(self.id)
        return verdict({p: r.state for p, r in self.rows.items()}, self.ahead(now), owner)

    def rejudge(self, now: float) -> Verdict:
        """Derive the verdict from the paths' current states (changes are logged)."""
        before = self.verdict
        self.verdict = self.derive(now)
        if self.verdict != before:
            note = self.verdict_note
            args = (self.id, before, self.verdict, f" ({note})" * bool(note))
            extra = {
                "event": "verdict",
                "pair": self.id,
                "path": ",".join(self.rows),
                "state": ",".join(r.state for r in self.rows.values()),
                "verdict": self.verdict,
                "previous_verdict": before,
                "note": note,
            }
            if self.changes is None:
                log.info("pair %s: verdict %s -> %s%s", *args, extra=extra)
            else:
                kind = f"verdict {before} -> {self.verdict}"
                self.changes.change(now, kind, "pair %s: verdict %s -> %s%s", *args, extra=extra)
        return self.verdict

    def ahead(self, now: float) -> set[str]:
        """The path that shows the host alive while the other one has had time to show
        the same and did not: the evidence a partition or a broken link needs.

        A path is ahead when its current run of beats began, and its newest beat came,
        at least one poll period plus one interval after the other path's newest beat.
        So a dying host (the network goes quiet a moment before the mirrored volume) is
        not a partition, and a restarted host (its network beats come back a moment
        before the volume shows them) is not a broken link.
        """
        vol, net = self.rows.get("volume"), self.rows.get("network")
        if vol is None or net is None:
            return set()
        for path, this, other in (("volume", vol, net), ("network", net, vol)):
            if this.last_change is None or this.fresh_since is None:
                continue
            slack = other.poll_period + other.timing.interval
            if this.fresh_since + slack <= now and (
                other.last_change is None or other.last_change + slack <= this.last_change
            ):
                return {path}
        return set()

    @property
    def verdict_note(self) -> str:
        return single_path_note(self.method, self.verdict)


@dataclass(slots=True)
class WriterStats:
    """Writer side (heartbeat check 101a) of one beating pair."""

    pair: str
    volume: str | None  # None: network beats only
    slot: int
    incarnation: int
    serial: int = 0
    written: int = 0
    sent: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    last_error: str = ""
    last_write: float | None = None


class Histogram:
    """Cumulative-bucket histogram kept as plain numbers, rendered by the collector."""

    BOUNDS = (
        0.00005,
        0.0001,
        0.00025,
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        10.0,
    )

    __slots__ = ("counts", "n", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:  # once per read: kept to plain local lookups
        self.counts[_bisect_left(_BOUNDS, value)] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[float, int]]:
        out, running = [], 0
        for bound, count in zip((*self.BOUNDS, math.inf), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(tuple(self.cumulative()), self.total)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A histogram as it stood: cumulative ``(upper bound, count)`` buckets and the sum."""

    buckets: tuple[tuple[float, int], ...] = ()
    total: float = 0.0


_BOUNDS = Histogram.BOUNDS
_bisect_left = bisect.bisect_left


class StatusTable:
    """All rows of one site and what the beater knows of its writers.  The poller, the
    network listener and the failover guard keep their own counters (``statistics()``)."""

    def __init__(self, clock: Clock, site: str = "") -> None:
        self.clock = clock
        self.site = site
        self.pairs: dict[str, Pair] = {}
        self.writers: dict[str, WriterStats] = {}
        # Each row's next possible change, in a wheel (see run_due); ``row.timer`` says
        # which of a row's entries is current.
        self._timers: Wheel[PathRow] = Wheel(TIMER_GRAIN)
        self._sleep_key = -(1 << 62)  # run_timers sleeps until this bucket ends
        self._wake = anyio.Event()
        self.started = clock.monotonic()
        self.changes = ChangeLog(log)
        self.generation = 0  # bumped whenever pairs or their paths change (renderer caches)
        # What the arbiter says of each pair's owner (set by the site when it has one).
        self.owner: Callable[[str], OwnerState] | None = None

    def add_pair(
        self,
        pair_id: str,
        method: str,
        timing: Timing,
        *,
        volume: str | None = None,
        slot: int = 0,
        failover: tuple[str, ...] = (),
        failover_single_path: bool = False,
        failover_without_arbiter: bool = False,
    ) -> Pair:
        """Add a pair (or update its policy, keeping its rows) and create its rows."""
        self.generation += 1
        now = self.clock.monotonic()
        pair = self.pairs.get(pair_id)
        if pair is None:
            pair = self.pairs[pair_id] = Pair(pair_id, method, timing, volume, slot, failover)
            pair.changes = self.changes
            pair.owner = self.owner
        else:
            pair.method, pair.timing, pair.volume, pair.slot = method, timing, volume, slot
            pair.failover = failover
        pair.failover_single_path = failover_single_path
        pair.failover_without_arbiter = failover_without_arbiter
        wanted = PATHS if method == "both" else (method,)
        for path in wanted:
            row = pair.rows.get(path)
            # How late a healthy beat may be seen: a volume is read once a period, give or
            # take the scheduler's coalescing (reads run up to 50 ms early or late); network
            # beats arrive when sent, with half an interval of slack.
            period = timing.interval / 2
            if path == "volume":
                period = timing.interval + min(POLL_JITTER, timing.interval / 2)
            if row is None:
                row = pair.rows[path] = PathRow(
                    pair_id, path, timing, created=now, poll_period=period
                )
            else:
                row.retime(timing, period)
            self.touch(row, now)
        for path in list(pair.rows):
            if path not in wanted:
                del pair.rows[path]
        pair.rejudge(now)
        return pair

    def set_owner_source(self, owner: Callable[[str], OwnerState] | None) -> None:
        """Judge "every path stale" by what ``owner`` says of each pair's owner (the
        arbiter's view, DESIGN.md "Arbiter"); None: no arbiter."""
        self.owner = owner
        for pair in self.pairs.values():
            pair.owner = owner

    def rejudge(self, pair_id: str) -> None:
        """The arbiter's view of ``pair_id`` changed: derive its verdict again now."""
        pair = self.pairs.get(pair_id)
        if pair is not None:
            pair.rejudge(self.clock.monotonic())

    def remove_pair(self, pair_id: str) -> None:
        self.generation += 1
        pair = self.pairs.pop(pair_id, None)
        for row in () if pair is None else pair.rows.values():
            row.timer = -1.0  # its timer entry, if any, no longer matches: dropped when due

    # -- keeping states current ---------------------------------------------------------

    def touch(self, row: PathRow, now: float) -> None:
        """Re-judge ``row`` after an observation (or when its timer falls due)."""
        before = row.state
        after = row.evaluate(now)
        row.quiet_until = row.next_change(now)
        pair = self.pairs.get(row.pair)
        if after != before:
            where = (
                f"volume {pair.volume}" if pair is not None and row.path == "volume" else row.path
            )
            extra = f" ({row.detail})" if row.detail and after != "alive" else ""

            def fields() -> dict[str, object]:  # (made only if the line is logged)
                return {
                    "event": "state",
                    "pair": row.pair,
                    "path": row.path,
                    "state": after,
                    "previous_state": before,
                    # the verdict these states give (its own change is the next line)
                    "verdict": pair.derive(now) if pair is not None else "unknown",
                    "reason": row.reason,
                    "detail": row.detail,
                    **(
                        {"volume": pair.volume} if pair is not None and row.path == "volume" else {}
                    ),
                }

            self.changes.change(
                now,
                f"{row.path} {before} -> {after}",
                "pair %s %s: %s -> %s%s",
                row.pair,
                where,
                before,
                after,
                extra,
                extra=fields,
            )
        if row.resumed:
            row.resumed = False
            if pair is not None:
                self._check_undead(pair, row, now)
        if pair is not None and row.last_change is None and (row.installed or row.serial == 0):
            # Installed (an install record, or an activation): the other path waits for
            # its first beat too, even if the activation datagram never arrived.
            for other in pair.rows.values():
                if other is not row and other.last_change is None and not other.installed:
                    other.installed = True
                    self.touch(other, now)
        if pair is not None and (after != before or pair.verdict in _AHEAD_MATTERS):
            pair.rejudge(now)  # in a mixed state, which path is ahead can change the verdict
        if row.quiet_until < row.timer:
            self._push(row.quiet_until, row)

    @staticmethod
    def _check_undead(pair: Pair, row: PathRow, now: float) -> None:
        """A writer beats again, same incarnation, after a stale silence on ``row``.

        If every other path was silent too, the whole host was (the pair was down and
        may have failed over): a frozen host came back, and every path says so until a
        new incarnation.  If another path kept beating, only this path was cut.
        """
        for other in pair.rows.values():
            if other is row:
                continue
            t = other.timing
            if other.last_change is not None and (
                now - other.last_change < t.miss_threshold * t.interval
                and (other.fresh_since or now) < now - t.interval  # not itself just resumed
            ):
                return
        log.warning(
            "pair %s: %s path: the same writer beats again after a stale silence on every "
            "path (a frozen host resumed?)",
            pair.id,
            row.path,
        )
        for r in pair.rows.values():
            if r.incarnation == row.incarnation and not r.undead:
                r.undead = True
                r.errors["undead_writer"] += 1

    def _push(self, when: float, row: PathRow) -> None:
        row.timer = when
        if when != math.inf and self._timers.push(when, row) < self._sleep_key:
            self._wake.set()  # (a row that cannot change any more, stopped say, waits for none)

    def run_due(self, now: float) -> None:
        """Re-judge the rows whose state or missed count may have changed by ``now``.

        Exact to the row: the rows of a bucket that has begun but are not yet due wait
        in it (run_timers wakes when a bucket ends, at most ``TIMER_GRAIN`` late)."""
        timers, inf = self._timers, math.inf
        grain = timers.grain
        early: list[PathRow] = []
        while (taken := timers.take(now)) is not None:
            key, bucket = taken
            for row in bucket:
                when = row.timer
                if when == inf or when // grain != key:
                    continue  # superseded by another entry, or the row was removed
                if when > now:
                    early.append(row)
                    continue
                row.timer = inf
                if row.quiet_until <= now:
                    self.touch(row, now)
                else:
                    self._push(row.quiet_until, row)
        for row in early:
            if row.timer != inf:  # (a row may have been in the bucket twice)
                timers.push(row.timer, row)

    async def run_timers(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep every row's state current: sleep until the earliest bucket of timers
        ends (10,000 rows due at 10,000 moments are judged ~100 times a second), judge."""
        task_status.started()
        grain = self._timers.grain
        while True:
            now = self.clock.monotonic()
            self.run_due(now)
            self.changes.flush(now)
            first = self._timers.first()
            until = now + 1.0 if first is None else first + grain
            self._sleep_key = self._timers.key(first) if first is not None else (1 << 62)
            self._wake = anyio.Event()
            await self.clock.sleep_until(min(until, now + 1.0), self._wake)
            self._sleep_key = -(1 << 62)

    def row(self, pair_id: str, path: str) -> PathRow | None:
        pair = self.pairs.get(pair_id)
        return None if pair is None else pair.rows.get(path)

    def rows(self) -> list[PathRow]:
        return [row for pair in self.pairs.values() for row in pair.rows.values()]

    def evaluate(self) -> float:
        """Bring every row up to now; returns the monotonic time used."""
        now = self.clock.monotonic()
        for pair in list(self.pairs.values()):
            for row in list(pair.rows.values()):
                self.touch(row, now)
            pair.rejudge(now)
        return now

    def polled(self) -> tuple[int, int]:
        """(volume rows read at least once, volume rows): start-up progress."""
        rows = [p.rows["volume"] for p in self.pairs.values() if "volume" in p.rows]
        return sum(1 for r in rows if r.last_read is not None), len(rows)

    def snapshot(self) -> list[dict[str, object]]:
        """Every row as plain data, worst first (for /status.json and the CLI)."""
        now = self.evaluate()
        out = [
            row_view(pair, row, now) for pair in self.pairs.values() for row in pair.rows.values()
        ]
        out.sort(key=worst_first)
        return out


def row_view(pair: Pair, row: PathRow, now: float) -> dict[str, object]:
    """One row of the status table as plain data (``/status.json``, ``hbmon status``)."""
    age = row.age(now)
    return {
        "pair": row.pair,
        "path": row.path,
        "method": pair.method,
        "verdict": pair.verdict,
        "verdict_note": pair.verdict_note,
        "state": row.state,
        "up": row.up,
        "serial": row.serial,
        "incarnation": _hex(row.incarnation),
        "writer_time": row.writer_time,
        "age": None if age is None else round(age, 3),
        "missed": row.missed(now),
        "missed_total": row.missed_total,
        "interval": row.timing.interval,
        "declared_interval": row.declared_interval,
        "miss_threshold": row.timing.miss_threshold,
        "clock_skew": None if row.skew is None else round(row.skew, 3),
        "reason": row.reason,
        "detail": row.detail,
        "note": "; ".join(n for n in (row.note, row.undead_note) if n),
        "undead": row.undead,
        "warnings": row.timing_warnings(),
        "timing_note": row.timing_note(),
        "volume": pair.volume,
        "slot": pair.slot,
        "errors": dict(row.errors),
        "restarts": row.restarts,
    }


def worst_first(view: dict[str, Any]) -> tuple[int, str, str]:
    return SEVERITY[view["state"]], str(view["pair"]), str(view["path"])


def _hex(value: int | None) -> str | None:
    return None if value is None else f"{value:016x}"
