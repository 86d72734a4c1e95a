"""The io_uring read path (hbmon/uring.py, hbmon/ringreads.py) on real loop devices."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import anyio
import pytest
from conftest import LoopdevFactory, need
from faultfs import FaultFS
from faultfs import available as faultfs_available

from hbmon.clock import SystemClock
from hbmon.config import Timing
from hbmon.poller import Poller
from hbmon.record import Record
from hbmon.status import StatusTable
from hbmon.uring import Ring, available, buffer_address

pytestmark = pytest.mark.root


def require_uring() -> None:
    need(available(), "io_uring is not available on this machine (kernel or architecture)")


def write_image(image: Path, slot: int, record: Record) -> None:
    """Write underneath the loop device, as an array's remote copy would."""
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, record.encode_block(512), slot * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_ring_reads_what_is_on_the_device_and_names_errors(
    loopdev_factory: LoopdevFactory,
) -> None:
    require_uring()
    image, dev = loopdev_factory(1 << 20)
    for slot in range(8):
        write_image(image, slot, Record(f"p{slot}", 9, 100 + slot, 1.7e9, 1.0))
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    pool = mmap.mmap(-1, 8 * 4096)
    ring = Ring(16)
    try:
        base = buffer_address(pool)
        reads = [(fd, base + i * 4096, 512, i * 4096, i + 1) for i in range(8)]
        reads.append((999_999, base, 512, 0, 77))  # not an open file
        assert ring.submit(reads) == 9
        done: dict[int, int] = {}
        for _ in range(2000):
            done.update(ring.reap())
            if len(done) == 9:
                break
            anyio_sleep_briefly()
        assert done.pop(77) == -errno.EBADF
        assert done == {i + 1: 512 for i in range(8)}
        assert ring.inflight == 0
        for i in range(8):
            assert pool[i * 4096 : i * 4096 + 8] == b"HBMONREC"
            assert int.from_bytes(pool[i * 4096 + 24 : i * 4096 + 32], "little") == 100 + i
        with pytest.raises(ValueError, match="room for"):
            ring.submit([(fd, base, 512, 0, 1)] * 17)
    finally:
        ring.close()
        os.close(fd)
        pool.close()


def anyio_sleep_briefly() -> None:
    import time

    time.sleep(0.001)


async def test_the_poller_reads_block_devices_through_the_ring(
    loopdev_factory: LoopdevFactory,
) -> None:
    """Rows on loop devices, fed underneath: alive through io_uring reads; a device
    that shrinks under its slots gives io_error / truncated; the backend says io_uring."""
    require_uring()
    devices = [loopdev_factory(1 << 20) for _ in range(2)]
    clock = SystemClock()
    table = StatusTable(clock)
    poller = Poller(table, clock, threads=2, ring=True)
    assert poller.ring is not None
    assert poller.statistics().io_backend == "io_uring"
    # device 0 carries slots 4..7, device 1 slots 0..3
    pairs = [
        (f"d{d}s{s}", image, dev, s + 4 * (d == 0))
        for d, (image, dev) in enumerate(devices)
        for s in range(4)
    ]
    for pair, image, dev, slot in pairs:
        write_image(image, slot, Record(pair, 5, 1, 1.7e9, 0.1))
        poller.watch(pair, dev, slot, "volume", Timing(interval=0.1))
    async with anyio.create_task_group() as tg:
        await tg.start(poller.run)
        for serial in range(2, 14):
            for pair, image, _, slot in pairs:
                write_image(image, slot, Record(pair, 5, serial, 1.7e9, 0.1))
            await anyio.sleep(0.1)
        for pair, *_ in pairs:
            row = table.row(pair, "volume")
            assert row is not None
            assert row.state == "alive", (pair, row.state, row.reason, row.detail)
            assert row.serial is not None
            assert row.serial >= 9
        submitted = poller.ring.submitted_total
        assert submitted >= len(pairs) * 6  # after each first read (a thread), the ring
        # Device 0 shrinks under its slots: those reads come back short (0 bytes), go to a
        # thread, which names it; the rows of device 1 beat on.
        os.truncate(devices[0][0], 4 * 4096)
        await anyio.run_process(["losetup", "-c", devices[0][1]])
        for serial in range(14, 30):
            for pair, image, _, slot in pairs[4:]:
                write_image(image, slot, Record(pair, 5, serial, 1.7e9, 0.1))
            await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    for pair, *_ in pairs[:4]:
        row = table.row(pair, "volume")
        assert row is not None
        assert (row.state, row.reason) == ("io_error", "truncated"), (pair, row.state, row.detail)
    for pair, *_ in pairs[4:]:
        row = table.row(pair, "volume")
        assert row is not None
        assert row.state == "alive", (pair, row.state, row.reason)


def test_threads_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HBMON_IO_BACKEND", "threads")
    clock = SystemClock()
    table = StatusTable(clock)
    poller = Poller(table, clock, threads=2)
    assert poller.ring is None
    assert poller.statistics().io_backend == "threads"


async def test_a_read_the_device_never_answers_is_io_hung_and_recovers(
    loopdev_factory: LoopdevFactory, tmp_path: Path
) -> None:
    """A loop device whose backing file sits on the fault-injecting FUSE file system
    (tests/faultfs.py), set to hang every read: the O_DIRECT read through the ring never
    completes.  The row turns io_hung at its read_timeout with no thread stuck (the read
    waits in the ring), the row on another device keeps beating, and once the file
    system answers again the row is alive."""
    require_uring()
    why = faultfs_available()
    need(why is None, f"faultfs: {why}")
    _, dev_b = loopdev_factory(1 << 20)
    listed = await anyio.run_process(["losetup", "--noheadings", "--output", "BACK-FILE", dev_b])
    image_b = Path(listed.stdout.decode().strip())
    with FaultFS(tmp_path / "ffs") as fs:
        backing = fs.real("dev.img")
        backing.write_bytes(bytes(1 << 20))
        attached = await anyio.run_process(["losetup", "--find", "--show", str(fs.path("dev.img"))])
        dev_a = attached.stdout.decode().strip()
        try:
            clock = SystemClock()
            table = StatusTable(clock)
            poller = Poller(table, clock, threads=2, ring=True)
            timing = Timing(interval=0.1, read_timeout=0.5, miss_threshold=3)
            serial = 1
            write_image(backing, 0, Record("hung", 5, serial, 1.7e9, 0.1))
            write_image(image_b, 0, Record("fine", 5, serial, 1.7e9, 0.1))
            poller.watch("hung", dev_a, 0, "volume", timing)
            poller.watch("fine", dev_b, 0, "volume", timing)

            async def beat(seconds: float) -> None:
                nonlocal serial
                for _ in range(round(seconds / 0.1)):
                    serial += 1
                    write_image(backing, 0, Record("hung", 5, serial, 1.7e9, 0.1))
                    write_image(image_b, 0, Record("fine", 5, serial, 1.7e9, 0.1))
                    await anyio.sleep(0.1)

            def state(pair: str) -> str:
                row = table.row(pair, "volume")
                assert row is not None
                return row.state

            async with anyio.create_task_group() as tg:
                await tg.start(poller.run)
                with fs.healing():
                    await beat(1.5)
                    assert (state("hung"), state("fine")) == ("alive", "alive")
                    assert poller.ring is not None
                    submitted = poller.ring.submitted_total
                    fs.set("dev.img", read="hang")
                    await beat(1.5)
                    assert state("hung") == "io_hung"
                    assert state("fine") == "alive"
                    assert poller.ring.submitted_total > submitted  # the ring was reading
                    assert poller.ring.ring.inflight >= 1  # the hung read waits in the ring
                    assert poller.statistics().workers_stuck == 0  # and holds no thread
                fs.heal()
                await beat(2.0)
                assert (state("hung"), state("fine")) == ("alive", "alive")
                tg.cancel_scope.cancel()
        finally:
            fs.heal()
            await anyio.run_process(["losetup", "-d", dev_a], check=False)
