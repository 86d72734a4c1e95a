"""The demo's arbiter: a real 3-member etcd cluster on localhost whose links can be cut.

Three ``etcd`` processes ("osaka", "tokyo" and "witness") run on 127.0.0.1 in the demo's
folder.  Every link between them goes through a userspace TCP proxy in this process, so
the lab cuts links without root and without network namespaces:

- **Peer traffic.** Each member advertises a proxy port as its peer URL; the proxy sits
  in front of the member's real peer port.  For each new connection the proxy learns
  which member it comes from and refuses it (a TCP reset) while the link between the two
  is cut; cutting a link resets that link's live connections at once.  The sender is
  the process that holds the other end of the connection, as the kernel says
  (``/proc/net/tcp`` gives the socket's inode, ``/proc/PID/fd`` the member that has it).
  etcd's raft streams and pipeline also name their sender in ``X-Server-From`` (and in
  the path of ``/raft/stream/...``), which is checked against the kernel's answer; but
  etcd 3.4 sends its other peer requests without it (``POST /leases`` and
  ``/leases/internal``: a follower forwarding a lease keepalive or time-to-live to the
  leader; ``GET /version``, ``/members``, ``/raft/probing``), so a header alone would let
  lease renewals through a cut link.
- **Client traffic.** Each site's hbmon has its own proxy in front of every member's
  client port (site osaka's endpoints: the osaka member, the tokyo member and the witness
  through proxies of its own), so cutting the link between site A and member B closes
  A's proxy to B.

A *link* ``(a, b)`` (:class:`Links`) covers the peer traffic between members a and b
*and* the client traffic from site a's hbmon to member b and from site b's hbmon to
member a (the witness runs no hbmon).  A site always reaches its own member.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import anyio.to_thread
from anyio.abc import SocketAttribute, SocketStream

from hbmon.errors import HbmonError

log = logging.getLogger(__name__)

MEMBERS = ("osaka", "tokyo", "witness")
SITES = ("osaka", "tokyo")  # the members whose site runs an hbmon
HEARTBEAT_MS = 100
ELECTION_MS = 1000
READY_TIMEOUT = 20.0  # seconds for the cluster to form
STOP_GRACE = 1.0  # SIGTERM, then SIGKILL after this many seconds
FIRST_BYTES_TIMEOUT = 2.0  # a peer connection that says nothing for this long is dropped
LOOPBACK = "127.0.0.1"


def free_tcp_port(taken: set[int] | None = None) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and is not in ``taken`` (which
    it is added to)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if taken is None:
            return port
        if port not in taken:
            taken.add(port)
            return port


# -- the links ---------------------------------------------------------------------------


class Links:
    """Which links between the three places are cut; a link has no direction."""

    def __init__(self, members: Iterable[str] = MEMBERS) -> None:
        self.members = tuple(members)
        self._cut: set[frozenset[str]] = set()
        self._listeners: list[Callable[[], None]] = []

    def _link(self, a: str, b: str) -> frozenset[str]:
        for name in (a, b):
            if name not in self.members:
                raise ValueError(f"unknown member {name!r} (one of {', '.join(self.members)})")
        if a == b:
            raise ValueError(f"a link joins two places, not {a!r} to itself")
        return frozenset((a, b))

    def is_cut(self, a: str, b: str) -> bool:
        return a != b and frozenset((a, b)) in self._cut

    def cut(self, a: str, b: str) -> None:
        self._cut.add(self._link(a, b))
        self._changed()

    def heal(self, a: str, b: str) -> None:
        self._cut.discard(self._link(a, b))
        self._changed()

    def isolate(self, place: str) -> None:
        """Cut every link of ``place``."""
        self._cut.update(self._link(place, other) for other in self.members if other != place)
        self._changed()

    def heal_all(self) -> None:
        self._cut.clear()
        self._changed()

    def cut_links(self) -> list[tuple[str, str]]:
        """The cut links, each as a sorted (a, b), in the members' order."""
        order = {m: i for i, m in enumerate(self.members)}
        pairs = [tuple(sorted(link, key=order.__getitem__)) for link in self._cut]
        return sorted((p[0], p[1]) for p in pairs)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every change (the proxies reset cut connections)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()


# -- who holds the other end of a connection -----------------------------------------------


def _proc_address(host: str, port: int) -> str:
    """An IPv4 address as ``/proc/net/tcp`` prints it (the address in host byte order)."""
    packed = int.from_bytes(socket.inet_aton(host), sys.byteorder)
    return f"{packed:08X}:{port:04X}"


def socket_owner(
    local: tuple[str, int], remote: tuple[str, int], pids: Mapping[int, str]
) -> str | None:
    """The name (from ``pids``) of the process that holds the TCP socket ``local`` ->
    ``remote``, or None when no process of ``pids`` does (Linux ``/proc``)."""
    want_local, want_remote = _proc_address(*local), _proc_address(*remote)
    inode = None
    try:
        with open("/proc/net/tcp") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 9 and fields[1] == want_local and fields[2] == want_remote:
                    inode = fields[9]
                    break
    except OSError:
        return None
    if inode is None or inode == "0":
        return None
    target = f"socket:[{inode}]"
    for pid, name in pids.items():
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return name
    return None


def _hostport(address: object) -> tuple[str, int]:
    if not isinstance(address, tuple) or len(address) < 2:
        raise TypeError(f"not a TCP address: {address!r}")
    return str(address[0]), int(address[1])


def header_sender(head: bytes) -> str | None:
    """The ``X-Server-From`` of the first request head in ``head`` (a member id in hex)."""
    end = head.find(b"\r\n\r\n")
    for line in head[: end if end >= 0 else len(head)].split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"x-server-from":
            return value.strip().decode("ascii", "replace")
    return None


def request_line(head: bytes) -> str:
    return head.split(b"\r\n", 1)[0][:200].decode("ascii", "replace")


# -- the proxies ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Conn:
    link: tuple[str, str]
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    severed: bool = False


def _reset(stream: SocketStream) -> None:
    """Make the close of ``stream`` a TCP reset (as a cut that refuses, at once)."""
    with contextlib.suppress(OSError, anyio.TypedAttributeLookupError):
        sock = stream.extra(SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _pump(src: SocketStream, dst: SocketStream, first: bytes = b"") -> None:
    """Copy ``src`` to ``dst`` until ``src`` ends; then half-close ``dst``."""
    if first:
        await dst.send(first)
    async for chunk in src:
        await dst.send(chunk)
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await dst.send_eof()


class Proxy:
    """A TCP proxy ``127.0.0.1:port`` -> ``127.0.0.1:target`` whose connections each
    travel on one link of :class:`Links`; see the module docstring."""

    def __init__(self, name: str, port: int, target: int, links: Links) -> None:
        self.name = name
        self.port = port
        self.target = target
        self.links = links
        self.live: set[_Conn] = set()
        self.counts: Counter[str] = Counter()  # accepted, refused, severed, ...
        links.subscribe(self.sever)

    async def link_of(self, client: SocketStream) -> tuple[tuple[str, str] | None, bytes]:
        """The link a new connection travels on (None: refuse it), and the bytes read
        to find out (forwarded first)."""
        raise NotImplementedError

    def sever(self) -> None:
        """Reset every live connection whose link is cut now."""
        for conn in list(self.live):
            if not conn.severed and self.links.is_cut(*conn.link):
                conn.severed = True
                self.counts["severed"] += 1
                conn.scope.cancel()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=self.port)
        async with listener, anyio.create_task_group() as tg:
            task_status.started()
            await listener.serve(self._handle, tg)

    async def _handle(self, client: SocketStream) -> None:
        try:
            link, first = await self.link_of(client)
            if link is None or self.links.is_cut(*link):
                self.counts["refused"] += 1
                _reset(client)
                return
            try:
                upstream = await anyio.connect_tcp(LOOPBACK, self.target)
            except OSError as err:
                self.counts["upstream_failed"] += 1
                log.debug("%s: upstream %d: %s", self.name, self.target, err)
                _reset(client)
                return
            conn = _Conn(link)
            self.live.add(conn)
            self.counts["accepted"] += 1
            if self.links.is_cut(*link):  # cut while connecting upstream
                conn.severed = True
                conn.scope.cancel()
            try:
                with conn.scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(_pump, client, upstream, first)
                        tg.start_soon(_pump, upstream, client)
            except* (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # one end went away: both are closed below
            finally:
                self.live.discard(conn)
                if conn.severed:
                    _reset(client)
                    _reset(upstream)
                await anyio.aclose_forcefully(upstream)
        finally:
            await anyio.aclose_forcefully(client)


class ClientProxy(Proxy):
    """Site ``site``'s hbmon -> member ``member``'s client port: one fixed link."""

    def __init__(self, site: str, member: str, port: int, target: int, links: Links) -> None:
        super().__init__(f"client {site}->{member}", port, target, links)
        self.site = site
        self.member = member

    async def link_of(self, client: SocketStream) -> tuple[tuple[str, str] | None, bytes]:
        return (self.site, self.member), b""


class PeerProxy(Proxy):
    """In front of member ``member``'s peer port: the link is (member, the sender)."""

    def __init__(self, cluster: Cluster, member: str, port: int, target: int) -> None:
        super().__init__(f"peer ->{member}", port, target, cluster.links)
        self.cluster = cluster
        self.member = member
        self.requests: Counter[tuple[str, str, bool]] = Counter()  # (sender, line, header)
        self.headers: Counter[tuple[str, str]] = Counter()  # (the kernel's sender, header)

    async def link_of(self, client: SocketStream) -> tuple[tuple[str, str] | None, bytes]:
        remote = client.extra(SocketAttribute.remote_address)
        local = client.extra(SocketAttribute.local_address)
        pids = dict(self.cluster.pids)
        # The client's socket: its local end is our remote end and the other way round.
        mine, theirs = _hostport(remote), _hostport(local)
        owner = await anyio.to_thread.run_sync(socket_owner, mine, theirs, pids)
        if owner is not None and owner != self.member and self.links.is_cut(self.member, owner):
            self.requests[(owner, "(refused before a byte)", False)] += 1
            return (self.member, owner), b""  # refused at once: no need to hear it out
        first = b""
        with anyio.move_on_after(FIRST_BYTES_TIMEOUT):
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                first = await client.receive()
        said = header_sender(first)
        named = self.cluster.name_of(said) if said is not None else None
        sender = owner or named
        if named is not None and owner is not None and named != owner:
            log.warning(
                "etcd peer connection to %s: the kernel says it comes from %s, X-Server-From "
                "says %s (%s): refused",
                self.member,
                owner,
                said,
                named,
            )
            sender = None
        self.requests[(sender or "?", request_line(first).rsplit(" ", 1)[0], said is not None)] += 1
        if said is not None and owner is not None:
            self.headers[(owner, said)] += 1
        if sender is None or sender == self.member:
            self.counts["unidentified"] += 1
            log.warning("etcd peer connection to %s from an unknown process: refused", self.member)
            return None, first
        return (self.member, sender), first


# -- the cluster -------------------------------------------------------------------------


@dataclass
class Member:
    name: str
    peer_port: int  # the real ports of the etcd process
    client_port: int
    peer_proxy: int  # the advertised peer URL's port
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    id: int = 0

    @property
    def client_url(self) -> str:
        """The member's own client URL (through no proxy: for tools and tests)."""
        return f"http://{LOOPBACK}:{self.client_port}"


class Cluster:
    """Three etcd members on localhost behind proxies; see the module docstring."""

    def __init__(
        self,
        folder: Path,
        etcd: str = "etcd",
        *,
        members: Iterable[str] = MEMBERS,
        sites: Iterable[str] = SITES,
        progress: Callable[[str], None] | None = None,
        token: str | None = None,
        avoid: Iterable[int] = (),
    ) -> None:
        """``avoid``: ports that others are about to bind (the demo's HTTP ports)."""
        self.folder = folder
        self.etcd = etcd
        self.progress = progress or (lambda line: log.info("%s", line))
        self.token = token or f"hbmon-demo-{os.getpid()}-{time.monotonic_ns()}"
        self.links = Links(members)
        taken = set(avoid)
        self.members = {
            name: Member(
                name,
                free_tcp_port(taken),
                free_tcp_port(taken),
                free_tcp_port(taken),
                folder / name,
                folder / f"{name}.log",
            )
            for name in self.links.members
        }
        self.sites = tuple(sites)
        self.pids: dict[int, str] = {}
        self.peer_proxies = {
            m.name: PeerProxy(self, m.name, m.peer_proxy, m.peer_port)
            for m in self.members.values()
        }
        self.client_proxies = {
            (site, m.name): ClientProxy(
                site, m.name, free_tcp_port(taken), m.client_port, self.links
            )
            for site in self.sites
            for m in self.members.values()
        }
        self.version = ""
        self.formed_in = math.nan
        self._ids: dict[int, str] = {}

    # -- what the sites and the lab see --

    def endpoints(self, site: str) -> list[str]:
        """Site ``site``'s client URLs: its own member first, each through its proxy."""
        order = sorted(self.members, key=lambda m: m != site)
        return [f"http://{LOOPBACK}:{self.client_proxies[site, m].port}" for m in order]

    def name_of(self, member_id: str) -> str | None:
        """The member name of an id as etcd writes it (hex), or None."""
        try:
            return self._ids.get(int(member_id, 16))
        except ValueError:
            return None

    def proxies(self) -> list[Proxy]:
        return [*self.peer_proxies.values(), *self.client_proxies.values()]

    # -- life --

    def command(self, member: Member) -> list[str]:
        cluster = ",".join(
            f"{m.name}=http://{LOOPBACK}:{m.peer_proxy}" for m in self.members.values()
        )
        return [
            self.etcd,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-peer-urls", f"http://{LOOPBACK}:{member.peer_port}",
            "--initial-advertise-peer-urls", f"http://{LOOPBACK}:{member.peer_proxy}",
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--initial-cluster", cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", str(HEARTBEAT_MS),
            "--election-timeout", str(ELECTION_MS),
            "--pre-vote",  # a member back from a cut does not force an election
        ]  # fmt: skip

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the proxies and the members, wait until the cluster is healthy, then
        serve until cancelled; the members are stopped on the way out (bounded)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        async with anyio.create_task_group() as tg:
            for proxy in self.proxies():
                await tg.start(proxy.run)
            try:
                self._spawn()
                await self._wait_formed()
                task_status.started()
                await self._watch()
            finally:
                with anyio.CancelScope(shield=True):
                    await self.stop()
                tg.cancel_scope.cancel()

    def _spawn(self) -> None:
        names = ", ".join(self.members)
        self.progress(f"etcd: starting members {names} (logs in {self.folder})")
        for member in self.members.values():
            with member.log_path.open("ab") as out:
                # Its own process group: a Ctrl-C at the terminal stops the demo, and the
                # demo stops the members in order.
                member.process = subprocess.Popen(
                    self.command(member),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    process_group=0,
                )
            self.pids[member.process.pid] = member.name

    async def _wait_formed(self) -> None:
        start = time.monotonic()
        healthy: set[str] = set()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
            with anyio.move_on_after(READY_TIMEOUT) as scope:
                while len(healthy) < len(self.members):
                    for member in self.members.values():
                        self._check_running(member)
                        if member.name in healthy:
                            continue
                        if await _healthy(http, member.client_url):
                            healthy.add(member.name)
                            took = time.monotonic() - start
                            self.progress(f"etcd: {member.name} healthy after {took:.1f} s")
                    await anyio.sleep(0.1)
                await self._learn_ids(http)
        if scope.cancelled_caught or len(self._ids) < len(self.members):
            raise HbmonError(
                f"the etcd cluster did not form within {READY_TIMEOUT:g} s "
                f"(healthy: {', '.join(sorted(healthy)) or 'none'}); see the logs in {self.folder}"
            )
        self.formed_in = time.monotonic() - start
        self.progress(
            f"etcd {self.version}: cluster of {len(self.members)} healthy in {self.formed_in:.1f} s"
        )

    async def _learn_ids(self, http: aiohttp.ClientSession) -> None:
        """Member ids (for X-Server-From) and the version, from the gateway."""
        url = next(iter(self.members.values())).client_url
        listed = await gateway(http, url, "/v3/cluster/member/list", {})
        for entry in listed.get("members", []):
            name = entry.get("name")
            if name in self.members:
                self.members[name].id = int(entry["ID"])
                self._ids[int(entry["ID"])] = name
        status = await gateway(http, url, "/v3/maintenance/status", {})
        self.version = str(status.get("version", ""))

    def _check_running(self, member: Member) -> None:
        proc = member.process
        if proc is not None and proc.poll() is not None:
            tail = b"".join(member.log_path.read_bytes().splitlines(keepends=True)[-5:])
            raise HbmonError(
                f"etcd member {member.name} exited with {proc.returncode} at start "
                f"({member.log_path}): {tail.decode(errors='replace').strip()}"
            )

    async def _watch(self) -> None:
        """Log a member that exits while the demo runs (the others carry on)."""
        gone: set[str] = set()
        while True:
            for member in self.members.values():
                proc = member.process
                if proc is not None and proc.poll() is not None and member.name not in gone:
                    gone.add(member.name)
                    log.error(
                        "etcd member %s exited with %s; see %s",
                        member.name,
                        proc.returncode,
                        member.log_path,
                    )
            await anyio.sleep(0.5)

    async def stop(self) -> None:
        """SIGTERM every member, SIGKILL those still running after ``STOP_GRACE``."""
        running = [m.process for m in self.members.values() if m.process is not None]
        for proc in running:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        # The followers exit at once; the leader tries to hand its leadership over first,
        # which cannot succeed once the others are gone (it would wait ~7 s): it is
        # killed as soon as it is the last one left.
        deadline = time.monotonic() + STOP_GRACE
        # (a child's exit has no event to wait on here: poll it)
        while sum(p.poll() is None for p in running) > 1 and time.monotonic() < deadline:  # noqa: ASYNC110
            await anyio.sleep(0.02)
        for proc in running:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()

    async def leader(self) -> str | None:
        """The member that leads now, as the first member that answers says."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
            for member in self.members.values():
                with contextlib.suppress(HbmonError):
                    status = await gateway(http, member.client_url, "/v3/maintenance/status", {})
                    return self._ids.get(int(status.get("leader", 0)))
        return None

    def state(self) -> dict[str, Any]:
        """For ``GET /lab`` and demo.json."""
        return {
            "version": self.version,
            "members": {m.name: m.client_url for m in self.members.values()},
            "endpoints": {site: self.endpoints(site) for site in self.sites},
            "cut": [list(link) for link in self.links.cut_links()],
        }


async def _healthy(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(f"{url}/health") as resp:
            doc = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
        return False
    return isinstance(doc, dict) and doc.get("health") == "true"


async def gateway(
    http: aiohttp.ClientSession, url: str, path: str, body: Mapping[str, Any]
) -> dict[str, Any]:
    """POST ``body`` to etcd's JSON gateway at ``url``; HbmonError on any failure."""
    try:
        async with http.post(f"{url}{path}", data=json.dumps(body)) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise HbmonError(f"{url}{path}: HTTP {resp.status}: {text[:200]}")
            doc = json.loads(text)
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as err:
        raise HbmonError(f"{url}{path}: {type(err).__name__}: {err}") from None
    if not isinstance(doc, dict):
        raise HbmonError(f"{url}{path}: not a JSON object: {text[:200]}")
    return doc


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
