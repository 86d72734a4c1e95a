"""Crash consistency: the writer killed with SIGKILL at random moments.

After every kill the slot is read back (O_DIRECT on the loop device, as the poller reads
it) and must hold one valid record: the one the killed writer was writing (new) or the
one before it (old), never a torn or mixed one.  The serial never goes back within an
incarnation.  The next writer does not read the old serial back: it starts with a new
random incarnation and beats from serial 1 again (docs/format.md), and a reader (the real
:class:`PathRow` logic) takes that as a restart, never as a serial regression or an
undead writer.

Who writes.  ``hbmon run`` takes about a second to start (Python, imports, HTTP): 200
kills of it would take minutes.  So most kills hit a *forked* writer: a small resident
process imports hbmon once and, for each round, forks a child that runs the real
:class:`hbmon.beater.Beater` (its worker pool, :func:`hbmon.volume.write_slot` with
O_DIRECT|O_DSYNC on a block device, pwrite + fdatasync on a file).  The child only
wraps ``write_slot`` / ``sync_files`` to note in a shared page which serial it is
writing, so that after the kill the test knows which record was in flight.  A smaller
round kills the real ``hbmon run`` daemon the same way.

Where a kill landed is told two ways: the child's marker (inside ``write_slot`` or
``sync_files`` or between writes), and ``/proc/PID/task/*/syscall`` sampled just before
the kill (a thread inside pwrite/pwritev/fdatasync).  The counts are printed (``-s``).
"""

from __future__ import annotations

import mmap
import os
import platform
import random
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from helpers import start_site

from hbmon.clock import FakeClock
from hbmon.config import Timing
from hbmon.errors import RecordError
from hbmon.record import SLOT_SIZE, Record, decode
from hbmon.row import PathRow
from hbmon.volume import open_volume, read_slot

PAIR = "crash1"
SLOT = 3
INTERVAL = 0.002  # seconds: the writer is almost always writing
MAX_DELAY = 0.05  # seconds from fork to SIGKILL, uniformly random
ROUNDS = {"loop": 200, "file": 100}
DAEMON_ROUNDS = 10
SEED = int(os.environ.get("HBMON_CRASH_SEED", "0")) or random.randrange(1 << 30)

# x86-64 syscall numbers of the calls a writer can be inside of when killed (elsewhere
# the kills aimed at a syscall are aimed at write_slot instead)
X86_64 = platform.machine() == "x86_64"
_WRITE_SYSCALLS = {
    1: "write",
    18: "pwrite64",
    20: "writev",
    75: "fdatasync",
    296: "pwritev",
    328: "pwritev2",  # what os.pwritev calls on current glibc
}
# phase, incarnation, serial in flight, writes started, writes done, serial last written
_MARK = struct.Struct("<QQQQQQ")
PHASES = {0: "before_first_write", 1: "in_write_slot", 2: "between_writes", 3: "in_sync_files"}

# The resident writer: imports hbmon once, then forks one real Beater per "go" line.
ZYGOTE = r"""
import ctypes, mmap, os, signal, struct, sys
from pathlib import Path


def die_with_parent():  # never outlive the test, whatever happens to it
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


die_with_parent()

import anyio

import hbmon.beater as beater
from hbmon.clock import SystemClock
from hbmon.config import BeatConfig
from hbmon.record import decode
from hbmon.status import StatusTable

volume, marker, pair, slot, interval = sys.argv[1:6]
MARK = struct.Struct("<QQQQQQ")


async def warm_up():  # import what anyio.run and the worker pool load lazily, once
    await anyio.sleep(0)


anyio.run(warm_up)


def child():
    die_with_parent()
    fd = os.open(marker, os.O_RDWR)
    mark = mmap.mmap(fd, MARK.size)
    real_write, real_sync = beater.write_slot, beater.sync_files
    current = [0, 0, 0, 0, 0]  # incarnation, serial, started, done, last written

    def note(phase):
        mark[:] = MARK.pack(phase, *current)

    def write_slot(vol, slot_, block, *, sync=True):
        rec = decode(block)
        current[0], current[1] = rec.incarnation, rec.serial
        current[2] += 1
        note(1)
        real_write(vol, slot_, block, sync=sync)
        current[3] += 1
        current[4] = current[1]
        note(2)

    def sync_files(volumes):
        note(3)
        failed = real_sync(volumes)
        note(2)
        return failed

    beater.write_slot, beater.sync_files = write_slot, sync_files

    async def main():
        clock = SystemClock()
        table = StatusTable(clock)
        cfg = beater.BeatConfig(pair, Path(volume), slot=int(slot), interval=float(interval))
        await beater.Beater(table, clock, (cfg,), threads=1).run()

    anyio.run(main)


for line in sys.stdin:
    if line.strip() != "go":
        continue
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            child()
        except BaseException as exc:
            print(f"writer child failed: {exc!r}", file=sys.stderr, flush=True)
            code = 3
        os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


@dataclass
class Tally:
    """What the kills found (printed at the end of each test)."""

    kills: int = 0
    aimed: Counter[str] = field(default_factory=Counter)
    phases: Counter[str] = field(default_factory=Counter)
    in_syscall: Counter[str] = field(default_factory=Counter)
    outcome: Counter[str] = field(default_factory=Counter)  # old / new / untouched
    live_reads: int = 0
    live_torn: int = 0  # reads racing a write that failed their checksum
    incarnations: set[int] = field(default_factory=set)
    written: int = 0

    def report(self, what: str, seed: int, took: float) -> str:
        return (
            f"\n[crash] {what}: {self.kills} SIGKILLs in {took:.1f} s (seed {seed}), "
            f"aimed {dict(self.aimed)}, the others at random; "
            f"marker at kill {dict(self.phases)}; thread inside a write syscall at kill "
            f"{dict(self.in_syscall)}; slot after kill {dict(self.outcome)}; "
            f"{self.written} records written by {len(self.incarnations)} incarnations; "
            f"live reads (O_DIRECT on a device) {self.live_reads}, torn by a racing write "
            f"{self.live_torn}"
        )


class Slot:
    """Reads the slot as the poller does: ``open_volume`` (O_DIRECT for a block device)."""

    def __init__(self, path: str) -> None:
        self.vol = open_volume(path)

    def read(self) -> bytes:
        data = read_slot(self.vol, SLOT)
        assert len(data) == self.vol.io_size
        return data

    def record(self) -> tuple[Record, bytes]:
        """The valid record in the slot; fails the test with the decode error otherwise."""
        data = self.read()
        try:
            return _decode(data), data
        except RecordError as err:
            pytest.fail(f"slot {SLOT} of {self.vol.path} holds no valid record: {err}")

    def close(self) -> None:
        self.vol.close()


def _decode(data: bytes) -> Record:
    return decode(data, PAIR)


class Reader:
    """The reader's side of the story: every record seen goes through a real PathRow."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.row = PathRow(PAIR, "volume", Timing(interval=1.0), created=self.clock.monotonic())
        self.seen: dict[int, int] = {}  # incarnation -> highest serial seen
        self.kinds: Counter[str] = Counter()

    def see(self, rec: Record) -> None:
        top = self.seen.get(rec.incarnation)
        assert top is None or rec.serial >= top, (
            f"serial went back within incarnation {rec.incarnation:#x}: {top} -> {rec.serial}"
        )
        self.seen[rec.incarnation] = rec.serial
        self.clock.advance(0.01)
        kind = self.row.observe_record(rec, self.clock.monotonic(), self.clock.wall())
        self.kinds[kind] += 1
        assert kind in ("baseline", "beat", "restart", "same"), (kind, rec, self.row.note)


def _in_write_syscall(pid: int) -> str | None:
    """The write-type syscall a thread of ``pid`` is inside of right now, if any."""
    if not X86_64:
        return None
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
        except OSError:
            continue
        if text and text[0].isdigit() and int(text[0]) in _WRITE_SYSCALLS:
            return _WRITE_SYSCALLS[int(text[0])]
    return None


class Zygote:
    """The resident process that forks real Beater writers on request."""

    def __init__(self, volume: str, tmp_path: Path) -> None:
        self.marker = tmp_path / "marker"
        self.marker.write_bytes(bytes(_MARK.size))
        self.stderr_path = tmp_path / "zygote.stderr"
        args = [volume, str(self.marker), PAIR, str(SLOT), str(INTERVAL)]
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", ZYGOTE, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        self.child: int | None = None
        fd = os.open(self.marker, os.O_RDWR)
        try:
            self.mark = mmap.mmap(fd, _MARK.size)
        finally:
            os.close(fd)

    def _line(self) -> int:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"the writer zygote died:\n{self.stderr_path.read_text()}")
        return int(line)

    def spawn(self) -> int:
        self.mark[:] = bytes(_MARK.size)
        stdin: IO[bytes] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(b"go\n")
        stdin.flush()
        self.child = self._line()
        return self.child

    def reap(self) -> int:
        """The wait status of the child just killed (once the zygote has reaped it)."""
        status = self._line()
        self.child = None
        return status

    def marker_state(self) -> tuple[int, int, int, int, int, int]:
        phase, inc, serial, started, done, written = _MARK.unpack(self.mark[:])
        return phase, inc, serial, started, done, written

    def close(self) -> None:
        if self.child is not None:  # a test failed while a writer ran
            os.kill(self.child, signal.SIGKILL)
        self.mark.close()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _aim_at(zygote: Zygote, pid: int, aim: str, skip: int) -> bool:
    """Spin until the writer is inside ``aim`` during a write after its first ``skip``:
    ``write_slot`` (the marker says so) or a syscall (``/proc`` says so).  False when it
    was not caught within 2 s (a device so fast that the syscall is never seen)."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        phase, _inc, _serial, started, _done, _written = zygote.marker_state()
        if started > skip and (
            (aim == "write_slot" and phase == 1) or _in_write_syscall(pid) == aim
        ):
            return True
    return False


def _kill_rounds(
    volume: str, rounds: int, aims: tuple[str, ...], tmp_path: Path
) -> tuple[Tally, Reader]:
    """Kill a forked writer ``rounds`` times: every other kill at a random moment, the
    others aimed at the moment the writer is inside one of the phases ``aims``."""
    rng = random.Random(SEED)
    tally, reader = Tally(), Reader()
    slot = Slot(volume)
    zygote = Zygote(volume, tmp_path)
    before: bytes | None = None  # the slot as the previous writer left it
    try:
        for i in range(rounds):
            pid = zygote.spawn()
            aim = aims[i // 2 % len(aims)] if i % 2 else None
            if aim is not None and not X86_64:
                aim = "write_slot"
            if aim is not None:
                caught = _aim_at(zygote, pid, aim, rng.randrange(3))
                tally.aimed[aim if caught else f"{aim} (missed)"] += 1
            deadline = time.monotonic() + rng.uniform(0.0, MAX_DELAY)
            while aim is None and time.monotonic() < deadline:  # read as a poller would
                data = slot.read()
                tally.live_reads += 1
                try:
                    reader.see(_decode(data))
                except RecordError as err:
                    if err.reason != "zeroed" or before is not None:  # zeroed: none yet
                        if err.reason != "checksum_mismatch":
                            pytest.fail(f"a live read found {err}")
                        tally.live_torn += 1  # raced a write; the poller reads it again
                time.sleep(0.002)
            in_syscall = _in_write_syscall(pid)
            os.kill(pid, signal.SIGKILL)
            status = zygote.reap()
            assert os.WIFSIGNALED(status), (
                f"writer exited with status {status} before the kill:\n"
                f"{zygote.stderr_path.read_text()}"
            )
            assert os.WTERMSIG(status) == signal.SIGKILL
            tally.kills += 1
            phase, inc, serial, _started, done, written = zygote.marker_state()
            tally.phases[PHASES[phase]] += 1
            if in_syscall is not None:
                tally.in_syscall[in_syscall] += 1
            tally.written += done

            if phase == 0:  # killed before it wrote anything: the slot is as it was
                if before is None:
                    assert not any(slot.read()), "a writer that never wrote changed the slot"
                else:
                    assert slot.read() == before
                tally.outcome["untouched"] += 1
                continue
            rec, data = slot.record()
            reader.see(rec)
            assert inc not in tally.incarnations, "a new writer reused an incarnation"
            if (rec.incarnation, rec.serial) == (inc, serial):
                tally.outcome["new"] += 1
            else:
                # Only a kill inside write_slot may leave the record before it: the
                # previous write of this writer, or the previous writer's last one.
                assert phase == 1, (phase, rec, inc, serial)
                if written:
                    assert (rec.incarnation, rec.serial) == (inc, written), (rec, written)
                else:
                    assert before is not None
                    assert data == before, (rec, serial)
                tally.outcome["old"] += 1
            if rec.incarnation == inc:
                tally.incarnations.add(inc)
            before = data
    finally:
        zygote.close()
        slot.close()
    return tally, reader


def _check(tally: Tally, reader: Reader, rounds: int) -> None:
    assert tally.kills == rounds
    assert tally.outcome["new"] + tally.outcome["old"] >= rounds // 2, tally
    # Every writer that wrote was taken by the reader as a restart (a new incarnation),
    # never as a serial regression or an undead writer.
    assert reader.row.restarts == len(reader.seen) - 1
    assert reader.row.errors["serial_regression"] == 0
    assert reader.row.errors["undead_writer"] == 0
    assert set(reader.seen) >= tally.incarnations


@pytest.mark.root
def test_sigkilled_writer_leaves_old_or_new_record_on_a_loop_device(
    loopdev_factory: Any, tmp_path: Path
) -> None:
    """The PVOL is a loop device: writes are one 512-byte block, O_DIRECT|O_DSYNC."""
    _image, dev = loopdev_factory(1 << 20)
    start = time.monotonic()
    tally, reader = _kill_rounds(dev, ROUNDS["loop"], ("write_slot", "pwritev2"), tmp_path)
    print(tally.report(f"loop device {dev}", SEED, time.monotonic() - start))
    _check(tally, reader, ROUNDS["loop"])
    assert tally.live_reads > 0
    assert tally.phases["in_write_slot"] > 0, "no kill landed while a record was written"


def test_sigkilled_writer_leaves_old_or_new_record_in_a_file(tmp_path: Path) -> None:
    """A file-backed PVOL (the demo, file labs): pwrite into the page cache, then one
    fdatasync per batch; a kill inside either leaves the old or the new record."""
    vol = tmp_path / "pvol.img"
    vol.write_bytes(bytes((SLOT + 1) * SLOT_SIZE))
    start = time.monotonic()
    tally, reader = _kill_rounds(str(vol), ROUNDS["file"], ("write_slot", "fdatasync"), tmp_path)
    print(tally.report(f"file {vol.name}", SEED, time.monotonic() - start))
    _check(tally, reader, ROUNDS["file"])


@pytest.mark.root
@pytest.mark.slow
def test_sigkilled_hbmon_run_leaves_a_valid_record(loopdev_factory: Any, tmp_path: Path) -> None:
    """The real daemon, beating every 5 ms to a loop device, SIGKILLed at random moments
    after it is up: the slot holds a valid record each time, and each start is a new
    incarnation whose serials continue from 1."""
    _image, dev = loopdev_factory(1 << 20)
    config = (
        f'site = "crash"\nstate_dir = "{tmp_path / "state"}"\nmethod = "volume"\n'
        f'[[beat]]\nid = "{PAIR}"\nvolume = "{dev}"\nslot = {SLOT}\ninterval = "5ms"\n'
    )
    rng = random.Random(SEED)
    reader, slot = Reader(), Slot(dev)
    incarnations: list[int] = []
    before = b""
    untouched = 0
    start = time.monotonic()
    try:
        for i in range(DAEMON_ROUNDS):
            site = start_site(config, tmp_path, name=f"writer{i}")
            # /healthz answers before the beater has started: an early kill may land
            # before the first write, and then the slot must be exactly as it was.
            time.sleep(rng.uniform(0.0, 0.25))
            site.kill()
            rec, data = slot.record()
            reader.see(rec)
            if data == before:
                untouched += 1
                continue
            assert rec.incarnation not in incarnations, "a restarted daemon reused its incarnation"
            incarnations.append(rec.incarnation)
            assert rec.serial >= 1
            before = data
    finally:
        slot.close()
    print(
        f"\n[crash] hbmon run: {DAEMON_ROUNDS} SIGKILLs in {time.monotonic() - start:.1f} s "
        f"(seed {SEED}); {untouched} before the first write; serials at kill "
        f"{[reader.seen[i] for i in incarnations]}"
    )
    assert len(incarnations) >= DAEMON_ROUNDS // 2
    assert reader.row.restarts == len(incarnations) - 1
    assert reader.row.errors["serial_regression"] == 0
