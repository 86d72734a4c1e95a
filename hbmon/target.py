"""One watched volume slot (a :class:`Target`), the groups it is read in, and its read
on a worker thread (:func:`read_target`, a plain function, tested without an event loop).
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from typing import Literal

from hbmon.errors import RecordError, VolumeError
from hbmon.record import SLOT_SIZE, Decoder, Record
from hbmon.status import PathRow
from hbmon.volume import Volume, open_volume, read_slot


@dataclass(eq=False, slots=True)
class Group:
    """Volumes of one poll period that fall due in the same ``COALESCE`` bucket: the
    poller's timer wheel schedules a group once a period, not each volume in it (at
    10,000 volumes that is ~20 entries a second instead of 10,000)."""

    period: float
    due: float  # monotonic: the earliest due time of its members
    members: list[Target] = field(default_factory=list)
    dropped: int = 0  # members that left (unwatched, or moved on a new period)


@dataclass(eq=False, slots=True)
class Target:
    """One watched volume slot, owned by the poller."""

    pair: str
    path: str
    slot: int
    period: float
    read_timeout: float
    row: PathRow | None = None  # its row in the status table
    decoder: Decoder = field(init=False)
    offset: int = field(init=False)  # of the slot in the volume, bytes
    volume: Volume | None = None  # kept open between polls; touched only by its worker
    reopen_at: float = 0.0  # monotonic: read on a thread, opened afresh, about then
    reopen: bool = False  # the next read_target() opens the volume afresh
    inflight: bool = False
    group: Group | None = None  # the group it is read with (see Group)
    submitted: float = 0.0
    hung: bool = False
    active: bool = True
    seen: bool = False  # read at least once
    keep_open: bool = True  # False past the open-file budget: opened for each read

    def __post_init__(self) -> None:
        self.decoder = Decoder(self.pair)
        self.offset = self.slot * SLOT_SIZE


#: What one read of a heartbeat slot found.
ReadKind = Literal["record", "zeroed", "invalid", "io_error"]


_KIND_OF_REASON: dict[str, ReadKind] = {"zeroed": "zeroed", "truncated": "io_error"}


@dataclass(slots=True)
class ReadOutcome:
    kind: ReadKind
    record: Record | None
    reason: str
    detail: str
    duration: float


def read_target(target: Target) -> ReadOutcome:
    """Read and decode one slot.  Runs on a worker thread; never raises."""
    start = time.perf_counter()
    try:
        if target.reopen:
            target.reopen = False
            forget(target)
        if target.volume is None:
            target.volume = open_volume(target.path)
        data = read_slot(target.volume, target.slot)
    except VolumeError as err:
        forget(target)
        return ReadOutcome("io_error", None, err.reason, err.problem, time.perf_counter() - start)
    except OSError as err:  # anything volume.py did not foresee
        forget(target)
        return ReadOutcome("io_error", None, "io_error", str(err), time.perf_counter() - start)
    duration = time.perf_counter() - start
    try:
        try:
            record = target.decoder(data)
        except RecordError as err:
            if err.reason != "checksum_mismatch":
                raise
            # Read once more: a write landing during our read is torn for this read
            # only; damage that is really on the volume reads the same twice.
            record = target.decoder(read_slot(target.volume, target.slot))
    except VolumeError as err:
        forget(target)
        return ReadOutcome("io_error", None, err.reason, err.problem, duration)
    except RecordError as err:
        forget(target)  # reopen next time: the file may have been replaced
        kind = _KIND_OF_REASON.get(err.reason, "invalid")
        return ReadOutcome(kind, None, err.reason, err.detail, duration)
    if not target.keep_open:
        forget(target)
    return ReadOutcome("record", record, "", "", duration)


def open_file_budget(reserve: int = 512) -> int:
    """How many volumes may stay open between polls.

    The soft open-file limit is raised to the hard one; ``reserve`` descriptors stay
    free for HTTP, UDP, logs and the beater.  Volumes past the budget are still polled
    on every interval, each opened for its read and closed after it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
    return max(0, limit - reserve)


def forget(target: Target) -> None:
    if target.volume is not None:
        target.volume.close()
        target.volume = None
