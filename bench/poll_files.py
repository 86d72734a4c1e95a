"""Targets 1, 4, 6 and 7: 10,000 file volumes polled once a second.

A writer process (bench/writer.py) rewrites every volume's record once a second.  Each run
measures the baseline (bench/baseline_poller.py: a task per volume, aiofiles, labelled
Gauges) and then hbmon (``hbmon run`` with one ``[[watch_glob]]``), each as its own
process:

* target 7: seconds from process start until every volume has been read once (hbmon: the
  "all N watched volume(s) read" log line, confirmed by /status.json ``polled``; also
  with ``polled`` asked every 0.2 s, which delays it; baseline: its ``first-read-all``
  line);
* target 1: process CPU (% of one core, user + system) over a window after a warm-up;
  the baseline cannot keep up with 10,000 reads a second, so the ratio is CPU per read;
  and, with ``--equal N`` (default 1,000; 0: skip), both again at N volumes, a load the
  baseline sustains, each against a writer of its own N volumes (the 10,000 volumes'
  writer stopped meanwhile): the CPU ratio at equal load;
* target 4: poll lag p99 while /metrics is scraped once a second (hbmon: every poll tick
  in the window, from ``hbmon_poll_tick_lag_seconds``; baseline: the same quantity, one
  sample per scheduler pass that starts reads -- an event-loop iteration in which tasks
  woke -- the lateness of the most overdue read it started; also, as before, the lateness
  of every task wake-up, one sample per read), while a thread renders the baseline's
  registry once a second;
* target 6: peak RSS during that window (sampled every 0.1 s); with ``--soak`` the last
  hbmon process keeps running, scraped every second, and its RSS is sampled every 10 s
  just before a scrape.

Medians over ``--runs`` runs; hbmon goes first in odd runs, the baseline in even ones (also
at equal load), so that an order effect cancels over an even number of runs.  Nothing is
asserted: it prints one line per target.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    BENCH,
    Hbmon,
    add_common_args,
    exit_on_sigterm,
    fmt,
    free_port,
    http_get,
    info,
    machine_line,
    make_volumes,
    measure_cpu,
    measure_cpu_fine,
    median,
    metric_value,
    quantile,
    ratio_text,
    report,
    rss_mib,
    site_config,
    start,
    stop,
    writer_argv,
)

STATUS_EVERY = 0.2  # how often start-up progress is asked for (each ask costs hbmon CPU)


class Scraper:
    """GET /metrics once a second on a thread, like Prometheus; keeps what it saw."""

    def __init__(self, url: str, pid: int, every: float = 1.0) -> None:
        self.url = url
        self.pid = pid
        self.every = every
        # RSS just before each scrape (a second after the last one: the steady state)
        self.rss_before: list[tuple[float, float]] = []
        self.durations: list[float] = []
        self.lag_gauge: list[float] = []
        # hbmon_poll_tick_lag_seconds buckets of the first and the latest scrape
        self.ticks_first: dict[float, float] | None = None
        self.ticks_last: dict[float, float] | None = None
        self.errors: list[str] = []
        self.bytes = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def start(self) -> Scraper:
        self._thread.start()
        return self

    def _run(self) -> None:
        next_at = time.monotonic()
        # The first scrape also builds the renderer's caches: not counted as a duration.
        first = True
        while not self._done.is_set():
            try:
                self.rss_before.append((time.monotonic(), rss_mib(self.pid)))
            except OSError:
                pass
            began = time.perf_counter()
            try:
                body = http_get(self.url + "/metrics").decode()
            except (urllib.error.URLError, OSError) as err:
                self.errors.append(str(err))
            else:
                if not first:
                    self.durations.append(time.perf_counter() - began)
                first = False
                self.bytes = len(body)
                lag = metric_value(body, "hbmon_poll_lag_seconds")
                if lag is not None:
                    self.lag_gauge.append(lag)
                buckets = tick_buckets(body)
                if buckets:
                    if self.ticks_first is None:
                        self.ticks_first = buckets
                    self.ticks_last = buckets
            next_at += self.every
            self._done.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._done.set()
        self._thread.join(30)


def tick_buckets(body: str) -> dict[float, float]:
    """``le`` -> cumulative count of hbmon_poll_tick_lag_seconds in a /metrics body."""
    out = {}
    prefix = 'hbmon_poll_tick_lag_seconds_bucket{le="'
    for line in body.splitlines():
        if line.startswith(prefix):
            le, _, rest = line[len(prefix) :].partition('"}')
            out[float(le)] = float(rest)
    return out


def window_quantile(
    first: dict[float, float], last: dict[float, float], q: float
) -> tuple[float | None, float, float | None]:
    """(q-quantile, ticks, share of ticks within 50 ms) of the ticks between two scrapes,
    interpolated within a bucket as PromQL's histogram_quantile does."""
    bounds = sorted(last)
    counts = [last[b] - first.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None, 0.0, None
    within = next((c for b, c in zip(bounds, counts, strict=True) if b >= 0.05), total) / total
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower, total, within
            share = (rank - below) / max(count - below, 1e-9)
            return lower + (bound - lower) * share, total, within
        lower, below = bound, count
    return lower, total, within


class PeakRss:
    """The highest RSS of a process, sampled every 0.1 s on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.1):
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except OSError:
                return

    def stop(self) -> float:
        self._done.set()
        self._thread.join(5)
        return self.peak


@dataclass
class Result:
    startup: float | None = None
    cpu: float | None = None
    reads_per_s: float | None = None
    lag_p99: float | None = None
    rss: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


class BaselineProc:
    """bench/baseline_poller.py as a subprocess; its stdout lines arrive on a queue."""

    def __init__(self, folder: Path, log: Path) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "baseline_poller.py"), str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
            text=True,
        )
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line.strip()))

    def wait_line(self, prefix: str, timeout: float) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                when, line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"baseline: no {prefix!r} line within {timeout} s") from None
            if line.startswith(prefix):
                return when, line
            if time.monotonic() > deadline:
                raise RuntimeError(f"baseline: no {prefix!r} line within {timeout} s")

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stats(self) -> dict[str, float]:
        self.command("stats")
        _, line = self.wait_line("stats", 60)
        return {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}

    def stop(self) -> None:
        stop(self.proc)


def run_baseline(folder: Path, tmp: Path, args: argparse.Namespace, n: int) -> Result:
    res = Result()
    proc = BaselineProc(folder, tmp / "baseline.stderr")
    try:
        when, _ = proc.wait_line("first-read-all", 120)
        res.startup = when - proc.started
        time.sleep(args.warmup)
        s0 = proc.stats()
        t0 = time.monotonic()
        res.cpu = measure_cpu(proc.proc.pid, args.window)
        t1 = time.monotonic()
        s1 = proc.stats()
        res.reads_per_s = (s1["polls"] - s0["polls"]) / (t1 - t0)
        proc.command("scrape")  # render once a second from now on; lag samples reset
        peak = PeakRss(proc.proc.pid)
        time.sleep(args.lag_window)
        res.rss = peak.stop()
        s2 = proc.stats()
        # No wake-up at all in the window (the render held the loop): no p99 to give.
        res.lag_p99 = s2["lag_p99"] if s2["lag_n"] else None
        res.extra = {"lag_max": s2["lag_max"], "renders": s2["renders"], "wakeups": s2["lag_n"]}
        if s2["renders"]:
            res.extra["render"] = s2["render_median"]
        if s2.get("pass_n"):  # the quantity hbmon's tick lag is (see baseline_poller.py)
            res.extra |= {"pass_p99": s2["pass_p99"], "pass_max": s2["pass_max"]}
            res.extra["passes"] = s2["pass_n"]
    finally:
        proc.stop()
    return res


def run_baseline_equal(folder: Path, tmp: Path, args: argparse.Namespace) -> Result:
    """Target 1 at equal load: the baseline at ``args.equal`` volumes, CPU only."""
    res = Result()
    proc = BaselineProc(folder, tmp / "baseline-equal.stderr")
    try:
        when, _ = proc.wait_line("first-read-all", 60)
        res.startup = when - proc.started
        time.sleep(args.equal_warmup)
        s0 = proc.stats()
        t0 = time.monotonic()
        res.cpu, res.extra["user"], res.extra["system"] = measure_cpu_fine(
            proc.proc.pid, args.equal_window
        )
        t1 = time.monotonic()
        s1 = proc.stats()
        res.reads_per_s = (s1["polls"] - s0["polls"]) / (t1 - t0)
    finally:
        proc.stop()
    return res


def run_hbmon_equal(folder: Path, tmp: Path, args: argparse.Namespace) -> Result:
    """Target 1 at equal load: ``hbmon run`` at ``args.equal`` volumes, CPU only."""
    res = Result()
    port = free_port()
    site = Hbmon(glob_config(tmp, folder, port), tmp / "hbmon-equal.stderr", port)
    try:
        res.startup = site.wait_serving()
        time.sleep(1.0 + args.equal_warmup)  # every volume read (~1 s), then the warm-up
        ta = time.monotonic()
        r0 = hbmon_reads(site)  # its render runs before the CPU window opens
        res.cpu, res.extra["user"], res.extra["system"] = measure_cpu_fine(
            site.pid, args.equal_window
        )
        t1 = time.monotonic()
        r1 = hbmon_reads(site)
        if r0 is not None and r1 is not None:
            res.reads_per_s = (r1 - r0) / (t1 - ta)
        site.check()
    finally:
        site.stop()
    return res


def run_equal(
    folder: Path, tmp: Path, args: argparse.Namespace, hbmon_first: bool
) -> tuple[Result, Result]:
    """Both sides at ``args.equal`` volumes (a writer of their own), in the given order."""
    out: dict[str, Result] = {}
    writer = start(writer_argv(folder, 1.0), tmp / "writer.stderr")
    try:
        time.sleep(1.0)  # every volume's record moves before the first side starts
        for side in ("hbmon", "baseline") if hbmon_first else ("baseline", "hbmon"):
            run = run_hbmon_equal if side == "hbmon" else run_baseline_equal
            out[side] = run(folder, tmp, args)
        if writer.poll() is not None:
            print(f"warning: the equal-load writer exited with code {writer.returncode}")
    finally:
        stop(writer)
    return out["baseline"], out["hbmon"]


def wait_polled(site: Hbmon, n: int, timeout: float = 120.0) -> float:
    """Seconds from process start until /status.json says every volume was read once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        site.check()
        asked = time.monotonic()
        try:
            doc = site.status()
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
            continue
        if "polled" not in doc:
            raise RuntimeError("/status.json has no 'polled' field")
        read, total = doc["polled"]
        if total == n and read == total:
            # The document was made between asking and the answer: count from the ask.
            return asked - site.started
        time.sleep(max(0.0, STATUS_EVERY - (time.monotonic() - asked)))
    raise RuntimeError(f"hbmon did not read all {n} volumes within {timeout} s")


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def log_wall(line: str) -> float | None:
    """The wall-clock time of a log line ("%(asctime)s ...", millisecond resolution)."""
    m = LOG_TIME.match(line)
    if m is None:
        return None
    return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000


def startup_from_log(site: Hbmon, wall_started: float, n: int) -> float | None:
    """Process start to the "all N watched volume(s) read" log line (info level)."""
    needle = f"all {n} watched volume(s) read"
    for line in site.log.read_text(errors="replace").splitlines():
        if needle in line:
            when = log_wall(line)
            return None if when is None else when - wall_started
    return None


def glob_config(tmp: Path, folder: Path, port: int) -> Path:
    return site_config(
        tmp,
        port,
        f'\n[[watch_glob]]\npattern = "{folder}/*.vol"\nmethod = "volume"\ninterval = "1s"\n',
    )


def hbmon_startup(folder: Path, tmp: Path, n: int) -> tuple[float | None, float, float | None]:
    """Target 7, in processes of their own (asking /status.json holds hbmon's loop for
    about a second at 10,000 rows; that must not leak into the other targets).

    Returns (quiet, asking, asking_log): ``quiet`` is process start to the "all N watched
    volume(s) read" log line in a process nobody asks anything until then (confirmed by
    one /status.json ``polled`` afterwards); ``asking`` is process start to the first
    /status.json that says ``polled == [N, N]``, asked every 0.2 s, and ``asking_log`` the
    log line's time in that same process."""
    port = free_port()
    wall = time.time()
    site = Hbmon(glob_config(tmp, folder, port), tmp / "hbmon-quiet.stderr", port, "info")
    try:
        quiet = None
        deadline = time.monotonic() + 120
        while quiet is None and time.monotonic() < deadline:
            site.check()
            time.sleep(0.1)
            quiet = startup_from_log(site, wall, n)
        if quiet is not None and site.status().get("polled") != [n, n]:
            quiet = None  # the log line and the status table disagree: do not trust it
    finally:
        site.stop()
    port = free_port()
    wall = time.time()
    site = Hbmon(glob_config(tmp, folder, port), tmp / "hbmon-asking.stderr", port, "info")
    try:
        asking = wait_polled(site, n)
        deadline = time.monotonic() + 5
        asking_log = startup_from_log(site, wall, n)
        while asking_log is None and time.monotonic() < deadline:
            time.sleep(0.1)
            asking_log = startup_from_log(site, wall, n)
    finally:
        site.stop()
    return quiet, asking, asking_log


def hbmon_reads(site: Hbmon) -> float | None:
    return metric_value(site.metrics(), "hbmon_volume_read_duration_seconds_count")


def run_hbmon(
    folder: Path, tmp: Path, args: argparse.Namespace, n: int, soak: float
) -> tuple[Result, dict[str, object]]:
    res = Result()
    quiet, asking, asking_log = hbmon_startup(folder, tmp, n)
    res.startup = quiet
    res.extra["startup_asking"] = asking
    if asking_log is not None:
        res.extra["startup_asking_log"] = asking_log
    soak_out: dict[str, object] = {}
    port = free_port()
    site = Hbmon(glob_config(tmp, folder, port), tmp / "hbmon.stderr", port)
    scraper: Scraper | None = None
    try:
        site.wait_serving()
        # No /status.json until the end of the lag window: each ask holds the poll loop.
        time.sleep(max(3.0, asking + 0.5) + args.warmup)
        res.extra["rss_no_scrape"] = rss_mib(site.pid)
        ta = time.monotonic()
        r0 = hbmon_reads(site)  # its render runs before the CPU window opens
        res.cpu = measure_cpu(site.pid, args.window)
        t1 = time.monotonic()
        r1 = hbmon_reads(site)
        if r0 is not None and r1 is not None:
            res.reads_per_s = (r1 - r0) / (t1 - ta)
        res.extra["rss_after_cpu"] = rss_mib(site.pid)
        scraper = Scraper(site.url, site.pid).start()
        peak = PeakRss(site.pid)
        time.sleep(args.lag_window)
        res.rss = peak.stop()
        between = [r for _, r in scraper.rss_before[1:]]
        if between:
            res.extra["rss_between"] = median(between)
        doc = site.status()
        res.extra["status_p99"] = doc.get("poll_lag_p99") or float("nan")
        res.lag_p99 = None
        if scraper.ticks_first is not None and scraper.ticks_last is not None:
            p99, ticks, within = window_quantile(scraper.ticks_first, scraper.ticks_last, 0.99)
            res.lag_p99 = p99
            res.extra["ticks"] = ticks
            if within is not None:
                res.extra["within_50ms"] = within
        res.extra["lag_source"] = 1.0 if res.lag_p99 is not None else 0.0
        if res.lag_p99 is None and scraper.lag_gauge:
            res.lag_p99 = quantile(scraper.lag_gauge, 0.99)
        if scraper.lag_gauge:
            res.extra["gauge_p99"] = quantile(scraper.lag_gauge, 0.99)
            res.extra["gauge_max"] = max(scraper.lag_gauge)
        if scraper.durations:
            res.extra["scrape_median"] = median(scraper.durations)
            res.extra["scrape_max"] = max(scraper.durations)
            res.extra["scrapes"] = len(scraper.durations)
        res.extra["scrape_errors"] = len(scraper.errors)
        res.extra["body_mib"] = scraper.bytes / (1 << 20)
        if soak > 0:
            soak_out = run_soak(site, scraper, soak)
        site.check()
    finally:
        if scraper is not None:
            scraper.stop()
        site.stop()
    return res, soak_out


def run_soak(site: Hbmon, scraper: Scraper, seconds: float) -> dict[str, object]:
    """RSS every 10 s for ``seconds`` while the scraper keeps going.

    The samples are the scraper's, taken just before a scrape (a second after the last
    one), so that each shows the same phase of the scrape cycle; the peak is sampled
    every 0.1 s besides."""
    began = time.monotonic()
    peak = PeakRss(site.pid)
    while (elapsed := time.monotonic() - began) < seconds:
        time.sleep(min(10.0, seconds - elapsed))
        site.check()
    top = peak.stop()
    samples: dict[int, tuple[float, float]] = {}
    for when, rss in scraper.rss_before:
        if when >= began:
            samples.setdefault(int((when - began) // 10), (when - began, rss))
    lag_p99 = site.status().get("poll_lag_p99")
    return {"samples": [samples[k] for k in sorted(samples)], "lag_p99": lag_p99, "peak": top}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="targets 1, 4, 6, 7: polling 10,000 file volumes")
    add_common_args(p)
    p.add_argument("--volumes", type=int, default=10_000)
    p.add_argument("--warmup", type=float, help="seconds after start-up before measuring")
    p.add_argument("--window", type=float, help="CPU window, seconds")
    p.add_argument("--lag-window", type=float, help="scrape window for lag and RSS, seconds")
    p.add_argument(
        "--soak",
        type=float,
        help="RSS growth over this many seconds (default 600, 60 with --quick; 0: skip)",
    )
    p.add_argument(
        "--equal",
        type=int,
        default=1000,
        help="target 1 again with both sides at this many volumes (default 1000; 0: skip)",
    )
    p.add_argument("--equal-warmup", type=float, help="seconds (default 5, 2 with --quick)")
    p.add_argument("--equal-window", type=float, help="CPU window, s (default 15, 4 --quick)")
    args = p.parse_args()
    quick = args.quick
    defaults = {"runs": 1 if quick else 3, "warmup": 3.0 if quick else 5.0}
    defaults |= {"window": 5.0 if quick else 20.0, "lag_window": 5.0 if quick else 15.0}
    defaults |= {"soak": 60.0 if quick else 600.0}
    defaults |= {"equal_warmup": 2.0 if quick else 5.0, "equal_window": 4.0 if quick else 15.0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> int:
    exit_on_sigterm()
    args = parse()
    n = args.volumes
    print(
        f"poll_files: {n} file volumes at 1 s, runs={args.runs}"
        + f", equal load {args.equal} volumes" * bool(args.equal)
        + " (quick)" * args.quick
    )
    print(machine_line(), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="hbmon-bench-poll-"))
    writer = None
    try:
        folder = tmp / "vols"
        made = time.monotonic()
        make_volumes(folder, n)
        if args.equal:
            make_volumes(tmp / "equal" / "vols", args.equal)
        info(f"made {n} volumes in {time.monotonic() - made:.1f} s; starting the writer")
        base: list[Result] = []
        mine: list[Result] = []
        base_eq: list[Result] = []
        mine_eq: list[Result] = []
        soak: dict[str, object] = {}
        for run in range(args.runs):
            if writer is None:
                writer = start(writer_argv(folder, 1.0), tmp / "writer.stderr")
                time.sleep(1.5)
            hbmon_first = run % 2 == 0  # odd runs (1, 3, ...): hbmon first
            last = run == args.runs - 1
            for side in ("hbmon", "baseline") if hbmon_first else ("baseline", "hbmon"):
                if side == "baseline":
                    b = run_baseline(folder, tmp, args, n)
                    base.append(b)
                    info(
                        f"run {run + 1} baseline: start-up {fmt(b.startup, ' s', 2)}, "
                        f"CPU {fmt(b.cpu, ' %')}, {fmt(b.reads_per_s, ' reads/s', 0)}, "
                        f"lag p99 {fmt(b.lag_p99, ' s', 3)} (per pass "
                        f"{fmt(b.extra.get('pass_p99'), ' s', 3)}), RSS {fmt(b.rss, ' MiB')}, "
                        f"render {fmt(b.extra.get('render'), ' s', 2)}"
                    )
                    continue
                h, s = run_hbmon(folder, tmp, args, n, args.soak if last else 0.0)
                mine.append(h)
                soak = soak or s
                info(
                    f"run {run + 1} hbmon: start-up {fmt(h.startup, ' s', 2)}, CPU "
                    f"{fmt(h.cpu, ' %')}, {fmt(h.reads_per_s, ' reads/s', 0)}, lag p99 "
                    f"{fmt(h.lag_p99, ' s', 4)}, RSS peak {fmt(h.rss, ' MiB')} (never scraped "
                    f"{h.extra['rss_no_scrape']:.1f}, after 2 scrapes "
                    f"{h.extra['rss_after_cpu']:.1f}, between scrapes "
                    f"{h.extra.get('rss_between', 0):.1f}), GET /metrics median "
                    f"{h.extra.get('scrape_median', float('nan')) * 1000:.0f} ms"
                    f" max {h.extra.get('scrape_max', float('nan')) * 1000:.0f} ms "
                    f"({h.extra.get('body_mib', 0):.1f} MiB body, "
                    f"{int(h.extra.get('scrape_errors', 0))} errors)"
                )
            if writer.poll() is not None:
                print(f"warning: the writer exited with code {writer.returncode}")
            if args.equal:
                stop(writer)  # its 10,000 writes a second are no part of the equal load
                writer = None
                b, h = run_equal(tmp / "equal" / "vols", tmp / "equal", args, hbmon_first)
                base_eq.append(b)
                mine_eq.append(h)
                first = "hbmon" if hbmon_first else "baseline"
                info(
                    f"run {run + 1} equal load ({args.equal} volumes, {first} first): hbmon "
                    f"CPU {fmt(h.cpu, ' %', 2)}, {fmt(h.reads_per_s, ' reads/s', 0)}; "
                    f"baseline CPU {fmt(b.cpu, ' %', 2)}, {fmt(b.reads_per_s, ' reads/s', 0)}"
                )
        print_results(args, n, base, mine, soak, base_eq, mine_eq)
    finally:
        if writer is not None:
            stop(writer)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def med(results: list[Result], attr: str) -> float | None:
    values = [getattr(r, attr) for r in results if getattr(r, attr) is not None]
    return median(values) if values else None


def med_extra(results: list[Result], key: str) -> float | None:
    values = [r.extra[key] for r in results if key in r.extra]
    return median(values) if values else None


def div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def print_results(
    args: argparse.Namespace,
    n: int,
    base: list[Result],
    mine: list[Result],
    soak: dict[str, object],
    base_eq: list[Result],
    mine_eq: list[Result],
) -> None:
    print(f"results (median of {len(mine)} run(s), {n} volumes):")
    hc, bc = med(mine, "cpu"), med(base, "cpu")
    hn, bn = med(mine, "reads_per_s"), med(base, "reads_per_s")
    per_read = div(div(bc, bn), div(hc, hn))  # CPU per read, baseline over hbmon
    report(
        1,
        f"CPU % of one core at {n} volumes/s (ratio: CPU per read)",
        fmt(hc, "%"),
        fmt(bc, "%"),
        ratio_text(per_read),
        "hbmon <= 10 %, ratio >= 10x",
    )
    info(
        f"reads/s achieved: hbmon {fmt(hn, '', 0)}, baseline {fmt(bn, '', 0)}; "
        f"raw CPU ratio {ratio_text(div(bc, hc))}; at {n} reads/s the baseline would need "
        f"{fmt(None if per_read is None or hc is None else per_read * hc, '%', 0)} of a core"
        + ("; at equal load see the next target 1 line" if mine_eq else "")
    )
    if mine_eq:
        print_equal(args, base_eq, mine_eq)
    hl, bl = med(mine, "lag_p99"), med(base, "lag_p99")
    soak_lag = soak.get("lag_p99") if soak else None
    if all(r.extra.get("lag_source") for r in mine):
        within = med_extra(mine, "within_50ms")
        source = (
            "p99 of every poll tick in the scrape window, from hbmon_poll_tick_lag_seconds "
            "bucket deltas between the first and last scrape (interpolated as "
            f"histogram_quantile does; {fmt(med_extra(mine, 'ticks'), '', 0)} ticks, "
            f"{fmt(None if within is None else 100 * within, ' %', 2)} of them within 50 ms); "
            "/status.json poll_lag_p99 (last 4096 ticks, start-up included): "
            f"{fmt(_ms(med_extra(mine, 'status_p99')), ' ms')}"
        )
    else:
        source = "p99 of hbmon_poll_lag_seconds sampled once per scrape"
    report(
        4,
        "poll lag p99 while /metrics is scraped every second",
        fmt(_ms(hl), " ms"),
        fmt(_ms(bl), " ms"),
        ratio_text(div(bl, hl)),
        "hbmon <= 50 ms",
    )
    runs = ", ".join(fmt(_ms(r.lag_p99), " ms") for r in mine)
    info(f"hbmon value: {source}; per run: {runs}; end of soak: {fmt(_ms(soak_lag), ' ms')}")
    gp, gm = med_extra(mine, "gauge_p99"), med_extra(mine, "gauge_max")
    info(
        f"hbmon_poll_lag_seconds seen in the scrapes: p99 {fmt(_ms(gp), ' ms')}, max "
        f"{fmt(_ms(gm), ' ms')}; baseline: lateness of every task wake-up in the window, "
        f"a thread rendering its registry once a second (task wake-ups in the window: "
        f"{fmt(med_extra(base, 'wakeups'), '', 0)}; renders finished: "
        f"{fmt(med_extra(base, 'renders'), '', 0)}, median "
        f"{fmt(med_extra(base, 'render'), ' s', 2)}): one sample per read, not per "
        "scheduler pass as hbmon's, so not the same quantity (the next target 4 line is)"
    )
    bp = med_extra(base, "pass_p99")
    report(
        4,
        "poll lag p99 while /metrics is scraped every second, the same quantity on both sides "
        "(per scheduler pass: lateness of its most overdue read)",
        fmt(_ms(hl), " ms"),
        fmt(_ms(bp), " ms"),
        ratio_text(div(bp, hl)),
        "hbmon <= 50 ms",
    )
    info(
        "both: one sample per pass of the poll scheduler that starts reads, how late it got "
        "to the most overdue read it started, against that read's due time (at least 0); "
        "hbmon: each poll tick, tick start - due time of its earliest-due group "
        "(hbmon_poll_tick_lag_seconds, the value of the line before, interpolated within its "
        "bucket); baseline: each event-loop iteration in which tasks woke for their reads, "
        "the largest wake-up - due time among them (exact, nearest rank; "
        f"{fmt(med_extra(base, 'passes'), '', 0)} passes in the window, max "
        f"{fmt(_ms(med_extra(base, 'pass_max')), ' ms')})"
    )
    hr, br = med(mine, "rss"), med(base, "rss")
    report(
        6,
        f"RSS at {n} pairs after warm-up, peak while scraped every second",
        fmt(hr, " MiB"),
        fmt(br, " MiB"),
        ratio_text(div(br, hr)),
        "hbmon <= 120 MiB",
    )
    info(
        f"hbmon RSS never scraped yet {fmt(med_extra(mine, 'rss_no_scrape'), ' MiB')}, "
        f"between scrapes {fmt(med_extra(mine, 'rss_between'), ' MiB')}, peak (the value "
        f"above) {fmt(hr, ' MiB')}; baseline: peak while its thread renders once a second"
    )
    samples = soak.get("samples") if soak else None
    if isinstance(samples, list) and len(samples) > 1:
        values = [v for _, v in samples]
        growth = values[-1] - values[0]
        report(
            6,
            f"RSS growth over a {args.soak:.0f} s soak, scraped every second",
            fmt(growth, " MiB", 2),
            "n/a",
            "n/a",
            "hbmon <= 5 MiB",
        )
        peak = soak.get("peak")
        info(
            f"soak RSS (just before a scrape, every 10 s): start {values[0]:.1f} MiB, end "
            f"{values[-1]:.1f} MiB, max {max(values):.1f} MiB, {len(values)} samples; peak "
            f"at any moment {fmt(peak if isinstance(peak, float) else None, ' MiB')}"
        )
    else:
        info("target 6 soak: skipped (--soak 0)")
    hs, bs = med(mine, "startup"), med(base, "startup")
    report(
        7,
        f"start-up: process start until all {n} volumes were read once",
        fmt(hs, " s", 2),
        fmt(bs, " s", 2),
        ratio_text(div(bs, hs)),
        "hbmon <= 3 s",
    )
    ha, hal = med_extra(mine, "startup_asking"), med_extra(mine, "startup_asking_log")
    info(
        f"hbmon: its own log line 'all {n} watched volume(s) read' (millisecond time stamp) "
        "in a process nothing asks until then, then one /status.json confirms 'polled'; "
        f"asking /status.json 'polled' every {STATUS_EVERY} s instead: {fmt(ha, ' s', 2)} "
        f"(log line in that process {fmt(hal, ' s', 2)}; each ask costs hbmon loop time); "
        "baseline: its first-read-all line"
    )


def print_equal(args: argparse.Namespace, base: list[Result], mine: list[Result]) -> None:
    """The target 1 line at equal load (both sides at ``args.equal`` volumes/s)."""
    hc, bc = med(mine, "cpu"), med(base, "cpu")
    hn, bn = med(mine, "reads_per_s"), med(base, "reads_per_s")
    report(
        1,
        f"CPU % of one core at {args.equal} volumes/s, the same load on both sides "
        "(ratio: raw CPU)",
        fmt(hc, "%", 2),
        fmt(bc, "%"),
        ratio_text(div(bc, hc)),
        "ratio >= 10x",
    )
    sustained = bn is not None and bn >= 0.97 * args.equal
    hus, bus = div(hc, hn), div(bc, bn)  # % of a core per read/s = 10 ms per read
    info(
        f"equal load: reads/s achieved hbmon {fmt(hn, '', 0)}, baseline {fmt(bn, '', 0)} "
        + ("(sustained)" if sustained else "(NOT sustained: the ratio scales a baseline behind)")
        + f"; CPU per read hbmon {fmt(None if hus is None else 1e4 * hus, ' us')}, baseline "
        f"{fmt(None if bus is None else 1e4 * bus, ' us')} (ratio {ratio_text(div(bus, hus))}); "
        f"hbmon user {fmt(med_extra(mine, 'user'), '%', 2)} + system "
        f"{fmt(med_extra(mine, 'system'), '%', 2)}, baseline user "
        f"{fmt(med_extra(base, 'user'), '%')} + system {fmt(med_extra(base, 'system'), '%')}; "
        f"CPU from the process CPU-time clock (ns), over {args.equal_window:g} s after a "
        f"{args.equal_warmup:g} s warm-up; per run hbmon "
        + ", ".join(fmt(r.cpu, "%", 2) for r in mine)
        + ", baseline "
        + ", ".join(fmt(r.cpu, "%") for r in base)
    )


def _ms(value: object) -> float | None:
    return value * 1000 if isinstance(value, int | float) else None


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
