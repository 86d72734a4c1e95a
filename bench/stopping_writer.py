"""A writer for target 5: beats every *.vol once per interval, then stops them at random.

Each volume gets its own phase within the interval, a fresh incarnation and a serial that
goes up by one per write.  When a line ``go`` arrives on stdin, every pair is given a stop
moment drawn uniformly from the next ``WINDOW`` seconds; after that moment the pair is
never written again.  The wall-clock time at which each pair's last write returned goes to
OUT (JSON ``{pair: unix seconds}``) once every pair has stopped; then it prints ``done``
and exits.

    stopping_writer.py FOLDER OUT WINDOW [--interval 1] [--seed N]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import secrets
import sys
import threading
import time
from pathlib import Path

from hbmon.record import Record


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("window", type=float)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    rng = random.Random(args.seed)
    paths = sorted(args.folder.glob("*.vol"))
    fds = {path.stem: os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in paths}
    incarnation = secrets.randbits(63) | 1
    serial = dict.fromkeys(fds, 0)
    last_write: dict[str, float] = {}
    stop_at: dict[str, float] = {}
    go = threading.Event()

    def wait_go() -> None:
        for line in sys.stdin:
            if line.strip() == "go":
                go.set()
                return

    threading.Thread(target=wait_go, daemon=True).start()
    start = time.monotonic()
    heap = [(start + rng.random() * args.interval, pair) for pair in fds]
    heapq.heapify(heap)
    while heap:
        due, pair = heap[0]
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, 0.05))
            continue
        heapq.heappop(heap)
        if go.is_set() and not stop_at:
            began = time.time()
            stop_at.update({p: began + rng.random() * args.window for p in fds})
        if stop_at and time.time() >= stop_at[pair]:
            continue  # this writer has "died": never written again
        serial[pair] += 1
        record = Record(pair, incarnation, serial[pair], time.time(), args.interval)
        os.pwrite(fds[pair], record.encode(), 0)
        last_write[pair] = time.time()
        heapq.heappush(heap, (due + args.interval, pair))
    args.out.write_text(json.dumps({"stop_at": stop_at, "last_write": last_write}))
    print("done", flush=True)


if __name__ == "__main__":
    main()
