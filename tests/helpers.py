"""Helpers for integration tests that run the real daemon (``hbmon run``) as a subprocess.

Only the standard library talks to the daemon (urllib), so a test sees exactly what an
operator, Prometheus or ``curl`` would see.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest

from hbmon.record import SLOT_SIZE, Record

T = TypeVar("T")

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 5.0
POLL_EVERY = 0.05


def wait_for(predicate: Callable[[], T | Literal[False] | None], timeout: float, what: str) -> T:
    """Poll ``predicate`` every 50 ms until it returns something truthy; return that.

    Fails the test, naming ``what`` and the last value seen, after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.1f} s waiting for {what} (last: {value!r})")
        time.sleep(POLL_EVERY)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_pair() -> int:
    """A TCP port PORT on 127.0.0.1 such that PORT and PORT+1 were both free a moment ago
    (``hbmon demo`` serves its two sites on PORT and PORT+1)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    pytest.fail("no two adjacent free TCP ports found")


def http_get(url: str, timeout: float = HTTP_TIMEOUT) -> tuple[int, str]:
    """``(status, body)`` of a GET; HTTP error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


class Site:
    """A running ``hbmon run`` process and the HTTP API it serves."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, stderr_path: Path) -> None:
        self.proc = proc
        self.url = url
        self.stderr_path = stderr_path

    # -- HTTP -----------------------------------------------------------------------

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.url + path)

    def healthz(self) -> int:
        return self.get("/healthz")[0]

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status.json")
        if code != 200:
            pytest.fail(f"GET /status.json: HTTP {code}: {body[:500]}\n{self.stderr_tail()}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def rows(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Every row of /status.json by ``(pair, path)``."""
        return {(r["pair"], r["path"]): r for r in self.status()["rows"]}

    def row(self, pair: str, path: str = "volume") -> dict[str, Any]:
        found = self.rows().get((pair, path))
        if found is None:
            pytest.fail(f"/status.json has no row for pair {pair!r} path {path!r}")
        return found

    def metrics(self) -> str:
        code, body = self.get("/metrics")
        if code != 200:
            pytest.fail(f"GET /metrics: HTTP {code}: {body[:500]}\n{self.stderr_tail()}")
        return body

    # -- process --------------------------------------------------------------------

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stderr_tail(self, lines: int = 100) -> str:
        text = self.stderr().splitlines()[-lines:]
        return f"--- daemon stderr ({self.stderr_path}) ---\n" + "\n".join(text)

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> tuple[int, float]:
        """SIGTERM and wait; returns ``(exit code, seconds taken)``; fails after ``timeout``."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(
                f"hbmon did not exit within {timeout:.0f} s of SIGTERM (killed)\n"
                + self.stderr_tail()
            )
        return code, time.monotonic() - start

    def kill(self) -> None:
        """SIGKILL: no stopping record, no cleanup, like a crashed host."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start_site(
    config_text: str, tmp_path: Path, name: str = "site", env: dict[str, str] | None = None
) -> Site:
    """Write the configuration and start ``hbmon run``; returns once /healthz says 200.

    ``env`` is added to the daemon's environment (e.g. libfaketime's variables)."""
    config = tmp_path / f"{name}.toml"
    config.write_text(config_text)
    stderr_path = tmp_path / f"{name}.stderr.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "hbmon.cli",
        "run",
        "-c",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
    ]
    with stderr_path.open("ab") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            cwd=tmp_path,
            env={**os.environ, **env} if env else None,
        )
    site = Site(proc, url, stderr_path)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(
                f"hbmon run exited with code {proc.returncode} before serving /healthz\n"
                + site.stderr_tail()
            )
        try:
            if site.healthz() == 200:
                return site
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() >= deadline:
            site.kill()
            pytest.fail(
                f"hbmon run did not answer /healthz with 200 within {READY_TIMEOUT:.0f} s\n"
                + site.stderr_tail()
            )
        time.sleep(POLL_EVERY)


@contextlib.contextmanager
def running_site(
    config_text: str, tmp_path: Path, name: str = "site", env: dict[str, str] | None = None
) -> Iterator[Site]:
    """Run ``hbmon run`` with ``config_text`` for the duration of the block.

    On exit the daemon gets SIGTERM and must be gone within 10 s with exit code 0.  When
    the block fails, the daemon's stderr is attached to the error.
    """
    site = start_site(config_text, tmp_path, name, env)
    try:
        yield site
    except BaseException as exc:
        if site.running():
            site.proc.send_signal(signal.SIGTERM)
            try:
                site.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                site.kill()
        exc.add_note(site.stderr_tail())
        raise
    if site.running():
        code, _ = site.stop()
        if code != 0:
            pytest.fail(f"hbmon run exited with code {code} after SIGTERM\n{site.stderr_tail()}")


# -- records and "remote copy" ---------------------------------------------------------


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` if it still runs and wait; SIGKILL it after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pwrite_sync(path: Path | str, offset: int, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` at ``offset`` of a file and fsync it (underneath any loop device)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, data, offset)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def pread_file(path: Path | str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def record_block(
    pair: str, incarnation: int, serial: int, interval: float, size: int = 512
) -> bytes:
    """One valid, active record padded to ``size`` bytes."""
    return Record(pair, incarnation, serial, time.time(), interval).encode_block(size)


class Feeder:
    """A thread that writes fresh records for several targets, like live writers.

    Each target is ``(pair, file, slot)``; each gets its own incarnation and a serial that
    goes up by one per write.  Records declare ``declared`` as their interval (the
    reader's, so that no timing disagreement is reported), written every ``every`` s.
    :meth:`stop_feeding` stops one target for good: once it returns, the thread will not
    touch that file again.
    """

    def __init__(
        self,
        targets: list[tuple[str, Path, int]],
        every: float,
        *,
        declared: float | None = None,
        sync: bool = True,
    ) -> None:
        self.targets = {pair: (path, slot) for pair, path, slot in targets}
        self.every = every
        self.declared = declared if declared is not None else every  # interval in the record
        self.sync = sync
        self.incarnation = {pair: 0x1000 + i for i, pair in enumerate(self.targets)}
        self.serial = dict.fromkeys(self.targets, 0)
        self.lock = threading.Lock()
        self.active = set(self.targets)
        self.errors: list[BaseException] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def feed_once(self) -> None:
        for pair, (path, slot) in self.targets.items():
            with self.lock:
                if pair not in self.active:
                    continue
                self.serial[pair] += 1
                block = record_block(pair, self.incarnation[pair], self.serial[pair], self.declared)
                pwrite_sync(path, slot * SLOT_SIZE, block, sync=self.sync)

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                self.feed_once()
            except BaseException as exc:  # reported by close()
                self.errors.append(exc)
                return
            self._done.wait(self.every)

    def start(self) -> Feeder:
        self.feed_once()
        self._thread.start()
        return self

    def stop_feeding(self, pair: str) -> None:
        with self.lock:
            self.active.discard(pair)

    def restart(self, pair: str) -> None:
        """Feed ``pair`` again as a restarted writer: a new incarnation from serial 1."""
        with self.lock:
            self.incarnation[pair] += 0x100000
            self.serial[pair] = 0
            self.active.add(pair)

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        assert not self._thread.is_alive(), "feeder thread did not stop"
        assert not self.errors, f"feeder thread failed: {self.errors[0]!r}"


# -- metrics ------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: ``(name, labels, value)``."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise AssertionError(f"unparsable metrics line: {line!r}")
        labels = dict(_LABEL.findall(m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample of ``name`` whose labels include ``labels``, or None."""
    found = [
        value
        for sample, have, value in parse_metrics(text)
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    ]
    if len(found) > 1:
        raise AssertionError(f"{name}{labels} matches {len(found)} samples")
    return found[0] if found else None


def post_host_down(site: Site, token: str, pair: str = "db1") -> dict[str, Any]:
    """POST one firing HbmonHostDown alert for ``pair`` to the webhook; the guard's decision."""
    body = json.dumps(
        {
            "version": "4",
            "status": "firing",
            "alerts": [
                {"status": "firing", "labels": {"alertname": "HbmonHostDown", "pair": pair}}
            ],
        }
    ).encode()
    request = urllib.request.Request(
        site.url + "/api/v1/alerts",
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        decisions: list[dict[str, Any]] = json.loads(resp.read())["decisions"]
    assert len(decisions) == 1, decisions
    return decisions[0]
