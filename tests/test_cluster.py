"""The demo's etcd cluster (hbmon/cluster.py): three real etcd members behind the lab's
userspace TCP proxies, and cuts that really cut.

What a cut does is judged from outside the proxies: by etcd itself (a put through the
gateway succeeds or fails) and by the kernel (which TCP connections the etcd processes
hold, from ``/proc/net/tcp`` and ``/proc/PID/fd``), not from the proxies' bookkeeping.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import anyio
import pytest
from conftest import need

from hbmon.cluster import MEMBERS, Cluster, b64

FORM_BOUND = 10.0  # seconds for the cluster to form (it takes ~2 s here)
ATTEMPT = 1.0  # each put through one endpoint
SETTLE = 10.0  # a new election, or the cluster whole again after a heal


def need_etcd() -> str:
    path = shutil.which("etcd")
    need(path is not None, "etcd not found (Debian package: etcd-server)")
    assert path is not None
    return path


@asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A formed cluster for the body of a test; afterwards every member process is gone."""
    lines: list[str] = []
    cluster = Cluster(tmp_path / "etcd", need_etcd(), progress=lines.append)
    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        await tg.start(cluster.run)
        print(f"\n[cluster] formed in {time.monotonic() - start:.2f} s: {lines}")
        try:
            yield cluster
        finally:
            stop = time.monotonic()
            tg.cancel_scope.cancel()
    took = time.monotonic() - stop
    print(f"[cluster] stopped in {took:.2f} s")
    for member in cluster.members.values():
        assert member.process is not None
        assert member.process.poll() is not None, f"etcd {member.name} still running"
    assert took < 3.0


async def put(url: str, key: str, limit: float = ATTEMPT) -> str | None:
    """A put through etcd's JSON gateway at ``url``; None on success, else why not."""
    body = json.dumps({"key": b64(key), "value": b64(f"{time.time()}")})
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=limit)) as http:
            async with http.post(f"{url}/v3/kv/put", data=body) as resp:
                text = await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError) as err:
        return f"{type(err).__name__}: {err}"
    if resp.status != 200 or "header" not in json.loads(text):
        return f"HTTP {resp.status}: {text[:200]}"
    return None


async def put_through(cluster: Cluster, site: str) -> tuple[str | None, dict[str, str]]:
    """A put through ``site``'s endpoints in turn (as the site's hbmon would); returns the
    member that took it (or None) and why each endpoint before it failed."""
    failures: dict[str, str] = {}
    members = sorted(cluster.members, key=lambda m: m != site)
    for member, url in zip(members, cluster.endpoints(site), strict=True):
        why = await put(url, f"/test/{site}")
        if why is None:
            return member, failures
        failures[member] = why
    return None, failures


async def eventually(
    what: str, check: Callable[[], Awaitable[object]], within: float = SETTLE
) -> float:
    """Await ``check()`` until it is truthy; returns the seconds it took."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > within:
            pytest.fail(f"{what}: not within {within:g} s")
        await anyio.sleep(0.1)


def established(pid: int, port: int) -> set[str]:
    """The TCP connections (socket inodes) in state ESTABLISHED that process ``pid`` holds
    to 127.0.0.1:port (the kernel's view: /proc/net/tcp for the sockets, /proc/PID/fd for
    who has them)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            if fields[3] == "01" and remote_port == port and fields[9] in inodes:
                found.add(fields[9])
    return found


def pid_of(cluster: Cluster, member: str) -> int:
    proc = cluster.members[member].process
    assert proc is not None
    return proc.pid


def peer_sockets(cluster: Cluster, a: str, b: str) -> set[str]:
    ma, mb = cluster.members[a], cluster.members[b]
    return established(pid_of(cluster, a), mb.peer_proxy) | established(
        pid_of(cluster, b), ma.peer_proxy
    )


def peer_connections(cluster: Cluster, a: str, b: str) -> int:
    """Established connections from a's etcd to b's peer URL and from b's to a's."""
    return len(peer_sockets(cluster, a, b))


async def lasting(cluster: Cluster, a: str, b: str) -> set[str]:
    """Connections between a and b that last 0.2 s (etcd redials a refused link every
    100 ms: such a connection is ESTABLISHED for the moment before the proxy resets it)."""
    first = peer_sockets(cluster, a, b)
    await anyio.sleep(0.2)
    return first & peer_sockets(cluster, a, b)


async def reset(cluster: Cluster, a: str, b: str, bound: float = 0.3) -> float:
    """Wait until the connections that joined a's and b's etcd processes are reset; fail
    after ``bound`` seconds; then check that no new one lasts."""
    start = time.monotonic()
    before = peer_sockets(cluster, a, b)
    while before & peer_sockets(cluster, a, b):
        if time.monotonic() - start > bound:
            pytest.fail(f"{a}-{b}: {len(before & peer_sockets(cluster, a, b))} left")
        await anyio.sleep(0.01)
    took = time.monotonic() - start
    assert await lasting(cluster, a, b) == set()
    return took


async def grant(url: str, ttl: int = 30) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        async with http.post(f"{url}/v3/lease/grant", data=json.dumps({"TTL": ttl})) as resp:
            assert resp.status == 200, await resp.text()
            return str((await resp.json())["ID"])


async def keepalive(url: str, lease: str) -> str | None:
    """One lease keepalive through ``url``: None when renewed, else why not."""
    body = json.dumps({"ID": lease})
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.5)) as http:
            async with http.post(f"{url}/v3/lease/keepalive", data=body) as resp:
                text = await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError) as err:
        return f"{type(err).__name__}: {err}"
    try:
        ttl = json.loads(text).get("result", {}).get("TTL")
    except (ValueError, AttributeError):
        ttl = None
    return None if resp.status == 200 and ttl not in (None, "0") else f"{resp.status}: {text}"


async def lead(cluster: Cluster, member: str) -> None:
    """Make ``member`` the leader (etcd's own leadership transfer, sent to the leader)."""
    leader = await cluster.leader()
    assert leader is not None
    if leader != member:
        body = json.dumps({"targetID": str(cluster.members[member].id)})
        url = cluster.members[leader].client_url
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.post(f"{url}/v3/maintenance/transfer-leadership", data=body) as resp:
                assert resp.status == 200, await resp.text()

    async def leads() -> bool:
        return await cluster.leader() == member

    await eventually(f"{member} leads", leads)


async def test_forms_and_every_proxy_carries_traffic(tmp_path: Path) -> None:
    start = time.monotonic()
    async with running(tmp_path) as cluster:
        formed = time.monotonic() - start
        assert formed < FORM_BOUND, formed
        assert cluster.version.startswith("3."), cluster.version
        assert sorted(cluster.members) == sorted(MEMBERS)
        assert all(m.id for m in cluster.members.values())
        for site in ("osaka", "tokyo"):
            for url in cluster.endpoints(site):
                assert await put(url, f"/test/{site}") is None, url
        # Every member pair has raft streams through the proxies, both ways.
        for a, b in (("osaka", "tokyo"), ("osaka", "witness"), ("tokyo", "witness")):
            assert peer_connections(cluster, a, b) >= 2, (a, b)
        # etcd's peer requests other than raft's name no sender (GET /members at start,
        # GET /version, POST /leases...): the kernel names it.
        for proxy in cluster.peer_proxies.values():
            print(f"[cluster] first requests at {proxy.member}'s peer proxy: {proxy.requests}")
            bare = {k: n for k, n in proxy.requests.items() if not k[2]}
            assert bare, proxy.requests
            assert {sender for sender, _, _ in bare} <= set(MEMBERS) - {proxy.member}, bare
        for proxy in cluster.peer_proxies.values():
            assert proxy.counts["unidentified"] == 0, proxy.counts
            # Where etcd names the sender (X-Server-From), the kernel names the same one.
            assert sum(proxy.headers.values()) >= 4, proxy.headers
            for (owner, said), _ in proxy.headers.items():
                assert cluster.name_of(said) == owner, (proxy.member, owner, said)


async def test_cut_wan_keeps_the_witness(tmp_path: Path) -> None:
    """osaka-tokyo cut: each site still writes (through the witness if need be), no raft
    connection joins osaka and tokyo, and site osaka's proxy to tokyo refuses at once."""
    async with running(tmp_path) as cluster:
        await lead(cluster, "tokyo")  # then osaka's own member is cut off from the leader
        osaka = cluster.members["osaka"].client_url
        lease = await grant(cluster.members["witness"].client_url)
        assert await keepalive(osaka, lease) is None  # osaka's member forwards it to tokyo
        cluster.links.cut("osaka", "tokyo")
        # At once, before osaka's member has missed a heartbeat: it still forwards the
        # keepalive to its leader over the peer URL (POST /leases, no X-Server-From), and
        # the cut must stop that too.
        why = await keepalive(osaka, lease)
        print(f"[cluster] cut-wan: a keepalive through osaka's member: {why}")
        assert why is not None, "a lease keepalive crossed the cut osaka-tokyo link"
        assert cluster.links.cut_links() == [("osaka", "tokyo")]
        await reset(cluster, "osaka", "tokyo")
        for site in ("osaka", "tokyo"):

            async def written(site: str = site) -> bool:
                member, failures = await put_through(cluster, site)
                print(f"[cluster] cut-wan: {site} wrote through {member}; failed: {failures}")
                return member is not None

            await eventually(f"a put through {site}'s endpoints", written)
        member, _ = await put_through(cluster, "osaka")
        assert member == "witness", member  # not osaka's own member: the leader is tokyo
        other = cluster.endpoints("osaka")[1]  # osaka's proxy to the tokyo member
        start = time.monotonic()
        why = await put(other, "/test/refused", limit=5.0)
        assert why is not None
        assert time.monotonic() - start < 0.5, why  # refused, not timed out
        await anyio.sleep(1.0)  # etcd keeps redialling: every attempt is refused
        assert await lasting(cluster, "osaka", "tokyo") == set()
        assert cluster.peer_proxies["tokyo"].counts["refused"] >= 1
        assert cluster.peer_proxies["osaka"].counts["refused"] >= 1
        assert peer_connections(cluster, "osaka", "witness") >= 2
        assert peer_connections(cluster, "tokyo", "witness") >= 2


async def test_isolated_site_cannot_write_and_heal_restores(tmp_path: Path) -> None:
    async with running(tmp_path) as cluster:
        cluster.links.isolate("osaka")
        assert cluster.links.cut_links() == [("osaka", "tokyo"), ("osaka", "witness")]
        await reset(cluster, "osaka", "tokyo")
        await reset(cluster, "osaka", "witness")
        start = time.monotonic()
        member, failures = await put_through(cluster, "osaka")
        took = time.monotonic() - start
        print(f"[cluster] osaka isolated: put failed in {took:.2f} s: {failures}")
        assert member is None, f"osaka wrote through {member} while isolated"
        assert took < 3 * ATTEMPT + 0.5  # each endpoint within its timeout

        async def tokyo_writes() -> bool:
            return (await put_through(cluster, "tokyo"))[0] is not None

        took = await eventually("tokyo writes while osaka is isolated", tokyo_writes)
        print(f"[cluster] tokyo writes {took:.2f} s after osaka's isolation")
        member, failures = await put_through(cluster, "osaka")  # still cut off
        assert member is None, failures
        assert await lasting(cluster, "osaka", "tokyo") == set()
        assert await lasting(cluster, "osaka", "witness") == set()

        cluster.links.heal_all()
        assert cluster.links.cut_links() == []

        async def osaka_writes() -> bool:
            # (osaka's member comes back with a higher term and forces an election: writes
            # may fail for a moment after the first one went through)
            for url in cluster.endpoints("osaka"):
                if await put(url, "/test/osaka") is not None:
                    return False
            return True

        took = await eventually("osaka writes through each of its endpoints", osaka_writes)
        print(f"[cluster] heal: osaka writes through each of its endpoints after {took:.2f} s")


async def test_cutting_a_link_resets_its_live_connections_at_once(tmp_path: Path) -> None:
    async with running(tmp_path) as cluster:
        before = peer_connections(cluster, "tokyo", "witness")
        assert before >= 2
        severed = cluster.peer_proxies["witness"].counts["severed"]
        cluster.links.cut("witness", "tokyo")
        took = await reset(cluster, "tokyo", "witness")
        print(f"[cluster] {before} tokyo-witness connections reset in {took * 1000:.0f} ms")
        assert cluster.peer_proxies["witness"].counts["severed"] > severed
        assert peer_connections(cluster, "osaka", "tokyo") >= 2  # other links untouched
        cluster.links.heal("tokyo", "witness")

        async def rejoined() -> bool:
            return peer_connections(cluster, "tokyo", "witness") >= 2

        took = await eventually("tokyo-witness connections again after heal", rejoined)
        print(f"[cluster] heal: tokyo-witness connected again after {took:.2f} s")
