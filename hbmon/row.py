"""One row of the status table: what a reader knows about one path of one pair.

The judgement rules (baseline, beats, missed, late, stale, grace, install records,
hysteresis, undead writers) are described in the docstring of :mod:`hbmon.status` and
for operators in docs/config.md.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from hbmon.config import Timing
from hbmon.record import Record, State
from hbmon.verdict import FRESH, PATHS, STATES, PathState

__all__ = ["FAILED", "PATHS", "SEVERITY", "STATES", "PathRow"]

FAILED: frozenset[PathState] = frozenset({"stale", "invalid", "io_error", "io_hung"})
#: Worst first, for sorting tables.
_WORST_FIRST: tuple[PathState, ...] = (
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
_PROBLEM_STATES: frozenset[PathState] = frozenset({"invalid", "io_error", "io_hung"})
_KEEP_INCARNATIONS = 8
_FINAL = (State.RETIRED, State.STOPPING, State.STANDBY)
_NOT_SERVING = (State.STOPPING, State.STANDBY)  # a writer that says it serves nothing
_NOT_EXPECTING: frozenset[PathState] = frozenset({"awaiting", "stopped", "retired"})


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
    problem: PathState | None = None
    reason: str | None = None
    detail: str = ""
    # hysteresis
    trusted: bool = True
    good_streak: int = 0
    held: PathState | None = None
    state: PathState = "awaiting"
    # counters
    missed_total: int = 0
    gap_missed: int = 0
    beats_seen: int = 0
    restarts: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    old_incarnations: tuple[int, ...] = ()  # replaced writers, newest last (a tuple: 10,000
    # rows of deque(maxlen=...) would cost 6 MiB for what is almost always empty)
    note: str = ""
    quiet_until: float = 0.0  # no change of state or missed count before this (see next_change)
    timer: float = math.inf  # when this row's current entry in the table's timer wheel falls due
    fresh_since: float | None = None  # when the current run of beats began
    resumed: bool = False  # beats again after a stale silence (undead if the pair agrees)
    installed: bool = False  # announced or install record seen: await the first beat
    undead: bool = False  # the writer resumed, same incarnation, after being declared stale
    slowest_read: float = 0.0  # decaying maximum of read latency, for timing checks
    quiet_after: float = field(init=False)  # quiet_until after a beat, less its time (retime)

    def __post_init__(self) -> None:
        self.retime(self.timing, self.poll_period)

    def retime(self, timing: Timing, poll_period: float) -> None:
        """Set the row's timing (and its poll period: 0 for one interval)."""
        self.timing, self.poll_period = timing, poll_period or timing.interval
        # How long after a beat nothing can change: the next beat is not due before a
        # poll period and an interval, and the row is stale after the threshold.
        self.quiet_after = min(
            self.poll_period + timing.interval, timing.miss_threshold * timing.interval
        )

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
            # A grace period still running leaves a full threshold of watching after the
            # first read: a read delayed at start-up (10,000 volumes opening on a busy
            # host) is no evidence that the writer is dead.
            t = self.timing
            if now < self.created + t.startup_grace:
                self.created = max(
                    self.created, now + t.miss_threshold * t.interval - t.startup_grace
                )
            self._take(rec)
            return "baseline"
        if rec.incarnation != self.incarnation:
            if rec.incarnation in self.old_incarnations:
                # A writer we saw replaced has come back: two writers for one pair.
                self.errors["undead_writer"] += 1
                self.note = f"old incarnation {rec.incarnation:#x} wrote again (undead writer)"
                return "undead"
            if self.incarnation != 0:  # 0 is the install record, not a writer
                kept = (*self.old_incarnations, self.incarnation)
                self.old_incarnations = kept[-_KEEP_INCARNATIONS:]
                self.restarts += 1
            self.undead = False  # a fresh start (a rebooted or fenced host) clears it
            self._beat(rec, now, wall)
            return "restart"
        if rec.serial > (self.serial or 0) or rec.state != self.record_state:
            t = self.timing
            if (
                self.last_change is not None  # this incarnation had beaten before...
                and now - self.last_change >= t.miss_threshold * t.interval  # ...went stale
                and not self.undead
                and rec.state is State.ACTIVE
                # ...and the writer did not beat meanwhile: a frozen writer resumes one
                # serial on; a writer that kept beating while the reader (a stalled read)
                # or the path (a cut link) could not see it has skipped many.
                and rec.serial - (self.serial or 0)
                < max(2.0, (now - self.last_change) / max(rec.interval, 0.001) / 2)
            ):
                # Same incarnation after a stale silence: a frozen host that resumed, or
                # only this path coming back.  The table asks the other path which.
                self.resumed = True
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
        self.installed, self.created, self.undead = True, now, False
        if self.record_state is State.RETIRED:
            self.record_state = None
            self.last_change = None
        self.trusted, self.held, self.good_streak = True, None, 0
        return True

    def observe_latency(self, seconds: float) -> None:
        """A decaying maximum of read latency; only seconds matter to the timing checks,
        so sub-millisecond reads of a row that reads fast change nothing."""
        if seconds >= 0.001 or self.slowest_read >= 0.001:
            self.slowest_read = max(seconds, self.slowest_read * 0.98)

    @property
    def undead_note(self) -> str:
        if not self.undead:
            return ""
        return (
            "frozen writer came back: same incarnation beat again after it was declared "
            "stale; if the pair failed over, fence this host"
        )

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

    def observe_next_beat(self, rec: Record, now: float, wall: float) -> bool:
        """The hot path: the next beat of a healthy row.  Returns False, changing nothing,
        when ``rec`` is anything else (then :meth:`observe_record` decides)."""
        return rec.state is State.ACTIVE and self.observe_next(
            rec.incarnation, rec.serial, rec.writer_time, rec.interval, now, wall
        )

    def observe_next(
        self,
        incarnation: int,
        serial: int,
        writer_time: float,
        interval: float,
        now: float,
        wall: float,
    ) -> bool:
        """:meth:`observe_next_beat` for an active record given by its fields (the
        poller's inline reads decode no more than these).  The same beat read again is
        taken too: it changes nothing but ``last_read``."""
        if (
            self.state != "alive"
            or self.problem is not None
            or incarnation != self.incarnation
            or self.record_state is not State.ACTIVE
            or not self.trusted
        ):
            return False
        last = self.serial or 0
        if serial <= last:
            if serial < last:
                return False  # a regression: observe_record names it
            # The same beat again (read before the writer's next one landed): nothing
            # changes but when this path was last read; the timers judge the silence.
            self.last_read = now
            return True
        # 10,000 rows a second: each attribute replaced frees an object a second old (a
        # cache miss or two), so what is usually unchanged is only compared.
        self.serial, self.writer_time = serial, writer_time
        if interval != self.declared_interval:
            self.declared_interval = interval
        self.last_change = self.last_read = now
        self.skew = writer_time - wall
        self.beats_seen += 1
        if self.gap_missed:
            self.gap_missed = 0
        if self.note:
            self.note = ""
        self.quiet_until = now + self.quiet_after
        return True

    def observe_zeroed(self, now: float) -> None:
        """An all-zero slot: not yet claimed if we never saw a record, else wiped."""
        self.last_read = now
        if self.incarnation is None:
            if self.problem is not None:
                self.problem = self.reason = None
            return
        self.observe_problem("invalid", "zeroed", "the slot was wiped (all zero bytes)", now)

    def observe_problem(self, state: PathState, reason: str, detail: str, now: float) -> None:
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
        t = self.timing
        if (
            self.last_change is None
            or rec.incarnation != self.incarnation
            or now - self.last_change >= t.miss_threshold * t.interval
        ):
            self.fresh_since = now  # a new run of beats
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

    def _distrust(self, state: PathState) -> None:
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

    def raw_state(self, now: float) -> PathState:
        """The state from the facts alone, before hysteresis."""
        if self.problem is not None:
            return self.problem
        if self.record_state is State.RETIRED:
            return "retired"
        if self.record_state in _NOT_SERVING:
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
        if (
            self.last_change == now
            and self.problem is None
            and self.trusted
            and self.record_state is State.ACTIVE
        ):
            self.state = "alive"  # the hot path: a beat has just been seen
            return "alive"
        raw = self.raw_state(now)
        if raw not in _NOT_EXPECTING:  # a beat that did not come is missed, whatever else
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

    def next_change(self, now: float) -> float:
        """When, with no new observation, the state or the missed count can next change.

        The table sleeps until then instead of re-judging every row all the time: this is
        what makes detection exact to the millisecond and cheap at 10,000 rows.
        """
        if self.problem is not None or self.record_state in _FINAL:
            return math.inf
        t = self.timing
        if self.last_change == now:  # the hot path: the next beat is due one interval on
            return now + self.quiet_after
        if self.last_change is None:
            if self.serial == 0 or self.installed:
                return math.inf
            grace_end = self.created + t.startup_grace
            if now < grace_end:
                return grace_end
            base = grace_end - t.interval * t.miss_threshold  # as missed() counts it
        else:
            base = self.last_change
        when = base + self.poll_period + (self.missed(now) + 1) * t.interval
        if self.last_change is not None:
            stale_at = base + t.miss_threshold * t.interval
            if now < stale_at < when:
                when = stale_at
        return max(when, now + 0.001)

    @property
    def up(self) -> bool:
        return self.state in FRESH
