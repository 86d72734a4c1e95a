"""A minimal io_uring ring for reads: O_DIRECT block-device reads without a thread each.

A synchronous O_DIRECT ``pread`` of a loop device costs ~14 us of process CPU (most of
it the kernel putting the thread to sleep and waking it); through io_uring the same read
costs ~3.5 us, because a batch of reads is one system call and nobody sleeps per read.

This speaks the kernel ABI directly: the submission and completion rings and the
submission entries are shared memory (``mmap`` of the ring's file descriptor), filled
and read with :mod:`struct`; ``io_uring_enter`` is the only system call, one per batch.
Completions are read from shared memory without any system call at all.  PyPI's
``liburing`` binding was tried first: its current wheel dies of SIGILL on this machine's
CPU (it is built for newer instruction sets) and its last source release takes minutes
to compile -- see docs/performance.md.

The rings are shared with the kernel without memory barriers from Python, which is
correct on x86-64 (stores are seen in program order, loads are not reordered with
loads); :func:`available` says no anywhere else, and the caller uses threads.

Nothing here knows the event loop: :meth:`Ring.submit` queues and submits without
waiting, :meth:`Ring.reap` returns what has completed so far.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct

SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427
IORING_REGISTER_EVENTFD = 4
IORING_OP_READ = 22
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_FEAT_SINGLE_MMAP = 1

# io_uring_params, 120 bytes: sq_entries cq_entries flags sq_thread_cpu sq_thread_idle
# features wq_fd resv[3]; io_sqring_offsets (head tail ring_mask ring_entries flags
# dropped array resv1, user_addr:u64); io_cqring_offsets (head tail ring_mask
# ring_entries overflow cqes flags resv1, user_addr:u64).
_PARAMS = struct.Struct("<10I8IQ8IQ")
assert _PARAMS.size == 120
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")  # 64 bytes
_CQE = struct.Struct("<QiI")  # 16 bytes
_U32 = struct.Struct("<I")
assert _SQE.size == 64
assert _CQE.size == 16

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def available() -> bool:
    """Whether this machine can run :class:`Ring` (x86-64 Linux whose kernel allows
    io_uring: some disable it with kernel.io_uring_disabled or a seccomp filter)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        Ring(8).close()
    except OSError:
        return False
    return True


class Ring:
    """One io_uring instance for reads into caller-owned, pinned buffers."""

    def __init__(self, entries: int = 1024) -> None:
        params = bytearray(_PARAMS.size)  # the kernel writes the ring offsets into it
        fd = _syscall(
            SYS_IO_URING_SETUP,
            ctypes.c_uint(entries),
            (ctypes.c_char * _PARAMS.size).from_buffer(params),
        )
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_setup: {os.strerror(err)}")
        self.fd = fd
        try:
            f = _PARAMS.unpack(bytes(params))
            sq_entries, cq_entries, features = f[0], f[1], f[5]
            sq = f[10:18]
            cq = f[19:27]
            sq_head, sq_tail, sq_mask, _, _, _, sq_array = sq[:7]
            cq_head, cq_tail, cq_mask, _, _, cq_cqes = cq[:6]
            sq_size = sq_array + sq_entries * 4
            cq_size = cq_cqes + cq_entries * _CQE.size
            if features & IORING_FEAT_SINGLE_MMAP:
                sq_size = cq_size = max(sq_size, cq_size)
            self._sq = mmap.mmap(fd, sq_size, offset=IORING_OFF_SQ_RING)
            self._cq = (
                self._sq
                if features & IORING_FEAT_SINGLE_MMAP
                else mmap.mmap(fd, cq_size, offset=IORING_OFF_CQ_RING)
            )
            self._sqes = mmap.mmap(fd, sq_entries * _SQE.size, offset=IORING_OFF_SQES)
        except BaseException:
            os.close(fd)
            raise
        self.entries: int = sq_entries
        self._sq_head, self._sq_tail, self._sq_array = sq_head, sq_tail, sq_array
        self._sq_mask = _U32.unpack_from(self._sq, sq_mask)[0]
        self._cq_head, self._cq_tail, self._cqes = cq_head, cq_tail, cq_cqes
        self._cq_mask = _U32.unpack_from(self._cq, cq_mask)[0]
        self.inflight = 0

    def notify(self, eventfd: int) -> None:
        """Have the kernel signal ``eventfd`` whenever a completion is posted."""
        value = ctypes.c_int(eventfd)
        if _syscall(
            SYS_IO_URING_REGISTER, self.fd, IORING_REGISTER_EVENTFD, ctypes.byref(value), 1
        ):
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_register(eventfd): {os.strerror(err)}")

    def space(self) -> int:
        """How many more reads may be submitted now (completions not yet reaped count)."""
        return self.entries - self.inflight

    def submit(self, reads: list[tuple[int, int, int, int, int]]) -> int:
        """Queue ``(fd, address, length, offset, user_data)`` reads and submit them.

        ``address`` points into a buffer the caller keeps alive and untouched until the
        read's completion is reaped.  Returns how many were submitted (all, or OSError).
        """
        if not reads:
            return 0
        if len(reads) > self.space():
            raise ValueError(f"{len(reads)} reads, room for {self.space()}")
        sq, sqes, mask = self._sq, self._sqes, self._sq_mask
        tail = _U32.unpack_from(sq, self._sq_tail)[0]
        pack_sqe, pack_u32, array = _SQE.pack_into, _U32.pack_into, self._sq_array
        for fd, address, length, offset, user_data in reads:
            index = tail & mask
            pack_sqe(sqes, index * 64, IORING_OP_READ, 0, 0, fd, offset, address, length, 0,
                     user_data, 0, 0, 0, 0, 0)  # fmt: skip
            pack_u32(sq, array + index * 4, index)
            tail = (tail + 1) & 0xFFFFFFFF
        pack_u32(sq, self._sq_tail, tail)  # published after the entries (x86-64 order)
        todo = len(reads)
        while todo:
            n = _syscall(SYS_IO_URING_ENTER, self.fd, todo, 0, 0, None, 0)
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
            todo -= n
        self.inflight += len(reads)
        return len(reads)

    def reap(self) -> list[tuple[int, int]]:
        """``(user_data, result)`` of every read completed since the last call; no wait."""
        cq = self._cq
        head = _U32.unpack_from(cq, self._cq_head)[0]
        tail = _U32.unpack_from(cq, self._cq_tail)[0]
        if head == tail:
            return []
        out = []
        mask, base, unpack = self._cq_mask, self._cqes, _CQE.unpack_from
        while head != tail:
            user_data, result, _ = unpack(cq, base + (head & mask) * 16)
            out.append((user_data, result))
            head = (head + 1) & 0xFFFFFFFF
        _U32.pack_into(cq, self._cq_head, head)
        self.inflight -= len(out)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            for m in {id(x): x for x in (self._sq, self._cq, self._sqes)}.values():
                m.close()
            os.close(self.fd)
            self.fd = -1


def buffer_address(buffer: mmap.mmap) -> int:
    """The address of an anonymous mmap (page aligned, so aligned for O_DIRECT)."""
    return int(ctypes.addressof(ctypes.c_char.from_buffer(buffer)))
