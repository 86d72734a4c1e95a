"""Shared pieces of the benchmarks: volumes, a writer process, CPU and RSS sampling.

Every benchmark measures hbmon and a baseline in the same run on the same machine and
prints the ratio; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def stop(proc: subprocess.Popen[Any]) -> None:
    """Stop ``proc`` (SIGTERM, SIGKILL after 10 s); a paused one is continued first (a
    stopped process cannot handle SIGTERM); one that has exited already is left alone."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGCONT)
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
    script = str(Path(__file__).with_name("writer.py"))
    return [sys.executable, script, str(folder), str(interval), str(slot)]


def slot_offset(slot: int) -> int:
    return slot * SLOT_SIZE


# -- added for the issue-7 benchmarks ---------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def measure_cpu_split(pid: int, seconds: float) -> tuple[float, float]:
    """(user %, system %) of one core used by ``pid`` over the next ``seconds``."""
    u0, s0 = cpu_split(pid)
    start = time.monotonic()
    time.sleep(seconds)
    u1, s1 = cpu_split(pid)
    took = time.monotonic() - start
    return 100 * (u1 - u0) / took, 100 * (s1 - s0) / took


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def ratio_text(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.1f}x"


def report(target: int | str, what: str, hbmon: str, baseline: str, ratio: str, goal: str) -> None:
    """The one line per target that every benchmark prints."""
    print(
        f"target {target}: {what} hbmon={hbmon} baseline={baseline} ratio={ratio} (goal: {goal})",
        flush=True,
    )


def info(text: str) -> None:
    print(f"  {text}", flush=True)


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (0 <= q <= 1) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def http_get(url: str, timeout: float = 30.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body: bytes = resp.read()
        return body


def http_json(url: str, timeout: float = 30.0) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(http_get(url, timeout))
    return doc


def hbmon_argv(config: Path, log_level: str = "warning") -> list[str]:
    """``hbmon run`` as a subprocess of this interpreter (the global option goes first)."""
    return [sys.executable, "-m", "hbmon.cli", "--log-level", log_level, "run", "-c", str(config)]


class Hbmon:
    """A running ``hbmon run`` process: start, wait until it serves, stop (always)."""

    def __init__(self, config: Path, log: Path, port: int, log_level: str = "warning") -> None:
        self.config, self.log, self.port = config, log, port
        self.url = f"http://127.0.0.1:{port}"
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            hbmon_argv(config, log_level),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
            cwd=REPO,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        if not self.alive():
            raise RuntimeError(f"hbmon exited with code {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_serving(self, timeout: float = 60.0) -> float:
        """Seconds from process start until /healthz answers."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            try:
                http_get(self.url + "/healthz", timeout=5)
                return time.monotonic() - self.started
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"hbmon did not serve within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        return http_json(self.url + "/status.json")

    def metrics(self) -> str:
        return http_get(self.url + "/metrics").decode()

    def stop(self) -> None:
        stop(self.proc)


def site_config(folder: Path, port: int, body: str, site: str = "bench") -> Path:
    """Write a site configuration (state in ``folder``) with ``body`` appended."""
    state = folder / "state"
    state.mkdir(parents=True, exist_ok=True)
    config = folder / "site.toml"
    config.write_text(
        f'site = "{site}"\nstate_dir = "{state}"\nlisten = "127.0.0.1:{port}"\n'
        f'method = "volume"\n' + body
    )
    return config


def metric_value(text: str, name: str) -> float | None:
    """The value of an unlabelled sample ``name`` in a /metrics body."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def metric_sum(text: str, name: str) -> float:
    """Sum of every sample named exactly ``name`` (any labels)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smaller and shorter (< 1 min)")
    parser.add_argument("--runs", type=int, help="repeat each measurement N times (median)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")


def machine_line() -> str:
    return (
        f"machine: {os.cpu_count()} CPUs, load average {loadavg()}, "
        f"python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M:%S')}; "
        f"hbmon {hbmon_version()}"
    )


def hbmon_version() -> str:
    """The commit of the hbmon being measured, and whether hbmon/ differs from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "hbmon"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "(version unknown: no git)"
    if not head:
        return "(version unknown: not a git checkout)"
    return f"commit {head}" + (" + uncommitted changes in hbmon/" if dirty else "")


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so every ``finally`` (stop processes, detach loop devices,
    remove temporary folders) still runs when a benchmark is stopped."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# -- added for issue 13: equal-load CPU -------------------------------------------------


def cpu_clock(pid: int) -> float:
    """CPU seconds of a whole process (every thread, also those that ended) in ns
    resolution: the process CPU-time clock Linux offers for any pid
    (``clock_getcpuclockid``, ``MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)``).  The same
    sum the kernel turns into utime + stime in ``/proc/PID/stat``, there in 10 ms ticks:
    too coarse for the ~1 % of a core of hbmon at 1,000 reads a second.  Falls back to
    ``/proc/PID/stat`` where the clock cannot be read."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        return cpu_seconds(pid)


def measure_cpu_fine(pid: int, seconds: float) -> tuple[float, float, float]:
    """(total %, user %, system %) of one core used by ``pid`` over the next ``seconds``:
    the total from :func:`cpu_clock`, the split from ``/proc/PID/stat`` (ticks)."""
    c0, (u0, s0) = cpu_clock(pid), cpu_split(pid)
    start = time.monotonic()
    time.sleep(seconds)
    c1, (u1, s1) = cpu_clock(pid), cpu_split(pid)
    took = time.monotonic() - start
    return 100 * (c1 - c0) / took, 100 * (u1 - u0) / took, 100 * (s1 - s0) / took
