"""The poller in-process: volumes past the open-file budget are still polled."""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from hbmon.clock import SystemClock
from hbmon.config import Timing
from hbmon.poller import Poller, open_file_budget
from hbmon.record import Record
from hbmon.status import StatusTable


def write_record(path: Path, pair: str, serial: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, Record(pair, 7, serial, 1.7e9, 0.1).encode_block(512), 0)
    finally:
        os.close(fd)


async def test_volumes_past_the_open_file_budget_are_polled(tmp_path: Path) -> None:
    clock = SystemClock()
    table = StatusTable(clock)
    poller = Poller(table, clock, threads=2)
    poller.open_budget = 2
    paths = [tmp_path / f"v{i}.vol" for i in range(5)]
    for path in paths:
        write_record(path, path.stem, 1)
        poller.watch(path.stem, str(path), 0, "volume", Timing(interval=0.1))
    kept = [t.pair for t in poller.targets.values() if t.keep_open]
    assert len(kept) == 2
    async with anyio.create_task_group() as tg:
        await tg.start(poller.run)
        for serial in range(2, 12):  # beats for a second
            for path in paths:
                write_record(path, path.stem, serial)
            await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    for target in poller.targets.values():
        row = table.row(target.pair, "volume")
        assert row is not None
        assert row.serial is not None
        # polled all along: it saw recent serials, and more than one change of them
        assert row.serial >= 8, (target.pair, row.serial)
        assert row.beats_seen >= 3, (target.pair, row.beats_seen)
        assert (target.volume is not None) == target.keep_open  # the others are closed


def test_the_budget_follows_the_open_file_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = open_file_budget(reserve=100)
    soft_after, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft_after >= soft
    assert budget == soft_after - 100
