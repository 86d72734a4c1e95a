"""The bounded log of state changes (hbmon/changes.py): a mass event is a few lines."""

from __future__ import annotations

import logging

import pytest

from hbmon.changes import ChangeLog
from hbmon.clock import FakeClock
from hbmon.config import Timing
from hbmon.record import Record
from hbmon.status import StatusTable

LOG = logging.getLogger("test.changes")


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG.name]


def test_a_burst_is_logged_then_counted_and_summed_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    changes = ChangeLog(LOG, burst=5, window=1.0)
    for i in range(30):
        kind = "volume alive -> late" if i % 3 else "verdict alive -> host_down"
        changes.change(10.0 + i * 0.01, kind, "pair %s changed", f"p{i}")
    assert lines(caplog) == [f"pair p{i} changed" for i in range(5)]
    changes.flush(10.5)  # the window is not over yet: nothing more
    assert len(lines(caplog)) == 5
    changes.flush(11.0)
    summary = lines(caplog)[-1]
    assert summary.startswith("... and 25 more state change(s) in 1.0 s")
    # 30 changes: 10 verdict ones (i % 3 == 0), 20 volume ones; 5 were logged (2 verdict)
    assert "volume alive -> late: 17" in summary
    assert "verdict alive -> host_down: 8" in summary
    assert changes.suppressed_total == 25
    changes.flush(12.0)  # summed up once only
    assert len(lines(caplog)) == 6
    changes.change(12.5, "x", "pair %s changed", "next")  # a new window logs again
    assert lines(caplog)[-1] == "pair next changed"


def test_a_quiet_site_logs_every_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    changes = ChangeLog(LOG, burst=3, window=1.0)
    for i in range(10):
        changes.change(float(i), "k", "change %d", i)
        changes.flush(float(i) + 0.5)
    assert lines(caplog) == [f"change {i}" for i in range(10)]


def test_a_site_going_stale_at_once_logs_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """500 pairs go stale in the same second: at most 50 lines, then one summary that
    counts the rest; the table itself has every row stale."""
    caplog.set_level(logging.INFO, "hbmon.status")
    clock = FakeClock()
    table = StatusTable(clock, site="s")
    timing = Timing(interval=1.0, miss_threshold=3)
    for i in range(500):
        pair = f"p{i:03d}"
        table.add_pair(pair, "volume", timing, volume=f"/v/{pair}")
        row = table.row(pair, "volume")
        assert row is not None
        row.observe_record(Record(pair, 7, 1, clock.wall(), 1.0), clock.monotonic(), clock.wall())
        clock.advance(0.001)
        row.observe_record(Record(pair, 7, 2, clock.wall(), 1.0), clock.monotonic(), clock.wall())
        table.touch(row, clock.monotonic())
    clock.advance(10.0)
    caplog.clear()
    table.run_due(clock.monotonic())
    assert {r.state for r in table.rows()} == {"stale"}
    one_by_one = [r.getMessage() for r in caplog.records if not r.getMessage().startswith("...")]
    # each pair's row change comes with its verdict change: the first 50 are 25 pairs' two
    assert len(one_by_one) == 50
    for i in range(25):
        row_line, verdict_line = one_by_one[2 * i : 2 * i + 2]
        assert row_line == f"pair p{i:03d} volume /v/p{i:03d}: alive -> stale"
        assert verdict_line.startswith(f"pair p{i:03d}: verdict alive -> host_down "), verdict_line
    clock.advance(1.0)
    table.changes.flush(clock.monotonic())
    summary = caplog.records[-1].getMessage()
    assert summary.startswith("... and 950 more state change(s) in 1.0 s"), summary
    # the other 475 pairs, two changes each
    assert "(volume alive -> stale: 475, verdict alive -> host_down: 475)" in summary, summary


def test_burst_zero_logs_every_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    changes = ChangeLog(LOG, burst=0, window=1.0)
    for i in range(200):
        changes.change(5.0, "k", "change %d", i)
    changes.flush(7.0)
    assert lines(caplog) == [f"change {i}" for i in range(200)]
