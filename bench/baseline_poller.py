"""The naive poller that targets 1, 4, 6 and 7 compare hbmon with.

One asyncio task per volume, each sleeping until its next poll (the first polls are spread
over one interval, as hbmon spreads them); every poll opens the file with ``aiofiles``,
reads 512 bytes, decodes the record with :func:`hbmon.record.decode`, and sets
prometheus-client labelled Gauge objects (age, serial, up and the nine state series) in a
``CollectorRegistry`` of its own.  It serves nothing.

Protocol: commands on stdin, answers on stdout (one line each, flushed).  Signals are not
used: under this load asyncio's self-pipe is full and a signal's wake-up byte is lost.

* ``first-read-all SECONDS`` is printed once every task has read its volume once (seconds
  since this script started);
* ``scrape``: start a thread that renders the registry with ``generate_latest`` once a
  second (what prometheus-client's own HTTP server does in a thread), and forget the lag
  samples gathered so far;
* ``stats``: answers ``stats polls=N lag_n=N lag_p50=S lag_p99=S lag_max=S renders=N
  render_median=S pass_n=N pass_p50=S pass_p99=S pass_max=S`` (lags since the last
  ``scrape``, or since start).

Two lateness figures are kept.  ``lag_*``: every task wake-up, how late it woke against its
own due time (one sample per read).  ``pass_*``: the quantity hbmon's
``hbmon_poll_tick_lag_seconds`` holds, one sample per scheduler pass that starts reads --
here an event-loop iteration in which tasks woke for their reads -- the lateness of the
most overdue read it started: the largest (wake-up time - due time) among its wake-ups, at
least 0 (hbmon: tick start - due time of its earliest-due group, whose reads start in that
tick).  An iteration still running when ``stats`` is asked counts as a pass.

SIGTERM (default action) or the end of stdin ends it.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import math
import statistics
import sys
import threading
import time
import zlib
from pathlib import Path

import aiofiles
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from hbmon.errors import RecordError
from hbmon.record import decode
from hbmon.row import STATES

STARTED = time.monotonic()
FRESH = ("alive", "late")


class PassLoop(asyncio.SelectorEventLoop):
    """An event loop that counts its iterations, so wake-ups of one pass can be told."""

    passes = 0

    def _run_once(self) -> None:
        self.passes += 1
        super()._run_once()  # (private, CPython 3.11-3.13)


class Baseline:
    def __init__(self, paths: list[Path], interval: float, miss_threshold: int) -> None:
        self.paths = paths
        self.interval = interval
        self.miss_threshold = miss_threshold
        self.registry = CollectorRegistry(auto_describe=False)
        labels = ["pair", "path"]
        self.age = Gauge("hbmon_heartbeat_age_seconds", "age", labels, registry=self.registry)
        self.serial = Gauge("hbmon_heartbeat_serial", "serial", labels, registry=self.registry)
        self.up = Gauge("hbmon_heartbeat_up", "up", labels, registry=self.registry)
        self.state = Gauge(
            "hbmon_heartbeat_state", "state", [*labels, "state"], registry=self.registry
        )
        self.polls = 0
        self.first_reads = 0
        self.lags = array.array("d")  # compact: 10,000 samples a second
        self.pass_lags = array.array("d")  # one per loop iteration that woke tasks
        self._pass = -1  # the iteration of the pass being gathered (-1: none yet)
        self._pass_max = 0.0  # its most overdue read so far
        self.renders: list[float] = []
        self.scraping = False

    async def watch(self, path: Path) -> None:
        loop = asyncio.get_running_loop()
        pair = path.stem
        serial: int | None = None
        last_change: float | None = None
        first = True
        due = loop.time() + (zlib.crc32(pair.encode()) % 1000) / 1000 * self.interval
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            now = loop.time()
            self.lags.append(max(0.0, now - due))
            passes = getattr(loop, "passes", None)
            if passes is not None:
                if passes != self._pass:  # the first wake-up of a new pass
                    if self._pass >= 0:
                        self.pass_lags.append(self._pass_max)
                    self._pass, self._pass_max = passes, 0.0
                if now - due > self._pass_max:
                    self._pass_max = now - due
            async with aiofiles.open(path, "rb") as f:
                data = await f.read(512)
            now = loop.time()
            try:
                rec = decode(data, pair)
            except RecordError:
                state = "invalid"
            else:
                if serial is not None and rec.serial != serial:
                    last_change = now
                serial = rec.serial
                if last_change is None:
                    state = "awaiting"
                else:
                    gap = now - last_change
                    if gap >= self.miss_threshold * self.interval:
                        state = "stale"
                    elif gap >= 2 * self.interval:
                        state = "late"
                    else:
                        state = "alive"
            age = 0.0 if last_change is None else now - last_change
            self.age.labels(pair=pair, path="volume").set(age)
            self.serial.labels(pair=pair, path="volume").set(serial or 0)
            self.up.labels(pair=pair, path="volume").set(1.0 if state in FRESH else 0.0)
            for name in STATES:
                self.state.labels(pair=pair, path="volume", state=name).set(
                    1.0 if name == state else 0.0
                )
            self.polls += 1
            if first:
                first = False
                self.first_reads += 1
                if self.first_reads == len(self.paths):
                    print(f"first-read-all {time.monotonic() - STARTED:.3f}", flush=True)
            due += self.interval
            if due <= loop.time():  # fell behind by a whole interval: no catch-up burst
                due = loop.time() + self.interval

    def scrape_forever(self) -> None:
        next_scrape = time.monotonic()
        while True:
            start = time.perf_counter()
            generate_latest(self.registry)
            self.renders.append(time.perf_counter() - start)
            next_scrape += 1.0
            time.sleep(max(0.0, next_scrape - time.monotonic()))

    def start_scraping(self) -> None:
        self.lags = array.array("d")
        self.pass_lags = array.array("d")
        self._pass = -1  # (a pass begun before is not counted; the rest of it is a new one)
        if not self.scraping:
            self.scraping = True
            threading.Thread(target=self.scrape_forever, daemon=True).start()

    def print_stats(self) -> None:
        lags = sorted(self.lags[:])
        n = len(lags)
        p50 = lags[n // 2] if lags else math.nan
        p99 = lags[min(n - 1, math.ceil(0.99 * n) - 1)] if lags else math.nan
        top = lags[-1] if lags else math.nan
        renders = list(self.renders)
        med = statistics.median(renders) if renders else math.nan
        passes = sorted([*self.pass_lags, *([self._pass_max] if self._pass >= 0 else [])])
        k = len(passes)
        pass_p50 = passes[k // 2] if passes else math.nan
        pass_p99 = passes[min(k - 1, math.ceil(0.99 * k) - 1)] if passes else math.nan
        pass_max = passes[-1] if passes else math.nan
        print(
            f"stats polls={self.polls} lag_n={n} lag_p50={p50:.6f} lag_p99={p99:.6f} "
            f"lag_max={top:.6f} renders={len(renders)} render_median={med:.6f} "
            f"pass_n={k} pass_p50={pass_p50:.6f} pass_p99={pass_p99:.6f} "
            f"pass_max={pass_max:.6f}",
            flush=True,
        )

    def commands(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        """Read commands from stdin (a thread: the loop is too busy to be asked)."""
        for line in sys.stdin:
            command = line.strip()
            if command == "scrape":
                self.start_scraping()
            elif command == "stats":
                self.print_stats()
        loop.call_soon_threadsafe(stop.set)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        threading.Thread(target=self.commands, args=(loop, stop), daemon=True).start()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self.watch(p)) for p in self.paths]
            await stop.wait()
            for task in tasks:
                task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--miss-threshold", type=int, default=3)
    args = parser.parse_args()
    paths = sorted(args.folder.glob("*.vol"))
    if not paths:
        sys.exit(f"no *.vol in {args.folder}")
    with asyncio.Runner(loop_factory=PassLoop) as runner:
        runner.run(Baseline(paths, args.interval, args.miss_threshold).run())


if __name__ == "__main__":
    main()
