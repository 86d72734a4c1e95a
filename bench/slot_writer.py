"""Rewrites many slots of image files once per interval (busy PVOLs behind loop devices).

    slot_writer.py INTERVAL SLOTS PREFIX IMAGE...

Image ``i`` gets records of pairs ``f"{PREFIX}{i}-{k}"`` in slots ``0 .. SLOTS - 1``.  The
images are written through the page cache; a loop device over an image reads the new data
underneath any reader's O_DIRECT, as an array's remote copy would.
"""

from __future__ import annotations

import os
import sys
import time

from hbmon.record import SLOT_SIZE, Record


def main() -> None:
    interval, slots, prefix = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    images = sys.argv[4:]
    fds = [os.open(image, os.O_WRONLY | os.O_CLOEXEC) for image in images]
    names = [[f"{prefix}{i}-{k}" for k in range(slots)] for i in range(len(images))]
    serial = 1
    next_round = time.monotonic()
    while True:
        serial += 1
        now = time.time()
        for fd, pairs in zip(fds, names, strict=True):
            for k, pair in enumerate(pairs):
                os.pwrite(fd, Record(pair, 1, serial, now, interval).encode(), k * SLOT_SIZE)
        next_round += interval
        time.sleep(max(0.0, next_round - time.monotonic()))


if __name__ == "__main__":
    main()
