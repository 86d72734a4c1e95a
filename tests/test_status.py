"""The status table: the judgement rules of hbmon/status.py, driven by a FakeClock.

With ``Timing(interval=1, miss_threshold=3, recover_beats=2)`` and no explicit grace:
start-up grace is (3 + 1) * 1 = 4 s, the poll period defaults to the interval (1 s),
``missed = floor((age - 1) / 1)``, and a row is stale at age 3 s.

The poller evaluates its rows once per poll period; :meth:`Feed.wait` does the same.
"""

from __future__ import annotations

import json
import time

import anyio
import pytest

from hbmon.clock import FakeClock
from hbmon.config import Timing
from hbmon.record import Record, State
from hbmon.status import (
    FAILED,
    FRESH,
    PATHS,
    POLL_JITTER,
    SEVERITY,
    STATES,
    TIMER_GRAIN,
    PathRow,
    StatusTable,
)

TIMING = Timing(interval=1, miss_threshold=3, recover_beats=2)
INC_A = 0xA11CE
INC_B = 0xB0B
WRITER_EPOCH = 1_700_000_000.0  # the writer's own wall clock at our monotonic 1000.0


def rec(
    serial: int,
    incarnation: int = INC_A,
    *,
    pair_id: str = "db1",
    writer_time: float = WRITER_EPOCH,
    interval: float = 1.0,
    state: State = State.ACTIVE,
) -> Record:
    return Record(pair_id, incarnation, serial, writer_time, interval, state)


class Feed:
    """One PathRow and the writer that feeds it, on a FakeClock."""

    def __init__(self, timing: Timing = TIMING, poll_period: float = 0.0) -> None:
        self.clock = FakeClock()
        self.row = PathRow(
            "db1", "volume", timing, created=self.clock.monotonic(), poll_period=poll_period
        )
        self.incarnation = INC_A
        self.serial = 0

    @property
    def now(self) -> float:
        return self.clock.monotonic()

    def writer_time(self) -> float:
        # The writer's clock runs in step with ours but is another machine's clock:
        # jumping *our* wall clock does not move it.
        return WRITER_EPOCH + self.now - 1000.0

    def see(self, record: Record) -> str:
        return self.row.observe_record(record, self.now, self.clock.wall())

    def beat(self, state: State = State.ACTIVE) -> str:
        self.serial += 1
        return self.see(
            rec(self.serial, self.incarnation, writer_time=self.writer_time(), state=state)
        )

    def state(self) -> str:
        return self.row.evaluate(self.now)

    def wait(self, seconds: float, step: float = 1.0) -> str:
        """Let ``seconds`` pass, evaluating every ``step`` as the poller does."""
        left = seconds
        while left > 1e-12:
            dt = min(step, left)
            self.clock.advance(dt)
            left -= dt
            self.row.evaluate(self.now)
        return self.state()

    def run(self, seconds: int) -> list[str]:
        """A healthy writer for ``seconds``: one beat per second, evaluated after each."""
        states = []
        for _ in range(seconds):
            self.clock.advance(1.0)
            self.beat()
            states.append(self.state())
        return states

    def alive(self) -> Feed:
        """Baseline plus one beat: the row is alive with age 0."""
        self.see(rec(0 if self.serial == 0 else self.serial))
        self.beat()
        assert self.state() == "alive"
        return self


# -- baseline, beats, missed, stale ----------------------------------------------------------


def test_first_record_is_a_baseline_not_a_beat() -> None:
    feed = Feed()
    assert feed.see(rec(57)) == "baseline"
    row = feed.row
    assert row.serial == 57
    assert row.incarnation == INC_A
    assert row.last_change is None
    assert row.age(feed.now) is None
    assert row.beats_seen == 0
    assert row.skew is None
    assert feed.state() == "awaiting"
    assert feed.wait(3) == "awaiting"
    assert row.missed_total == 0
    # the same record again is still no beat
    assert feed.see(rec(57)) == "same"
    assert feed.wait(0.5) == "awaiting"
    assert row.beats_seen == 0


def test_beat_after_the_baseline() -> None:
    feed = Feed()
    feed.see(rec(57))
    feed.clock.advance(1)
    assert feed.see(rec(58, writer_time=WRITER_EPOCH + 1)) == "beat"
    assert feed.row.last_change == feed.now
    assert feed.row.age(feed.now) == 0
    assert feed.row.beats_seen == 1
    assert feed.row.skew == pytest.approx(0.0)
    assert feed.state() == "alive"
    assert feed.row.up


def test_beats_keep_a_row_alive() -> None:
    feed = Feed().alive()
    assert feed.run(60) == ["alive"] * 60
    assert feed.row.missed_total == 0
    assert feed.row.beats_seen == 61
    assert feed.row.serial == 61


@pytest.mark.parametrize(
    ("age", "missed", "state"),
    [
        (0.0, 0, "alive"),
        (0.5, 0, "alive"),
        (1.0, 0, "alive"),
        (1.999, 0, "alive"),
        (2.0, 1, "late"),
        (2.5, 1, "late"),
        (2.999, 1, "late"),
        (3.0, 2, "stale"),
        (4.0, 3, "stale"),
        (10.5, 9, "stale"),
    ],
)
def test_missed_formula_and_states(age: float, missed: int, state: str) -> None:
    feed = Feed().alive()
    feed.clock.advance(age)
    assert feed.row.missed(feed.now) == missed
    assert feed.state() == state
    assert feed.row.up == (state in FRESH)


@pytest.mark.parametrize(("age", "missed"), [(1.2, 0), (1.25, 1), (2.24, 1), (2.25, 2), (2.5, 2)])
def test_missed_uses_the_poll_period(age: float, missed: int) -> None:
    feed = Feed(poll_period=0.25).alive()
    feed.clock.advance(age)
    assert feed.row.missed(feed.now) == missed


@pytest.mark.parametrize(
    ("timing", "before", "state_before", "at"),
    [
        (TIMING, 2.999, "late", 3.0),
        (Timing(interval=0.5, miss_threshold=4), 1.999, "late", 2.0),
        # with a threshold of 2 the one beat allowed for the poll period leaves no "late"
        (Timing(interval=10, miss_threshold=2), 19.999, "alive", 20.0),
    ],
)
def test_stale_exactly_at_miss_threshold_times_interval(
    timing: Timing, before: float, state_before: str, at: float
) -> None:
    feed = Feed(timing).alive()
    feed.clock.advance(before)
    assert feed.state() == state_before
    feed.clock.advance(at - before)
    assert feed.row.age(feed.now) == pytest.approx(at)
    assert feed.state() == "stale"
    assert not feed.row.up


def test_missed_total_counts_each_missing_beat_once() -> None:
    feed = Feed().alive()
    totals = []
    for _ in range(5):  # to age 2.5
        feed.wait(0.5, step=0.5)
        totals.append(feed.row.missed_total)
    assert totals == [0, 0, 0, 1, 1]
    for _ in range(10):  # evaluating again at the same instant counts nothing
        feed.state()
    assert feed.row.missed_total == 1
    feed.beat()
    assert feed.state() == "alive"
    assert feed.row.missed_total == 1  # the beat does not take the count back
    assert feed.row.missed(feed.now) == 0
    # a second gap, to age 6: missed 1, 2, ..., 5
    for _ in range(6):
        feed.wait(1)
        totals.append(feed.row.missed_total)
    assert totals[-6:] == [1, 2, 3, 4, 5, 6]
    assert totals == sorted(totals)


def test_missed_total_of_a_row_that_never_beat() -> None:
    feed = Feed()
    assert feed.wait(4) == "stale"  # grace over
    assert feed.row.missed_total == 0  # not one beat overdue yet
    feed.wait(0.5, step=0.5)
    # once grace is over the row is judged as if a beat had been seen at
    # created + grace - miss_threshold * interval = age 3 at the end of grace
    assert feed.row.missed(feed.now) == 2
    assert feed.row.missed_total == 2
    feed.wait(2)
    assert feed.row.missed_total == 4


# -- hysteresis --------------------------------------------------------------------------------


def test_after_stale_one_beat_is_not_enough() -> None:
    feed = Feed().alive()
    assert feed.wait(3) == "stale"
    feed.clock.advance(0.5)
    feed.beat()
    assert feed.state() == "stale"
    assert not feed.row.up
    assert feed.row.age(feed.now) == 0
    feed.clock.advance(1)
    feed.beat()
    assert feed.state() == "alive"
    assert feed.row.up
    assert feed.run(5) == ["alive"] * 5


@pytest.mark.parametrize("recover_beats", [1, 2, 5])
def test_recover_beats_beats_make_it_alive(recover_beats: int) -> None:
    feed = Feed(Timing(interval=1, miss_threshold=3, recover_beats=recover_beats)).alive()
    assert feed.wait(5) == "stale"
    states = feed.run(recover_beats + 2)
    assert states == ["stale"] * (recover_beats - 1) + ["alive"] * 3


def test_a_new_stale_gap_during_recovery_restarts_the_count() -> None:
    """BUG: going stale again while held at stale does not reset the good-beat count.

    PathRow.evaluate() only calls _distrust() when ``self.trusted or self.held != raw``;
    when the row is already held at "stale" and a new gap makes it raw-stale again,
    good_streak keeps the beat counted before the gap.  A writer that beats only once
    every 3.5 s (always past the 3 s threshold) is then reported alive after every
    second beat, and flaps between stale and alive.  (A repeated ``invalid`` does reset
    the count, because observe_problem() always calls _distrust().)
    """
    feed = Feed().alive()
    assert feed.wait(3) == "stale"
    feed.beat()  # good beat 1 of 2
    assert feed.state() == "stale"
    assert feed.wait(3) == "stale"  # stale again: that beat no longer counts
    feed.beat()
    assert feed.state() == "stale"


def test_start_up_grace_without_any_beat() -> None:
    feed = Feed()
    assert feed.state() == "awaiting"
    assert feed.wait(3.5, step=0.5) == "awaiting"
    assert feed.row.missed(feed.now) == 0
    feed.clock.advance(0.5)  # exactly (miss_threshold + 1) * interval after creation
    assert feed.state() == "stale"
    # A record now is a baseline; the first beat after it needs recover_beats like any
    # other recovery.
    assert feed.see(rec(7)) == "baseline"
    assert feed.state() == "stale"
    feed.serial = 7
    feed.clock.advance(1)
    assert feed.beat() == "beat"
    assert feed.state() == "stale"
    feed.clock.advance(1)
    feed.beat()
    assert feed.state() == "alive"


def test_a_late_first_read_still_gets_a_full_threshold() -> None:
    """A first read delayed by a busy start-up (3.5 s into a 4 s grace) is watched for
    miss_threshold intervals before the row can go stale; a late first beat is alive."""
    feed = Feed()
    feed.clock.advance(3.5)
    assert feed.see(rec(5)) == "baseline"
    feed.serial = 5
    assert feed.wait(2.9, step=0.1) == "awaiting"
    assert feed.row.missed(feed.now) == 0
    feed.clock.advance(0.1)  # 3 intervals after the first read, no change seen
    assert feed.state() == "stale"
    fresh = Feed()
    fresh.clock.advance(3.5)
    fresh.see(rec(5))
    fresh.serial = 5
    fresh.clock.advance(1.0)
    assert fresh.beat() == "beat"
    assert fresh.state() == "alive"


def test_explicit_grace() -> None:
    feed = Feed(Timing(interval=1, miss_threshold=3, recover_beats=2, grace=30))
    feed.see(rec(5))
    assert feed.wait(29) == "awaiting"
    assert feed.wait(1) == "stale"


def test_a_beat_during_grace_ends_awaiting() -> None:
    feed = Feed()
    feed.see(rec(5))
    feed.clock.advance(1)
    feed.serial = 5
    feed.beat()
    assert feed.state() == "alive"
    assert feed.wait(3) == "stale"  # judged by age from now on, grace or not


def test_install_record_waits_indefinitely() -> None:
    feed = Feed()
    assert feed.see(rec(0, incarnation=0)) == "baseline"
    for _ in range(24):
        assert feed.wait(3600, step=60) == "awaiting"
    assert feed.row.missed(feed.now) == 0
    assert feed.row.missed_total == 0
    assert not feed.row.up
    # The writer starts: its first beat ends the wait at once.
    feed.clock.advance(1)
    feed.see(rec(1, INC_A))
    assert feed.state() == "alive"


# -- writer states -----------------------------------------------------------------------------


def test_stopping_record_means_stopped_and_never_stale() -> None:
    feed = Feed().alive()
    feed.clock.advance(1)
    assert feed.beat(State.STOPPING) == "beat"
    assert feed.state() == "stopped"
    assert not feed.row.up
    total = feed.row.missed_total
    assert feed.wait(3600, step=30) == "stopped"
    assert feed.row.missed_total == total
    # The writer comes back with a new incarnation: alive at once.
    feed.incarnation, feed.serial = INC_B, 0
    assert feed.beat() == "restart"
    assert feed.state() == "alive"


def test_stopping_record_with_the_same_serial_is_still_a_change() -> None:
    feed = Feed().alive()
    assert feed.see(rec(feed.serial, state=State.STOPPING)) == "beat"
    assert feed.state() == "stopped"


def test_retired_record_means_retired() -> None:
    feed = Feed().alive()
    feed.clock.advance(1)
    feed.beat(State.RETIRED)
    assert feed.state() == "retired"
    assert feed.wait(86400, step=600) == "retired"
    assert not feed.row.up


def test_stopped_while_stale_is_stopped() -> None:
    feed = Feed().alive()
    assert feed.wait(5) == "stale"
    feed.beat(State.STOPPING)
    assert feed.state() == "stopped"


# -- serials and incarnations ----------------------------------------------------------------


def test_a_record_sent_over_the_network_is_a_beat_at_once() -> None:
    feed = Feed()
    record = rec(57, writer_time=feed.writer_time())
    assert feed.row.observe_record(record, feed.now, feed.clock.wall(), sent=True) == "beat"
    assert feed.row.age(feed.now) == 0
    assert feed.state() == "alive"


def test_serial_regression_is_flagged_and_not_a_beat() -> None:
    feed = Feed().alive()
    feed.run(9)
    assert feed.row.serial == 10
    before = feed.row.last_change
    feed.clock.advance(1)
    assert feed.see(rec(4)) == "regression"
    assert feed.row.errors["serial_regression"] == 1
    assert "from 10 to 4" in feed.row.note
    assert feed.row.serial == 10
    assert feed.row.last_change == before
    assert feed.row.age(feed.now) == 1
    feed.clock.advance(1)
    feed.see(rec(5))
    assert feed.row.age(feed.now) == 2
    assert feed.state() == "late"
    assert feed.wait(1) == "stale"


def test_same_serial_is_no_beat() -> None:
    feed = Feed().alive()
    feed.clock.advance(1)
    assert feed.see(rec(feed.serial)) == "same"
    assert feed.row.age(feed.now) == 1
    assert not feed.row.errors


def test_new_incarnation_is_a_beat_and_a_restart() -> None:
    feed = Feed().alive()
    feed.run(5)
    assert feed.wait(2) == "late"
    feed.incarnation, feed.serial = INC_B, 0
    assert feed.beat() == "restart"
    assert feed.row.restarts == 1
    assert feed.row.incarnation == INC_B
    assert feed.row.serial == 1  # lower than before, but a new writer starts at 1
    assert feed.row.age(feed.now) == 0
    assert feed.state() == "alive"
    assert not feed.row.errors


def test_old_incarnation_coming_back_is_undead_and_not_a_beat() -> None:
    feed = Feed().alive()
    feed.run(3)
    old_serial = feed.serial
    feed.incarnation, feed.serial = INC_B, 0
    feed.clock.advance(1)
    assert feed.beat() == "restart"
    before = feed.row.last_change
    # The old writer (a frozen host that resumed) writes again.
    feed.clock.advance(1)
    assert feed.see(rec(old_serial + 1, INC_A)) == "undead"
    assert feed.row.errors["undead_writer"] == 1
    assert "undead" in feed.row.note
    assert feed.row.incarnation == INC_B
    assert feed.row.last_change == before
    assert feed.row.restarts == 1
    feed.clock.advance(1)
    feed.see(rec(old_serial + 2, INC_A))
    assert feed.row.errors["undead_writer"] == 2
    assert feed.row.age(feed.now) == 2
    assert feed.state() == "late"


@pytest.mark.parametrize("jump", [3600.0, -3600.0])
def test_wall_clock_jump_changes_only_the_skew(jump: float) -> None:
    feed = Feed().alive()
    feed.run(5)
    assert feed.row.skew == pytest.approx(0.0)
    feed.clock.jump_wall(jump)
    assert feed.state() == "alive"
    assert feed.row.age(feed.now) == 0
    assert feed.run(10) == ["alive"] * 10
    assert feed.row.missed_total == 0
    assert feed.row.skew == pytest.approx(-jump)
    # and time judged without beats is still monotonic time
    assert feed.wait(2) == "late"
    feed.clock.jump_wall(-jump)
    assert feed.state() == "late"
    assert feed.wait(1) == "stale"


# -- problems: invalid, zeroed, I/O ------------------------------------------------------------


def test_invalid_then_valid_records_need_recover_beats() -> None:
    feed = Feed().alive()
    feed.clock.advance(1)
    feed.row.observe_problem(
        "invalid", "checksum_mismatch", "stored crc 0x1, computed 0x2", feed.now
    )
    assert feed.state() == "invalid"
    assert feed.row.reason == "checksum_mismatch"
    assert feed.row.errors["checksum_mismatch"] == 1
    assert not feed.row.up
    # A valid record again, but no new beat: the problem is gone, the state is held.
    assert feed.see(rec(feed.serial)) == "same"
    assert feed.row.reason is None
    assert feed.state() == "invalid"
    feed.beat()
    assert feed.state() == "invalid"
    feed.clock.advance(1)
    feed.beat()
    assert feed.state() == "alive"


def test_invalid_again_during_recovery_restarts_the_count() -> None:
    feed = Feed().alive()
    feed.row.observe_problem("invalid", "bad_magic", "foreign", feed.now)
    feed.clock.advance(1)
    feed.beat()
    feed.row.observe_problem("invalid", "bad_magic", "foreign", feed.now)
    assert feed.state() == "invalid"
    assert feed.row.errors["bad_magic"] == 2
    feed.clock.advance(1)
    feed.beat()
    assert feed.state() == "invalid"
    feed.clock.advance(1)
    feed.beat()
    assert feed.state() == "alive"


def test_identity_mismatch_is_invalid() -> None:
    feed = Feed().alive()
    feed.row.observe_problem("invalid", "identity_mismatch", "record of 'db2'", feed.now)
    assert feed.state() == "invalid"
    assert feed.row.detail == "record of 'db2'"
    assert feed.wait(10) == "invalid"  # a problem stays what it is, not stale


def test_io_hung_is_counted_once_per_hang() -> None:
    feed = Feed().alive()
    for _ in range(5):
        feed.clock.advance(1)
        feed.row.observe_problem("io_hung", "io_hung", "read past its 2 s deadline", feed.now)
        assert feed.state() == "io_hung"
    assert feed.row.errors["io_hung"] == 1
    # The read completes; the hang is over.
    feed.beat()
    assert feed.row.problem is None
    assert feed.state() == "io_hung"  # held until recover_beats
    feed.clock.advance(1)
    feed.row.observe_problem("io_hung", "io_hung", "again", feed.now)
    feed.row.observe_problem("io_hung", "io_hung", "again", feed.now)
    assert feed.row.errors["io_hung"] == 2


def test_io_error_then_recovery() -> None:
    feed = Feed().alive()
    feed.row.observe_problem("io_error", "EIO", "Input/output error", feed.now)
    assert feed.state() == "io_error"
    assert feed.row.reason == "EIO"
    feed.clock.advance(1)
    feed.beat()
    assert feed.state() == "io_error"
    feed.clock.advance(1)
    feed.beat()
    assert feed.state() == "alive"


def test_zeroed_slot_before_any_record_is_awaiting() -> None:
    feed = Feed()
    feed.row.observe_zeroed(feed.now)
    assert feed.state() == "awaiting"
    assert feed.row.problem is None
    assert not feed.row.errors
    feed.clock.advance(1)
    feed.row.observe_zeroed(feed.now)
    assert feed.state() == "awaiting"
    # a zeroed slot is no install record: it does not wait past the grace period
    assert feed.wait(3) == "stale"


def test_zeroed_slot_after_records_is_invalid() -> None:
    feed = Feed().alive()
    feed.clock.advance(1)
    feed.row.observe_zeroed(feed.now)
    assert feed.state() == "invalid"
    assert feed.row.reason == "zeroed"
    assert feed.row.errors["zeroed"] == 1


def test_zeroed_before_the_first_record_clears_an_earlier_problem() -> None:
    feed = Feed()
    feed.row.observe_problem("io_error", "EIO", "Input/output error", feed.now)
    assert feed.state() == "io_error"
    feed.row.observe_zeroed(feed.now)
    assert feed.row.problem is None


# -- the table ---------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def table(clock: FakeClock) -> StatusTable:
    return StatusTable(clock, site="osaka")


@pytest.mark.parametrize(
    ("method", "paths"),
    [("volume", {"volume"}), ("network", {"network"}), ("both", {"volume", "network"})],
)
def test_add_pair_creates_the_rows_of_its_method(
    table: StatusTable, method: str, paths: set[str]
) -> None:
    pair = table.add_pair("db1", method, TIMING, volume="/srv/hb/db1.vol", slot=3)
    assert set(pair.rows) == paths
    assert pair.volume == "/srv/hb/db1.vol"
    assert pair.slot == 3
    for path in paths:
        row = table.row("db1", path)
        assert row is not None
        assert (row.pair, row.path, row.timing) == ("db1", path, TIMING)
        assert row.state == "awaiting"
    assert len(table.rows()) == len(paths)
    assert set(PATHS) >= paths
    # The volume is polled once per interval, give or take the scheduler's coalescing;
    # network beats arrive when sent.
    poll = {"volume": TIMING.interval + POLL_JITTER, "network": TIMING.interval / 2}
    for path in paths:
        row = table.row("db1", path)
        assert row is not None
        assert row.poll_period == poll[path]


def test_add_pair_again_keeps_row_state(table: StatusTable, clock: FakeClock) -> None:
    table.add_pair("db1", "both", TIMING)
    row = table.row("db1", "volume")
    assert row is not None
    row.observe_record(rec(1), clock.monotonic(), clock.wall())
    clock.advance(1)
    row.observe_record(rec(2), clock.monotonic(), clock.wall())
    table.evaluate()
    assert row.state == "alive"
    created = row.created

    slower = Timing(interval=2, miss_threshold=3, recover_beats=2)
    pair = table.add_pair("db1", "both", slower, failover=("/sbin/promote",))
    assert table.row("db1", "volume") is row
    assert (row.serial, row.state, row.beats_seen, row.created) == (2, "alive", 1, created)
    assert row.timing == slower
    assert row.poll_period == slower.interval + POLL_JITTER
    assert pair.failover == ("/sbin/promote",)

    # Narrowing the method drops the other path's row, keeps this one.
    table.add_pair("db1", "volume", slower)
    assert table.row("db1", "network") is None
    assert table.row("db1", "volume") is row
    table.add_pair("db1", "both", slower)
    network = table.row("db1", "network")
    assert network is not None
    assert network.state == "awaiting"
    assert table.row("db1", "volume") is row


def test_remove_pair(table: StatusTable) -> None:
    table.add_pair("db1", "both", TIMING)
    table.remove_pair("db1")
    table.remove_pair("never-there")
    assert table.row("db1", "volume") is None
    assert table.rows() == []


def test_table_evaluate_uses_its_clock(table: StatusTable, clock: FakeClock) -> None:
    table.add_pair("db1", "volume", TIMING)
    clock.advance(4)
    assert table.evaluate() == clock.monotonic()
    row = table.row("db1", "volume")
    assert row is not None
    assert row.state == "stale"


def _make_states(table: StatusTable, clock: FakeClock) -> None:
    """One row in each of most states; ids are chosen so that name order != severity."""

    def see(pair: str, serial: int, state: State = State.ACTIVE) -> None:
        row = table.row(pair, "volume")
        assert row is not None
        record = rec(serial, pair_id=pair, writer_time=clock.wall(), state=state)
        row.observe_record(record, clock.monotonic(), clock.wall())

    def tick(*beating: str) -> None:
        clock.advance(1)
        for pair in beating:
            row = table.row(pair, "volume")
            assert row is not None
            see(pair, (row.serial or 0) + 1)
        table.evaluate()

    volume_pairs = ("a-alive", "b-late", "c-stale", "d-stopped", "e-retired", "f-inv", "g-hung")
    for pair in volume_pairs:  # t = 0: baselines
        table.add_pair(pair, "volume", TIMING, volume=f"/srv/hb/{pair}.vol")
        see(pair, 1)
    tick("a-alive", "b-late", "c-stale", "f-inv", "g-hung")  # t = 1
    see("d-stopped", 2, State.STOPPING)
    see("e-retired", 2, State.RETIRED)
    tick()  # t = 2
    tick("a-alive", "b-late", "f-inv", "g-hung")  # t = 3: c-stale late
    tick("a-alive")  # t = 4: c-stale stale
    tick("a-alive")  # t = 5
    clock.advance(POLL_JITTER + 0.1)  # b-late: one beat missed beyond the poll jitter: late
    table.evaluate()
    now = clock.monotonic()
    row = table.row("f-inv", "volume")
    assert row is not None
    row.observe_problem("invalid", "checksum_mismatch", "torn", now)
    row = table.row("g-hung", "volume")
    assert row is not None
    row.observe_problem("io_hung", "io_hung", "stuck", now)
    table.add_pair("h-awaiting", "network", TIMING)


def test_snapshot_is_sorted_worst_first(table: StatusTable, clock: FakeClock) -> None:
    _make_states(table, clock)
    snap = table.snapshot()
    assert [(r["pair"], r["state"]) for r in snap] == [
        ("c-stale", "stale"),
        ("f-inv", "invalid"),
        ("g-hung", "io_hung"),
        ("b-late", "late"),
        ("h-awaiting", "awaiting"),
        ("d-stopped", "stopped"),
        ("e-retired", "retired"),
        ("a-alive", "alive"),
    ]
    severities = [SEVERITY[str(r["state"])] for r in snap]
    assert severities == sorted(severities)
    assert set(SEVERITY) == set(STATES)
    assert FAILED < set(STATES)
    assert FRESH < set(STATES)


def test_snapshot_ties_sort_by_pair_then_path(table: StatusTable) -> None:
    for pair in ("zz", "aa", "mm"):
        table.add_pair(pair, "both", TIMING)
    snap = table.snapshot()
    assert [(r["pair"], r["path"]) for r in snap] == [
        (p, path) for p in ("aa", "mm", "zz") for path in ("network", "volume")
    ]


def test_snapshot_is_json_serialisable(table: StatusTable, clock: FakeClock) -> None:
    _make_states(table, clock)
    snap = table.snapshot()
    back = json.loads(json.dumps(snap))
    assert back == snap
    alive = next(r for r in back if r["pair"] == "a-alive")
    assert alive["incarnation"] == f"{INC_A:016x}"
    assert alive["up"] is True
    assert alive["method"] == "volume"
    assert alive["volume"] == "/srv/hb/a-alive.vol"
    assert alive["serial"] == 5
    assert alive["age"] == pytest.approx(POLL_JITTER + 0.1)
    assert alive["missed"] == 0
    assert alive["interval"] == 1
    assert alive["miss_threshold"] == 3
    assert alive["declared_interval"] == 1.0
    stale = next(r for r in back if r["pair"] == "c-stale")
    assert stale["up"] is False
    assert stale["age"] == pytest.approx(4 + POLL_JITTER + 0.1)
    assert stale["missed"] == 3
    assert stale["missed_total"] == 3
    late = next(r for r in back if r["pair"] == "b-late")
    assert late["up"] is True
    assert late["missed"] == 1
    invalid = next(r for r in back if r["pair"] == "f-inv")
    assert invalid["reason"] == "checksum_mismatch"
    assert invalid["errors"] == {"checksum_mismatch": 1}
    waiting = next(r for r in back if r["pair"] == "h-awaiting")
    assert waiting["age"] is None
    assert waiting["incarnation"] is None
    assert waiting["clock_skew"] is None


def test_a_resumed_writer_is_one_serial_on_a_hidden_one_many() -> None:
    """After a stale silence, the same incarnation one serial on is a frozen writer that
    resumed (an undead candidate); many serials on, the writer beat all along and only the
    reader (a stalled read) or the path (a cut link) could not see it."""
    frozen = Feed()
    frozen.beat()
    frozen.clock.advance(1)
    frozen.beat()
    assert frozen.state() == "alive"
    assert frozen.wait(5) == "stale"
    frozen.clock.advance(1)
    frozen.beat()  # serial + 1 after 6 s of silence
    assert frozen.row.resumed

    hidden = Feed()
    hidden.beat()
    hidden.clock.advance(1)
    hidden.beat()
    assert hidden.wait(5) == "stale"
    hidden.clock.advance(1)
    hidden.serial += 5  # the writer beat on while nobody saw it
    hidden.beat()
    assert not hidden.row.resumed


def test_table_timers_judge_each_row_at_its_moment_not_its_buckets() -> None:
    """Rows due inside one timer bucket are judged when each is due (run_due on a fake
    clock is exact), and a stopped row, which can never change, holds no timer."""
    clock = FakeClock()
    table = StatusTable(clock, site="s")
    for pair, offset in (("a", 0.0), ("b", 0.004), ("s", 0.0)):
        table.add_pair(pair, "volume", TIMING, volume=f"/v/{pair}")
        row = table.row(pair, "volume")
        assert row is not None
        clock.advance(offset)
        row.observe_record(rec(1, pair_id=pair), clock.monotonic(), clock.wall())
        clock.advance(0.001)
        row.observe_record(rec(2, pair_id=pair), clock.monotonic(), clock.wall())
        table.touch(row, clock.monotonic())
    stopper = table.row("s", "volume")
    a, b = table.row("a", "volume"), table.row("b", "volume")
    assert stopper is not None
    assert a is not None
    assert b is not None
    stopper.observe_record(rec(3, pair_id="s", state=State.STOPPING), clock.monotonic(), 0.0)
    table.touch(stopper, clock.monotonic())
    assert stopper.state == "stopped"
    stale_a = a.last_change + TIMING.miss_threshold * TIMING.interval  # type: ignore[operator]
    clock.advance(stale_a - clock.monotonic())
    table.run_due(clock.monotonic())
    assert (a.state, b.state) == ("stale", "late")  # b is due 5 ms later (same 10 ms bucket)
    clock.advance(0.004)
    table.run_due(clock.monotonic())
    assert b.state == "late"
    clock.advance(0.0015)
    table.run_due(clock.monotonic())
    assert b.state == "stale"
    clock.advance(3600)
    table.run_due(clock.monotonic())
    assert stopper.state == "stopped"
    assert stopper.timer == float("inf")


async def test_run_timers_takes_a_silent_row_late_then_stale_in_virtual_time() -> None:
    """run_timers sleeps on the table's clock: with nothing but the FakeClock moving (no
    evaluate(), no real sleep) a silent row goes late, then stale, each within one timer
    bucket of its moment, and the loop wakes only when a row can change (or once a
    second), not at every bucket."""
    clock = FakeClock()
    table = StatusTable(clock, site="s")
    table.add_pair("db1", "volume", TIMING, volume="/v/db1")
    row = table.row("db1", "volume")
    assert row is not None
    row.observe_record(rec(1), clock.monotonic(), clock.wall())
    clock.advance(1.0)
    row.observe_record(rec(2), clock.monotonic(), clock.wall())
    table.touch(row, clock.monotonic())
    beat = clock.monotonic()
    seen = [(0.0, row.state)]
    wakeups = 0
    began = time.monotonic()
    async with anyio.create_task_group() as tg:
        await tg.start(table.run_timers)
        await clock.settle()
        while clock.monotonic() < beat + 8.0:
            first = clock.next_deadline()
            assert first is not None  # run_timers always sleeps on the clock
            clock.advance(first - clock.monotonic())
            await clock.settle()
            wakeups += 1
            if row.state != seen[-1][1]:
                seen.append((clock.monotonic() - beat, row.state))
        tg.cancel_scope.cancel()
    assert time.monotonic() - began < 1.0
    assert [state for _, state in seen] == ["alive", "late", "stale"], seen
    late_at, stale_at = seen[1][0], seen[2][0]
    late_due = POLL_JITTER + 2 * TIMING.interval  # one beat missed, a poll period ago
    slop = TIMER_GRAIN + 1e-9  # (run_timers wakes when a bucket ends; float rounding)
    assert late_due <= late_at <= late_due + slop, seen
    assert 3.0 <= stale_at <= 3.0 + slop, seen
    assert row.missed_total == 7  # counted on once a second: at 2.1 s, 3.1 s ... 8.1 s
    assert wakeups <= 12, wakeups  # 8 s: its timers and the 1 s cap, not 800 buckets


async def test_a_timer_earlier_than_the_sleep_wakes_run_timers() -> None:
    """A row added while run_timers sleeps (its 1 s cap: nothing due) sets the wake event:
    the loop sleeps again until that row's timer, so the row goes stale on time rather
    than at the end of the old sleep."""
    clock = FakeClock()
    table = StatusTable(clock, site="s")
    start = clock.monotonic()
    async with anyio.create_task_group() as tg:
        await tg.start(table.run_timers)
        await clock.settle()
        assert clock.next_deadline() == start + 1.0
        clock.advance(0.3)
        await clock.settle()
        fast = Timing(interval=0.1, miss_threshold=3, recover_beats=2)  # grace 0.4 s
        table.add_pair("db1", "volume", fast, volume="/v/db1")
        row = table.row("db1", "volume")
        assert row is not None
        assert row.state == "awaiting"
        await clock.settle()
        first = clock.next_deadline()
        assert first is not None
        assert start + 0.7 <= first <= start + 0.7 + TIMER_GRAIN + 1e-9, first - start
        await clock.run_for(first - clock.monotonic())
        assert row.state == "stale"
        tg.cancel_scope.cancel()
