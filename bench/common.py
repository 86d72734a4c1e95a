"""Shared pieces of the benchmarks: volumes, a writer process, CPU and RSS sampling.

Every benchmark measures hbmon and a baseline in the same run on the same machine and
prints the ratio; nothing here asserts a time.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hbmon.record import SLOT_SIZE, Record

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def make_volumes(folder: Path, count: int, prefix: str = "v") -> list[Path]:
    """``count`` file volumes, each holding a valid record in slot 0."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{prefix}{i:05d}.vol"
        pair = path.stem
        path.write_bytes(Record(pair, 1, 1, time.time(), 1.0).encode_block(512))
        paths.append(path)
    return paths


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * PAGE / (1 << 20)


def measure_cpu(pid: int, seconds: float) -> float:
    """Percent of one core used by ``pid`` over the next ``seconds``."""
    start_cpu, start = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100 * (cpu_seconds(pid) - start_cpu) / (time.monotonic() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=log.open("wb"))


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def writer_argv(folder: Path, interval: float, slot: int = 0) -> list[str]:
    """A separate process that rewrites every volume's record once per interval."""
    return [sys.executable, str(Path(__file__).with_name("writer.py")), str(folder), str(interval), str(slot)]


def slot_offset(slot: int) -> int:
    return slot * SLOT_SIZE
