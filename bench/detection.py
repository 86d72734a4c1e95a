"""Target 5: how long after a writer stops hbmon declares its pair stale / host_down.

1,000 volume-only pairs (files), interval 1 s, miss_threshold 3.  bench/stopping_writer.py
beats all of them every second (each pair at its own phase); once every row is ``alive``
it is told ``go`` and stops each pair at a random moment of a 20 s window, recording the
wall time of each pair's last write.  hbmon runs with ``--log-level info``; the moment a
pair was declared dead is the earliest of its log lines ``pair X volume ...: alive|late ->
stale`` (the poller saw it) and ``pair X: verdict ... -> host_down`` (the timer saw it),
read from the "%(asctime)s" millisecond wall-clock time stamp.

    detection latency = declared time - last write time

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


def log_lines(path: Path) -> list[tuple[float, str]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = LOG_TIME.match(line)
        if m:
            wall = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
            out.append((wall + int(m.group(2)) / 1000, m.group(4)))
    return out


def declared(path: Path, after: float) -> tuple[dict[str, float], dict[str, int]]:
    """Per pair, the first time after ``after`` it was declared stale or host_down."""
    first: dict[str, float] = {}
    kinds = {"stale line first": 0, "host_down line first": 0}
    which: dict[str, str] = {}
    for when, message in log_lines(path):
        if when < after:
            continue
        for kind, pattern in (("stale", STALE), ("host_down", HOST_DOWN)):
            m = pattern.match(message)
            if m and m.group(1) not in first:
                first[m.group(1)] = when
                which[m.group(1)] = kind
    for kind in which.values():
        kinds[f"{kind} line first"] += 1
    return first, kinds


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


def one_run(tmp: Path, n: int, window: float, seed: int) -> tuple[list[float], list[str], dict]:
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
        seen, kinds = declared(log, go)
        latencies, missing = [], []
        for pair, wrote in last.items():
            if pair in seen:
                latencies.append(seen[pair] - wrote)
            else:
                missing.append(pair)
        return latencies, missing, kinds
    finally:
        if site is not None:
            site.stop()
        stop(writer)


def histogram(values: list[float], width: float = 0.25, bar: int = 50) -> list[str]:
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
    pooled: list[float] = []
    missing_all: list[str] = []
    try:
        for run in range(runs):
            latencies, missing, kinds = one_run(tmp, n, window, seed=run + 1)
            pooled += latencies
            missing_all += missing
            if latencies:
                info(
                    f"run {run + 1}: {len(latencies)} detections, p50 "
                    f"{quantile(latencies, 0.5):.3f} s, p99 {quantile(latencies, 0.99):.3f} s, "
                    f"max {max(latencies):.3f} s, not declared: {len(missing)}; {kinds}"
                )
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"results ({len(pooled)} detections pooled over {runs} run(s)):")
    if not pooled:
        print("target 5: no detection found in hbmon's log (nothing to report)")
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
        f"p50 {quantile(pooled, 0.5):.3f} s, p90 {quantile(pooled, 0.9):.3f} s, p99 {p99:.3f} s, "
        f"max {max(pooled):.3f} s, min {min(pooled):.3f} s; within the bound "
        f"{within}/{len(pooled)}; never declared: {len(missing_all)}"
        + (f" (e.g. {', '.join(missing_all[:5])})" if missing_all else "")
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
