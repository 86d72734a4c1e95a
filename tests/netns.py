"""Two hbmon sites in two network namespaces, for ``tests/test_network.py``.

Layout (one lab per test, names unique per process and test)::

    root namespace (the test)           namespace A (production)     namespace B (standby)
    ─────────────────────────           ────────────────────────     ─────────────────────
                                        vethA 10.77.0.1/24 ◄─veth──► vethB 10.77.0.2/24
    hbm<tag>a 10.79.K.1/24 ◄──veth────► mgmt0 10.79.K.2/24
    hbm<tag>b 10.78.K.1/24 ◄──veth──────────────────────────────────► mgmt0 10.78.K.2/24

``K`` is 0 unless another lab (another test run on this machine) already holds
10.78.0.1 or 10.79.0.1 in the root namespace; then the next free ``K`` is taken, so two
runs at once do not fight over one route.  The management links only carry the test's
HTTP requests to each site; heartbeats between the sites go over vethA/vethB alone.

The "array remote copy" is :class:`Mirror`: a thread that copies PVOL slots from A's
loop image file into B's loop image file (pwrite + fsync underneath the loop devices).

Everything talks to the daemons with the standard library only, without proxies.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import need

from hbmon.record import SLOT_SIZE

PYTHON = sys.executable
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 3.0
SAMPLE_EVERY = 0.05

_lab_counter = itertools.count(1)
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- shell --------------------------------------------------------------------------------


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command (no shell); on failure the test fails with its stderr."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def require_netns() -> None:
    """Root, ``ip`` and working network namespaces; fail under CI, skip otherwise."""
    need(os.geteuid() == 0, "network namespaces need root")
    need(shutil.which("ip") is not None, "the `ip` command (iproute2) is missing")
    probe = f"hbprobe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode == 0:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    need(made.returncode == 0, f"cannot create a network namespace: {made.stderr.strip()}")


def _root_has_address(prefix: str) -> bool:
    out = sh("ip", "-4", "-o", "addr", "show").stdout
    return f" {prefix}/" in out


# -- the two namespaces ------------------------------------------------------------------------


@dataclass
class Lab:
    """Names and addresses of one two-namespace lab."""

    ns_a: str
    ns_b: str
    mgmt_a: str  # A's address on its management link (reachable from the test)
    mgmt_b: str
    host_links: tuple[str, str]  # root-side management interfaces
    site_a_ip: str = "10.77.0.1"
    site_b_ip: str = "10.77.0.2"
    link_a: str = "vethA"  # A's end of the A<->B link
    link_b: str = "vethB"

    def exec_argv(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def cut(self) -> None:
        """Cut the network between the sites (A's end of the link down)."""
        sh("ip", "-n", self.ns_a, "link", "set", self.link_a, "down")

    def heal(self) -> None:
        sh("ip", "-n", self.ns_a, "link", "set", self.link_a, "up")

    def send_from_a(self, datagrams: Iterable[bytes], dest: tuple[str, int]) -> Sender:
        """Start sending UDP datagrams to ``dest`` from a process inside namespace A."""
        script = (
            "import json, socket, sys, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for h in json.load(sys.stdin):\n"
            f"    s.sendto(bytes.fromhex(h), ({dest[0]!r}, {dest[1]}))\n"
            "    time.sleep(0.005)\n"
        )
        proc = subprocess.Popen(
            self.exec_argv(self.ns_a, PYTHON, "-I", "-c", script),
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps([d.hex() for d in datagrams]))
        proc.stdin.close()
        return Sender(proc)


class Sender:
    """A datagram sender running in a namespace (see :meth:`Lab.send_from_a`)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def done(self) -> bool:
        return self.proc.poll() is not None

    def wait(self) -> None:
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        self.proc.stderr.close()
        if self.proc.returncode != 0:
            pytest.fail(f"sending datagrams failed ({self.proc.returncode}): {err.strip()}")


def _free_subnet_index() -> int:
    for k in range(256):
        if not _root_has_address(f"10.78.{k}.1") and not _root_has_address(f"10.79.{k}.1"):
            return k
    pytest.fail("no free 10.78.K.0/24 and 10.79.K.0/24 management subnet in the root namespace")


def kill_namespace_processes(ns: str) -> None:
    """SIGKILL what this lab started and left running inside its own namespace."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in out.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def two_namespaces() -> Iterator[Lab]:
    """Create the lab of the module docstring; delete it on exit, even after a failure."""
    require_netns()
    n = next(_lab_counter)
    tag = f"{os.getpid() % 100000}x{n}"
    ns_a, ns_b = f"hbA-{os.getpid()}-{n}", f"hbB-{os.getpid()}-{n}"
    host_a, host_b = f"hbm{tag}a", f"hbm{tag}b"
    created: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # the link between the sites: heartbeats and nothing else
        veth = ("type", "veth", "peer", "name", "vethB", "netns", ns_b)
        sh("ip", "link", "add", "vethA", "netns", ns_a, *veth)
        sh("ip", "-n", ns_a, "addr", "add", "10.77.0.1/24", "dev", "vethA")
        sh("ip", "-n", ns_b, "addr", "add", "10.77.0.2/24", "dev", "vethB")
        sh("ip", "-n", ns_a, "link", "set", "vethA", "up")
        sh("ip", "-n", ns_b, "link", "set", "vethB", "up")
        # management links from the root namespace, for the test's HTTP requests
        k = _free_subnet_index()
        for host, ns, net in ((host_b, ns_b, f"10.78.{k}"), (host_a, ns_a, f"10.79.{k}")):
            sh("ip", "link", "add", host, "type", "veth", "peer", "name", "mgmt0", "netns", ns)
            sh("ip", "addr", "add", f"{net}.1/24", "dev", host)
            sh("ip", "link", "set", host, "up")
            sh("ip", "-n", ns, "addr", "add", f"{net}.2/24", "dev", "mgmt0")
            sh("ip", "-n", ns, "link", "set", "mgmt0", "up")
        yield Lab(ns_a, ns_b, f"10.79.{k}.2", f"10.78.{k}.2", (host_a, host_b))
    finally:
        for ns in created:
            kill_namespace_processes(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for host in (host_a, host_b):  # normally gone with its peer's namespace
            subprocess.run(["ip", "link", "del", host], capture_output=True)


# -- the remote copy ---------------------------------------------------------------------------


class Mirror:
    """Copies ``slots`` of the PVOL image into the SVOL image every ``every`` seconds.

    Like an array's remote copy it writes underneath the loop device (pwrite + fsync on
    the image file).  :meth:`pause` stops the copy: once it returns, nothing more is copied
    until :meth:`resume`.
    """

    def __init__(self, src: Path, dst: Path, slots: Iterable[int], every: float = 0.05) -> None:
        self.src, self.dst = src, dst
        self.slots = tuple(slots)
        self.every = every
        self.copies = 0
        self.errors: list[BaseException] = []
        self._last: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._paused = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mirror", daemon=True)

    def copy_once(self) -> None:
        with self._lock:
            if self._paused:
                return
            src = os.open(self.src, os.O_RDONLY | os.O_CLOEXEC)
            try:
                dst = os.open(self.dst, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    for slot in self.slots:
                        data = os.pread(src, SLOT_SIZE, slot * SLOT_SIZE)
                        if data != self._last.get(slot):
                            os.pwrite(dst, data, slot * SLOT_SIZE)
                            os.fsync(dst)
                            self._last[slot] = data
                            self.copies += 1
                finally:
                    os.close(dst)
            finally:
                os.close(src)

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                self.copy_once()
            except BaseException as exc:  # reported by close()
                self.errors.append(exc)
                return
            self._done.wait(self.every)

    def start(self) -> Mirror:
        self._thread.start()
        return self

    def pause(self) -> None:
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        assert not self._thread.is_alive(), "mirror thread did not stop"
        assert not self.errors, f"mirror thread failed: {self.errors[0]!r}"


# -- one site process --------------------------------------------------------------------------


def http_get(url: str, timeout: float = HTTP_TIMEOUT) -> tuple[int, str]:
    try:
        with _NO_PROXY.open(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


class NsSite:
    """``hbmon run -c CONFIG`` inside a network namespace, and its HTTP API."""

    def __init__(self, lab: Lab, ns: str, config: Path, url: str, name: str) -> None:
        self.lab, self.ns, self.config, self.url, self.name = lab, ns, config, url, name
        self.stderr_path = config.with_suffix(".stderr.log")
        self.proc: subprocess.Popen[bytes] | None = None

    # -- process --------------------------------------------------------------------

    def launch(self) -> NsSite:
        argv = self.lab.exec_argv(self.ns, PYTHON, "-m", "hbmon.cli", "run", "-c", str(self.config))
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=self.config.parent
            )
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> NsSite:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"site {self.name} exited with code {self.proc.returncode} before serving "
                    f"/healthz\n{self.stderr_tail()}"
                )
            with contextlib.suppress(OSError):
                if http_get(self.url + "/healthz", timeout=1.0)[0] == 200:
                    return self
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"site {self.name} did not answer /healthz within {timeout:.0f} s\n"
                    + self.stderr_tail()
                )
            time.sleep(SAMPLE_EVERY)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None, f"site {self.name} was never started"
        assert self.running(), f"site {self.name} is not running"
        self.proc.send_signal(signum)  # `ip netns exec` execs: this is the hbmon process

    def kill(self) -> None:
        """SIGKILL: no stopping record, no cleanup, like a crashed host."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait for the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(
                f"site {self.name} ignored SIGTERM for {timeout:.0f} s\n{self.stderr_tail()}"
            )

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stderr_tail(self, lines: int = 60) -> str:
        text = self.stderr().splitlines()[-lines:]
        return f"--- site {self.name} stderr ({self.stderr_path}) ---\n" + "\n".join(text)

    # -- HTTP -------------------------------------------------------------------------

    def get(self, path: str) -> str:
        try:
            code, body = http_get(self.url + path)
        except OSError as err:
            pytest.fail(f"GET {self.url}{path}: {err}\n{self.stderr_tail()}")
        if code != 200:
            pytest.fail(f"GET {self.url}{path}: HTTP {code}: {body[:300]}\n{self.stderr_tail()}")
        return body

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.get("/status.json"))
        return doc

    def rows(self, pair: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
        return {
            (r["pair"], r["path"]): r
            for r in self.status()["rows"]
            if pair is None or r["pair"] == pair
        }

    def pairs(self) -> set[str]:
        return {pair for pair, _ in self.rows()}

    def metrics(self) -> str:
        return self.get("/metrics")


# -- both sites --------------------------------------------------------------------------------


@dataclass
class TwoSites:
    """The lab, its volumes, the key, the mirror and the two site processes."""

    lab: Lab
    tmp: Path
    key_file: Path
    key: bytes
    pvol: str  # A's loop device
    pvol_image: Path
    svol: str  # B's loop device
    svol_image: Path
    mirror: Mirror
    sites: dict[str, NsSite] = field(default_factory=dict)

    def config_path(self, name: str) -> Path:
        return self.tmp / f"{name}.toml"

    def write_config(self, name: str, text: str) -> Path:
        """Write a configuration atomically (a reload never reads half a file)."""
        path = self.config_path(name)
        part = path.with_suffix(".part")
        part.write_text(text)
        os.replace(part, path)
        return path

    def site_a(self, text: str) -> NsSite:
        """Prepare site A (in namespace A; HTTP on its management address)."""
        return self._site("A", self.lab.ns_a, f"http://{self.lab.mgmt_a}:9799", text)

    def site_b(self, text: str) -> NsSite:
        return self._site("B", self.lab.ns_b, f"http://{self.lab.mgmt_b}:9799", text)

    def _site(self, name: str, ns: str, url: str, text: str) -> NsSite:
        site = NsSite(self.lab, ns, self.write_config(name, text), url, name)
        self.sites[name] = site
        return site

    def start(self, *sites: NsSite) -> None:
        """Launch the sites at once, then wait until each serves /healthz."""
        for site in sites:
            site.launch()
        for site in sites:
            site.wait_ready()

    def cli_in(self, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``hbmon ARGS`` run inside namespace ``ns`` (network announcements leave from it)."""
        argv = self.lab.exec_argv(ns, PYTHON, "-m", "hbmon.cli", *args)
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=60, cwd=self.tmp, check=False
        )

    def stderr_tails(self) -> str:
        return "\n".join(s.stderr_tail() for s in self.sites.values() if s.proc is not None)


def site_config(
    name: str,
    tmp: Path,
    *,
    listen_http: str,
    listen_udp: str,
    key_file: Path,
    body: str,
) -> str:
    """The head of a site configuration (200 ms, threshold 3, method both) plus ``body``."""
    return (
        f'site = "{name}"\n'
        f'state_dir = "{tmp / f"state-{name}"}"\n'
        f'listen = "{listen_http}"\n'
        'interval = "200ms"\n'
        "miss_threshold = 3\n"
        'method = "both"\n'
        "\n[network]\n"
        f'listen = "{listen_udp}"\n'
        f'key_file = "{key_file}"\n' + body
    )


@contextlib.contextmanager
def two_sites(
    tmp_path: Path, loopdev_factory: Callable[..., tuple[Path, str]], slots: Iterable[int] = (0,)
) -> Iterator[TwoSites]:
    """The lab, one loop device per site, the shared key and the mirror of ``slots``.

    Sites are prepared and started by the test; on exit every site still running gets
    SIGTERM (SIGKILL after the timeout), and on failure every site's stderr is attached.
    """
    with two_namespaces() as lab:
        pvol_image, pvol = loopdev_factory(1 << 20)
        svol_image, svol = loopdev_factory(1 << 20)
        key_file = tmp_path / "hb.key"
        key_file.write_text(os.urandom(32).hex() + "\n")
        key_file.chmod(0o600)
        key = key_file.read_bytes().strip()
        mirror = Mirror(pvol_image, svol_image, slots).start()
        env = TwoSites(lab, tmp_path, key_file, key, pvol, pvol_image, svol, svol_image, mirror)
        try:
            yield env
        except BaseException as exc:
            exc.add_note(env.stderr_tails())
            raise
        finally:
            for site in env.sites.values():
                if site.running():
                    assert site.proc is not None
                    site.proc.send_signal(signal.SIGTERM)
            for site in env.sites.values():
                if site.proc is not None:
                    try:
                        site.proc.wait(STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        site.kill()
            mirror.close()


# -- watching verdicts ------------------------------------------------------------------------


@dataclass
class Trace:
    """Verdicts (and per-path states) of one pair, sampled every 50 ms."""

    pair: str
    start: float
    samples: list[tuple[float, str, dict[str, str]]] = field(default_factory=list)

    @property
    def verdicts(self) -> list[str]:
        return [v for _, v, _ in self.samples]

    def seen(self) -> set[str]:
        return set(self.verdicts)

    def first(self, verdict: str) -> float | None:
        """Seconds from ``start`` to the first sample showing ``verdict``."""
        return next((t for t, v, _ in self.samples if v == verdict), None)

    def sequence(self) -> list[str]:
        """The verdicts in order, repeats collapsed."""
        out: list[str] = []
        for v in self.verdicts:
            if not out or out[-1] != v:
                out.append(v)
        return out

    def __str__(self) -> str:
        parts, last = [], None
        for t, v, states in self.samples:
            key = (v, tuple(sorted(states.items())))
            if key != last:
                paths = ",".join(f"{p}={s}" for p, s in sorted(states.items()))
                parts.append(f"{t:+.2f}s {v} [{paths}]")
                last = key
        return f"pair {self.pair}: " + "; ".join(parts)


def sample(
    site: NsSite,
    pair: str,
    *,
    seconds: float,
    until: Callable[[Trace], bool] | None = None,
    trace: Trace | None = None,
    start: float | None = None,
) -> Trace:
    """Read ``pair``'s verdict every 50 ms for ``seconds`` (or until ``until`` holds).

    A pair that is not in the table is recorded as ``absent``.  Samples are timed from
    ``start`` (default: now), the moment of the fault being measured.
    """
    now = time.monotonic()
    trace = trace or Trace(pair, start if start is not None else now)
    deadline = now + seconds
    while True:
        rows = [r for r in site.status()["rows"] if r["pair"] == pair]
        verdict = str(rows[0]["verdict"]) if rows else "absent"
        states = {str(r["path"]): str(r["state"]) for r in rows}
        trace.samples.append((time.monotonic() - trace.start, verdict, states))
        if until is not None and until(trace):
            return trace
        if time.monotonic() >= deadline:
            return trace
        time.sleep(SAMPLE_EVERY)
