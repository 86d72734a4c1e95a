"""A fault-injecting FUSE file system for the reliability tests (libfuse 3 via mfusepy).

``faultfs`` passes every operation through to a backing directory, except where a fault
is set for a file.  Faults are per file and per operation:

=========  ===============================================================  ============
operation  faults                                                           error seen
=========  ===============================================================  ============
read       ``eio``, ``hang`` (blocks until healed), ``short`` (returns 100   EIO, none,
           of the bytes asked), ``slow`` (answers after ``delay`` s)         short count
write      ``eio``, ``enospc``, ``erofs``, ``hang``, ``slow``                EIO, ENOSPC,
                                                                            EROFS
fsync      ``eio``, ``enospc``, ``hang``, ``slow``
open       ``eio``, ``hang``, ``slow``
=========  ===============================================================  ============

The file system runs in its own process (``python tests/faultfs.py BACKING MOUNT
CONTROL``), so an operation hung on purpose blocks a thread of that process and the
kernel request of the caller, never the test process.  It is mounted with ``direct_io``:
every read and write reaches this process (no page cache), as an O_DIRECT read of a
block device reaches the device.

The control channel is the directory CONTROL: the test side (:class:`FaultFS`) writes
``faults.json`` atomically with a generation number; a watcher thread in the file system
re-reads it every 10 ms, releases hung operations whose fault was healed, and
acknowledges the generation in ``applied.json``.  Per file and operation, the outcomes
(``ok``, ``eio``, ``hang``, ...) are counted in ``stats.json``.

:class:`FaultFS` (a context manager) mounts, waits until the mount answers, and on exit
heals every fault, unmounts (lazily if a caller still holds a file), and aborts the
connection through ``/sys/fs/fuse/connections`` if the process does not exit, so a test
never leaves a hung mount behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

READ_FAULTS = ("eio", "hang", "short", "slow")
WRITE_FAULTS = ("eio", "enospc", "erofs", "hang", "slow")
ERRNO = {"eio": errno.EIO, "enospc": errno.ENOSPC, "erofs": errno.EROFS}
SHORT_READ = 100  # bytes a "short" read returns
DEFAULT_DELAY = 2.0  # seconds a "slow" operation takes
WATCH_EVERY = 0.01


# -- the file system (runs in its own process) ---------------------------------------


def _serve(backing: str, mount: str, control: str) -> None:
    import mfusepy

    class Faults:
        """The current faults, re-read from CONTROL/faults.json by a watcher thread."""

        def __init__(self) -> None:
            self.cond = threading.Condition()
            self.table: dict[str, dict[str, Any]] = {}
            self.generation = -1
            self.stats: dict[str, dict[str, int]] = {}
            self.dirty = False
            self.done = False
            self._seen: tuple[int, int] | None = None

        def fault(self, name: str, op: str) -> tuple[str | None, float]:
            entry = self.table.get(name, {})
            return entry.get(op), float(entry.get("delay", DEFAULT_DELAY))

        def count(self, name: str, op: str, outcome: str) -> None:
            with self.cond:
                per = self.stats.setdefault(f"{name}:{op}", {})
                per[outcome] = per.get(outcome, 0) + 1
                self.dirty = True

        def apply(self, name: str, op: str) -> int | None:
            """Act out the fault for ``op`` on ``name``: None to go on, or an errno."""
            fault, delay = self.fault(name, op)
            if fault is None:
                return None
            self.count(name, op, fault)
            if fault == "hang":
                with self.cond:
                    while not self.done and self.fault(name, op)[0] == "hang":
                        self.cond.wait(1.0)
                return None
            if fault == "slow":
                time.sleep(delay)
                return None
            if fault in ERRNO:
                return ERRNO[fault]
            return None  # "short" is acted out by read()

        def watch(self) -> None:
            path = os.path.join(control, "faults.json")
            while not self.done:
                try:
                    st = os.stat(path)
                    key = (st.st_ino, st.st_mtime_ns)
                    if key != self._seen:
                        with open(path) as f:
                            doc = json.load(f)
                        with self.cond:
                            self.table = doc["faults"]
                            self.generation = doc["generation"]
                            self.cond.notify_all()
                        self._seen = key
                        _write_json(
                            os.path.join(control, "applied.json"),
                            {"generation": self.generation},
                        )
                except (OSError, ValueError, KeyError):
                    pass
                if self.dirty:
                    with self.cond:
                        snapshot, self.dirty = json.loads(json.dumps(self.stats)), False
                    _write_json(os.path.join(control, "stats.json"), snapshot)
                time.sleep(WATCH_EVERY)

        def stop(self) -> None:
            with self.cond:
                self.done = True
                self.cond.notify_all()

    faults = Faults()

    def fail(err: int) -> None:
        raise mfusepy.FuseOSError(err)

    class PassThrough(mfusepy.Operations):
        use_ns = True

        def _real(self, path: str) -> str:
            return os.path.join(backing, path.lstrip("/"))

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            st = os.fstat(fh) if fh is not None else os.lstat(self._real(path))
            out = {
                key: getattr(st, key)
                for key in (
                    "st_mode",
                    "st_nlink",
                    "st_uid",
                    "st_gid",
                    "st_size",
                    "st_ino",
                    "st_blocks",
                )
            }
            out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
            return out

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._real(path))]

        def open(self, path: str, flags: int) -> int:
            err = faults.apply(path.lstrip("/"), "open")
            if err is not None:
                faults.count(path.lstrip("/"), "open", "failed")
                fail(err)
            flags &= ~(os.O_CREAT | os.O_EXCL | os.O_DIRECT)
            return os.open(self._real(path), flags | os.O_CLOEXEC)

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return os.open(self._real(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode & 0o7777)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            name = path.lstrip("/")
            fault, _ = faults.fault(name, "read")
            err = faults.apply(name, "read")
            if err is not None:
                fail(err)
            data = os.pread(fh, size, offset)
            if fault == "short":
                data = data[:SHORT_READ]
            elif fault is None:
                faults.count(name, "read", "ok")
            return data

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            name = path.lstrip("/")
            err = faults.apply(name, "write")
            if err is not None:
                fail(err)
            n = os.pwrite(fh, data, offset)
            faults.count(name, "write", "ok")
            return n

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            name = path.lstrip("/")
            err = faults.apply(name, "fsync")
            if err is not None:
                fail(err)
            os.fdatasync(fh)
            return 0

        def flush(self, path: str, fh: int) -> int:
            return 0

        def release(self, path: str, fh: int) -> int:
            os.close(fh)
            return 0

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                os.truncate(self._real(path), length)
            return 0

        def unlink(self, path: str) -> int:
            os.unlink(self._real(path))
            return 0

        def chmod(self, path: str, mode: int) -> int:
            os.chmod(self._real(path), mode)
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            os.utime(self._real(path), ns=times)
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            sv = os.statvfs(backing)
            return {
                key: getattr(sv, key)
                for key in (
                    "f_bsize",
                    "f_frsize",
                    "f_blocks",
                    "f_bfree",
                    "f_bavail",
                    "f_files",
                    "f_ffree",
                    "f_favail",
                    "f_namemax",
                )
            }

        def destroy(self, path: str) -> None:
            faults.stop()

    watcher = threading.Thread(target=faults.watch, name="faults", daemon=True)
    watcher.start()
    try:
        mfusepy.FUSE(
            PassThrough(),
            mount,
            foreground=True,
            direct_io=True,  # every read and write reaches us: no page cache
            fsname="faultfs",
            attr_timeout=0,
            entry_timeout=0,
        )
    finally:
        faults.stop()


def _write_json(path: str, doc: object) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


# -- the test side ----------------------------------------------------------------------


class FaultFS:
    """A mounted faultfs: ``with FaultFS(tmp_path) as fs: fs.path("x.vol") ...``.

    ``backing`` holds the real files (write there to change what readers see, underneath
    the mount, as an array's remote copy does); ``mount`` is where readers and writers
    look.  :meth:`set` changes faults and returns once the file system applies them.
    """

    def __init__(self, root: Path) -> None:
        self.backing = root / "backing"
        self.mount = root / "mnt"
        self.control = root / "control"
        self.log = root / "faultfs.log"
        for d in (self.backing, self.mount, self.control):
            d.mkdir(parents=True, exist_ok=True)
        self._mount_path = os.path.realpath(self.mount)  # resolved before anything hangs
        self.faults: dict[str, dict[str, Any]] = {}
        self.generation = 0
        self.proc: subprocess.Popen[bytes] | None = None

    # -- files ------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """The file as readers and writers see it, through the mount."""
        return self.mount / name

    def real(self, name: str) -> Path:
        """The backing file, underneath the mount."""
        return self.backing / name

    # -- faults -----------------------------------------------------------------------

    def set(self, name: str, *, delay: float | None = None, **ops: str | None) -> None:
        """Set (a value) or heal (None) faults of ``name``, e.g. ``set("a.vol", read="eio")``."""
        entry = dict(self.faults.get(name, {}))
        for op, fault in ops.items():
            allowed = READ_FAULTS if op == "read" else WRITE_FAULTS
            if fault is not None and fault not in allowed:
                raise ValueError(f"fault {fault!r} for {op}: choose one of {allowed}")
            if fault is None:
                entry.pop(op, None)
            else:
                entry[op] = fault
        if delay is not None:
            entry["delay"] = delay
        if set(entry) - {"delay"}:
            self.faults[name] = entry
        else:
            self.faults.pop(name, None)
        self._publish()

    def heal(self, name: str | None = None) -> None:
        """Heal every fault of ``name`` (of every file when None)."""
        if name is None:
            self.faults.clear()
        else:
            self.faults.pop(name, None)
        self._publish()

    @contextlib.contextmanager
    def healing(self) -> Iterator[None]:
        """Heal every fault when the block exits, however it exits.

        Open it inside ``running_site`` (``with running_site(...) as site,
        fs.healing():``) so that a failing test releases the daemon's hung requests
        before the daemon is stopped: a process with a thread in a FUSE request that has
        reached the file system cannot exit, not even on SIGKILL, until it is answered.
        """
        try:
            yield
        finally:
            with contextlib.suppress(OSError, AssertionError):
                self.heal()

    def _publish(self, wait: float = 5.0) -> None:
        self.generation += 1
        _write_json(
            str(self.control / "faults.json"),
            {"generation": self.generation, "faults": self.faults},
        )
        if self.proc is None or self.proc.poll() is not None:
            return
        deadline = time.monotonic() + wait
        while self.applied() < self.generation:
            if time.monotonic() > deadline:
                raise AssertionError(f"faultfs did not apply generation {self.generation}")
            time.sleep(0.005)

    def applied(self) -> int:
        try:
            return int(json.loads((self.control / "applied.json").read_text())["generation"])
        except (OSError, ValueError, KeyError):
            return -1

    def stats(self, name: str, op: str) -> dict[str, int]:
        """How often ``op`` on ``name`` ended each way (ok, eio, hang, ...)."""
        try:
            doc = json.loads((self.control / "stats.json").read_text())
        except (OSError, ValueError):
            return {}
        return dict(doc.get(f"{name}:{op}", {}))

    # -- mount ------------------------------------------------------------------------

    def __enter__(self) -> FaultFS:
        self._publish()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(self.backing), str(self.mount), str(self.control)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 10.0
        while not (self.mounted() is not None and self.applied() >= self.generation):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"faultfs did not mount on {self.mount}:\n{self.log_text()}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def mounted(self) -> tuple[int, int] | None:
        """The mount's device number (from /proc/self/mountinfo, so a hung file system is
        never touched), or None when it is not mounted."""
        target = self._mount_path
        try:
            lines = Path("/proc/self/mountinfo").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            fields = line.split()
            if len(fields) > 4 and fields[4] == target:
                major, minor = fields[2].split(":")
                return int(major), int(minor)
        return None

    def abort(self) -> None:
        """Abort the FUSE connection: every pending and future request fails (ENOTCONN)."""
        dev = self.mounted()
        if dev is None:
            return
        conns = Path("/sys/fs/fuse/connections")
        if not os.path.ismount(conns):
            subprocess.run(
                ["mount", "-t", "fusectl", "none", str(conns)], check=False, capture_output=True
            )
        with contextlib.suppress(OSError):
            (conns / str(dev[1]) / "abort").write_text("1")

    def close(self) -> None:
        """Heal everything, unmount, stop the process; abort the connection if need be.

        Never stats the mount: a file system whose process hangs would hang the stat.
        """
        self.faults.clear()
        try:
            self._publish(wait=2.0)
        except (OSError, AssertionError):
            # The process does not answer: abort first, or even closing a file of the
            # mount (as a fork + exec of fusermount3 does) would wait for it forever.
            self.abort()
        if self.mounted() is not None:
            try:
                done = subprocess.run(
                    ["fusermount3", "-u", str(self.mount)], capture_output=True, timeout=5.0
                )
                ok = done.returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            if not ok:  # busy (a caller holds a file) or the file system does not answer
                self.abort()
                subprocess.run(["umount", "-l", str(self.mount)], check=False, capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.abort()
                self.proc.kill()
                self.proc.wait(5.0)
        if self.mounted() is not None:
            self.abort()
            subprocess.run(["umount", "-l", str(self.mount)], check=False, capture_output=True)


def available() -> str | None:
    """Why faultfs cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "FUSE mounts need root here"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not found (Debian package: fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as err:
        return f"mfusepy cannot load libfuse 3: {err}"
    return None


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: faultfs.py BACKING MOUNT CONTROL")
    _serve(*sys.argv[1:4])
