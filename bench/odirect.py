"""Targets 2 and 8: O_DIRECT reads and O_DIRECT|O_DSYNC writes on loop devices.

Needs root (losetup).  Ten sparse 64 MiB images (on /dev/shm when it exists, so a DSYNC
write costs what a write-back array cache costs, not a disk flush) behind ten loop devices:

* target 2: each device carries 1,000 slots with valid records, which bench/slot_writer.py
  rewrites once a second (through the images, underneath the readers' O_DIRECT).  hbmon
  runs with 10,000 ``[[watch]]`` entries (``d{dev}-{slot}``, method volume, interval 1 s):
  10,000 O_DIRECT reads a second.  Process CPU is reported as user and system (system is
  what the kernel adds).  Baseline: bench/baseline_odirect.py ``read``, one
  ``anyio.to_thread.run_sync(os.preadv, ...)`` hop per read at the same rate.  The
  baseline cannot keep up with 10,000 reads a second, so the ratio is CPU per read; with
  ``--equal N`` (default 1,000; 0: skip) both run again at N reads a second (N / devices
  slots on each device), a load the baseline sustains: the CPU ratio at equal load.
* target 8: hbmon runs with 1,000 ``[[beat]]`` entries (100 slots on each device, no
  watches), interval 1 s: 1,000 O_DIRECT|O_DSYNC writes a second.  Baseline:
  bench/baseline_odirect.py ``write``, one thread hop per write.

Every loop device is detached at the end, whatever happened.  Medians of ``--runs``; hbmon
goes first in odd runs, the baseline in even ones, so that an order effect cancels over an
even number of runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    BENCH,
    Hbmon,
    cpu_split,
    exit_on_sigterm,
    fmt,
    free_port,
    info,
    machine_line,
    measure_cpu_fine,
    median,
    metric_sum,
    ratio_text,
    report,
    rss_mib,
    site_config,
    stop,
)

from hbmon.record import SLOT_SIZE, Record

IMAGE_SIZE = 64 << 20
READ_SLOTS = 1000  # per device, target 2
BEAT_FIRST, BEAT_SLOTS = 1000, 100  # per device, target 8 (hbmon)
BASE_WRITE_FIRST = 1100  # per device, target 8 (baseline writer), slots 1100..1199


def losetup(image: Path) -> str:
    done = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def detach(device: str) -> None:
    subprocess.run(["losetup", "-d", device], capture_output=True, check=False)


def make_images(folder: Path, count: int) -> list[Path]:
    images = []
    for dev in range(count):
        image = folder / f"hb{dev}.img"
        with image.open("wb") as f:
            f.truncate(IMAGE_SIZE)
            for slot in range(READ_SLOTS):
                f.seek(slot * SLOT_SIZE)
                f.write(Record(f"d{dev}-{slot}", 1, 1, time.time(), 1.0).encode_block(512))
        images.append(image)
    return images


class Measured:
    def __init__(self) -> None:
        self.user: list[float] = []
        self.system: list[float] = []
        self.rate: list[float] = []
        self.rss: list[float] = []
        self.totals: list[float] = []  # user + system, or the finer process clock

    def add(
        self, user: float, system: float, rate: float | None, rss: float, total: float | None = None
    ) -> None:
        self.user.append(user)
        self.system.append(system)
        if rate is not None:
            self.rate.append(rate)
        self.rss.append(rss)
        self.totals.append(user + system if total is None else total)

    def total(self) -> float | None:
        if not self.totals:
            return None
        return median(self.totals)

    def med(self, name: str) -> float | None:
        values: list[float] = getattr(self, name)
        return median(values) if values else None


def cpu_window(pid: int, seconds: float) -> tuple[float, float, float]:
    """(user %, system %, seconds) of one core over the window."""
    u0, s0 = cpu_split(pid)
    began = time.monotonic()
    time.sleep(seconds)
    u1, s1 = cpu_split(pid)
    took = time.monotonic() - began
    return 100 * (u1 - u0) / took, 100 * (s1 - s0) / took, took


class BaselineProc:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "baseline_odirect.py"), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
            text=True,
        )

    def ops(self) -> int:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.startswith("stats"):
            raise RuntimeError(f"baseline_odirect: {line!r} (exit {self.proc.poll()})")
        return int(line.split()[1].split("=")[1])

    def stop(self) -> None:
        stop(self.proc)


def run_baseline(
    argv: list[str], tmp: Path, args: argparse.Namespace, into: Measured, equal: bool = False
) -> None:
    """Run the baseline; ``equal``: the equal-load windows, CPU from the process clock."""
    proc = BaselineProc(argv, tmp / "baseline.stderr")
    warmup, window = (args.equal_warmup, args.equal_window) if equal else (args.warmup, args.window)
    try:
        time.sleep(1.0 + warmup)
        n0 = proc.ops()
        if equal:
            began = time.monotonic()
            total, user, system = measure_cpu_fine(proc.proc.pid, window)
            took = time.monotonic() - began
        else:
            (user, system, took), total = cpu_window(proc.proc.pid, window), None
        n1 = proc.ops()
        into.add(user, system, (n1 - n0) / took, rss_mib(proc.proc.pid), total)
    finally:
        proc.stop()


def run_hbmon(
    body: str,
    tmp: Path,
    args: argparse.Namespace,
    into: Measured,
    counter: str,
    equal: bool = False,
) -> str | None:
    """Run hbmon with ``body``; returns its io_backend label (from hbmon_build_info).
    ``equal``: 1,000 watches or so, read within a second; the equal-load windows, CPU from
    the process clock."""
    port = free_port()
    config = site_config(tmp, port, body)
    site = Hbmon(config, tmp / "hbmon.stderr", port)
    backend = None
    warmup, window = (args.equal_warmup, args.equal_window) if equal else (args.warmup, args.window)
    try:
        site.wait_serving(120)
        time.sleep((1.0 if equal else 3.0) + warmup)
        ta = time.monotonic()  # the counter is read while this request is served
        text = site.metrics()
        n0 = metric_sum(text, counter)
        for line in text.splitlines():
            if line.startswith("hbmon_build_info{") and "io_backend=" in line:
                backend = line.split('io_backend="', 1)[1].split('"', 1)[0]
        if equal:
            total, user, system = measure_cpu_fine(site.pid, window)
        else:
            (user, system, _), total = cpu_window(site.pid, window), None
        tb = time.monotonic()
        n1 = metric_sum(site.metrics(), counter)
        into.add(user, system, (n1 - n0) / (tb - ta), rss_mib(site.pid), total)
        site.check()
    finally:
        site.stop()
    return backend


def both(hbmon_first: bool, hbmon: Callable[[], object], baseline: Callable[[], object]) -> None:
    """Run the two sides in the given order."""
    for side in (hbmon, baseline) if hbmon_first else (baseline, hbmon):
        side()


def watch_body(devices: list[str], slots: int = READ_SLOTS) -> str:
    parts = ['interval = "1s"\n']
    for dev, device in enumerate(devices):
        for slot in range(slots):
            parts.append(
                f'[[watch]]\nid = "d{dev}-{slot}"\nvolume = "{device}"\nslot = {slot}\n'
                'method = "volume"\n'
            )
    return "\n".join(parts)


def beat_body(devices: list[str]) -> str:
    parts = ['interval = "1s"\n']
    for dev, device in enumerate(devices):
        for slot in range(BEAT_FIRST, BEAT_FIRST + BEAT_SLOTS):
            parts.append(f'[[beat]]\nid = "b{dev}-{slot}"\nvolume = "{device}"\nslot = {slot}\n')
    return "\n".join(parts)


def print_target(
    target: int, what: str, mine: Measured, base: Measured, goal: str, unit: str
) -> None:
    ht, bt = mine.total(), base.total()
    hr, br = mine.med("rate"), base.med("rate")
    per_op = None
    if ht and bt and hr and br:
        per_op = (bt / br) / (ht / hr)
    report(
        target,
        f"{what} (ratio: CPU per {unit})",
        fmt(ht, "%"),
        fmt(bt, "%"),
        ratio_text(per_op),
        goal,
    )
    info(
        f"hbmon user {fmt(mine.med('user'), '%')} + system {fmt(mine.med('system'), '%')} "
        f"(system: what the kernel adds), {fmt(hr, f' {unit}s/s', 0)}, RSS "
        f"{fmt(mine.med('rss'), ' MiB')}; baseline user {fmt(base.med('user'), '%')} + system "
        f"{fmt(base.med('system'), '%')}, {fmt(br, f' {unit}s/s', 0)}"
    )
    if ht and bt and hr and br:
        info(
            f"process CPU per {unit}: hbmon {1e6 * ht / 100 / hr:.1f} us, "
            f"baseline {1e6 * bt / 100 / br:.1f} us; raw CPU ratio {bt / ht:.1f}x"
        )


def print_equal(rate: int, mine: Measured, base: Measured, args: argparse.Namespace) -> None:
    """The target 2 line at equal load (both sides at ``rate`` reads/s)."""
    ht, bt = mine.total(), base.total()
    hr, br = mine.med("rate"), base.med("rate")
    report(
        2,
        f"CPU % of one core at {rate} O_DIRECT reads/s, the same load on both sides "
        "(ratio: raw CPU)",
        fmt(ht, "%", 2),
        fmt(bt, "%"),
        ratio_text(None if not ht or bt is None else bt / ht),
        "none at this load; hbmon <= 20 % is at 10,000 reads/s",
    )
    sustained = br is not None and br >= 0.97 * rate
    per = None
    if ht and bt and hr and br:
        per = f"hbmon {1e6 * ht / 100 / hr:.1f} us, baseline {1e6 * bt / 100 / br:.1f} us"
        per += f" (ratio {(bt / br) / (ht / hr):.1f}x)"
    info(
        f"equal load: reads/s achieved hbmon {fmt(hr, '', 0)}, baseline {fmt(br, '', 0)} "
        + ("(sustained)" if sustained else "(NOT sustained: the ratio scales a baseline behind)")
        + f"; CPU per read {per or 'n/a'}; hbmon user {fmt(mine.med('user'), '%', 2)} + system "
        f"{fmt(mine.med('system'), '%', 2)}, baseline user {fmt(base.med('user'), '%')} + "
        f"system {fmt(base.med('system'), '%')}; CPU from the process CPU-time clock (ns), "
        f"over {args.equal_window:g} s after a {args.equal_warmup:g} s warm-up; per run hbmon "
        + ", ".join(f"{t:.2f}%" for t in mine.totals)
        + ", baseline "
        + ", ".join(f"{t:.1f}%" for t in base.totals)
    )


def main() -> int:
    exit_on_sigterm()
    p = argparse.ArgumentParser(description="targets 2 and 8: O_DIRECT on loop devices")
    p.add_argument("--quick", action="store_true", help="one short run of each (< 1 min)")
    p.add_argument("--runs", type=int, help="runs (median; default 3, 1 with --quick)")
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--warmup", type=float, help="seconds (default 5, 2 with --quick)")
    p.add_argument("--window", type=float, help="CPU window, s (default 15, 5 with --quick)")
    p.add_argument(
        "--equal",
        type=int,
        default=1000,
        help="target 2 again with both sides at this many reads/s (default 1000; 0: skip)",
    )
    p.add_argument("--equal-warmup", type=float, help="seconds (default 5, 2 with --quick)")
    p.add_argument("--equal-window", type=float, help="CPU window, s (default 15, 4 --quick)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 5.0)
    args.window = args.window or (5.0 if args.quick else 15.0)
    if args.equal_warmup is None:
        args.equal_warmup = 2.0 if args.quick else 5.0
    args.equal_window = args.equal_window or (4.0 if args.quick else 15.0)
    equal_slots = min(READ_SLOTS, args.equal // args.devices) if args.equal > 0 else 0
    print(
        f"odirect: {args.devices} loop devices, {args.devices * READ_SLOTS} O_DIRECT reads/s "
        f"(target 2), {args.devices * BEAT_SLOTS} O_DSYNC writes/s (target 8), {runs} run(s)"
        + " (quick)"
        * args.quick
    )
    print(machine_line(), flush=True)
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        print("skipped: needs root (and losetup)")
        return 0
    shm = Path("/dev/shm")
    tmp = Path(tempfile.mkdtemp(prefix="hbmon-bench-odirect-"))
    images_dir = Path(
        tempfile.mkdtemp(prefix="hbmon-bench-img-", dir=shm if shm.is_dir() else None)
    )
    devices: list[str] = []
    writer = None
    try:
        images = make_images(images_dir, args.devices)
        for image in images:
            try:
                devices.append(losetup(image))
            except subprocess.CalledProcessError as err:
                print(f"skipped: losetup failed: {err.stderr.strip() or err}")
                return 0
        info(f"images in {images_dir}, devices {' '.join(devices)}")
        writer = subprocess.Popen(
            [sys.executable, str(BENCH / "slot_writer.py"), "1", str(READ_SLOTS), "d"]
            + [str(i) for i in images],
            stdin=subprocess.DEVNULL,
            stderr=(tmp / "writer.stderr").open("wb"),
        )
        time.sleep(1.0)
        mine, base = Measured(), Measured()
        mine_eq, base_eq = Measured(), Measured()
        backends: list[str] = []
        reads = "hbmon_volume_read_duration_seconds_count"
        body = watch_body(devices)
        reader = ["read", "1", str(READ_SLOTS), "0", "d", *devices]
        body_eq = watch_body(devices, equal_slots)
        reader_eq = ["read", "1", str(equal_slots), "0", "d", *devices]

        def hbmon_reads(into: Measured, text: str, equal: bool = False) -> None:
            backend = run_hbmon(text, tmp, args, into, reads, equal)
            if backend:
                backends.append(backend)

        for run in range(runs):
            hbmon_first = run % 2 == 0  # odd runs (1, 3, ...): hbmon first
            both(
                hbmon_first,
                lambda: hbmon_reads(mine, body),
                lambda: run_baseline(reader, tmp, args, base),
            )
            info(
                f"target 2 run {run + 1}: hbmon {mine.totals[-1]:.1f}%, baseline "
                f"{base.totals[-1]:.1f}% ({'hbmon' if hbmon_first else 'baseline'} first)"
            )
            if equal_slots:
                both(
                    hbmon_first,
                    lambda: hbmon_reads(mine_eq, body_eq, equal=True),
                    lambda: run_baseline(reader_eq, tmp, args, base_eq, equal=True),
                )
                info(
                    f"target 2 run {run + 1} equal load ({equal_slots * len(devices)} reads/s): "
                    f"hbmon {mine_eq.totals[-1]:.2f}%, baseline {base_eq.totals[-1]:.1f}%"
                )
        stop(writer)
        writer = None
        beats, wbase = Measured(), Measured()
        body = beat_body(devices)
        naive = ["write", "1", str(BEAT_SLOTS), str(BASE_WRITE_FIRST), "w", *devices]
        for run in range(runs):
            hbmon_first = run % 2 == 0
            both(
                hbmon_first,
                lambda: run_hbmon(body, tmp, args, beats, "hbmon_beats_written_total"),
                lambda: run_baseline(naive, tmp, args, wbase),
            )
            info(
                f"target 8 run {run + 1}: hbmon {beats.totals[-1]:.1f}%, baseline "
                f"{wbase.totals[-1]:.1f}% ({'hbmon' if hbmon_first else 'baseline'} first)"
            )
        print(f"results (median of {runs} run(s)):")
        print_target(
            2,
            f"CPU % of one core at {args.devices * READ_SLOTS} O_DIRECT reads/s",
            mine,
            base,
            "hbmon <= 20 % of one core",
            "read",
        )
        if equal_slots:
            print_equal(equal_slots * len(devices), mine_eq, base_eq, args)
        backend = ", ".join(sorted(set(backends))) or "not reported"
        info(f"hbmon io_backend (hbmon_build_info): {backend}")
        print_target(
            8,
            f"CPU % of one core at {args.devices * BEAT_SLOTS} O_DIRECT|O_DSYNC writes/s",
            beats,
            wbase,
            "hbmon <= 15 % of one core",
            "write",
        )
    finally:
        if writer is not None:
            stop(writer)
        for device in devices:
            detach(device)
        shutil.rmtree(images_dir, ignore_errors=True)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
