"""Three network namespaces (site A, site B, witness W) and a real 3-member etcd cluster.

Layout (one lab per use, namespace names unique per process and lab)::

        namespace A                                   namespace B
        toB 10.81.1.1/24 ◄───────── veth ──────────► toA 10.81.1.2/24
        toW 10.81.2.1/24                              toW 10.81.3.2/24
              ▲                                             ▲
              │ veth            namespace W                 │ veth
              └──────────► toA 10.81.2.3/24                 │
                           toB 10.81.3.3/24 ◄───────────────┘

Every site has one address on each of its two links and nothing else (no default route,
no forwarding): A reaches B only over the A-B link, never through W.  Each etcd member
listens on and advertises both of its link addresses (peer port :data:`PEER_PORT`, client
port :data:`CLIENT_PORT`), so a peer or a client reaches it over whichever direct link is
up.  Each member also listens on ``127.0.0.1:CLIENT_PORT`` *inside its own namespace*:
that is the site's local network, which a WAN cut does not take away, so a process at a
cut-off site still reaches its own member (and gets timeouts from it, not "unreachable").
The ports are not etcd's defaults (2379/2380), so nothing here can meet a default etcd on
the host's 127.0.0.1:2379 even by mistake.

With ``mgmt=True`` (the default) each namespace also gets a management veth to the root
namespace (``10.85.K.0/30``, ``.4/30``, ``.8/30``; ``K`` is the first subnet free in the root
namespace) so the test (and an Alertmanager in the root namespace) can reach HTTP servers
inside the sites.  Management links never carry etcd or heartbeat traffic: nothing in the
sites routes anything but their own /30 over them.

Raft timing is etcd's default (heartbeat 100 ms, election timeout 1000 ms) unless given.
``pre_vote`` defaults to True (etcd 3.5's default; 3.4's is off): without it the member cut
off by an A-B cut (the one not on the leader's side) keeps raising its term and, when the
link heals, deposes the leader.  Measured here: healing a 3 s A-B cut without pre-vote
stalled writes for 3.4 s and took the raft term from 2 to 25; with it, no stall and the
term stayed 2.  Also measured (2 cores, 6 clusters): the cluster forms in 0.7-2.6 s
(median 2.4 s); after a leader kill a new leader is elected in 1.15-1.55 s and B writes
again 1.2-2.6 s after the kill.

Everything is synchronous (``subprocess``); from an async test call it through
``anyio.to_thread.run_sync``.  Member logs go to ``TMP/etcd-SITE.log`` (kept across
restarts) and are attached to the failure of whatever raised inside the context manager.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from netns import kill_namespace_processes, require_netns, sh

SITES: tuple[str, ...] = ("A", "B", "W")
LINKS: tuple[tuple[str, str], ...] = (("A", "B"), ("A", "W"), ("B", "W"))
SUBNETS: dict[tuple[str, str], str] = {
    ("A", "B"): "10.81.1",
    ("A", "W"): "10.81.2",
    ("B", "W"): "10.81.3",
}
HOST: dict[str, int] = {"A": 1, "B": 2, "W": 3}
CLIENT_PORT = 12379
PEER_PORT = 12380
MGMT_NET = "10.85"
LOOPBACK_URL = f"http://127.0.0.1:{CLIENT_PORT}"
COMMAND_TIMEOUT = 2.0  # etcdctl --command-timeout for puts and gets

_counter = itertools.count(1)
_LOCK_FILE = Path("/tmp/hbmon-etcdnet.lock")  # serialises the choice of management subnet


def link(x: str, y: str) -> tuple[str, str]:
    """The canonical name of the link between ``x`` and ``y`` (a key of :data:`SUBNETS`)."""
    pair = (x, y) if SITES.index(x) < SITES.index(y) else (y, x)
    if pair not in SUBNETS:
        raise ValueError(f"no link between {x!r} and {y!r}")
    return pair


def address(site: str, via: str) -> str:
    """``site``'s address on its link to ``via``."""
    return f"{SUBNETS[link(site, via)]}.{HOST[site]}"


def neighbours(site: str) -> list[str]:
    return [s for s in SITES if s != site]


def ifname(site: str, to: str) -> str:
    """The name, inside ``site``'s namespace, of its end of the veth to ``to``."""
    return f"to{to}"


def require_etcdnet() -> None:
    """Root, ``ip``, network namespaces, ``etcd`` and ``etcdctl``; fail under CI, else skip."""
    require_netns()
    need(shutil.which("etcd") is not None, "etcd not found (Debian package: etcd-server)")
    need(shutil.which("etcdctl") is not None, "etcdctl not found (Debian package: etcd-client)")


def _root_addresses() -> str:
    return sh("ip", "-4", "-o", "addr", "show").stdout


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """etcdctl's own ``Error: ...`` line (it logs retries as JSON before it)."""
    lines = (proc.stderr + proc.stdout).strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    return (errors or lines or [f"exit {proc.returncode}"])[-1][:300]


@dataclass
class Put:
    """The outcome of :meth:`EtcdNet.put`: which endpoint took the write, and the errors."""

    ok: bool
    endpoint: str | None
    seconds: float
    errors: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok


class EtcdNet:
    """The lab of the module docstring; build it with :func:`etcd_cluster`.

    Faults: :meth:`cut`/:meth:`heal` one link (both veth ends down/up),
    :meth:`isolate`/:meth:`rejoin` a site (all its links), :meth:`kill_member` (SIGKILL),
    :meth:`start_member`, :meth:`pause_member`/:meth:`resume_member` (SIGSTOP/SIGCONT).
    """

    def __init__(
        self,
        tmp: Path,
        tag: str,
        *,
        election_ms: int | None = None,
        heartbeat_ms: int | None = None,
        pre_vote: bool = True,
    ) -> None:
        self.tmp = tmp
        self.tag = tag
        self.ns: dict[str, str] = {s: f"hbe{s}-{tag}" for s in SITES}
        self.election_ms = election_ms
        self.heartbeat_ms = heartbeat_ms
        self.pre_vote = pre_vote
        self.procs: dict[str, subprocess.Popen[bytes] | None] = dict.fromkeys(SITES)
        self.paused: set[str] = set()
        self.down: set[tuple[str, str]] = set()
        self.mgmt: dict[str, str] = {}  # site -> its address on the management link
        self.mgmt_host: dict[str, str] = {}  # site -> the root namespace's address there
        self.mgmt_ifaces: list[str] = []  # root-side interface names
        self.formed_in: float | None = None  # seconds from launch to healthy (start())
        self.token = f"hbmon-etcdnet-{tag}"
        self._created: list[str] = []  # sites whose namespace exists

    # -- addresses ------------------------------------------------------------------------

    def client_urls(self, site: str) -> list[str]:
        """The client URLs ``site``'s member advertises (one per link)."""
        return [f"http://{address(site, n)}:{CLIENT_PORT}" for n in neighbours(site)]

    def peer_urls(self, site: str) -> list[str]:
        return [f"http://{address(site, n)}:{PEER_PORT}" for n in neighbours(site)]

    def endpoints(self, site: str) -> list[str]:
        """Client URLs a process in ``site``'s namespace should use, its own member first.

        Own member on the namespace's loopback (the site's local network), then each other
        member on its address on the link that joins it to ``site`` (the only one ``site``
        has a route to).
        """
        return [LOOPBACK_URL] + [
            f"http://{address(n, site)}:{CLIENT_PORT}" for n in neighbours(site)
        ]

    def member_url(self, site: str) -> str:
        """The URL of ``site``'s own member from inside ``site`` (the loopback)."""
        return LOOPBACK_URL

    def exec_argv(self, site: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[site], *argv]

    # -- building -------------------------------------------------------------------------

    def _create(self, mgmt: bool) -> None:
        for site in SITES:
            sh("ip", "netns", "add", self.ns[site])
            self._created.append(site)
            sh("ip", "-n", self.ns[site], "link", "set", "lo", "up")
        for x, y in LINKS:
            sh(
                "ip", "link", "add", ifname(x, y), "netns", self.ns[x],
                "type", "veth", "peer", "name", ifname(y, x), "netns", self.ns[y],
            )  # fmt: skip
            for site, other in ((x, y), (y, x)):
                dev = ifname(site, other)
                sh("ip", "-n", self.ns[site], "addr", "add", f"{address(site, other)}/24",
                   "dev", dev)  # fmt: skip
                sh("ip", "-n", self.ns[site], "link", "set", dev, "up")
        if mgmt:
            self._create_mgmt()

    def _create_mgmt(self) -> None:
        _LOCK_FILE.touch(exist_ok=True)
        with _LOCK_FILE.open("r") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            taken = _root_addresses()
            k = next((k for k in range(256) if f" {MGMT_NET}.{k}.1/" not in taken), None)
            if k is None:
                pytest.fail(f"no free {MGMT_NET}.K.0/24 management subnet in the root namespace")
            for i, site in enumerate(SITES):
                base = 4 * i
                host_if = f"hbe{self.tag}{site.lower()}"[:15]
                host_ip, ns_ip = f"{MGMT_NET}.{k}.{base + 1}", f"{MGMT_NET}.{k}.{base + 2}"
                sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "mgmt0",
                   "netns", self.ns[site])  # fmt: skip
                self.mgmt_ifaces.append(host_if)
                sh("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
                sh("ip", "link", "set", host_if, "up")
                sh("ip", "-n", self.ns[site], "addr", "add", f"{ns_ip}/30", "dev", "mgmt0")
                sh("ip", "-n", self.ns[site], "link", "set", "mgmt0", "up")
                self.mgmt[site], self.mgmt_host[site] = ns_ip, host_ip

    def _destroy(self) -> None:
        for site in SITES:
            proc = self.procs.get(site)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
        for site in self._created:
            kill_namespace_processes(self.ns[site])
        for site in SITES:
            proc = self.procs.get(site)
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        for site in self._created:
            subprocess.run(["ip", "netns", "del", self.ns[site]], capture_output=True)
        for host_if in self.mgmt_ifaces:  # normally gone with its peer's namespace
            subprocess.run(["ip", "link", "del", host_if], capture_output=True)

    # -- etcd members ---------------------------------------------------------------------

    def data_dir(self, site: str) -> Path:
        return self.tmp / f"etcd-{site}.data"

    def log_path(self, site: str) -> Path:
        return self.tmp / f"etcd-{site}.log"

    def member_argv(self, site: str) -> list[str]:
        cluster = ",".join(f"{s}={url}" for s in SITES for url in self.peer_urls(s))
        argv = [
            "etcd",
            "--name", site,
            "--data-dir", str(self.data_dir(site)),
            "--listen-peer-urls", ",".join(self.peer_urls(site)),
            "--initial-advertise-peer-urls", ",".join(self.peer_urls(site)),
            "--listen-client-urls", ",".join([LOOPBACK_URL, *self.client_urls(site)]),
            "--advertise-client-urls", ",".join(self.client_urls(site)),
            "--initial-cluster", cluster,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        if self.pre_vote:
            argv.append("--pre-vote")
        if self.election_ms is not None:
            argv += ["--election-timeout", str(self.election_ms)]
        if self.heartbeat_ms is not None:
            argv += ["--heartbeat-interval", str(self.heartbeat_ms)]
        return argv

    def start_member(self, site: str) -> None:
        """Launch ``site``'s member (again); after a kill it rejoins with its data dir."""
        proc = self.procs.get(site)
        if proc is not None and proc.poll() is None:
            raise AssertionError(f"etcd member {site} is already running (pid {proc.pid})")
        with self.log_path(site).open("ab") as log:
            log.write(f"\n=== start {time.monotonic():.3f} ===\n".encode())
            log.flush()
            self.procs[site] = subprocess.Popen(
                self.exec_argv(site, self.member_argv(site)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.tmp,
            )
        self.paused.discard(site)

    def kill_member(self, site: str) -> None:
        """SIGKILL ``site``'s member (``ip netns exec`` execs: the pid is etcd's)."""
        proc = self.procs.get(site)
        if proc is None or proc.poll() is not None:
            raise AssertionError(f"etcd member {site} is not running")
        proc.kill()
        proc.wait(10)
        self.paused.discard(site)

    def pause_member(self, site: str) -> None:
        proc = self.procs.get(site)
        if proc is None or proc.poll() is not None:
            raise AssertionError(f"etcd member {site} is not running")
        proc.send_signal(signal.SIGSTOP)
        self.paused.add(site)

    def resume_member(self, site: str) -> None:
        proc = self.procs.get(site)
        if proc is None or proc.poll() is not None:
            raise AssertionError(f"etcd member {site} is not running")
        proc.send_signal(signal.SIGCONT)
        self.paused.discard(site)

    def running(self, site: str) -> bool:
        proc = self.procs.get(site)
        return proc is not None and proc.poll() is None

    def start(self, timeout: float = 30.0) -> float:
        """Launch the three members at once and wait until the cluster is healthy."""
        t0 = time.monotonic()
        for site in SITES:
            self.start_member(site)
        self.wait_healthy(timeout, sites=SITES, since=t0)
        self.formed_in = time.monotonic() - t0
        return self.formed_in

    # -- faults on links -------------------------------------------------------------------

    def _set_link(self, x: str, y: str, state: str) -> None:
        for site, other in ((x, y), (y, x)):
            sh("ip", "-n", self.ns[site], "link", "set", ifname(site, other), state)

    def cut(self, x: str, y: str) -> None:
        """Take the link between ``x`` and ``y`` down (both ends)."""
        self._set_link(x, y, "down")
        self.down.add(link(x, y))

    def heal(self, x: str, y: str) -> None:
        self._set_link(x, y, "up")
        self.down.discard(link(x, y))

    def isolate(self, site: str) -> None:
        """Cut every link of ``site`` (its etcd traffic and everything else)."""
        for other in neighbours(site):
            self.cut(site, other)

    def rejoin(self, site: str) -> None:
        """Heal every link of ``site``, including ones cut one by one."""
        for other in neighbours(site):
            self.heal(site, other)

    def heal_all(self) -> None:
        for x, y in list(self.down):
            self.heal(x, y)

    def link_is_up(self, x: str, y: str) -> bool:
        """What the kernel says about ``x``'s end (operational state UP)."""
        out = sh("ip", "-n", self.ns[x], "-o", "link", "show", ifname(x, y)).stdout
        return "state UP" in out

    # -- processes in the sites --------------------------------------------------------------

    def run_in(self, site: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """``argv`` started inside ``site``'s namespace (``ip netns exec`` execs it)."""
        popen.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.exec_argv(site, argv), **popen)

    def etcdctl(
        self,
        site: str,
        *args: str,
        endpoints: Sequence[str] | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """``etcdctl ARGS`` inside ``site`` (default endpoint: its own member)."""
        eps = ",".join(endpoints if endpoints is not None else [self.member_url(site)])
        argv = [
            "etcdctl",
            f"--endpoints={eps}",
            f"--command-timeout={timeout:g}s",
            f"--dial-timeout={min(timeout, 2.0):g}s",
            *args,
        ]
        env = {**os.environ, "ETCDCTL_API": "3"}
        for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
            env.pop(proxy, None)
        return subprocess.run(
            self.exec_argv(site, argv),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout + 10,
            check=False,
        )

    def put(self, site: str, key: str, value: str, *, timeout: float = COMMAND_TIMEOUT) -> Put:
        """Write from inside ``site``: try :meth:`endpoints` in order, each for ``timeout``.

        This is what hbmon's client does (next endpoint after a failure); the result says
        which endpoint took the write.
        """
        t0 = time.monotonic()
        errors: list[str] = []
        for ep in self.endpoints(site):
            proc = self.etcdctl(site, "put", key, value, endpoints=[ep], timeout=timeout)
            if proc.returncode == 0 and proc.stdout.strip() == "OK":
                return Put(True, ep, time.monotonic() - t0, errors)
            errors.append(f"{ep}: {_error_line(proc)}")
        return Put(False, None, time.monotonic() - t0, errors)

    def get(
        self,
        site: str,
        key: str,
        *,
        timeout: float = COMMAND_TIMEOUT,
        serializable: bool = False,
        endpoints: Sequence[str] | None = None,
    ) -> str | None:
        """Read ``key`` through ``site``'s own member (default: linearizable); None if absent.

        ``serializable=True`` is the local read a minority member answers with stale data
        (what hbmon never uses).  Raises AssertionError when the member cannot answer.
        """
        args = ["get", key, "--print-value-only"]
        if serializable:
            args.append("--consistency=s")
        proc = self.etcdctl(site, *args, endpoints=endpoints, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"get {key} at {site} failed: {_error_line(proc)}")
        if not proc.stdout:
            return None
        return proc.stdout.removesuffix("\n")

    # -- cluster state -----------------------------------------------------------------------

    def status(self, site: str, timeout: float = 1.0) -> dict[str, Any] | None:
        """``endpoint status`` of ``site``'s own member (local, needs no quorum)."""
        if not self.running(site) or site in self.paused:
            return None
        proc = self.etcdctl(site, "endpoint", "status", "-w", "json", timeout=timeout)
        if proc.returncode != 0:
            return None
        try:
            doc = json.loads(proc.stdout)
            status: dict[str, Any] = doc[0]["Status"]
        except (ValueError, LookupError, TypeError):
            return None
        return status

    def statuses(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for site in SITES:
            st = self.status(site)
            if st is not None:
                out[site] = st
        return out

    def leader(self) -> str | None:
        """The site whose member is leader in the newest raft term any member reports."""
        statuses = self.statuses()
        ids = {int(st["header"]["member_id"]): site for site, st in statuses.items()}
        best: tuple[int, str] | None = None
        for site, st in statuses.items():
            if int(st.get("leader", 0)) == int(st["header"]["member_id"]):
                term = int(st.get("raftTerm", 0))
                if best is None or term > best[0]:
                    best = (term, site)
        if best is not None:
            return best[1]
        # no member says it leads (e.g. the leader is paused): what the others believe
        believed = {ids.get(int(st.get("leader", 0))) for st in statuses.values()}
        believed.discard(None)
        return believed.pop() if len(believed) == 1 else None

    def healthy(self, site: str, timeout: float = 1.0) -> bool:
        """``endpoint health`` of ``site``'s own member: a linearizable read went through."""
        proc = self.etcdctl(site, "endpoint", "health", timeout=timeout)
        return proc.returncode == 0 and "is healthy" in (proc.stdout + proc.stderr)

    def wait_healthy(
        self,
        timeout: float = 30.0,
        *,
        sites: Sequence[str] | None = None,
        since: float | None = None,
    ) -> float:
        """Wait until every member in ``sites`` (default: all running) serves a
        linearizable read and all agree on one leader; return seconds since ``since``."""
        t0 = since if since is not None else time.monotonic()
        deadline = time.monotonic() + timeout
        while True:
            if sites is not None:
                for s in sites:
                    proc = self.procs.get(s)
                    if proc is None or proc.poll() is not None:
                        code = None if proc is None else proc.returncode
                        pytest.fail(f"etcd member {s} is not running ({code})\n{self.logs()}")
            want = [s for s in (sites or SITES) if self.running(s)]
            if want and all(self.healthy(s) for s in want):
                statuses = self.statuses()
                leaders = {int(statuses[s].get("leader", 0)) for s in want if s in statuses}
                if len(leaders) == 1 and all(s in statuses for s in want):
                    return time.monotonic() - t0
            if time.monotonic() >= deadline:
                pytest.fail(f"etcd cluster not healthy within {timeout:g} s\n{self.report()}")
            time.sleep(0.1)

    def wait_leader(self, timeout: float, *, other_than: str | None = None) -> tuple[str, float]:
        """Wait for a leader (not ``other_than``) that a majority follows; (site, seconds)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            statuses = self.statuses()
            lead = self.leader()
            if lead is not None and lead != other_than and lead in statuses:
                lead_id = int(statuses[lead]["header"]["member_id"])
                followers = [s for s, st in statuses.items() if int(st.get("leader", 0)) == lead_id]
                if len(followers) >= 2:
                    return lead, time.monotonic() - t0
            if time.monotonic() >= deadline:
                pytest.fail(f"no new etcd leader within {timeout:g} s\n{self.report()}")
            time.sleep(0.05)

    # -- reports ------------------------------------------------------------------------------

    def logs(self, lines: int = 25) -> str:
        parts = []
        for site in SITES:
            try:
                text = self.log_path(site).read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                text = ["(no log)"]
            parts.append(f"--- etcd {site} ({self.log_path(site)}) ---\n" + "\n".join(text))
        return "\n".join(parts)

    def report(self) -> str:
        running = {s: self.running(s) for s in SITES}
        return (
            f"etcdnet {self.tag}: namespaces {self.ns}, links down {sorted(self.down)}, "
            f"members running {running}, paused {sorted(self.paused)}\n{self.logs()}"
        )


@contextlib.contextmanager
def etcd_cluster(
    tmp: Path,
    *,
    start: bool = True,
    mgmt: bool = True,
    election_ms: int | None = None,
    heartbeat_ms: int | None = None,
    pre_vote: bool = True,
    timeout: float = 30.0,
) -> Iterator[EtcdNet]:
    """Build the lab, start the cluster (unless ``start=False``) and tear it all down.

    Whatever raises inside gets the member logs and link states attached as a note.
    """
    require_etcdnet()
    tag = f"{os.getpid() % 100000}x{next(_counter)}"
    tmp.mkdir(parents=True, exist_ok=True)
    net = EtcdNet(tmp, tag, election_ms=election_ms, heartbeat_ms=heartbeat_ms, pre_vote=pre_vote)
    try:
        net._create(mgmt)
        if start:
            net.start(timeout)
        try:
            yield net
        except BaseException as exc:
            exc.add_note(net.report())
            raise
    finally:
        net._destroy()
