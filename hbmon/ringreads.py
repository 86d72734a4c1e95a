"""Block-device reads through io_uring: the poller's O_DIRECT path without threads.

The poller hands :meth:`RingReads.submit` the block-device volumes that are due (already
opened, by a first read on a worker thread that also learnt their block size).  Each
read gets a slot of a pinned, page-aligned buffer pool, one ``io_uring_enter`` submits
the whole tick's reads, and :meth:`RingReads.run` -- woken by an eventfd the kernel
signals on completion -- hands each result back to the poller.  A read the device never
answers keeps its slot and stays in flight: the poller's own deadline shows the row
``io_hung`` exactly as for a thread that never returns, and every other read goes on.
When the pool or the ring is full, or io_uring is not available, reads go to threads.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from hbmon.record import SLOT_SIZE
from hbmon.uring import Ring, available, buffer_address

if TYPE_CHECKING:
    from hbmon.target import Target

SLOT_BYTES = 4096  # one pool slot: a logical block up to the 4096-byte record slot
SLOTS = 1024  # reads in flight at most (4 MiB of buffers)

#: ``result(target, data, error, seconds)``: ``data`` is a view of what was read (valid
#: during the call only), or None with ``error`` an errno.
Result = Callable[["Target", memoryview | None, int, float], None]


class RingReads:
    """An io_uring ring, its buffer pool, and the targets whose reads are in flight."""

    def __init__(self, slots: int = SLOTS) -> None:
        self.ring = Ring(slots)
        self.slots = min(slots, self.ring.entries)
        self.pool = mmap.mmap(-1, self.slots * SLOT_BYTES)
        self.view = memoryview(self.pool)
        self.base = buffer_address(self.pool)
        self.free = list(range(self.slots - 1, -1, -1))
        self.reading: list[Target | None] = [None] * self.slots
        self.started = [0.0] * self.slots
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ring.notify(self.eventfd)
        self.submitted_total = 0

    @staticmethod
    def create() -> RingReads | None:
        """A ring if this machine can run one, else None (threads do the reads)."""
        if not available():
            return None
        try:
            return RingReads()
        except OSError:
            return None

    def submit(self, targets: list[Target]) -> list[Target]:
        """Submit reads of ``targets``; returns those that must go to threads instead."""
        n = min(len(targets), len(self.free))
        if not n:
            return targets
        reads = []
        now = time.perf_counter()
        for target in targets[:n]:
            vol = target.volume
            assert vol is not None
            slot = self.free.pop()
            self.reading[slot], self.started[slot] = target, now
            offset = target.slot * SLOT_SIZE
            reads.append((vol.fd, self.base + slot * SLOT_BYTES, vol.block_size, offset, slot + 1))
        try:
            self.ring.submit(reads)
        except OSError:
            for *_, user_data in reads:
                self.reading[user_data - 1] = None
                self.free.append(user_data - 1)
            return targets
        self.submitted_total += n
        return targets[n:]

    async def run(self, result: Result) -> None:
        """Hand every completed read to ``result``, as completions arrive; forever."""
        while True:
            await anyio.wait_readable(self.eventfd)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.eventfd)
            self.reap(result)

    def reap(self, result: Result) -> int:
        """Hand completed reads to ``result`` now; returns how many."""
        done = self.ring.reap()
        now = time.perf_counter()
        view = self.view
        for user_data, res in done:
            slot = user_data - 1
            target = self.reading[slot]
            self.reading[slot] = None
            if target is not None:
                start = slot * SLOT_BYTES
                if res >= 0:
                    result(target, view[start : start + res], 0, now - self.started[slot])
                else:
                    result(target, None, -res or errno.EIO, now - self.started[slot])
            self.free.append(slot)
        return len(done)

    def close(self) -> None:
        self.ring.close()  # the kernel cancels or finishes what is still in flight
        os.close(self.eventfd)
        with contextlib.suppress(BufferError):
            self.view.release()
            self.pool.close()
