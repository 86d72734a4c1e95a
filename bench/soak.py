"""Soak: a two-site ``hbmon demo`` with many pairs, faults applied and healed in turn.

The demo (both sites in one real process, simulated remote copy, UDP beats on loopback) is
scraped every second on both sites like Prometheus scrapes it.  Faults come from the
demo's own lab endpoints (``hbmon lab``), one cycle after another, different pairs each
time: kill hosts, cut the remote link (all pairs), partition the network (all pairs),
corrupt SVOL records, hang the reads of a pair (its volume becomes a FIFO nobody writes),
truncate an SVOL inside a pair's slot, and a mix.  Each cycle waits until the watching
site shows the fault's verdict, heals, and waits until every pair of both sites is
``alive`` again and ``hbmon_workers_stuck`` is 0.

At the end (after a final heal) it checks, and exits 1 when one fails:

* no traceback, ``Exception`` or ``ERROR``/``CRITICAL`` line in the daemon's log;
* every fault was seen, and after every heal all pairs came back ``alive`` with no stuck
  worker left;
* every scrape succeeded, and the demo exits 0 on SIGTERM;
* full mode only: RSS growth under ``--rss-limit`` MiB (median of the last ten samples
  minus the median of ten samples after the warm-up; a least-squares slope is printed too).

Usage::

    python bench/soak.py                       # 2,000 pairs, 10 minutes (full mode)
    python bench/soak.py --quick               # 400 pairs, 0.5 s beats, 45 s: what CI runs
    python bench/soak.py --pairs 1000 --duration 120
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT = 120.0  # start-up of the demo until every pair is alive
DETECT_TIMEOUT = 20.0  # a fault until its verdict shows (the promise is ~4 s; generous)
RECOVER_TIMEOUT = 45.0  # a heal until every pair is alive again with no stuck worker
BAD_LOG = re.compile(r"Traceback|Exception|\bERROR\b|\bCRITICAL\b")
VERDICT_LINE = re.compile(r'^hbmon_pair_verdict\{pair="([^"]+)",verdict="([^"]+)"\} 1\.0$', re.M)


def http(url: str, method: str = "GET", timeout: float = 30.0) -> bytes:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        body: bytes = resp.read()
        return body


def free_port_pair() -> int:
    import socket

    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise SystemExit("no two adjacent free TCP ports")


def proc_status(pid: int) -> tuple[float, int]:
    """(VmRSS in MiB, threads) of a process."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, MiB)`` points, in MiB per hour."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    cov = sum((t - mx) * (v - my) for t, v in points)
    return 3600 * cov / var if var else 0.0


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class Scrape:
    at: float
    verdicts: dict[str, str]  # pair -> verdict, both sites
    stuck: float
    lag: float


@dataclass
class Scraper:
    """GET /metrics of both sites once a second (a thread), like Prometheus."""

    urls: list[str]
    pid: int
    every: float = 1.0
    latest: Scrape | None = None
    count: int = 0
    errors: list[str] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    max_stuck: float = 0.0
    _done: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._done.is_set():
            try:
                rss, threads = proc_status(self.pid)
                self.rss.append((time.monotonic(), rss))
                self.threads.append(threads)
            except OSError:
                pass
            verdicts: dict[str, str] = {}
            stuck = lag = 0.0
            ok = True
            for url in self.urls:
                began = time.monotonic()
                try:
                    text = http(url + "/metrics").decode()
                except (urllib.error.URLError, OSError) as err:
                    self.errors.append(f"{time.strftime('%H:%M:%S')} {url}: {err}")
                    ok = False
                    continue
                self.durations.append(time.monotonic() - began)
                verdicts.update(VERDICT_LINE.findall(text))
                for line in text.splitlines():
                    if line.startswith("hbmon_workers_stuck "):
                        stuck += float(line.split()[1])
                    elif line.startswith("hbmon_poll_lag_seconds "):
                        lag = max(lag, float(line.split()[1]))
            if ok:
                with self._lock:
                    self.latest = Scrape(time.monotonic(), verdicts, stuck, lag)
                    self.count += 1
                    self.lags.append(lag)
                    self.max_stuck = max(self.max_stuck, stuck)
            next_at += self.every
            self._done.wait(max(0.0, next_at - time.monotonic()))

    def snapshot(self, after: float) -> Scrape | None:
        """The newest scrape taken after ``after`` (monotonic), if any."""
        with self._lock:
            latest = self.latest
        return latest if latest is not None and latest.at > after else None

    def wait(self, what: str, ok: object, timeout: float) -> tuple[float | None, Scrape | None]:
        """Seconds until a scrape taken from now on satisfies ``ok(scrape)`` (or None)."""
        start = time.monotonic()
        last = None
        while time.monotonic() - start < timeout:
            scrape = self.snapshot(start if last is None else last.at)
            if scrape is not None:
                last = scrape
                if ok(scrape):  # type: ignore[operator]
                    return scrape.at - start, scrape
            time.sleep(0.1)
        return None, last


@dataclass
class Fault:
    name: str
    actions: list[tuple[str, str | None]]  # (lab action, pair or None)
    expect: dict[str, set[str]]  # pair -> acceptable verdicts while the fault holds
    stuck: bool = False  # a worker must show as stuck while it holds


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="hbmon-soak-"))
        self.log = self.tmp / "demo.log"
        self.port = free_port_pair()
        self.urls = [f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.port + 1}"]
        self.failures: list[str] = []
        self.cycles: list[dict[str, object]] = []
        half = {"osaka": (args.pairs + 1) // 2, "tokyo": args.pairs // 2}
        self.pairs = {  # as hbmon.demo names them
            site: [f"{site}-{i:0{max(2, len(str(n)))}d}" for i in range(1, n + 1)]
            for site, n in half.items()
        }
        self.all_pairs = self.pairs["osaka"] + self.pairs["tokyo"]
        self._next = 0

    # -- the demo ------------------------------------------------------------------

    def start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ, TMPDIR=str(self.tmp))  # `hbmon lab` finds this demo only
        argv = [
            sys.executable,
            "-m",
            "hbmon.cli",
            "demo",
            "--pairs",
            str(self.args.pairs),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--interval",
            f"{self.args.interval}s",
        ]
        with self.log.open("wb") as log:
            return subprocess.Popen(
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip

    def lab(self, action: str, pair: str | None) -> None:
        query = f"?pair={pair}" if pair else ""
        try:
            http(f"{self.urls[0]}/lab/{action}{query}", method="POST")
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            self.failures.append(f"lab {action} {pair or ''}: HTTP {err.code} {detail}")

    # -- faults --------------------------------------------------------------------

    def pick(self, site: str | None = None, count: int = 1) -> list[str]:
        """The next ``count`` pairs (of ``site``, or of both), a different lot each call."""
        pool = self.pairs[site] if site else self.all_pairs
        out = []
        for _ in range(count):
            out.append(pool[self._next % len(pool)])
            self._next += 7
        return out

    def faults(self) -> list[Fault]:
        """One round of faults, on pairs not used by the previous round."""
        everyone = self.all_pairs
        killed = self.pick(count=5)
        mixed = self.pick(count=3)
        last = self.pairs["osaka"][-1]  # truncating its SVOL cuts no other pair
        hung = self.pick()[0]
        corrupt = self.pick(count=3)
        frozen = self.pick(count=2)

        def each(pairs: list[str], verdict: str) -> dict[str, set[str]]:
            return {p: {verdict} for p in pairs}

        def acts(action: str, pairs: list[str]) -> list[tuple[str, str | None]]:
            return [(action, p) for p in pairs]

        return [
            Fault("kill-host x5", acts("kill-host", killed), each(killed, "host_down")),
            Fault("hang-read", [("hang-read", hung)], each([hung], "degraded"), stuck=True),
            Fault("cut-link (all)", [("cut-link", None)], each(everyone, "link_down")),
            Fault("partition (all)", [("partition", None)], each(everyone, "network_partition")),
            Fault("corrupt x3", acts("corrupt", corrupt), each(corrupt, "degraded")),
            Fault("truncate", [("truncate", last)], each([last], "degraded")),
            Fault(
                "kill + partition + cut-link",
                [("kill-host", mixed[0]), ("partition", mixed[1]), ("cut-link", mixed[2])],
                {
                    mixed[0]: {"host_down"},
                    mixed[1]: {"network_partition"},
                    mixed[2]: {"link_down"},
                },
            ),
            Fault("freeze-host x2", acts("freeze-host", frozen), each(frozen, "host_down")),
        ]

    def run_fault(self, scraper: Scraper, fault: Fault) -> None:
        for action, pair in fault.actions:
            self.lab(action, pair)
        want = fault.expect

        def shown(s: Scrape) -> bool:
            seen = all(s.verdicts.get(p) in v for p, v in want.items())
            return seen and (not fault.stuck or s.stuck > 0)

        detected, scrape = scraper.wait(fault.name, shown, DETECT_TIMEOUT)
        if detected is None:
            got = {p: scrape.verdicts.get(p) for p in list(want)[:5]} if scrape else None
            stuck = scrape.stuck if scrape else None
            self.failures.append(f"{fault.name}: not shown in {DETECT_TIMEOUT:.0f} s "
                                 f"(saw {got}, stuck {stuck})")  # fmt: skip
        self.lab("heal", None)
        recovered, scrape = scraper.wait("recovery", self.healthy, RECOVER_TIMEOUT)
        if recovered is None:
            bad = {p: v for p, v in (scrape.verdicts.items() if scrape else ()) if v != "alive"}
            stuck = scrape.stuck if scrape else None
            self.failures.append(
                f"{fault.name}: not healthy {RECOVER_TIMEOUT:.0f} s after heal: "
                f"{len(bad)} pair(s) not alive {dict(list(bad.items())[:5])}, stuck {stuck}"
            )
        self.cycles.append({"fault": fault.name, "detected": detected, "recovered": recovered})
        shown_s = "never" if detected is None else f"{detected:.1f} s"
        back = "never" if recovered is None else f"{recovered:.1f} s"
        print(f"  {time.strftime('%H:%M:%S')} {fault.name:<28} shown {shown_s:>6}, "
              f"all alive + 0 stuck after heal {back:>6}", flush=True)  # fmt: skip

    def healthy(self, s: Scrape) -> bool:
        return (
            s.stuck == 0
            and len(s.verdicts) == len(self.all_pairs)
            and all(v == "alive" for v in s.verdicts.values())
        )

    # -- the whole soak ------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        proc = self.start()
        scraper = Scraper(self.urls, proc.pid)
        try:
            self._wait_ready(proc)
            began_cpu, began = cpu_seconds(proc.pid), time.monotonic()
            scraper.start()
            up, _ = scraper.wait("start", self.healthy, READY_TIMEOUT)
            if up is None:
                self.failures.append(f"not every pair alive {READY_TIMEOUT:.0f} s after start")
                return self.finish(proc, scraper, began, began_cpu)
            print(f"soak: {args.pairs} pairs, interval {args.interval} s, {args.duration:.0f} s"
                  f" of faults; demo pid {proc.pid}, log {self.log}", flush=True)  # fmt: skip
            deadline = began + args.duration
            while time.monotonic() < deadline:
                for fault in self.faults():
                    if time.monotonic() >= deadline:
                        break
                    self.run_fault(scraper, fault)
                    if proc.poll() is not None:
                        self.failures.append(f"the demo exited with code {proc.returncode}")
                        return self.finish(proc, scraper, began, began_cpu)
                    time.sleep(args.settle)
            return self.finish(proc, scraper, began, began_cpu)
        finally:
            scraper.stop()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the demo exited with {proc.returncode}:\n{self.tail()}")
            try:
                http(self.urls[1] + "/healthz", timeout=2)
                http(self.urls[0] + "/healthz", timeout=2)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise SystemExit(f"the demo did not answer within {READY_TIMEOUT:.0f} s\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def finish(
        self, proc: subprocess.Popen[bytes], scraper: Scraper, began: float, began_cpu: float
    ) -> int:
        args = self.args
        # Final heal: every pair alive and no stuck worker.
        if proc.poll() is None:
            self.lab("heal", None)
            final, _ = scraper.wait("final heal", self.healthy, RECOVER_TIMEOUT)
            if final is None:
                self.failures.append("not every pair alive with 0 stuck after the final heal")
        elapsed = time.monotonic() - began
        cpu = 100 * (cpu_seconds(proc.pid) - began_cpu) / elapsed if proc.poll() is None else 0.0
        scraper.stop()
        time.sleep(scraper.every + 0.5)
        code = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                self.failures.append("the demo did not exit within 30 s of SIGTERM")
        else:
            code = proc.returncode
        if code != 0:
            self.failures.append(f"the demo exited with code {code}")
        text = self.log.read_text(errors="replace")
        bad = [line for line in text.splitlines() if BAD_LOG.search(line)]
        if bad:
            self.failures.append(f"{len(bad)} bad log line(s), first: {bad[0][:300]}")
        if scraper.errors:
            self.failures.append(
                f"{len(scraper.errors)} failed scrape(s), first: {scraper.errors[0]}"
            )

        # RSS: after the warm-up against the end.
        warm = scraper.rss[0][0] + args.warmup if scraper.rss else 0.0
        points = [(t - warm, v) for t, v in scraper.rss if t >= warm]
        growth = slope = None
        if len(points) >= 20:
            growth = median([v for _, v in points[-10:]]) - median([v for _, v in points[:10]])
            slope = slope_per_hour(points)
            if not args.quick and growth >= args.rss_limit:
                self.failures.append(f"RSS grew {growth:.2f} MiB (limit {args.rss_limit} MiB)")
        elif not args.quick:
            self.failures.append(f"too few RSS samples after the warm-up ({len(points)})")

        detected = [c["detected"] for c in self.cycles if c["detected"] is not None]
        recovered = [c["recovered"] for c in self.cycles if c["recovered"] is not None]
        counts = Counter(str(c["fault"]) for c in self.cycles)
        lags = sorted(scraper.lags) or [0.0]
        durations = sorted(scraper.durations) or [0.0]
        summary = {
            "mode": "quick" if args.quick else "full",
            "pairs": args.pairs,
            "interval_s": args.interval,
            "seconds": round(elapsed, 1),
            "fault_cycles": len(self.cycles),
            "faults": dict(counts),
            "detect_s_max": round(max(detected), 2) if detected else None,  # type: ignore[type-var]
            "recover_s_max": round(max(recovered), 2) if recovered else None,  # type: ignore[type-var]
            "scrapes": scraper.count,
            "scrape_errors": len(scraper.errors),
            "scrape_s_p99": round(durations[int(0.99 * (len(durations) - 1))], 3),
            "poll_lag_gauge_p99_s": round(lags[int(0.99 * (len(lags) - 1))], 4),
            "poll_lag_gauge_max_s": round(lags[-1], 4),
            "workers_stuck_max": scraper.max_stuck,
            "rss_start_mib": round(points[0][1], 1) if points else None,
            "rss_end_mib": round(points[-1][1], 1) if points else None,
            "rss_growth_mib": None if growth is None else round(growth, 2),
            "rss_each_minute_mib": [round(v, 1) for _, v in points[::60]],
            "threads_start_end": [scraper.threads[0], scraper.threads[-1]]
            if scraper.threads
            else None,
            "rss_slope_mib_per_hour": None if slope is None else round(slope, 2),
            "cpu_percent": round(cpu, 1),
            "bad_log_lines": len(bad),
            "log_lines": text.count("\n"),
            "exit_code": code,
            "failures": self.failures,
        }
        print("soak summary:")
        for key, value in summary.items():
            print(f"  {key:<24} {value}")
        print(f"SOAK-JSON {json.dumps(summary)}", flush=True)
        if self.failures:
            print("soak FAILED:\n  " + "\n  ".join(self.failures), flush=True)
            return 1
        print("soak passed", flush=True)
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of faults")
    parser.add_argument("--interval", type=float, default=1.0, help="beat interval, seconds")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between cycles")
    parser.add_argument("--warmup", type=float, default=60.0, help="RSS baseline after this")
    parser.add_argument("--rss-limit", type=float, default=5.0, help="MiB (full mode only)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short mode: 400 pairs, 0.5 s beats, 45 s; RSS reported",
    )
    args = parser.parse_args()
    if args.quick:
        defaults = {"pairs": 2000, "duration": 600.0, "warmup": 60.0, "interval": 1.0}
        quick = {"pairs": 400, "duration": 45.0, "warmup": 10.0, "interval": 0.5}
        for key, value in quick.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    soak = Soak(args)
    code = soak.run()
    if code == 0:
        shutil.rmtree(soak.tmp, ignore_errors=True)
    else:
        print(f"soak: the demo's log is kept in {soak.log}")
    return code


if __name__ == "__main__":
    sys.exit(main())
