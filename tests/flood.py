"""A UDP flood sender, run as its own process by test_flood.py.

    python tests/flood.py DATAGRAMS.json PORT --count N --seconds S

``DATAGRAMS.json`` maps a kind (the rejection reason it should cause) to a list of
datagrams in hex.  The sender cycles through the kinds in turn, and through each kind's
datagrams, sending as fast as this one process can until ``N`` datagrams are out or ``S``
seconds have passed, whichever comes first; then it prints one JSON line: datagrams sent
per kind, send errors and seconds taken.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("datagrams", type=Path)
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    doc = json.loads(args.datagrams.read_text())
    kinds = {kind: [bytes.fromhex(d) for d in hexes] for kind, hexes in doc.items()}
    rounds = max(len(ds) for ds in kinds.values())
    plan = [(k, ds[i % len(ds)]) for i in range(rounds) for k, ds in kinds.items()]
    sent = dict.fromkeys(kinds, 0)
    errors = 0
    addr = (args.host, args.port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    start = time.monotonic()
    deadline = start + args.seconds
    total = 0
    while total < args.count:
        for kind, data in plan[: min(len(plan), args.count - total)]:
            try:
                sock.sendto(data, addr)
                sent[kind] += 1
            except OSError:
                errors += 1
            total += 1
        if time.monotonic() >= deadline:
            break
    seconds = time.monotonic() - start
    print(json.dumps({"sent": sent, "errors": errors, "seconds": seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
