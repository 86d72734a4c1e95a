"""Integration: the real daemon (``hbmon run``) against loop devices, files and FIFOs.

The "array remote copy" is simulated the way an array does it: bytes are written into the
image file *underneath* the loop device the daemon reads, never through the device, so
the device's page cache is bypassed exactly as with TrueCopy/SRDF.  The daemon runs in
real time (it has no fake clock); the tests poll with ``wait_for`` instead of sleeping.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Feeder,
    Site,
    metric_value,
    pread_file,
    pwrite_sync,
    record_block,
    running_site,
    start_site,
    wait_for,
)

from hbmon.errors import RecordError
from hbmon.record import SLOT_SIZE, Record, decode
from hbmon.site import STOP_GRACE

BLOCK = 512  # the loop devices' logical block size: what the beater writes per slot


def _site_head(tmp_path: Path, name: str, **extra: str) -> str:
    lines = [f'site = "{name}"', f'state_dir = "{tmp_path / "state"}"', 'method = "volume"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def _read_record(image: Path, offset: int, pair: str) -> tuple[Record, bytes] | None:
    """The valid record of ``pair`` at ``offset`` of ``image``, or None (none yet, torn)."""
    data = pread_file(image, offset, BLOCK)
    try:
        return decode(data, pair), data
    except RecordError:
        return None


# -- 1. remote copy underneath the host -------------------------------------------------


@pytest.mark.root
def test_remote_copy_underneath_the_host_is_seen(loopdev_factory: Any, tmp_path: Path) -> None:
    a_img, dev_a = loopdev_factory(1 << 20)
    b_img, dev_b = loopdev_factory(1 << 20)
    offset = 3 * SLOT_SIZE
    config = _site_head(tmp_path, "remote-copy") + (
        f'[[beat]]\nid = "db1"\nvolume = "{dev_a}"\nslot = 3\ninterval = "200ms"\n'
        f'[[watch]]\nid = "db1"\nvolume = "{dev_b}"\nslot = 3\ninterval = "200ms"\n'
    )
    copied: list[int] = []
    shown: set[int] = set()

    def copy_next() -> tuple[Record, bytes]:
        """Wait for a newer record on the PVOL image, copy it to the SVOL image."""
        last = copied[-1] if copied else 0
        rec, data = wait_for(
            lambda: (got := _read_record(a_img, offset, "db1")) and got[0].serial > last and got,
            2.0,
            f"the beater to write a serial above {last} to {a_img}",
        )
        pwrite_sync(b_img, offset, data)  # the array's remote copy: underneath /dev/loopB
        copied.append(rec.serial)
        return rec, data

    def hbmon_shows(rec: Record, site: Site) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            row = site.row("db1")
            if row["serial"] is not None:
                shown.add(row["serial"])
            return row if row["serial"] == rec.serial else None

        return wait_for(check, 2.0, f"/status.json to show db1 serial {rec.serial}")

    cached_before = cached_after = new_bytes = b""
    buffered = os.open(dev_b, os.O_RDONLY | os.O_CLOEXEC)  # no O_DIRECT: the page cache
    try:
        with running_site(config, tmp_path) as site:
            for round_ in range(10):
                if round_ == 5:
                    cached_before = os.pread(buffered, BLOCK, offset)
                rec, data = copy_next()
                row = hbmon_shows(rec, site)
                assert row["incarnation"] == f"{rec.incarnation:016x}"
                if round_ == 5:
                    cached_after = os.pread(buffered, BLOCK, offset)
                    new_bytes = data
    finally:
        os.close(buffered)

    assert len(copied) == 10
    assert all(a < b for a, b in itertools.pairwise(copied)), copied
    assert shown <= set(copied), f"hbmon showed serials never copied: {shown - set(copied)}"
    assert set(copied) <= shown
    # Why O_DIRECT: a buffered reader of the SVOL keeps its cached page while the array
    # writes underneath; hbmon, reading with O_DIRECT, reported the new serial meanwhile.
    assert cached_after == cached_before
    assert cached_after != new_bytes
    assert decode(new_bytes, "db1").serial == copied[5]


# -- 2. faults on the SVOL ----------------------------------------------------------------

EXPECTED_FAULTS = {
    "corrupt": ("invalid", "checksum_mismatch"),
    "zeroed": ("invalid", "zeroed"),
    "foreign": ("invalid", "identity_mismatch"),
    "truncated": ("io_error", "truncated"),
}


@pytest.mark.root
def test_svol_faults_each_get_their_own_state(loopdev_factory: Any, tmp_path: Path) -> None:
    volumes: dict[str, Path] = {}
    devices: dict[str, str] = {}
    for pair in ("healthy", "corrupt", "zeroed", "foreign"):
        volumes[pair], devices[pair] = loopdev_factory(1 << 20)
    volumes["truncated"] = tmp_path / "truncated.vol"  # a regular file, not a loop device
    volumes["truncated"].write_bytes(bytes(SLOT_SIZE))
    devices["truncated"] = str(volumes["truncated"])
    config = _site_head(tmp_path, "faults", interval='"200ms"', miss_threshold="3")
    for pair, dev in devices.items():
        config += f'[[watch]]\nid = "{pair}"\nvolume = "{dev}"\nslot = 0\n'

    fed = [(pair, path, 0) for pair, path in volumes.items()]
    feeder = Feeder(fed, every=0.1, declared=0.2).start()
    try:
        with running_site(config, tmp_path) as site:
            wait_for(
                lambda: all(site.row(p)["state"] == "alive" for p in volumes),
                5.0,
                "all five SVOLs alive while fed",
            )
            for pair in EXPECTED_FAULTS:
                feeder.stop_feeding(pair)
            record = pread_file(volumes["corrupt"], 0, BLOCK)
            flipped = bytes(b ^ 0xFF for b in record[40:50])
            pwrite_sync(volumes["corrupt"], 40, flipped)
            pwrite_sync(volumes["zeroed"], 0, bytes(BLOCK))
            pwrite_sync(volumes["foreign"], 0, record_block("intruder", 0x5EED, 7, 0.1))
            os.truncate(volumes["truncated"], 100)

            def faults() -> dict[str, tuple[str, str]]:
                rows = site.rows()
                return {
                    p: (rows[p, "volume"]["state"], rows[p, "volume"]["reason"])
                    for p in EXPECTED_FAULTS
                }

            wait_for(lambda: faults() == EXPECTED_FAULTS, 2.0, f"fault states {EXPECTED_FAULTS}")
            end = time.monotonic() + 2.0
            samples = 0
            while time.monotonic() < end:
                rows = site.rows()
                for pair, (state, reason) in EXPECTED_FAULTS.items():
                    row = rows[pair, "volume"]
                    assert (row["state"], row["reason"], row["up"]) == (state, reason, False), row
                healthy = rows["healthy", "volume"]
                assert healthy["state"] == "alive", healthy
                samples += 1
                time.sleep(0.1)
            assert samples >= 10

            text = site.metrics()
            for pair, (_, reason) in EXPECTED_FAULTS.items():
                value = metric_value(
                    text, "hbmon_volume_read_errors_total", pair=pair, reason=reason
                )
                assert value is not None, f"no read error counter for {pair} {reason}"
                assert value > 0
                assert metric_value(text, "hbmon_heartbeat_up", pair=pair, path="volume") == 0
            assert metric_value(text, "hbmon_heartbeat_up", pair="healthy", path="volume") == 1
            assert site.healthz() == 200
            assert site.running()
    finally:
        feeder.close()


# -- 3. one hung volume among many ----------------------------------------------------------


# "Exits at once" after SIGTERM, measured here: 0.03 s with every worker free again, 0.52 s
# with one stuck forever (hbmon gives a stuck worker 0.5 s to finish, then exits without it).
# The bounds leave room for a loaded machine yet stay under the stop grace period, which a
# stop that waited for the stuck worker (or for the grace period) would use up.
AT_ONCE = 1.0  # no worker stuck
AT_ONCE_LEAVING_ONE_STUCK = 0.5 + AT_ONCE
assert AT_ONCE_LEAVING_ONE_STUCK < STOP_GRACE


def _hung_site(tmp_path: Path, files: int) -> tuple[str, list[tuple[str, Path, int]], Path]:
    vols = tmp_path / "vols"
    vols.mkdir()
    targets = []
    for i in range(files):
        path = vols / f"v{i:02d}.vol"
        path.write_bytes(bytes(SLOT_SIZE))
        targets.append((path.stem, path, 0))
    fifo = vols / "hung.vol"
    os.mkfifo(fifo)
    config = _site_head(tmp_path, "hung") + (
        f'[[watch_glob]]\npattern = "{vols}/*.vol"\ninterval = "1s"\nread_timeout = "1s"\n'
    )
    return config, targets, fifo


class FifoReleaser:
    """Opens the FIFO for writing (blocking, on a thread) so the stuck reader's open returns.

    The write end stays open until :meth:`close`, so later opens by the daemon return at
    once instead of hanging again.
    """

    def __init__(self, fifo: Path) -> None:
        self.fd: int | None = None
        self.thread = threading.Thread(target=self._open, args=(fifo,), daemon=True)
        self.thread.start()

    def _open(self, fifo: Path) -> None:
        self.fd = os.open(fifo, os.O_WRONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def test_one_hung_volume_does_not_delay_the_others(tmp_path: Path) -> None:
    config, targets, fifo = _hung_site(tmp_path, 40)
    pairs = [pair for pair, _, _ in targets]
    feeder = Feeder(targets, every=0.2, declared=1.0, sync=False).start()
    releaser: FifoReleaser | None = None
    try:
        with running_site(config, tmp_path) as site:
            ready = time.monotonic()
            hung_at: list[float] = []

            def note_hung(rows: dict[tuple[str, str], dict[str, Any]]) -> None:
                if not hung_at and rows["hung", "volume"]["state"] == "io_hung":
                    hung_at.append(time.monotonic() - ready)

            def all_alive() -> bool:
                rows = site.rows()
                note_hung(rows)
                return all(rows[p, "volume"]["state"] == "alive" for p in pairs)

            wait_for(all_alive, 5.0, "the 40 fed volumes to be alive")
            end = time.monotonic() + 6.0
            while time.monotonic() < end:
                rows = site.rows()
                note_hung(rows)
                for pair in pairs:
                    row = rows[pair, "volume"]
                    assert row["state"] == "alive", row
                    assert row["age"] is not None
                    assert row["age"] < 1.5, row
                if hung_at:
                    assert rows["hung", "volume"]["state"] == "io_hung"
                time.sleep(0.2)
            assert hung_at, "the FIFO row never became io_hung"
            assert hung_at[0] <= 3.0, f"io_hung only after {hung_at[0]:.1f} s"
            assert metric_value(site.metrics(), "hbmon_workers_stuck") == 1
            assert site.status()["workers_stuck"] == 1

            releaser = FifoReleaser(fifo)
            releaser.thread.join(5)
            assert not releaser.thread.is_alive(), "the daemon no longer holds the FIFO open"
            wait_for(
                lambda: site.row("hung")["state"] != "io_hung",
                3.0,
                "the released FIFO to leave io_hung",
            )
            code, took = site.stop()
            assert code == 0
            assert took < AT_ONCE, f"SIGTERM took {took:.2f} s"
        assert "still blocked" not in site.stderr()
    finally:
        feeder.close()
        if releaser is not None:
            releaser.close()


def test_sigterm_ends_daemon_with_a_worker_stuck_forever(tmp_path: Path) -> None:
    config, targets, _fifo = _hung_site(tmp_path, 3)
    feeder = Feeder(targets, every=0.2, declared=1.0, sync=False).start()
    try:
        site = start_site(config, tmp_path)
        try:
            wait_for(
                lambda: site.row("hung")["state"] == "io_hung", 4.0, "the FIFO row to be io_hung"
            )
            assert metric_value(site.metrics(), "hbmon_workers_stuck") == 1
        finally:
            code, took = site.stop()
        assert code == 0, site.stderr_tail()
        assert took < AT_ONCE_LEAVING_ONE_STUCK, f"SIGTERM took {took:.2f} s"
        assert "still blocked" in site.stderr()
    finally:
        feeder.close()


# -- start-up: a writer that first appears after the grace period -------------------------


def test_writer_starting_after_grace_is_not_undead(tmp_path: Path) -> None:
    """The reader starts first and declares the pair stale (nothing beat within the grace
    period); then the writer starts.  Its first beats are a writer coming up, not a frozen
    writer resuming: the incarnation was never seen before the row went stale."""
    vol = tmp_path / "late.vol"
    vol.write_bytes(bytes(SLOT_SIZE))
    config = _site_head(tmp_path, "late-writer", interval='"200ms"') + (
        f'[[watch]]\nid = "late"\nvolume = "{vol}"\n'
    )
    feeder: Feeder | None = None
    try:
        with running_site(config, tmp_path) as site:
            wait_for(
                lambda: site.row("late")["state"] == "stale",
                3.0,
                "the pair to be stale (no writer within the grace period)",
            )
            feeder = Feeder([("late", vol, 0)], every=0.1, declared=0.2).start()
            row = wait_for(
                lambda: (row := site.row("late"))["state"] == "alive" and row,
                3.0,
                "the pair to be alive once the writer runs",
            )
            why = f"flagged undead: note {row['note']!r}, errors {row['errors']}"
            assert row["undead"] is False, why
            assert "undead_writer" not in row["errors"], why
            undead = metric_value(site.metrics(), "hbmon_heartbeat_undead", pair="late")
            assert undead == 0
    finally:
        if feeder is not None:
            feeder.close()


def test_new_incarnation_after_stale_is_not_undead(tmp_path: Path) -> None:
    """A writer that was declared stale and comes back with a *new* incarnation restarted
    (a rebooted or fenced host): that is the opposite of an undead writer."""
    vol = tmp_path / "restart.vol"
    vol.write_bytes(bytes(SLOT_SIZE))
    config = _site_head(tmp_path, "restart", interval='"200ms"') + (
        f'[[watch]]\nid = "db2"\nvolume = "{vol}"\n'
    )
    feeder = Feeder([("db2", vol, 0)], every=0.1, declared=0.2).start()
    try:
        with running_site(config, tmp_path) as site:
            first = wait_for(
                lambda: (row := site.row("db2"))["state"] == "alive" and row,
                3.0,
                "db2 alive",
            )
            feeder.stop_feeding("db2")
            wait_for(lambda: site.row("db2")["state"] == "stale", 2.0, "db2 stale")
            feeder.restart("db2")
            row = wait_for(
                lambda: (row := site.row("db2"))["state"] == "alive" and row,
                3.0,
                "db2 alive again with a new incarnation",
            )
            assert row["incarnation"] != first["incarnation"]
            assert row["restarts"] == 1, row
            why = f"flagged undead: note {row['note']!r}, errors {row['errors']}"
            assert row["undead"] is False, why
            assert "undead_writer" not in row["errors"], why
            undead = metric_value(site.metrics(), "hbmon_heartbeat_undead", pair="db2")
            assert undead == 0
    finally:
        feeder.close()


# -- 4. writer restart ----------------------------------------------------------------------


class Mirror:
    """Remote copy of one slot, PVOL image -> SVOL image, every ``every`` seconds.

    Like an array, it copies whole blocks: a block read while the writer was half way
    through it (CRC fails) is not copied; the next round copies the finished one.
    """

    def __init__(self, src: Path, dst: Path, offset: int, every: float = 0.05) -> None:
        self.src, self.dst, self.offset, self.every = src, dst, offset, every
        self.copies = 0
        self.errors: list[BaseException] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mirror", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = b""
        while not self._done.wait(self.every):
            try:
                data = pread_file(self.src, self.offset, BLOCK)
                if data == last or not any(data):
                    continue
                try:
                    decode(data)
                except RecordError:
                    continue
                pwrite_sync(self.dst, self.offset, data)
                last = data
                self.copies += 1
            except BaseException as exc:
                self.errors.append(exc)
                return

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        assert not self.errors, f"mirror thread failed: {self.errors[0]!r}"


@pytest.mark.root
def test_writer_restart_is_a_new_incarnation(loopdev_factory: Any, tmp_path: Path) -> None:
    a_img, dev_a = loopdev_factory(1 << 20)
    b_img, dev_b = loopdev_factory(1 << 20)
    config_a = _site_head(tmp_path, "a") + (
        f'[[beat]]\nid = "db1"\nvolume = "{dev_a}"\nslot = 1\ninterval = "200ms"\n'
    )
    config_b = _site_head(tmp_path, "b") + (
        f'[[watch]]\nid = "db1"\nvolume = "{dev_b}"\nslot = 1\ninterval = "200ms"\n'
    )
    mirror = Mirror(a_img, b_img, 1 * SLOT_SIZE)
    a2: Site | None = None
    try:
        with running_site(config_b, tmp_path, "b") as b:
            a1 = start_site(config_a, tmp_path, "a1")
            try:
                first = wait_for(
                    lambda: (row := b.row("db1"))["state"] == "alive" and row,
                    5.0,
                    "site B to see db1 alive",
                )
            finally:
                a1.kill()  # SIGKILL: no stopping record
            a2 = start_site(config_a, tmp_path, "a2")
            new_inc = a2.status()["writers"][0]["incarnation"]
            assert new_inc != first["incarnation"]
            wait_for(
                lambda: b.row("db1")["incarnation"] == new_inc,
                5.0,
                f"site B to see the new incarnation {new_inc}",
            )
            row = wait_for(
                lambda: (row := b.row("db1"))["state"] == "alive" and row,
                5.0,
                "db1 alive again after the restart",
            )
            assert row["restarts"] == 1, row
            assert "serial_regression" not in row["errors"], row
            restarted = row

            code, _ = a2.stop()
            assert code == 0, a2.stderr_tail()
            seen: list[str] = []
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                seen.append(b.row("db1")["state"])
                time.sleep(0.05)
            assert "stale" not in seen, seen
            assert seen[-1] == "stopped", seen
            assert b.row("db1")["restarts"] == 1
        # A restart is a new incarnation, never an undead writer (the count may already be
        # 1 from start-up: see test_writer_starting_after_grace_is_not_undead).
        undead_before = first["errors"].get("undead_writer", 0)
        why = f"flagged undead: note {restarted['note']!r}, errors {restarted['errors']}"
        assert restarted["errors"].get("undead_writer", 0) == undead_before, why
        assert restarted["undead"] is False, why
    finally:
        if a2 is not None and a2.running():
            a2.stop()
        mirror.close()
