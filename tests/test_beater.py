"""The beater on regular files: claiming slots, refusing foreign ones, retrying errors."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from hbmon.beater import Beater
from hbmon.clock import SystemClock
from hbmon.config import BeatConfig
from hbmon.record import SLOT_SIZE, Record, State, decode
from hbmon.status import StatusTable


def slot_record(path: Path, slot: int, pair: str) -> Record:
    return decode(path.read_bytes()[slot * SLOT_SIZE :], pair)


async def beat_for(beats: tuple[BeatConfig, ...], seconds: float) -> tuple[StatusTable, Beater]:
    clock = SystemClock()
    table = StatusTable(clock)
    beater = Beater(table, clock, beats)
    async with anyio.create_task_group() as tg:
        await tg.start(beater.run)
        await anyio.sleep(seconds)
        await beater.stop()
        tg.cancel_scope.cancel()
    beater.close()
    return table, beater


async def test_creates_a_missing_file_and_beats_into_its_slot(tmp_path: Path) -> None:
    vol = tmp_path / "pvol.img"
    table, _ = await beat_for((BeatConfig("db1", vol, slot=2, interval=0.05),), 0.3)
    stats = table.writers["db1"]
    assert stats.written >= 4
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
    assert stats.errors["slot_taken"] >= 3  # reported at every interval, never fatal
    assert holder in stats.last_error
    assert vol.read_bytes() == content


async def test_write_errors_are_counted_and_retried(tmp_path: Path) -> None:
    vol = tmp_path / "later" / "pvol.img"  # the directory does not exist yet
    clock = SystemClock()
    table = StatusTable(clock)
    beater = Beater(table, clock, (BeatConfig("db1", vol, interval=0.05),))
    async with anyio.create_task_group() as tg:
        await tg.start(beater.run)
        await anyio.sleep(0.2)
        stats = table.writers["db1"]
        assert stats.written == 0
        assert stats.errors["missing"] >= 2
        vol.parent.mkdir()
        with anyio.fail_after(2):
            while stats.written < 2:
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    beater.close()
    assert stats.last_error == ""
    assert slot_record(vol, 0, "db1").serial == stats.serial
