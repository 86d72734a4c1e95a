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
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from dataclasses import dataclass, field

from hbmon.clock import Clock
from hbmon.config import Timing
from hbmon.record import Record, State
from hbmon.verdict import FRESH, single_path_note, verdict

log = logging.getLogger(__name__)

PATHS = ("volume", "network")
STATES = (
    "awaiting",
    "alive",
    "late",
    "stale",
    "invalid",
    "io_error",
    "io_hung",
    "stopped",
    "retired",
)
FAILED = frozenset({"stale", "invalid", "io_error", "io_hung"})
#: Worst first, for sorting tables.
_WORST_FIRST = (
    "stale",
    "invalid",
    "io_hung",
    "io_error",
    "late",
    "awaiting",
    "stopped",
    "retired",
    "alive",
)
SEVERITY = {s: i for i, s in enumerate(_WORST_FIRST)}
_PROBLEM_STATES = frozenset({"invalid", "io_error", "io_hung"})
_KEEP_INCARNATIONS = 8


@dataclass(slots=True)
class PathRow:
    """What one reader knows about one path of one pair."""

    pair: str
    path: str
    timing: Timing
    created: float
    poll_period: float = 0.0
    # newest valid record
    incarnation: int | None = None
    serial: int | None = None
    writer_time: float | None = None
    declared_interval: float | None = None
    record_state: State | None = None
    last_change: float | None = None
    last_read: float | None = None
    skew: float | None = None
    # current problem with the path (invalid, io_error, io_hung)
    problem: str | None = None
    reason: str | None = None
    detail: str = ""
    # hysteresis
    trusted: bool = True
    good_streak: int = 0
    held: str | None = None
    state: str = "awaiting"
    # counters
    missed_total: int = 0
    gap_missed: int = 0
    beats_seen: int = 0
    restarts: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    old_incarnations: deque[int] = field(default_factory=lambda: deque(maxlen=_KEEP_INCARNATIONS))
    note: str = ""
    installed: bool = False  # announced or install record seen: await the first beat
    slowest_read: float = 0.0  # decaying maximum of read latency, for timing checks

    def __post_init__(self) -> None:
        if not self.poll_period:
            self.poll_period = self.timing.interval

    # -- observations -------------------------------------------------------------

    def observe_record(self, rec: Record, now: float, wall: float, *, sent: bool = False) -> str:
        """Take a valid record read at monotonic ``now``; returns what it was.

        One of ``baseline``, ``beat``, ``restart``, ``same``, ``regression``, ``undead``.
        A record read from a volume may be old, so the first one is only a baseline; a
        record ``sent`` over the network was written just now and is a beat at once.
        """
        self.last_read = now
        if self.problem is not None:
            self.problem = self.reason = None
            self.detail = ""
        if rec.incarnation == 0 and rec.serial == 0:
            # An install record (`hbmon volume init`): no writer yet, await the first beat.
            if self.incarnation is not None and self.incarnation != 0:
                self.last_change, self.installed = None, True
            self._take(rec)
            return "baseline"
        if self.incarnation is None:
            if sent:
                self._beat(rec, now, wall)
                return "beat"
            self._take(rec)
            return "baseline"
        if rec.incarnation != self.incarnation:
            if rec.incarnation in self.old_incarnations:
                # A writer we saw replaced has come back: a frozen host that resumed.
                self.errors["undead_writer"] += 1
                self.note = f"old incarnation {rec.incarnation:#x} wrote again (undead writer)"
                return "undead"
            if self.incarnation != 0:  # 0 is the install record, not a writer
                self.old_incarnations.append(self.incarnation)
                self.restarts += 1
            self._beat(rec, now, wall)
            return "restart"
        if rec.serial > (self.serial or 0) or rec.state != self.record_state:
            self._beat(rec, now, wall)
            return "beat"
        if rec.serial < (self.serial or 0):
            self.errors["serial_regression"] += 1
            self.note = f"serial went back from {self.serial} to {rec.serial} (not taken as a beat)"
            return "regression"
        return "same"

    def observe_install(self, now: float) -> bool:
        """An activation (install) announcement; returns False when it changes nothing.

        A pair that has beaten already stays as it is; a retired or never-seen pair
        waits for its first beat, however long that takes.
        """
        if self.last_change is not None and self.record_state is not State.RETIRED:
            return False
        self.installed, self.created = True, now
        if self.record_state is State.RETIRED:
            self.record_state = None
            self.last_change = None
        self.trusted, self.held, self.good_streak = True, None, 0
        return True

    def observe_latency(self, seconds: float) -> None:
        self.slowest_read = max(seconds, self.slowest_read * 0.98)

    def timing_warnings(self) -> list[str]:
        """Disagreements between writer and reader timing (empty when all is well)."""
        t, out = self.timing, []
        declared = self.declared_interval
        if declared is not None and abs(declared - t.interval) > 0.01 * t.interval:
            out.append("interval_mismatch")
        if self.slowest_read >= (t.miss_threshold - 1) * t.interval:
            out.append("threshold_too_short")
        return out

    def timing_note(self) -> str:
        t, notes = self.timing, []
        for warning in self.timing_warnings():
            if warning == "interval_mismatch":
                notes.append(
                    f"writer declares interval {self.declared_interval:g} s, "
                    f"this reader expects {t.interval:g} s"
                )
            else:
                notes.append(
                    f"a read took {self.slowest_read:.1f} s: miss_threshold {t.miss_threshold}"
                    f" x interval {t.interval:g} s leaves too little room"
                )
        return "; ".join(notes)

    def observe_zeroed(self, now: float) -> None:
        """An all-zero slot: not yet claimed if we never saw a record, else wiped."""
        self.last_read = now
        if self.incarnation is None:
            if self.problem is not None:
                self.problem = self.reason = None
            return
        self.observe_problem("invalid", "zeroed", "the slot was wiped (all zero bytes)", now)

    def observe_problem(self, state: str, reason: str, detail: str, now: float) -> None:
        """A read failed (``io_error``, ``io_hung``) or found an invalid record."""
        assert state in _PROBLEM_STATES, state
        self.last_read = now
        if self.problem != state or self.reason != reason:
            self.errors[reason] += 1
        elif state != "io_hung":
            self.errors[reason] += 1
        self.problem, self.reason, self.detail = state, reason, detail
        self._distrust(state)

    def _take(self, rec: Record) -> None:
        self.incarnation = rec.incarnation
        self.serial = rec.serial
        self.writer_time = rec.writer_time
        self.declared_interval = rec.interval
        self.record_state = rec.state

    def _beat(self, rec: Record, now: float, wall: float) -> None:
        self._take(rec)
        self.last_change = now
        self.skew = rec.writer_time - wall
        self.beats_seen += 1
        self.installed = False
        self.gap_missed = 0
        self.note = ""
        if not self.trusted:
            self.good_streak += 1
            if self.good_streak >= self.timing.recover_beats:
                self.trusted, self.held, self.good_streak = True, None, 0

    def _distrust(self, state: str) -> None:
        self.trusted, self.held, self.good_streak = False, state, 0

    # -- judgement -----------------------------------------------------------------

    def age(self, now: float) -> float | None:
        return None if self.last_change is None else max(0.0, now - self.last_change)

    def missed(self, now: float) -> int:
        """Beats due in the current gap, beyond one poll period, that have not been seen."""
        if self.last_change is None:
            since = now - self.created - self.timing.startup_grace
            base = since + self.timing.interval * self.timing.miss_threshold
            if since <= 0 or self.serial == 0 or self.installed:
                return 0
        else:
            base = now - self.last_change
        return max(0, math.floor((base - self.poll_period) / self.timing.interval + 1e-9))

    def raw_state(self, now: float) -> str:
        """The state from the facts alone, before hysteresis."""
        if self.problem is not None:
            return self.problem
        if self.record_state is State.RETIRED:
            return "retired"
        if self.record_state is State.STOPPING:
            return "stopped"
        t = self.timing
        if self.last_change is None:
            if self.serial == 0 or self.installed or now - self.created < t.startup_grace:
                return "awaiting"
            return "stale"
        age = now - self.last_change
        if age >= t.miss_threshold * t.interval:
            return "stale"
        return "late" if self.missed(now) >= 1 else "alive"

    def evaluate(self, now: float) -> str:
        """Bring ``state`` and the missed-beat counter up to ``now``; returns the state."""
        raw = self.raw_state(now)
        if raw in ("alive", "late", "stale"):
            gap = self.missed(now)
            if gap > self.gap_missed:
                self.missed_total += gap - self.gap_missed
                self.gap_missed = gap
        if raw in FAILED:
            if self.trusted or self.held != raw or self.good_streak:
                self._distrust(raw)
            self.state = raw
        elif not self.trusted and raw in FRESH:
            self.state = self.held or "stale"
        else:
            if raw in ("stopped", "retired", "awaiting"):
                self.trusted, self.held, self.good_streak = True, None, 0
            self.state = raw
        return self.state

    @property
    def up(self) -> bool:
        return self.state in FRESH


@dataclass(slots=True)
class Pair:
    """A watched pair: identity and policy from configuration, rows per path."""

    id: str
    method: str
    timing: Timing
    volume: str | None = None
    slot: int = 0
    failover: tuple[str, ...] = ()
    rows: dict[str, PathRow] = field(default_factory=dict)
    verdict: str = "unknown"

    def judge(self, now: float) -> str:
        """Evaluate every path and derive the verdict (changes are logged)."""
        before = self.verdict
        self.verdict = verdict({path: row.evaluate(now) for path, row in self.rows.items()})
        if self.verdict != before:
            note = self.verdict_note
            log.info(
                "pair %s: verdict %s -> %s%s",
                self.id,
                before,
                self.verdict,
                f" ({note})" * bool(note),
            )
        return self.verdict

    @property
    def verdict_note(self) -> str:
        return single_path_note(self.method, self.verdict)


@dataclass(slots=True)
class WriterStats:
    """Writer side (heartbeat check 101a) of one beating pair."""

    pair: str
    volume: str
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

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        i = 0
        bounds = self.BOUNDS
        while i < len(bounds) and value > bounds[i]:
            i += 1
        self.counts[i] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[float, int]]:
        out, running = [], 0
        for bound, count in zip((*self.BOUNDS, math.inf), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class StatusTable:
    """All rows of one site, plus the site-wide gauges the poller and beater keep."""

    def __init__(self, clock: Clock, site: str = "") -> None:
        self.clock = clock
        self.site = site
        self.pairs: dict[str, Pair] = {}
        self.writers: dict[str, WriterStats] = {}
        self.read_duration = Histogram()
        self.poll_lag = 0.0
        self.workers_stuck = 0
        self.io_backend = "threads"
        self.net_rejected: Counter[str] = Counter()
        self.started = clock.monotonic()
        self.last_poll_tick = self.started

    def add_pair(
        self,
        pair_id: str,
        method: str,
        timing: Timing,
        *,
        volume: str | None = None,
        slot: int = 0,
        failover: tuple[str, ...] = (),
    ) -> Pair:
        """Add a pair (or update its policy, keeping its rows) and create its rows."""
        now = self.clock.monotonic()
        pair = self.pairs.get(pair_id)
        if pair is None:
            pair = self.pairs[pair_id] = Pair(pair_id, method, timing, volume, slot, failover)
        else:
            pair.method, pair.timing, pair.volume, pair.slot = method, timing, volume, slot
            pair.failover = failover
        wanted = PATHS if method == "both" else (method,)
        for path in wanted:
            row = pair.rows.get(path)
            # Network beats arrive when sent, not when polled: half an interval of slack.
            period = timing.interval if path == "volume" else timing.interval / 2
            if row is None:
                pair.rows[path] = PathRow(pair_id, path, timing, created=now, poll_period=period)
            else:
                row.timing, row.poll_period = timing, period
        for path in list(pair.rows):
            if path not in wanted:
                del pair.rows[path]
        return pair

    def remove_pair(self, pair_id: str) -> None:
        self.pairs.pop(pair_id, None)

    def row(self, pair_id: str, path: str) -> PathRow | None:
        pair = self.pairs.get(pair_id)
        return None if pair is None else pair.rows.get(path)

    def rows(self) -> list[PathRow]:
        return [row for pair in self.pairs.values() for row in pair.rows.values()]

    def evaluate(self) -> float:
        """Bring every row up to now; returns the monotonic time used."""
        now = self.clock.monotonic()
        for pair in self.pairs.values():
            pair.judge(now)
        return now

    def snapshot(self) -> list[dict[str, object]]:
        """Every row as plain data, worst first (for /status.json and the CLI)."""
        now = self.evaluate()
        out: list[dict[str, object]] = []
        for pair in self.pairs.values():
            for row in pair.rows.values():
                age = row.age(now)
                out.append(
                    {
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
                        "note": row.note,
                        "warnings": row.timing_warnings(),
                        "timing_note": row.timing_note(),
                        "volume": pair.volume,
                        "slot": pair.slot,
                        "errors": dict(row.errors),
                        "restarts": row.restarts,
                    }
                )
        out.sort(key=lambda r: (SEVERITY[str(r["state"])], str(r["pair"]), str(r["path"])))
        return out


def _hex(value: int | None) -> str | None:
    return None if value is None else f"{value:016x}"
