"""EtcdStore against a real etcd (Debian etcd-server 3.4) started by the tests.

One member serves most tests (module scope; each test has its own key prefix); a 3-member
cluster, a TLS member and a member with authentication are started by the tests that need
them.  Answers no etcd would give come from a fake gateway (aiohttp) in the test.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from conftest import need
from helpers import free_port, stop_process
from test_tls import make_ca, make_cert, openssl

from hbmon.arbiter.base import FOREIGN, Owner, OwnerEvent, owner_value, site_value
from hbmon.arbiter.etcd import EtcdStore
from hbmon.arbiter.lease import LeaseTiming
from hbmon.config import ArbiterConfig
from hbmon.errors import ArbiterUnavailable, ConfigError, LeaseLost, OwnerTaken

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
PROGRESS = 0.5  # the members' --experimental-watch-progress-notify-interval, seconds
RT = 2.0  # request_timeout of the stores on the shared member
_prefixes = itertools.count(1)


def need_etcd() -> None:
    need(Path(ETCD).exists(), "the etcd binary is missing (Debian package: etcd-server)")


# -- etcd members ------------------------------------------------------------------------------


@dataclass
class Member:
    name: str
    folder: Path
    scheme: str = "http"
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, cluster: str, extra: tuple[str, ...]) -> None:
        log = (self.folder / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen(
            [
                ETCD, "--name", self.name, "--data-dir", str(self.folder / self.name),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer, "--initial-advertise-peer-urls", self.peer,
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--experimental-watch-progress-notify-interval", f"{PROGRESS * 1000:g}ms",
                "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn", *extra,
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def healthy(self, context: ssl.SSLContext | None) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1, context=context) as r:
                return bool(json.load(r).get("health") == "true")
        except (OSError, ValueError):
            return False


def start_cluster(
    folder: Path,
    size: int,
    *,
    scheme: str = "http",
    extra: tuple[str, ...] = (),
    context: ssl.SSLContext | None = None,
) -> list[Member]:
    need_etcd()
    members = [Member(f"m{i}", folder, scheme) for i in range(size)]
    cluster = ",".join(f"{m.name}={m.peer}" for m in members)
    for m in members:
        m.start(cluster, extra)
    deadline = time.monotonic() + 20
    while not all(m.healthy(context) for m in members):
        for m in members:
            if m.proc is not None and m.proc.poll() is not None:
                log = (folder / f"{m.name}.log").read_text(errors="replace")[-2000:]
                stop_cluster(members)
                pytest.fail(f"etcd {m.name} exited with {m.proc.returncode}:\n{log}")
        if time.monotonic() > deadline:
            stop_cluster(members)
            pytest.fail(f"etcd cluster of {size} in {folder} not healthy within 20 s")
        time.sleep(0.05)
    return members


def stop_cluster(members: list[Member]) -> None:
    for m in members:
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGCONT)
            stop_process(m.proc, timeout=5)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Member]:
    (member,) = members = start_cluster(tmp_path_factory.mktemp("etcd"), 1)
    yield member
    stop_cluster(members)


@pytest.fixture
def prefix() -> str:
    return f"/t{next(_prefixes)}"


Opener = Callable[..., EtcdStore]


@pytest.fixture
async def opener() -> AsyncIterator[Opener]:
    """``opener(*args, **kwargs)`` or ``opener(cfg)``: an EtcdStore closed after the test."""
    made: list[EtcdStore] = []

    def open_store(*args: Any, **kwargs: Any) -> EtcdStore:
        if isinstance(args[0], ArbiterConfig):
            made.append(EtcdStore.from_config(args[0]))
        else:
            made.append(EtcdStore(*args, **kwargs))
        return made[-1]

    yield open_store
    for s in made:
        await s.aclose()


@pytest.fixture
def store(etcd: Member, prefix: str, opener: Opener) -> EtcdStore:
    return opener([etcd.url], prefix, RT, heartbeat=3 * PROGRESS + 1)


async def gateway(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """One raw gateway request, for what hbmon itself would never write."""
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as r:
        doc: dict[str, Any] = await r.json(content_type=None)
        assert r.status == 200, doc
        return doc


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def raw_put(url: str, key: str, value: str) -> None:
    await gateway(url, "/v3/kv/put", {"key": b64(key), "value": b64(value)})


async def raw_get(url: str, key: str) -> str | None:
    kvs = (await gateway(url, "/v3/kv/range", {"key": b64(key)})).get("kvs", [])
    return base64.b64decode(kvs[0].get("value", "")).decode() if kvs else None


def ms(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=100)
    return f"median {statistics.median(samples) * 1e3:.2f} ms, p99 {q[98] * 1e3:.2f} ms"


# -- leases ------------------------------------------------------------------------------------


@pytest.mark.tools
async def test_lease_grant_keepalive_time_left_revoke(store: EtcdStore) -> None:
    lease = await store.grant(2.2)  # rounded up to 3 s
    left = await store.time_left(lease)
    assert left is not None
    assert 1 <= left <= 3
    samples = []
    for _ in range(100):
        sent = time.monotonic()
        assert await store.keepalive(lease) == 3.0
        samples.append(time.monotonic() - sent)
    print(f"\nkeepalive round trip on localhost: {ms(samples)}")
    assert statistics.median(samples) < RT
    await store.revoke(lease)
    assert await store.time_left(lease) is None
    with pytest.raises(LeaseLost, match="no longer exists"):
        await store.keepalive(lease)
    await store.revoke(lease)  # a lease already gone is not an error
    with pytest.raises(LeaseLost):
        await store.register("osaka", lease)
    with pytest.raises(LeaseLost):
        await store.claim("db1", "osaka", lease)


@pytest.mark.tools
async def test_expiry_deletes_owner_and_site_keys_and_the_watch_sees_it(
    store: EtcdStore, etcd: Member
) -> None:
    lease = await store.grant(2)
    await store.register("osaka", lease)
    owner = await store.claim("db1", "osaka", lease)
    seen: list[OwnerEvent] = []
    started = time.monotonic()
    with anyio.fail_after(6):
        async for event in store.watch(owner.revision - 1):
            seen.append(event)
            if event.owner is None:
                break
    took = time.monotonic() - started
    assert [e.owner for e in seen] == [owner, None]
    assert 1.0 <= took < 4.5, f"the lease of 2 s expired after {took:.2f} s"
    view = await store.view()
    assert view.owners == {}
    assert view.sites == {}
    assert view.terms == {"db1": 1}  # the term key has no lease: it stays
    assert view.revision == seen[-1].revision
    assert await store.time_left(lease) is None
    with pytest.raises(LeaseLost):
        await store.keepalive(lease)


# -- ownership ---------------------------------------------------------------------------------


@pytest.mark.tools
async def test_claim_release_and_terms(store: EtcdStore) -> None:
    osaka, tokyo = await store.grant(30), await store.grant(30)
    first = await store.claim("db1", "osaka", osaka)
    assert (first.site, first.term, first.lease) == ("osaka", 1, osaka)
    with pytest.raises(OwnerTaken) as taken:
        await store.claim("db1", "tokyo", tokyo)
    assert (taken.value.holder, taken.value.term) == ("osaka", 1)
    with pytest.raises(OwnerTaken):  # without keep, not even the holder takes it again
        await store.claim("db1", "osaka", osaka)
    assert await store.claim("db1", "osaka", osaka, keep=True) == first
    await store.release(first)
    assert (await store.view()).owners == {}
    again = await store.claim("db1", "osaka", osaka)
    assert (again.term, (await store.view()).owners["db1"]) == (2, again)
    with pytest.raises(OwnerTaken, match="osaka at term 2"):
        await store.release(first)  # no longer exactly that key
    await store.release(again)
    second = await store.claim("db1", "tokyo", tokyo)
    assert (second.site, second.term) == ("tokyo", 3)
    await store.release(second)
    await store.release(second)  # already gone: nothing to do
    samples = []
    for _ in range(30):
        sent = time.monotonic()
        owner = await store.claim("db2", "osaka", osaka)
        samples.append(time.monotonic() - sent)
        await store.release(owner)
    print(f"\nclaim round trip on localhost (read + txn): {ms(samples)}")
    assert (await store.view()).terms["db2"] == 30


@pytest.mark.tools
async def test_claim_reads_again_when_only_the_term_moved(
    store: EtcdStore, etcd: Member, prefix: str, opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another site claims and releases the pair between our read and our transaction:
    the term compare fails, the claim reads again and takes the term after the other's."""
    other = opener([etcd.url], prefix, RT)
    osaka, tokyo = await store.grant(30), await other.grant(30)
    read = store._read
    raced: list[Owner] = []

    async def racing_read(*keys: str) -> Any:
        kvs = await read(*keys)
        if not raced:
            raced.append(await other.claim("db1", "tokyo", tokyo))
            await other.release(raced[0])
        return kvs

    monkeypatch.setattr(store, "_read", racing_read)
    owner = await store.claim("db1", "osaka", osaka)
    assert raced[0].term == 1
    assert (owner.site, owner.term) == ("osaka", 2)
    assert (await store.view()).terms == {"db1": 2}


@pytest.mark.tools
async def test_a_claim_whose_answer_was_lost_is_still_ours(
    etcd: Member, prefix: str, opener: Opener
) -> None:
    """The first endpoint passes a transaction on to etcd but loses the answer: the claim
    is asked again at the next endpoint, whose compare fails on the key the first attempt
    wrote; that key is this claim's, not someone else's."""
    hold = anyio.Event()

    async def lossy(request: web.Request) -> web.Response:
        body = await request.read()
        async with aiohttp.ClientSession() as s, s.post(etcd.url + request.path, data=body) as r:
            answer = await r.read()
        if json.loads(body).get("compare"):
            await hold.wait()
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_post("/{path:.*}", lossy)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        store = opener([f"http://127.0.0.1:{runner.addresses[0][1]}", etcd.url], prefix, 0.5)
        lease = await opener([etcd.url], prefix, RT).grant(30)
        started = time.monotonic()
        owner = await store.claim("db1", "osaka", lease)
        assert time.monotonic() - started >= 0.5  # the first answer was lost
        assert (owner.site, owner.term, owner.lease) == ("osaka", 1, lease)
        assert (await store.view()).owners == {"db1": owner}
    finally:
        hold.set()
        await runner.cleanup()


@pytest.mark.tools
async def test_keep_moves_the_key_to_a_new_lease_with_the_same_term(store: EtcdStore) -> None:
    old, new = await store.grant(30), await store.grant(30)
    first = await store.claim("db1", "osaka", old)
    kept = await store.claim("db1", "osaka", new, keep=True)
    assert (kept.term, kept.lease) == (1, new)
    assert kept.revision > first.revision
    await store.revoke(old)  # the key no longer hangs on the old lease
    assert (await store.view()).owners["db1"] == kept
    with pytest.raises(OwnerTaken, match="osaka at term 1"):
        await store.claim("db1", "tokyo", await store.grant(30), keep=True)
    await store.revoke(new)
    assert (await store.view()).owners == {}


@pytest.mark.tools
async def test_concurrent_candidates_exactly_one_wins(store: EtcdStore) -> None:
    leases = [await store.grant(30) for _ in range(6)]
    won: list[Owner] = []
    lost: list[OwnerTaken] = []

    async def candidate(i: int) -> None:
        try:
            won.append(await store.claim("db1", f"site{i}", leases[i]))
        except OwnerTaken as err:
            lost.append(err)

    async with anyio.create_task_group() as tg:
        for i in range(len(leases)):
            tg.start_soon(candidate, i)
    assert len(won) == 1
    assert len(lost) == 5
    assert won[0].term == 1
    assert {e.holder for e in lost} == {won[0].site}


@pytest.mark.tools
async def test_hand_over(store: EtcdStore) -> None:
    osaka, tokyo = await store.grant(30), await store.grant(30)
    await store.register("tokyo", tokyo)
    owner = await store.claim("db1", "osaka", osaka)
    with pytest.raises(LeaseLost, match="'nagoya' holds no lease"):
        await store.hand_over(owner, "nagoya")
    moved = await store.hand_over(owner, "tokyo")
    assert (moved.site, moved.term, moved.lease) == ("tokyo", 2, tokyo)
    view = await store.view()
    assert view.owners["db1"] == moved
    assert view.terms["db1"] == 2
    with pytest.raises(OwnerTaken, match="tokyo at term 2"):
        await store.hand_over(owner, "tokyo")  # no longer exactly that owner
    await store.revoke(tokyo)  # the handed-over key hangs on tokyo's lease
    assert (await store.view()).owners == {}
    with pytest.raises(OwnerTaken, match="no one"):
        await store.hand_over(moved, "osaka")


@pytest.mark.tools
async def test_foreign_keys_are_reported_and_never_overwritten(
    store: EtcdStore, etcd: Member, prefix: str
) -> None:
    lease = await store.grant(30)
    foreign = {
        f"{prefix}/owner/junk": "not json",
        f"{prefix}/owner/nolease": owner_value("osaka", 4, lease),  # not attached to it
        f"{prefix}/term/db2": '{"term": "7"}',
        f"{prefix}/site/osaka": site_value("kyoto", lease),
        f"{prefix}/other/x": "{}",
    }
    for key, value in foreign.items():
        await raw_put(etcd.url, key, value)
    await store.claim("db1", "osaka", lease)
    view = await store.view()
    assert sorted(view.foreign) == sorted(foreign)
    assert list(view.owners) == ["db1"]
    assert view.terms == {"db1": 1}
    assert view.sites == {}
    for pair in ("junk", "nolease", "db2"):
        with pytest.raises(OwnerTaken) as taken:
            await store.claim(pair, "osaka", lease, keep=True)
        assert taken.value.holder == FOREIGN
    for key, value in foreign.items():
        assert await raw_get(etcd.url, key) == value


@pytest.mark.tools
async def test_start_claims_take_many_pairs_a_transaction_and_answer_each(
    store: EtcdStore, etcd: Member, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """claim_many: 70 pairs in 3 transactions of claims (32 a batch), each new pair at
    term 1 with its batch's revision; a pair this lease holds is answered as it is, one
    held under this site's old lease moves to the new lease with its term, one of
    another site and a foreign key are OwnerTaken, and nothing of theirs is written."""
    old, lease, tokyo = await store.grant(30), await store.grant(30), await store.grant(30)
    kept = await store.claim("p000", "osaka", lease)
    moved = await store.claim("p001", "osaka", old)
    other = await store.claim("p002", "tokyo", tokyo)
    await raw_put(etcd.url, f"{prefix}/owner/p003", "garbage")
    pairs = [f"p{n:03d}" for n in range(70)]
    txns = 0
    real_txn = store._txn

    async def counting(*args: Any, **kw: Any) -> Any:
        nonlocal txns
        txns += bool(args[1])  # (a transaction that writes)
        return await real_txn(*args, **kw)

    monkeypatch.setattr(store, "_txn", counting)
    answers = await store.claim_many(pairs, "osaka", lease)
    assert sorted(answers) == pairs
    assert answers["p000"] == kept
    assert answers["p001"] == replace(moved, lease=lease, revision=answers["p001"].revision)
    for pair, holder in (("p002", "tokyo"), ("p003", FOREIGN)):
        taken = answers[pair]
        assert isinstance(taken, OwnerTaken)
        assert taken.holder == holder
    new = {p: answers[p] for p in pairs[4:]}
    assert all(isinstance(o, Owner) and (o.term, o.lease) == (1, lease) for o in new.values())
    assert len({o.revision for o in new.values() if isinstance(o, Owner)}) == 3  # 3 batches
    assert txns == 3
    view = await store.view()
    assert view.owners["p002"] == other
    assert {p for p, o in view.owners.items() if o.lease == lease} == set(pairs) - {"p002", "p003"}
    assert await raw_get(etcd.url, f"{prefix}/owner/p003") == "garbage"


@pytest.mark.tools
async def test_a_start_claim_batch_that_lost_a_race_is_claimed_pair_by_pair(
    store: EtcdStore, etcd: Member, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the batch's read and its transaction another site takes p01: the batch's
    compares fail, nothing of it is written, and each pair is claimed on its own: p01 is
    OwnerTaken, the others are osaka's."""
    lease, tokyo = await store.grant(30), await store.grant(30)
    real_read = store._read
    raced = False

    async def racing(*keys: str) -> Any:
        nonlocal raced
        found = await real_read(*keys)
        if not raced and len(keys) > 2:
            raced = True
            await store.claim("p01", "tokyo", tokyo)
        return found

    monkeypatch.setattr(store, "_read", racing)
    answers = await store.claim_many(["p00", "p01", "p02"], "osaka", lease)
    assert raced
    assert isinstance(answers["p01"], OwnerTaken)
    assert answers["p01"].holder == "tokyo"
    for pair in ("p00", "p02"):
        owner = answers[pair]
        assert isinstance(owner, Owner)
        assert (owner.site, owner.term, owner.lease) == ("osaka", 1, lease)
    assert answers["p00"].revision != answers["p02"].revision  # (one by one, not the batch)


# -- watch -------------------------------------------------------------------------------------


@pytest.mark.tools
async def test_watch_sees_puts_and_deletes_and_tells_foreign_values(
    store: EtcdStore, etcd: Member, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    osaka, tokyo = await store.grant(30), await store.grant(30)
    await store.register("tokyo", tokyo)
    start = (await store.view()).revision
    first = await store.claim("db1", "osaka", osaka)
    await raw_put(etcd.url, f"{prefix}/owner/db9", "garbage")
    await raw_put(etcd.url, f"{prefix}/term/db1", '{"term": 5}')  # not an owner key
    moved = await store.hand_over(first, "tokyo")
    await store.release(moved)
    seen: list[OwnerEvent] = []
    with anyio.fail_after(5):
        async for event in store.watch(start):
            seen.append(event)
            if len(seen) == 4:
                break
    assert seen == [
        OwnerEvent("db1", first, first.revision),
        OwnerEvent("db9", None, first.revision + 1, foreign=True),  # never "deleted"
        OwnerEvent("db1", moved, moved.revision),
        OwnerEvent("db1", None, moved.revision + 1),
    ]
    assert moved.term == 6
    assert f"{prefix}/owner/db9 does not hold an owner" in caplog.text


@pytest.mark.tools
async def test_watch_of_a_compacted_revision_is_unavailable(store: EtcdStore, etcd: Member) -> None:
    lease = await store.grant(30)
    old = await store.claim("db1", "osaka", lease)
    await store.release(old)
    now = (await store.view()).revision
    await gateway(etcd.url, "/v3/kv/compaction", {"revision": str(now)})
    with pytest.raises(ArbiterUnavailable, match="compacted"), anyio.fail_after(5):
        async for _ in store.watch(old.revision - 2):
            pass


@pytest.mark.tools
async def test_an_idle_watch_lives_on_progress_and_a_frozen_member_ends_it(
    store: EtcdStore, etcd: Member
) -> None:
    """heartbeat = 3 x the progress interval + 1 s: an idle watch outlives it on progress
    notifications alone; once the member freezes (SIGSTOP), nothing comes at all."""
    assert store.heartbeat == 3 * PROGRESS + 1
    outcome: list[OwnerEvent | ArbiterUnavailable] = []
    ended = anyio.Event()

    async def consume(revision: int) -> None:
        try:
            async for event in store.watch(revision):
                outcome.append(event)
        except ArbiterUnavailable as err:
            outcome.append(err)
        ended.set()

    async with anyio.create_task_group() as tg:
        revision = (await store.view()).revision
        await store.aclose()  # no connection but the watch's (the store opens a new session)
        tg.start_soon(consume, revision)
        await anyio.sleep(store.heartbeat + 1)
        assert outcome == []
        ss = await anyio.run_process(
            ["ss", "-tnopH", "state", "established", "dport", f"= :{etcd.client_port}"],
            check=False,
        )
        assert ss.returncode == 0, ss.stderr  # the watch's connection has TCP keepalive armed
        mine = [line for line in ss.stdout.splitlines() if f"pid={os.getpid()},".encode() in line]
        assert len(mine) == 1, ss.stdout  # the watch's (the other calls' went with aclose)
        timer = re.search(rb"timer:\(keepalive,([\d.]+)(ms|sec)", mine[0])
        assert timer is not None, mine  # not minutes, as with the kernel's default
        assert float(timer[1]) / (1000 if timer[2] == b"ms" else 1) <= RT, mine
        etcd.signal(signal.SIGSTOP)
        try:
            frozen = time.monotonic()
            with anyio.fail_after(store.heartbeat + 3):
                await ended.wait()
            took = time.monotonic() - frozen
        finally:
            etcd.signal(signal.SIGCONT)
    assert len(outcome) == 1
    assert isinstance(outcome[0], ArbiterUnavailable)
    assert "nothing received for 2.5 s" in str(outcome[0])
    assert store.heartbeat - 0.6 <= took < store.heartbeat + 1.5, f"{took:.2f} s"
    assert (await store.view()).revision > 0


# -- several endpoints -------------------------------------------------------------------------


async def status(url: str) -> dict[str, Any]:
    return await gateway(url, "/v3/maintenance/status", {})


@pytest.mark.tools
async def test_cluster_calls_go_on_through_the_other_members(
    tmp_path: Path, opener: Opener
) -> None:
    members = start_cluster(tmp_path, 3)
    rt = 1.0
    try:
        docs = [await status(m.url) for m in members]
        leader = next(m for m, d in zip(members, docs, strict=True)
                      if d["leader"] == d["header"]["member_id"])  # fmt: skip
        f1, f2 = (m for m in members if m is not leader)
        urls = [f1.url, f2.url, leader.url]
        store = opener(urls, "/c", rt)
        lease = await store.grant(30)
        owner = await store.claim("db1", "osaka", lease)

        f1.signal(signal.SIGSTOP)  # the first endpoint stops answering: a timeout
        started = time.monotonic()
        assert (await store.view()).owners["db1"] == owner
        took = time.monotonic() - started
        assert rt - 0.05 <= took < 2 * rt, f"{took:.2f} s"
        started = time.monotonic()  # the endpoint that answered is asked first now
        assert await store.keepalive(lease) == 30.0
        assert time.monotonic() - started < rt / 2

        f1.kill()  # the first endpoint is gone: connection refused
        fresh = opener(urls, "/c", rt)
        started = time.monotonic()
        tokyo = await fresh.grant(30)
        assert time.monotonic() - started < rt / 2
        with pytest.raises(OwnerTaken, match="osaka at term 1"):
            await fresh.claim("db1", "tokyo", tokyo)
        await fresh.release(owner)
        assert (await store.claim("db1", "osaka", lease)).term == 2

        f2.signal(signal.SIGSTOP)  # no quorum left: the leader alone cannot answer
        started = time.monotonic()
        with pytest.raises(ArbiterUnavailable) as err:
            await store.view()
        took = time.monotonic() - started
        assert took < 2 * rt + 0.3, f"{took:.2f} s"
        message = str(err.value)
        assert f"{f2.url}: no answer within 1 s" in message
        assert f"{f1.url}: ClientConnectorError" in message  # refused at once
        assert f"{leader.url}: " in message  # no answer, or "no leader"
    finally:
        stop_cluster(members)


# -- answers that are not answers (no etcd needed) ---------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[str]:
    """A gateway that answers /MODE/v3/... according to MODE."""
    stop = anyio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        mode = request.match_info["mode"]
        header = {"header": {"revision": "3"}}
        if mode.startswith("hang"):
            await stop.wait()
        if mode == "notjson":
            return web.Response(text="<html>proxy error</html>")
        if mode == "http500":
            return web.Response(status=500, text="Internal Server Error")
        if mode == "etcderror":
            body = {"error": "etcdserver: no leader", "message": "etcdserver: no leader"}
            return web.json_response({**body, "code": 14}, status=503)
        if mode == "lost":  # keepalive of a lease that is gone: no TTL
            return web.json_response({"result": {**header, "ID": "7"}})
        if mode in ("watchjunk", "watchend"):
            resp = web.StreamResponse()
            await resp.prepare(request)
            await resp.write(json.dumps({"result": {**header, "created": True}}).encode() + b"\n")
            if mode == "watchjunk":
                await resp.write(b"{not json}\n")
            return resp
        answers: dict[str, Any] = {
            "noheader": {"kvs": []},
            "norevision": {"header": {"member_id": "1"}},
            "badkvs": {**header, "kvs": [{"key": "%%%", "mod_revision": "2"}]},
            "badresult": {"result": {}},
            "array": [1, 2],
        }
        return web.json_response(answers[mode])

    app = web.Application()
    app.router.add_post("/{mode}/v3/{path:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    stop.set()
    await runner.cleanup()


@pytest.mark.parametrize(
    ("mode", "problem"),
    [
        ("notjson", "HTTP 200, not JSON: b'<html>proxy error"),
        ("http500", "HTTP 500, not JSON: b'Internal Server Error'"),
        ("etcderror", "HTTP 503, etcd error: etcdserver: no leader"),
        ("noheader", "the answer's 'header' is None, not dict"),
        ("norevision", "the answer's 'revision' is None, not int"),
        ("badkvs", "a key or value is not base64 UTF-8"),
        ("array", "HTTP 200, not a JSON object"),
    ],
)
async def test_answers_that_are_not_etcd_answers(
    fake: str, mode: str, problem: str, opener: Opener
) -> None:
    with pytest.raises(ArbiterUnavailable) as err:
        await opener([f"{fake}/{mode}"], "/f", 1.0).view()
    assert f"{fake}/{mode}: {problem}" in str(err.value)


async def test_stream_answers_that_are_not_etcd_answers(fake: str, opener: Opener) -> None:
    lost = opener([f"{fake}/lost"], "/f", 1.0)
    with pytest.raises(LeaseLost):  # an answer with a header but no TTL
        await lost.keepalive(7)
    with pytest.raises(ArbiterUnavailable, match="not 8"):
        await lost.keepalive(8)
    with pytest.raises(ArbiterUnavailable, match="'header' is None, not dict"):
        await opener([f"{fake}/badresult"], "/f", 1.0).keepalive(7)
    for mode, problem in (
        ("watchjunk", "broke: HTTP 200, not JSON: b'{not json}'"),
        ("watchend", "broke: the stream ended"),
        ("http500", "watch: .*/http500: HTTP 500"),
    ):
        store = opener([f"{fake}/{mode}"], "/f", 1.0)
        with pytest.raises(ArbiterUnavailable, match=problem), anyio.fail_after(3):
            async for _ in store.watch(1):
                pass


async def test_unreachable_endpoints_give_up_within_twice_the_request_timeout(
    fake: str, opener: Opener
) -> None:
    closed = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
    store = opener(closed, "/f", 1.0)
    started = time.monotonic()
    with pytest.raises(ArbiterUnavailable) as err:
        await store.grant(5)
    assert time.monotonic() - started < 0.5
    for url in closed:
        assert f"{url}: ClientConnectorError" in str(err.value)

    hanging = [f"{fake}/hang0", f"{fake}/hang1", f"{fake}/hang2"]
    store = opener(hanging, "/f", 0.5)
    for call in (store.view(), store.keepalive(1), store.claim("db1", "osaka", 1)):
        started = time.monotonic()
        with pytest.raises(ArbiterUnavailable) as err:
            await call
        took = time.monotonic() - started
        assert 0.95 <= took < 1.3, f"{took:.2f} s"
        message = str(err.value)
        assert f"{hanging[0]}: no answer within 0.5 s; {hanging[1]}: no answer within" in message
        assert f"{hanging[2]}: not tried" in message


# -- TLS and authentication --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(shutil.which("openssl") is not None, "the openssl command is missing")
    folder = tmp_path_factory.mktemp("pki")
    make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    # etcd's gateway dials its own gRPC port with the server certificate: clientAuth too
    both = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
    make_cert(folder, "server", "ca", both)
    make_cert(folder, "client", "ca", "extendedKeyUsage=clientAuth\n")
    openssl("pkey", "-in", "client.key", "-aes256", "-passout", "pass:secret",
            "-out", "encrypted.key", cwd=folder)  # fmt: skip
    (folder / "encrypted.key").chmod(0o600)
    return folder


@pytest.mark.tools
async def test_tls_right_and_wrong_ca(tmp_path: Path, pki: Path, opener: Opener) -> None:
    good = ssl.create_default_context(cafile=pki / "ca.crt")
    good.load_cert_chain(pki / "client.crt", pki / "client.key")
    tls = (
        "--cert-file", str(pki / "server.crt"), "--key-file", str(pki / "server.key"),
        "--trusted-ca-file", str(pki / "ca.crt"), "--client-cert-auth",
    )  # fmt: skip
    members = start_cluster(tmp_path, 1, scheme="https", extra=tls, context=good)
    url = members[0].url
    cfg = ArbiterConfig(
        endpoints=(url,), prefix="/s", timing=LeaseTiming(request_timeout=1.0),
        ca_file=pki / "ca.crt", cert_file=pki / "client.crt", key_file=pki / "client.key",
    )  # fmt: skip
    try:
        store = opener(cfg)
        owner = await store.claim("db1", "osaka", await store.grant(10))
        assert (await store.view()).owners == {"db1": owner}

        wrong = ssl.create_default_context(cafile=pki / "other-ca.crt")
        with pytest.raises(ArbiterUnavailable) as err:
            await opener([url], "/s", 1.0, ssl_context=wrong).view()
        assert f"{url}: TLS: " in str(err.value)
        assert "certificate verify failed" in str(err.value)

        no_cert = ssl.create_default_context(cafile=pki / "ca.crt")
        with pytest.raises(ArbiterUnavailable, match=url):  # etcd wants a client certificate
            await opener([url], "/s", 1.0, ssl_context=no_cert).view()
    finally:
        stop_cluster(members)
    with pytest.raises(ConfigError, match=r"arbiter\.key_file: cannot be loaded"):
        EtcdStore.from_config(replace(cfg, key_file=pki / "encrypted.key"))  # and no prompt
    (pki / "client.key").chmod(0o644)
    try:
        with pytest.raises(ConfigError, match=r"arbiter\.key_file: secret file is world-readable"):
            EtcdStore.from_config(cfg)
    finally:
        (pki / "client.key").chmod(0o600)


@pytest.mark.tools
async def test_user_and_password(tmp_path: Path, opener: Opener) -> None:
    (member,) = members = start_cluster(tmp_path, 1, extra=("--auth-token-ttl", "1"))
    url = member.url
    secret = tmp_path / "password"
    secret.write_text("s3cret pw\n")
    secret.chmod(0o600)
    cfg = ArbiterConfig(endpoints=(url,), prefix="/a", user="hbmon", password_file=secret)
    try:
        for path, body in (
            ("/v3/auth/user/add", {"name": "root", "password": "rootpw"}),
            ("/v3/auth/role/add", {"name": "root"}),
            ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
            ("/v3/auth/user/add", {"name": "hbmon", "password": "s3cret pw"}),
            ("/v3/auth/role/add", {"name": "hbmon"}),
            ("/v3/auth/role/grant", {"name": "hbmon", "perm": {
                "permType": "READWRITE", "key": b64("/a/"), "range_end": b64("/a0")}}),
            ("/v3/auth/user/grant", {"user": "hbmon", "role": "hbmon"}),
            ("/v3/auth/enable", {}),
        ):  # fmt: skip
            await gateway(url, path, body)
        store = opener(cfg)
        owner = await store.claim("db1", "osaka", await store.grant(30))
        tokens = [store._token]  # peeked at to see a new token fetched
        await store.view()
        assert store._token == tokens[0]  # a token is used until etcd refuses it
        await anyio.sleep(2.2)  # --auth-token-ttl 1: the simple token expires
        async for event in store.watch(owner.revision - 1):  # refused first: cancel_reason
            assert event == OwnerEvent("db1", owner, owner.revision)
            break
        tokens.append(store._token)
        await anyio.sleep(2.2)
        assert (await store.view()).owners == {"db1": owner}  # refused first: an error
        tokens.append(store._token)
        assert len(set(tokens)) == 3, tokens

        for user, password, problem in (
            ("hbmon", "wrong", "authentication failed"),
            (None, None, "user name is empty"),
        ):
            with pytest.raises(ArbiterUnavailable, match=f"{url}: .*{problem}"):
                await opener([url], "/a", 1.0, user=user, password=password).view()
        with pytest.raises(ArbiterUnavailable, match="permission denied"):
            await opener([url], "/b", 1.0, user="hbmon", password="s3cret pw").view()
    finally:
        stop_cluster(members)
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=r"arbiter\.password_file: secret file is world-readable"):
        EtcdStore.from_config(cfg)
