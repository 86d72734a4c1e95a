"""A simulated array remote copy, for the demo and labs without a storage array.

Like an array's asynchronous remote copy, every write to a PVOL slot is copied to the
matching SVOL slot ``lag`` seconds later.  A copy is all or nothing: the block is only
copied when its checksum is right (an array copies sector-atomic writes, so a reader of
the SVOL never sees half a record).  Faults for the lab: the link can be cut for one
pair or all (copies are dropped, as when an array suspends the pair), and a pair's SVOL
slot can be corrupted (copies for it stop until healed).
"""

from __future__ import annotations

import heapq
import logging
import os
from dataclasses import dataclass

import anyio
import anyio.abc
import anyio.to_thread

from hbmon.clock import Clock
from hbmon.errors import RecordError
from hbmon.record import RECORD_SIZE, SLOT_SIZE, decode
from hbmon.volume import FILE_READ_SIZE

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Link:
    """One mirrored slot: PVOL slot -> SVOL slot."""

    pair: str
    pvol: str
    svol: str
    slot: int


class FileCache:
    """Open file descriptors by path, for the copier thread only."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def copy_slots(links: list[Link], files: FileCache) -> int:
    """Copy each link's record block from PVOL to SVOL; returns how many were copied."""
    copied = 0
    for link in links:
        offset = link.slot * SLOT_SIZE
        try:
            block = os.pread(files.fd(link.pvol), FILE_READ_SIZE, offset)
            decode(block)  # all or nothing: never copy a torn or half-written record
            os.pwrite(files.fd(link.svol), block, offset)
            copied += 1
        except (OSError, RecordError) as err:
            log.debug("copy of %s skipped: %s", link.pair, err)
    return copied


def corrupt_slot(link: Link, files: FileCache) -> None:
    """Damage the SVOL record so its checksum fails (bit rot, a bad copy)."""
    fd = files.fd(link.svol)
    offset = link.slot * SLOT_SIZE
    block = bytearray(os.pread(fd, RECORD_SIZE, offset).ljust(RECORD_SIZE, b"\0"))
    block[:8] = b"HBMONREC"
    for i in range(40, 60):
        block[i] ^= 0x5A
    os.pwrite(fd, bytes(block), offset)


def truncate_slot(link: Link, files: FileCache) -> None:
    """Cut the SVOL file in the middle of the record (a LUN resized under the reader)."""
    os.ftruncate(files.fd(link.svol), link.slot * SLOT_SIZE + RECORD_SIZE // 2)


class RemoteCopy:
    """Copies PVOL writes to SVOLs after ``lag`` seconds; see the module docstring."""

    def __init__(self, clock: Clock, links: list[Link], *, lag: float = 0.05) -> None:
        self.clock = clock
        self.lag = lag
        self.links = {link.pair: link for link in links}
        self.cut_all = False
        self.cut: set[str] = set()
        self.corrupted: set[str] = set()
        self.copied = 0
        self._queue: list[tuple[float, str]] = []
        self._files = FileCache()
        self._limiter = anyio.CapacityLimiter(1)
        self._wake = anyio.Event()

    def written(self, pair: str) -> None:
        """A PVOL write of ``pair`` completed: copy it after the lag (if the link is up)."""
        if self.cut_all or pair in self.cut or pair in self.corrupted:
            return
        heapq.heappush(self._queue, (self.clock.monotonic() + self.lag, pair))
        self._wake.set()

    async def corrupt(self, pair: str) -> None:
        self.corrupted.add(pair)
        await anyio.to_thread.run_sync(
            corrupt_slot, self.links[pair], self._files, limiter=self._limiter
        )

    async def truncate(self, pair: str) -> None:
        self.corrupted.add(pair)
        await anyio.to_thread.run_sync(
            truncate_slot, self.links[pair], self._files, limiter=self._limiter
        )

    def heal(self) -> None:
        self.cut_all = False
        self.cut.clear()
        self.corrupted.clear()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        queue = self._queue
        try:
            while True:
                now = self.clock.monotonic()
                due: dict[str, Link] = {}
                while queue and queue[0][0] <= now:
                    _, pair = heapq.heappop(queue)
                    if not (self.cut_all or pair in self.cut or pair in self.corrupted):
                        due[pair] = self.links[pair]
                if due:
                    self.copied += await anyio.to_thread.run_sync(
                        copy_slots, list(due.values()), self._files, limiter=self._limiter
                    )
                self._wake = anyio.Event()
                until = queue[0][0] if queue else self.clock.monotonic() + 1.0
                await self.clock.sleep_until(until, self._wake)
        finally:
            self._files.close()
