"""The beater on regular files: claiming slots, refusing foreign ones, retrying errors."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from hbmon.beater import Beater
from hbmon.clock import FakeClock
from hbmon.config import BeatConfig
from hbmon.record import SLOT_SIZE, Record, State, decode
from hbmon.status import StatusTable


def slot_record(path: Path, slot: int, pair: str) -> Record:
    return decode(path.read_bytes()[slot * SLOT_SIZE :], pair)


async def pass_time(beater: Beater, seconds: float) -> None:
    """Let ``seconds`` of virtual time pass on the beater's FakeClock, beat by beat; the
    writes (real I/O on worker threads) are waited for before time moves on."""
    clock = beater.clock
    assert isinstance(clock, FakeClock)
    await clock.run_for(seconds, busy=lambda: any(t.inflight for t in beater.targets.values()))


async def beat_for(beats: tuple[BeatConfig, ...], seconds: float) -> tuple[StatusTable, Beater]:
    clock = FakeClock()
    table = StatusTable(clock)
    beater = Beater(table, clock, beats)
    async with anyio.create_task_group() as tg:
        await tg.start(beater.run)
        await pass_time(beater, seconds)
        await beater.stop()
        tg.cancel_scope.cancel()
    beater.close()
    return table, beater


async def test_creates_a_missing_file_and_beats_into_its_slot(tmp_path: Path) -> None:
    vol = tmp_path / "pvol.img"
    table, _ = await beat_for((BeatConfig("db1", vol, slot=2, interval=0.05),), 0.3)
    stats = table.writers["db1"]
    assert stats.written == 6 + 1  # a beat every 0.05 s of 0.3 s, then the stopping record
    assert not stats.errors
    rec = slot_record(vol, 2, "db1")
    assert rec.state is State.STOPPING
    assert rec.serial == stats.serial
    assert rec.incarnation == stats.incarnation
    assert vol.stat().st_size == 2 * SLOT_SIZE + 512  # slots 0 and 1 untouched (sparse zero)
    assert not any(vol.read_bytes()[: 2 * SLOT_SIZE])


async def test_each_start_is_a_new_incarnation(tmp_path: Path) -> None:
    vol = tmp_path / "pvol.img"
    beats = (BeatConfig("db1", vol, interval=0.05),)
    first, _ = await beat_for(beats, 0.1)
    second, _ = await beat_for(beats, 0.1)
    assert first.writers["db1"].incarnation != second.writers["db1"].incarnation
    assert slot_record(vol, 0, "db1").incarnation == second.writers["db1"].incarnation


@pytest.mark.parametrize(
    ("content", "holder"),
    [
        (Record("db2", 5, 9, 1.7e9, 1.0).encode_block(512), "pair 'db2'"),
        (b"LABELONE" + bytes(504), "not a valid hbmon record"),
    ],
    ids=["another-pair", "foreign-data"],
)
async def test_never_overwrites_a_slot_it_does_not_own(
    tmp_path: Path, content: bytes, holder: str
) -> None:
    vol = tmp_path / "pvol.img"
    vol.write_bytes(content)
    table, _ = await beat_for((BeatConfig("db1", vol, interval=0.05),), 0.25)
    stats = table.writers["db1"]
    assert stats.written == 0
    assert stats.errors["slot_taken"] == 5 + 1  # at every beat of 0.25 s and the stop
    assert holder in stats.last_error
    assert vol.read_bytes() == content


async def test_write_errors_are_counted_and_retried(tmp_path: Path) -> None:
    vol = tmp_path / "later" / "pvol.img"  # the directory does not exist yet
    clock = FakeClock()
    table = StatusTable(clock)
    beater = Beater(table, clock, (BeatConfig("db1", vol, interval=0.05),))
    async with anyio.create_task_group() as tg:
        await tg.start(beater.run)
        await pass_time(beater, 0.2)
        stats = table.writers["db1"]
        assert stats.written == 0
        assert stats.errors["missing"] == 4  # every beat of 0.2 s tried, none fatal
        vol.parent.mkdir()
        await pass_time(beater, 0.1)
        assert stats.written == 2  # the very next beats are written
        assert stats.errors["missing"] == 4
        tg.cancel_scope.cancel()
    beater.close()
    assert stats.last_error == ""
    assert slot_record(vol, 0, "db1").serial == stats.serial


async def test_beats_are_written_at_their_interval_in_virtual_time(tmp_path: Path) -> None:
    """The beater sleeps on its clock: on a FakeClock each write lands exactly one
    interval after the one before, on the beat's own phase; a writer paused for 3 virtual
    seconds (a frozen host) writes nothing meanwhile and resumes on the same grid, with
    the next serial.  20 virtual seconds take well under a real second."""
    clock = FakeClock()
    table = StatusTable(clock)
    written: list[float] = []
    beats = (BeatConfig("db1", tmp_path / "pvol.img", interval=0.5),)
    beater = Beater(table, clock, beats, on_written=lambda pair: written.append(clock.mono))
    start = clock.monotonic()
    began = time.monotonic()
    async with anyio.create_task_group() as tg:
        await tg.start(beater.run)
        await pass_time(beater, 10.0)
        beater.pause("db1")
        await pass_time(beater, 3.0)
        assert len(written) == 20  # nothing in the pause
        beater.resume("db1")
        await pass_time(beater, 7.0)
        tg.cancel_scope.cancel()
    beater.close()
    assert time.monotonic() - began < 1.0
    phase = written[0] - start
    assert 0 <= phase < 0.5
    due = [start + phase + 0.5 * k for k in range(40) if not 10.0 < phase + 0.5 * k < 13.0]
    assert written == pytest.approx(due, abs=1e-9)
    stats = table.writers["db1"]
    assert (stats.written, stats.serial) == (len(due), len(due))
    assert slot_record(tmp_path / "pvol.img", 0, "db1").serial == len(due)


async def test_a_late_start_keeps_the_beats_spread_over_the_interval(tmp_path: Path) -> None:
    """Configured 20 s before it runs (a site's arbiter start claims at 10,000 pairs take
    that long), the beater still spreads its 50 beats over their 1 s interval, each in its
    own phase, and each pair beats once a second.  They used to fall due all at once and
    stay in one burst every second for good (10,000 datagrams and writes at once)."""
    clock = FakeClock()
    table = StatusTable(clock)
    vol = tmp_path / "lun.vol"
    beats = tuple(BeatConfig(f"db{n}", vol, slot=n, interval=1.0) for n in range(50))
    beater = Beater(table, clock, beats)
    clock.advance(20.0)
    ticks: list[float] = []
    submit = beater._submit

    def noting(target: object, record: Record) -> object:
        ticks.append(clock.monotonic())
        return submit(target, record)  # type: ignore[arg-type]

    beater._submit = noting  # type: ignore[assignment,method-assign]
    async with anyio.create_task_group() as tg:
        await tg.start(beater.run)
        await pass_time(beater, 3.0)
        tg.cancel_scope.cancel()
    beater.close()
    assert 140 <= len(ticks) <= 160, len(ticks)  # ~3 beats each
    per_second = [len({t for t in ticks if s <= t - 1020.0 < s + 1}) for s in range(3)]
    assert all(n >= 10 for n in per_second), per_second  # ticks, not one burst a second
    assert all(1 <= table.writers[f"db{n}"].written <= 4 for n in range(50))
