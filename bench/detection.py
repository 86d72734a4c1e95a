"""Target 5: how long after a writer stops hbmon declares its pair stale / host_down.

1,000 volume-only pairs (files), interval 1 s, miss_threshold 3.  bench/stopping_writer.py
beats all of them every second (each pair at its own phase); once every row is ``alive``
it is told ``go`` and stops each pair at a random moment of a 20 s window, recording the
wall time of each pair's last write.  hbmon runs with ``--log-level info``; the moment a
pair was declared dead is the earliest of its log lines ``pair X volume ...: alive|late ->
stale`` (the poller saw it) and ``pair X: verdict ... -> host_down`` (the timer saw it),
read from the "%(asctime)s" millisecond wall-clock time stamp.

    detection latency = declared time - last write time

Only a declaration at or after the pair's last write, and never taken back (no ``stale ->
...`` or ``verdict host_down -> ...`` line after it), is a detection.  A declaration before
the last write, or one that a later line takes back, is a false alarm: counted and printed,
never a (fast) detection.  A pair with no detection by the end of the run is a miss: its
latency is infinite, and it counts in the p99 and the max like any other pair.

The bound is interval x miss_threshold + interval + 100 ms = 4.1 s: the beat is seen up to
one interval after it was written, the row is stale miss_threshold intervals after that,
plus 100 ms of scheduling.  There is no baseline program: the bound is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    BENCH,
    Hbmon,
    exit_on_sigterm,
    fmt,
    free_port,
    info,
    machine_line,
    make_volumes,
    quantile,
    report,
    site_config,
    stop,
)

INTERVAL = 1.0
MISS_THRESHOLD = 3
BOUND = INTERVAL * MISS_THRESHOLD + INTERVAL + 0.1

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ (\S+): (.*)$")
STALE = re.compile(r"^pair (\S+) volume \S+: (alive|late) -> stale")
HOST_DOWN = re.compile(r"^pair (\S+): verdict \S+ -> host_down")
# A declaration taken back: the row leaves stale, the verdict leaves host_down.
UNSTALE = re.compile(r"^pair (\S+) volume \S+: stale -> ")
UNDOWN = re.compile(r"^pair (\S+): verdict host_down -> ")
MISS = float("inf")  # the latency of a pair never declared


def log_lines(path: Path) -> list[tuple[float, str]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = LOG_TIME.match(line)
        if m:
            wall = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
            out.append((wall + int(m.group(2)) / 1000, m.group(4)))
    return out


@dataclass
class Episode:
    """A pair declared dead (its first stale / host_down line) until taken back."""

    began: float
    kind: str  # "stale" or "host_down": the line that came first
    ended: float | None = None  # the first line that took it back


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)  # detected pairs only
    missing: list[str] = field(default_factory=list)  # never detected: latency MISS
    false_alarms: int = 0  # episodes before the last write, or taken back
    false_alarm_pairs: int = 0
    early: int = 0  # of those, begun before the pair's last write
    kinds: dict[str, int] = field(default_factory=dict)

    def pooled(self) -> list[float]:
        return self.latencies + [MISS] * len(self.missing)


def episodes(path: Path, after: float) -> dict[str, list[Episode]]:
    """Per pair, its declarations after ``after`` from hbmon's log, in order."""
    out: dict[str, list[Episode]] = {}
    for when, message in log_lines(path):
        if when < after:
            continue
        for kind, pattern in (("stale", STALE), ("host_down", HOST_DOWN)):
            m = pattern.match(message)
            if m:
                runs = out.setdefault(m.group(1), [])
                if not runs or runs[-1].ended is not None:
                    runs.append(Episode(when, kind))
        for pattern in (UNSTALE, UNDOWN):
            m = pattern.match(message)
            if m and (runs := out.get(m.group(1))) and runs[-1].ended is None:
                runs[-1].ended = when
    return out


def judge(seen: dict[str, list[Episode]], last: dict[str, float]) -> Outcome:
    """Detections, misses and false alarms of every pair the writer stopped.

    The detection is the first declaration at or after the pair's last write that is
    never taken back; every other declaration is a false alarm (one before the last
    write was a flap while the writer still beat; one taken back was a flap too)."""
    out = Outcome(kinds={"stale line first": 0, "host_down line first": 0})
    for pair, wrote in last.items():
        detection = None
        alarms = 0
        for ep in seen.get(pair, []):
            if detection is None and ep.began >= wrote and ep.ended is None:
                detection = ep
                continue
            alarms += 1
            out.early += ep.began < wrote
        out.false_alarms += alarms
        out.false_alarm_pairs += alarms > 0
        if detection is None:
            out.missing.append(pair)
        else:
            out.latencies.append(detection.began - wrote)
            out.kinds[f"{detection.kind} line first"] += 1
    return out


def wait_all_alive(site: Hbmon, n: int, timeout: float = 60.0) -> int:
    """Wait until every row is alive; after ``timeout`` make do with 99 % of them.
    Returns how many rows were alive."""
    began = time.monotonic()
    states: dict[str, int] = {}
    while True:
        site.check()
        try:
            states = site.status().get("states", {})
        except (urllib.error.URLError, OSError):
            states = {}
        alive = int(states.get("alive", 0))
        if alive == n:
            return alive
        if time.monotonic() - began > timeout:
            if alive >= 0.99 * n:
                info(f"warning: only {alive} of {n} rows alive after {timeout:.0f} s: {states}")
                return alive
            raise RuntimeError(f"not every row became alive within {timeout} s: {states}")
        time.sleep(0.25)


def one_run(tmp: Path, n: int, window: float, seed: int) -> Outcome:
    folder = tmp / "vols"
    shutil.rmtree(folder, ignore_errors=True)
    make_volumes(folder, n, prefix="d")
    out = tmp / "last_writes.json"
    writer = subprocess.Popen(
        [
            sys.executable,
            str(BENCH / "stopping_writer.py"),
            str(folder),
            str(out),
            str(window),
            "--interval",
            str(INTERVAL),
            "--seed",
            str(seed),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(tmp / "writer.stderr").open("wb"),
        text=True,
    )
    port = free_port()
    config = site_config(
        tmp,
        port,
        f'interval = "{INTERVAL:g}s"\nmiss_threshold = {MISS_THRESHOLD}\n'
        "log_changes = 0\n\n"  # every change logged: the log is what is measured
        f'[[watch_glob]]\npattern = "{folder}/*.vol"\nmethod = "volume"\n',
    )
    log = tmp / f"hbmon-{seed}.stderr"
    site = None
    try:
        time.sleep(1.5)  # every volume has a record that moves before hbmon starts
        site = Hbmon(config, log, port, log_level="info")
        site.wait_serving()
        wait_all_alive(site, n)
        go = time.time()
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.stdout is not None
        line = writer.stdout.readline()  # "done" once every pair has stopped
        if line.strip() != "done":
            raise RuntimeError(f"writer: {line!r} (see {tmp / 'writer.stderr'})")
        time.sleep(BOUND + 2.0)
        site.check()
        site.stop()
        data = json.loads(out.read_text())
        last = data["last_write"]
        return judge(episodes(log, go), last)
    finally:
        if site is not None:
            site.stop()
        stop(writer)


def histogram(values: list[float], width: float = 0.25, bar: int = 50) -> list[str]:
    """Bins of the finite values, then one line for the misses."""
    misses = sum(1 for v in values if v == MISS)
    values = [v for v in values if v != MISS]
    if not values:
        return [f"never declared {misses:5d}"] if misses else []
    lo = int(min(values) / width) * width
    hi = max(values)
    bins: list[int] = []
    edges: list[float] = []
    edge = lo
    while edge <= hi:
        edges.append(edge)
        bins.append(sum(1 for v in values if edge <= v < edge + width))
        edge += width
    top = max(bins) or 1
    lines = []
    for edge, count in zip(edges, bins, strict=True):
        mark = " <- bound" if edge < BOUND <= edge + width else ""
        lines.append(
            f"{edge:5.2f}-{edge + width:4.2f} s {count:5d} {'#' * round(bar * count / top)}{mark}"
        )
    if misses:
        lines.append(f"never declared {misses:5d} (misses)")
    return lines


def main() -> int:
    exit_on_sigterm()
    p = argparse.ArgumentParser(description="target 5: detection latency of stopped writers")
    p.add_argument("--quick", action="store_true", help="one run, a 10 s window (< 1 min)")
    p.add_argument("--runs", type=int, help="runs pooled together (default 3, 1 with --quick)")
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--window", type=float, help="stop window, s (default 20, 10 with --quick)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    window = args.window or (10.0 if args.quick else 20.0)
    n = args.pairs
    print(
        f"detection: {n} volume-only pairs, interval {INTERVAL:g} s, miss_threshold "
        f"{MISS_THRESHOLD}, stops spread over {window:g} s, {runs} run(s)" + " (quick)" * args.quick
    )
    print(machine_line(), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="hbmon-bench-detect-"))
    pooled: list[float] = []  # every stopped pair: a latency, or MISS
    missing_all: list[str] = []
    alarms = alarm_pairs = early = 0
    try:
        for run in range(runs):
            got = one_run(tmp, n, window, seed=run + 1)
            pooled += got.pooled()
            missing_all += got.missing
            alarms += got.false_alarms
            alarm_pairs += got.false_alarm_pairs
            early += got.early
            if got.latencies or got.missing:
                values = got.pooled()
                info(
                    f"run {run + 1}: {len(got.latencies)} detections, p50 "
                    f"{fmt(quantile(values, 0.5), ' s', 3)}, p99 "
                    f"{fmt(quantile(values, 0.99), ' s', 3)}, max {fmt(max(values), ' s', 3)}, "
                    f"misses (never declared): {len(got.missing)}, false alarms: "
                    f"{got.false_alarms} in {got.false_alarm_pairs} pair(s); {got.kinds}"
                )
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    detected = [v for v in pooled if v != MISS]
    print(
        f"results ({len(pooled)} stopped pairs pooled over {runs} run(s): {len(detected)} "
        f"detections, {len(missing_all)} misses):"
    )
    if not pooled:
        print("target 5: no pair was stopped (nothing to report)")
        return 0
    p99 = quantile(pooled, 0.99)
    report(
        5,
        "detection latency p99 (declared stale/host_down - last write)",
        fmt(p99, " s", 3),
        fmt(BOUND, " s (theoretical bound)", 3),
        f"{p99 / BOUND:.2f} of the bound",
        f"p99 <= interval x miss_threshold + interval + 100 ms = {BOUND:.1f} s",
    )
    within = sum(1 for v in pooled if v <= BOUND)
    info(
        f"p50 {fmt(quantile(pooled, 0.5), ' s', 3)}, p90 {fmt(quantile(pooled, 0.9), ' s', 3)}, "
        f"p99 {fmt(p99, ' s', 3)}, max {fmt(max(pooled), ' s', 3)}, min "
        f"{fmt(min(pooled), ' s', 3)}; within the bound {within}/{len(pooled)}; "
        f"misses (never declared, counted as inf in p50/p90/p99/max): {len(missing_all)}"
        + (f" (e.g. {', '.join(missing_all[:5])})" if missing_all else "")
        + (f"; max of the detected {max(detected):.3f} s" if missing_all and detected else "")
    )
    info(
        f"false alarms (not detections): {alarms} declaration(s) in {alarm_pairs} pair(s), "
        f"{early} of them before the pair's last write, the rest taken back by a later line"
    )
    info(
        f"theory: stale at miss_threshold x interval = {MISS_THRESHOLD * INTERVAL:g} s after the "
        f"poll that saw the last beat, which comes 0-{INTERVAL:g} s after the write: "
        f"{MISS_THRESHOLD * INTERVAL:g}-{(MISS_THRESHOLD + 1) * INTERVAL:g} s, uniform; log "
        "time stamps have 1 ms resolution"
    )
    for line in histogram(pooled):
        info(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
