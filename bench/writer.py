"""Rewrites the record of every *.vol file in a folder once per interval (a busy PVOL)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from hbmon.record import SLOT_SIZE, Record


def main() -> None:
    folder, interval, slot = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    paths = sorted(folder.glob("*.vol"))
    fds = [os.open(p, os.O_WRONLY) for p in paths]
    names = [p.stem for p in paths]
    serial = 1
    incarnation = int.from_bytes(os.urandom(8), "little") or 1  # a new writer per start
    next_round = time.monotonic()
    while True:
        serial += 1
        now = time.time()
        for fd, name in zip(fds, names, strict=True):
            os.pwrite(fd, Record(name, incarnation, serial, now, 1.0).encode(), slot * SLOT_SIZE)
        next_round += interval
        time.sleep(max(0.0, next_round - time.monotonic()))


if __name__ == "__main__":
    main()
