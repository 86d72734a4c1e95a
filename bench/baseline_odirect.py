"""The naive O_DIRECT reader (target 2) and writer (target 8) hbmon is compared with.

    baseline_odirect.py read|write INTERVAL SLOTS FIRST_SLOT PREFIX DEVICE...

Device ``i`` carries pairs ``f"{PREFIX}{i}-{k}"`` in slots ``FIRST_SLOT .. FIRST_SLOT +
SLOTS - 1``.  Each slot is read (or written) once per INTERVAL.  One scheduler over a heap
of due times wakes every 10 ms and starts one task per due slot; each task makes exactly
one thread hop, ``await anyio.to_thread.run_sync(os.preadv, ...)`` (or ``os.pwritev``) on
the device opened with O_DIRECT (writes: O_DIRECT|O_DSYNC) into a page-aligned buffer, and
decodes (or encodes) the record with :mod:`hbmon.record`.  That is the per-read thread hop
the issue measures at 7-20 us of process CPU, without hbmon's batching.

A slot whose previous read (write) has not returned yet is skipped for that turn, so a
baseline that cannot keep up falls behind instead of piling up tasks.

A line ``stats`` on stdin answers ``stats ops=N errors=N`` on stdout.
"""

from __future__ import annotations

import heapq
import mmap
import os
import sys
import threading
import time
import zlib

import anyio
import anyio.to_thread

from hbmon.errors import RecordError
from hbmon.record import SLOT_SIZE, Record, decode

TICK = 0.01
BLOCK = 512


class Slot:
    __slots__ = ("buffer", "busy", "fd", "offset", "pair", "serial", "view")

    def __init__(self, fd: int, pair: str, slot: int) -> None:
        self.fd, self.pair, self.offset = fd, pair, slot * SLOT_SIZE
        self.buffer = mmap.mmap(-1, mmap.PAGESIZE)  # page aligned, as O_DIRECT wants
        self.view = memoryview(self.buffer)[:BLOCK]
        self.serial = 0
        self.busy = False  # its previous read (write) has not returned: skip this turn


class Baseline:
    def __init__(self, mode: str, interval: float, slots: list[Slot]) -> None:
        self.mode, self.interval, self.slots = mode, interval, slots
        self.ops = 0
        self.errors = 0
        self.incarnation = int.from_bytes(os.urandom(8), "little") | 1

    async def read(self, slot: Slot) -> None:
        try:
            n = await anyio.to_thread.run_sync(os.preadv, slot.fd, [slot.view], slot.offset)
            decode(slot.view[:n], slot.pair)
        except (OSError, RecordError):
            self.errors += 1
        self.ops += 1
        slot.busy = False

    async def write(self, slot: Slot) -> None:
        slot.serial += 1
        record = Record(slot.pair, self.incarnation, slot.serial, time.time(), self.interval)
        slot.view[:] = record.encode_block(BLOCK)
        try:
            await anyio.to_thread.run_sync(os.pwritev, slot.fd, [slot.view], slot.offset)
        except OSError:
            self.errors += 1
        self.ops += 1
        slot.busy = False

    async def run(self) -> None:
        op = self.read if self.mode == "read" else self.write
        start = time.monotonic()
        heap = [
            (start + (zlib.crc32(s.pair.encode()) % 1000) / 1000 * self.interval, i)
            for i, s in enumerate(self.slots)
        ]
        heapq.heapify(heap)
        async with anyio.create_task_group() as tg:
            while True:
                now = time.monotonic()
                while heap and heap[0][0] <= now:
                    due, i = heapq.heappop(heap)
                    slot = self.slots[i]
                    if not slot.busy:
                        slot.busy = True
                        tg.start_soon(op, slot)
                    nxt = due + self.interval
                    heapq.heappush(heap, (nxt if nxt > now else now + self.interval, i))
                await anyio.sleep(TICK)

    def commands(self) -> None:
        for line in sys.stdin:
            if line.strip() == "stats":
                print(f"stats ops={self.ops} errors={self.errors}", flush=True)
        os._exit(0)


def main() -> None:
    mode, interval, count, first, prefix = sys.argv[1:6]
    devices = sys.argv[6:]
    flags = os.O_DIRECT | os.O_CLOEXEC
    flags |= os.O_RDONLY if mode == "read" else os.O_RDWR | os.O_DSYNC
    slots = []
    for i, device in enumerate(devices):
        fd = os.open(device, flags)
        for k in range(int(first), int(first) + int(count)):
            slots.append(Slot(fd, f"{prefix}{i}-{k}", k))
    baseline = Baseline(mode, float(interval), slots)
    threading.Thread(target=baseline.commands, daemon=True).start()
    anyio.run(baseline.run)


if __name__ == "__main__":
    main()
