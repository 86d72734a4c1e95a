"""Target 3: the /metrics body at 10,000 pairs with both paths, rendered in-process.

A :class:`~hbmon.status.StatusTable` of 10,000 pairs, method ``both`` (two rows each), fed
a few records so the rows are alive (1 % of the pairs then go quiet and are stale).  Before
every timed render each row gets one more beat, as between two scrapes a second apart, so
the renderer's per-value caches are as cold as they are in a running site.  Timed:

* hbmon: ``Renderer(table, site_registry(table))``: ``render(renderer.inputs())`` with one
  renderer kept between renders as ``hbmon run`` keeps it (and, for information, a new
  renderer each time, and ``inputs()`` alone: the part that runs on the event loop);
* baseline: prometheus-client labelled Gauge/Counter objects holding the same per-pair
  series (plus the same site-wide collectors), built once, values set, then
  ``generate_latest(registry)``;
* for information: ``generate_latest(make_registry(table))``, the custom collector.

Medians of ``--reps`` renders.  The hbmon body also goes through ``promtool check metrics``
when promtool is installed.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TypeVar

from common import exit_on_sigterm, fmt, info, machine_line, median, ratio_text, report
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)

from hbmon.clock import FakeClock
from hbmon.config import Timing
from hbmon.exposition import Renderer
from hbmon.metrics import PAIR_FAMILIES, make_registry, site_registry
from hbmon.record import Record
from hbmon.status import STATES, StatusTable
from hbmon.verdict import VERDICTS

TIMING = Timing(interval=1.0, miss_threshold=3, recover_beats=2)
INCARNATION = 0x5EED
T = TypeVar("T")


def build_table(n: int) -> tuple[StatusTable, FakeClock, dict[str, int]]:
    clock = FakeClock()
    table = StatusTable(clock, site="bench")
    for i in range(n):
        table.add_pair(f"p{i:05d}", "both", TIMING, volume=f"/srv/hb/p{i:05d}.vol")
    serials = dict.fromkeys(table.pairs, 0)
    quiet = quiet_pairs(table)
    for round_ in range(8):
        beat(table, clock, serials, skip=quiet if round_ >= 2 else set())
        clock.advance(1.0)
    table.evaluate()
    return table, clock, serials


def quiet_pairs(table: StatusTable) -> set[str]:
    """1 % of the pairs: their writers stop, so they are stale (host_down)."""
    return {pid for i, pid in enumerate(table.pairs) if i % 100 == 42}


def beat(
    table: StatusTable, clock: FakeClock, serials: dict[str, int], skip: set[str] | None = None
) -> None:
    """One new record on every row (except the pairs in ``skip``)."""
    now, wall = clock.monotonic(), clock.wall()
    for pid, pair in table.pairs.items():
        if skip and pid in skip:
            continue
        serials[pid] += 1
        rec = Record(pid, INCARNATION, serials[pid], wall - 0.01, 1.0)
        for row in pair.rows.values():
            row.observe_record(rec, now, wall)
            row.observe_latency(0.0002)
            table.touch(row, now)


def baseline_registry(table: StatusTable) -> CollectorRegistry:
    """Labelled prometheus-client objects for the same series (plus the site families)."""
    registry = site_registry(table)
    pp = ["pair", "path"]

    def gauge(key: str, labels: list[str]) -> Gauge:
        name, _, text = PAIR_FAMILIES[key]
        return Gauge(name, text, labels, registry=registry)

    age, last, serial = gauge("age", pp), gauge("last", pp), gauge("serial", pp)
    name, _, text = PAIR_FAMILIES["missed"]
    missed = Counter(name, text, pp, registry=registry)
    up, state = gauge("up", pp), gauge("state", [*pp, "state"])
    skew, verdict = gauge("skew", ["pair"]), gauge("verdict", ["pair", "verdict"])
    undead = gauge("undead", pp)
    name, _, text = PAIR_FAMILIES["errors"]
    errors = Counter(name, text, ["pair", "reason"], registry=registry)
    warning = gauge("warning", [*pp, "warning"])
    now = table.clock.monotonic()
    for pid, pair in table.pairs.items():
        for v in VERDICTS:
            verdict.labels(pid, v).set(1.0 if v == pair.verdict else 0.0)
        skew_value = None
        for path, row in pair.rows.items():
            a = row.age(now)
            if a is not None:
                age.labels(pid, path).set(a)
            if row.writer_time is not None:
                last.labels(pid, path).set(row.writer_time)
            if row.serial is not None:
                serial.labels(pid, path).set(row.serial)
            missed.labels(pid, path).inc(row.missed_total)
            up.labels(pid, path).set(1.0 if row.up else 0.0)
            undead.labels(pid, path).set(1.0 if row.undead else 0.0)
            for s in STATES:
                state.labels(pid, path, s).set(1.0 if s == row.state else 0.0)
            for w in row.timing_warnings():
                warning.labels(pid, path, w).set(1.0)
            if row.skew is not None and (skew_value is None or path == "volume"):
                skew_value = row.skew
            if path == "volume":
                for reason, count in row.errors.items():
                    errors.labels(pid, reason).inc(count)
        if skew_value is not None:
            skew.labels(pid).set(skew_value)
    return registry


def timed(
    fn: Callable[[], T], reps: int, before: Callable[[], None] | None = None
) -> tuple[float, T]:
    """Median seconds of ``reps`` calls of ``fn`` (``before`` runs untimed each time), and
    what the last call returned."""
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        gc.collect()
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return median(times), out


def samples_in(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def promtool(body: bytes) -> str:
    tool = shutil.which("promtool")
    if tool is None:
        return "promtool: not installed (skipped)"
    with tempfile.NamedTemporaryFile(suffix=".prom") as f:
        f.write(body)
        f.flush()
        with open(f.name, "rb") as stdin:
            done = subprocess.run(
                [tool, "check", "metrics"], stdin=stdin, capture_output=True, timeout=300
            )
    out = (done.stdout + done.stderr).decode(errors="replace").strip()
    if done.returncode == 0 and not out:
        return "promtool: clean"
    lines = out.splitlines()
    more = f"\n    ... {len(lines) - 20} more lines" if len(lines) > 20 else ""
    return f"promtool: exit {done.returncode}:\n    " + "\n    ".join(lines[:20]) + more


def main() -> int:
    exit_on_sigterm()
    p = argparse.ArgumentParser(description="target 3: /metrics render time at 10,000 pairs")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (< 1 min)")
    p.add_argument("--runs", "--reps", dest="reps", type=int, help="renders timed (median)")
    p.add_argument("--pairs", type=int, default=10_000)
    p.add_argument("--keep", action="store_true", help="accepted for bench/run_all; no files")
    p.add_argument(
        "--slow-reps",
        type=int,
        help="renders timed for the two prometheus-client ways (default: --reps; 1 if --quick)",
    )
    args = p.parse_args()
    reps = args.reps or (3 if args.quick else 7)
    n = args.pairs
    slow = args.slow_reps or (1 if args.quick else reps)
    print(
        f"metrics_render: {n} pairs, method both, median of {reps} (prometheus-client ways: "
        f"{slow})" + " (quick)" * args.quick
    )
    print(machine_line(), flush=True)
    disable_created_metrics()  # labelled Counters would add *_created series hbmon does not have

    began = time.perf_counter()
    table, clock, serials = build_table(n)
    states: dict[str, int] = {}
    for row in table.rows():
        states[row.state] = states.get(row.state, 0) + 1
    info(f"table built in {time.perf_counter() - began:.1f} s: {len(table.rows())} rows {states}")

    quiet = quiet_pairs(table)

    def next_second() -> None:
        clock.advance(1.0)
        beat(table, clock, serials, skip=quiet)
        table.run_due(clock.monotonic())

    renderer = Renderer(table, site_registry(table))
    renderer.render(renderer.inputs())  # builds the per-row text once, as the first scrape does
    hbmon_t, body = timed(lambda: renderer.render(renderer.inputs()), reps, next_second)
    inputs_t, _ = timed(renderer.inputs, reps, next_second)
    cold_t, _ = timed(
        lambda: (r := Renderer(table, site_registry(table))).render(r.inputs()), reps, next_second
    )
    slow_reps = args.slow_reps or (1 if args.quick else reps)
    custom = make_registry(table)
    custom_t, custom_body = timed(lambda: generate_latest(custom), slow_reps)

    began = time.perf_counter()
    labelled = baseline_registry(table)
    build_t = time.perf_counter() - began
    labelled_t, labelled_body = timed(lambda: generate_latest(labelled), slow_reps)

    print("results:")
    report(
        3,
        f"/metrics render at {n} pairs x 2 paths, median ms",
        fmt(hbmon_t * 1000, " ms"),
        fmt(labelled_t * 1000, " ms"),
        ratio_text(labelled_t / hbmon_t),
        "hbmon <= 150 ms and >= 4x faster than labelled objects",
    )
    info(
        f"hbmon: renderer kept between scrapes (as in hbmon run), a new beat on every row "
        f"before each render; inputs() alone (on the event loop) {inputs_t * 1000:.1f} ms; "
        f"a new Renderer each time {cold_t * 1000:.0f} ms"
    )
    info(
        f"custom collector generate_latest(make_registry(table)): {custom_t * 1000:.0f} ms "
        f"(hbmon is {custom_t / hbmon_t:.1f}x faster); labelled objects built and set in "
        f"{build_t:.1f} s"
    )
    info(
        f"samples: hbmon {samples_in(body)}, custom collector {samples_in(custom_body)}, "
        f"labelled objects {samples_in(labelled_body)}; body {len(body) / (1 << 20):.1f} MiB"
    )
    print(promtool(body), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
