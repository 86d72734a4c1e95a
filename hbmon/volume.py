"""Heartbeat volume I/O: plain synchronous functions, called from worker threads.

Block devices are read with O_DIRECT into a buffer aligned to the device's logical block
size, because the array's remote copy writes underneath the host's page cache: a
buffered reader would keep returning the page it cached first.  Writes are one aligned
block with O_DIRECT|O_DSYNC, so a record is never torn across sectors and is on the
device when the call returns.  Regular files (the demo, file-backed labs) are read
normally and written with pwrite + fdatasync.

Nothing here knows about time or the event loop; deadlines are enforced by the caller
(:mod:`hbmon.workers`), which runs these functions on threads it can abandon.  The one
exception is a buffered read of a regular file with ``RWF_NOWAIT`` on a local file
system (``Volume.nowait``, see :func:`nowait_refused`), which the kernel either serves
from the page cache at once or refuses (EAGAIN), so the poller makes it on the event loop.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import time
from dataclasses import dataclass, field

from hbmon.errors import RecordError, SlotTakenError, VolumeError
from hbmon.record import RECORD_SIZE, SLOT_SIZE, Record, decode, describe_slot

BLKSSZGET = 0x1268  # ioctl: logical block size of a block device
BLKGETSIZE64 = 0x80081272  # ioctl: size of a block device in bytes
FILE_READ_SIZE = 512

#: Local file systems whose buffered reads honour RWF_NOWAIT: a cached page is copied at
#: once, anything that would wait (a page being read in, a lock) fails with EAGAIN.
#: FUSE and network file systems are left out: a read there waits on a server.
NOWAIT_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs"})


@dataclass(eq=False, slots=True)
class Volume:
    """An open heartbeat volume."""

    path: str
    fd: int
    is_block: bool
    block_size: int
    writable: bool
    buffer: mmap.mmap | None = field(default=None, repr=False)
    #: reads may be tried with RWF_NOWAIT (a regular file on a file system in NOWAIT_FS)
    nowait: bool = False

    @property
    def io_size(self) -> int:
        """Bytes read or written per slot: one logical block (512 for files)."""
        return self.block_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None


def open_volume(path: str, *, write: bool = False, create: bool = False) -> Volume:
    """Open ``path`` for reading (or reading and writing).

    With ``create`` a missing regular file is created (mode 0644); a missing block
    device is an error.  Raises :class:`VolumeError` with reason ``missing``,
    ``permission`` or ``io_error``.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not (write and create):
            raise VolumeError(path, "does not exist", reason="missing") from None
        st = None
    except OSError as err:
        raise volume_error(path, err) from None
    is_block = st is not None and stat.S_ISBLK(st.st_mode)
    flags = os.O_RDWR if write else os.O_RDONLY
    flags |= os.O_CLOEXEC
    if is_block:
        flags |= os.O_DIRECT
        if write:
            flags |= os.O_DSYNC
    elif write and create:
        flags |= os.O_CREAT
    try:
        fd = _open(path, flags, noatime=not write and not is_block)
    except OSError as err:
        raise volume_error(path, err) from None
    try:
        if is_block:
            raw = fcntl.ioctl(fd, BLKSSZGET, b"\0\0\0\0")
            block_size = struct.unpack("i", raw)[0]
            if not struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0]:
                raise VolumeError(
                    path,
                    "is a block device of size 0 (a detached loop device or a removed "
                    "medium): attach it again",
                    reason="missing",
                )
            if block_size < RECORD_SIZE or SLOT_SIZE % block_size:
                raise VolumeError(
                    path, f"logical block size {block_size} does not divide the 4096-byte slot"
                )
            buffer = mmap.mmap(-1, block_size)  # page aligned, so aligned for O_DIRECT
        else:
            if st is not None and not stat.S_ISREG(st.st_mode) and write:
                raise VolumeError(path, "is neither a block device nor a regular file")
            block_size, buffer = FILE_READ_SIZE, None
    except BaseException:
        os.close(fd)
        raise
    nowait = not is_block and not write and _fs_type(os.fstat(fd).st_dev) in NOWAIT_FS
    return Volume(path, fd, is_block, block_size, write, buffer, nowait)


def _open(path: str, flags: int, *, noatime: bool) -> int:
    """``os.open``; a reader of a regular file asks for ``O_NOATIME`` first.

    Under ``relatime`` every read of a file written since its last read updates the
    access time: at 10,000 volumes a second that was an inode made dirty (and journalled)
    for every poll, a third of the kernel's share of a read.  The kernel allows the flag
    only to the file's owner (or CAP_FOWNER); anyone else gets EPERM, and then a plain open.
    """
    if noatime:
        try:
            return os.open(path, flags | os.O_NOATIME, 0o644)
        except PermissionError:
            pass
    return os.open(path, flags, 0o644)


def read_slot(vol: Volume, slot: int) -> bytes:
    """The first block of ``slot``: fewer bytes when the volume ends inside it."""
    offset = slot * SLOT_SIZE
    try:
        if vol.buffer is not None:
            n = os.preadv(vol.fd, [vol.buffer], offset)
            return vol.buffer[:n]
        return os.pread(vol.fd, vol.io_size, offset)
    except OSError as err:
        raise volume_error(vol.path, err) from None


def nowait_refused(vol: Volume, err: OSError) -> int:
    """What a read with ``RWF_NOWAIT`` that raised ``err`` means: -1, read it on a thread.

    EAGAIN: the page is not cached (the kernel would wait).  EOPNOTSUPP or EINVAL: the
    file system does not allow the flag, so ``vol.nowait`` is cleared.  Anything else
    the thread's read meets again and names.
    """
    if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):
        vol.nowait = False
    return -1


_mounts: dict[int, str] = {}  # replaced whole, never mutated: read by several threads
_mounts_read = -1.0


def _fs_type(dev: int) -> str:
    """The file system type of device number ``dev`` (from /proc/self/mountinfo; the
    table is re-read when ``dev`` is unknown or it is more than 5 s old, because
    anonymous device numbers are reused by later mounts)."""
    global _mounts, _mounts_read
    now = time.monotonic()
    if dev not in _mounts or now - _mounts_read > 5.0:
        table: dict[int, str] = {}
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields, _, rest = line.partition(" - ")
                    major, _, minor = fields.split()[2].partition(":")
                    table[os.makedev(int(major), int(minor))] = rest.split(" ", 1)[0]
        except (OSError, ValueError, IndexError):
            table = {}
        _mounts, _mounts_read = table, now
    return _mounts.get(dev, "")


def write_slot(vol: Volume, slot: int, block: bytes, *, sync: bool = True) -> None:
    """Write one block at the start of ``slot`` and make it durable.

    Block devices are written with O_DIRECT|O_DSYNC: durable when the call returns.  A
    regular file is fdatasync'ed unless ``sync`` is false, for a caller that writes a
    batch of slots and syncs each file once (see :func:`sync_files`).
    """
    if not vol.writable:
        raise VolumeError(vol.path, "was opened read-only")
    if len(block) != vol.io_size:
        raise ValueError(f"block of {len(block)} bytes, the volume takes {vol.io_size}")
    offset = slot * SLOT_SIZE
    assert len(block) <= SLOT_SIZE  # never a byte outside the slot
    try:
        if vol.buffer is not None:
            vol.buffer[:] = block
            n = os.pwritev(vol.fd, [vol.buffer], offset)
        else:
            n = os.pwrite(vol.fd, block, offset)
            if sync:
                os.fdatasync(vol.fd)
    except OSError as err:
        if vol.is_block and err.errno == errno.EPERM:  # what a write-protected device says
            raise VolumeError(
                vol.path,
                f"{err.strerror} (errno {err.errno}): the block device is read-only "
                "(blockdev --getro); make it writable (blockdev --setrw) or beat elsewhere",
                reason="read_only",
            ) from None
        raise volume_error(vol.path, err) from None
    if n != len(block):
        raise VolumeError(vol.path, f"short write at slot {slot}: {n} of {len(block)} bytes")


def sync_files(volumes: list[Volume]) -> dict[int, VolumeError]:
    """fdatasync each file once (volumes of one file share the sync); returns the
    failures keyed by ``id(volume)`` for every volume of a file that failed."""
    by_file: dict[tuple[int, int], list[Volume]] = {}
    for vol in volumes:
        if not vol.is_block and vol.fd >= 0:
            st = os.fstat(vol.fd)
            by_file.setdefault((st.st_dev, st.st_ino), []).append(vol)
    failed: dict[int, VolumeError] = {}
    for group in by_file.values():
        try:
            os.fdatasync(group[0].fd)
        except OSError as err:
            for vol in group:
                failed[id(vol)] = volume_error(vol.path, err)
    return failed


def claim_slot(vol: Volume, slot: int, pair_id: str, *, force: bool = False) -> Record | None:
    """Check that ``slot`` may be written for ``pair_id``; returns the record found, if any.

    A zeroed slot, a slot past the end of a file, or a record of the same pair may be
    written.  Anything else (another pair's record, foreign data) raises
    :class:`SlotTakenError` unless ``force``.
    """
    data = read_slot(vol, slot)
    try:
        return decode(data, expected_id=pair_id)
    except RecordError as err:
        if err.reason == "zeroed" and not any(data):
            return None
        if err.reason == "truncated" and not vol.is_block and not any(data):
            return None
        if force:
            return None
        raise SlotTakenError(vol.path, slot, describe_slot(data)) from None


def volume_error(path: str, err: OSError) -> VolumeError:
    """The VolumeError for ``err`` on ``path``, its reason named from the errno."""
    reason = {
        errno.ENOENT: "missing",
        errno.EACCES: "permission",
        errno.EPERM: "permission",
        errno.ENOSPC: "no_space",
        errno.EDQUOT: "no_space",
        errno.EROFS: "read_only",
    }.get(err.errno or 0, "io_error")
    return VolumeError(path, f"{err.strerror or err} (errno {err.errno})", reason=reason)
