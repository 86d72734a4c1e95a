"""An in-memory :class:`~hbmon.arbiter.base.Store` on an injected clock: unit tests ONLY.

It keeps etcd's semantics where hbmon depends on them: one revision counter bumped once
per write transaction (the keys a transaction writes share its revision), leases that
expire on the clock (never early; checked lazily at every call and by :meth:`expire`),
owner keys deleted with their lease, the term key that only grows, watches that replay
changes after a revision and then deliver them as they happen.

Knobs for tests: :attr:`unavailable` (every call raises ArbiterUnavailable at once, and
open watches break), :attr:`delay` (seconds of the clock a call takes before the store
handles it), :meth:`pause`/:meth:`resume` (calls wait unanswered, like a frozen etcd), and
:attr:`deadline` (the store's own bound on one call, as EtcdStore's 2 x request_timeout:
a call not answered by then raises ArbiterUnavailable).  It is never the arbiter of the
partition tests or of the demo.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from hbmon.arbiter.base import (
    OWNER,
    SITE,
    TERM,
    Owner,
    OwnerEvent,
    OwnerView,
    Store,
    owner_value,
    parse_owner,
    parse_term,
    parse_term_site,
    site_value,
    term_value,
)
from hbmon.clock import Clock
from hbmon.errors import ArbiterUnavailable, LeaseLost, OwnerTaken

FIRST_LEASE = 0x694D_0000_0001  # lease ids look like etcd's: large, not 1, 2, 3


@dataclass(slots=True)
class _Key:
    value: str
    mod_revision: int
    lease: int = 0


@dataclass(slots=True)
class _Lease:
    ttl: float
    expires_at: float
    keys: set[str] = field(default_factory=set)


class MemoryStore(Store):
    """See the module docstring."""

    def __init__(self, clock: Clock, prefix: str = "/hbmon", *, deadline: float = 4.0) -> None:
        self.clock = clock
        self.prefix = prefix
        self.deadline = deadline
        self.delay = 0.0
        self.calls: Counter[str] = Counter()  # method name -> calls made (answered or not)
        self.sent: list[tuple[float, str]] = []  # (clock time, method) of every call
        self.revision = 1
        self.kv: dict[str, _Key] = {}
        self.leases: dict[int, _Lease] = {}
        self.history: list[OwnerEvent] = []  # every owner-key change, oldest first
        self._unavailable = False
        self._resumed: anyio.Event | None = None  # set while paused
        self._next_lease = FIRST_LEASE
        self._watchers: list[MemoryObjectSendStream[OwnerEvent | ArbiterUnavailable]] = []

    # -- knobs --------------------------------------------------------------------------

    @property
    def unavailable(self) -> bool:
        return self._unavailable

    @unavailable.setter
    def unavailable(self, value: bool) -> None:
        self._unavailable = value
        if value:
            self.break_watches("the memory store became unavailable")

    def pause(self) -> None:
        """Hold every answer (calls in flight and new ones) until :meth:`resume`."""
        if self._resumed is None:
            self._resumed = anyio.Event()

    def resume(self) -> None:
        if self._resumed is not None:
            self._resumed.set()
            self._resumed = None

    def break_watches(self, why: str = "the watch stream broke") -> None:
        for stream in self._watchers:
            stream.send_nowait(ArbiterUnavailable(f"memory store: {why}"))
        self._watchers.clear()

    def put_raw(self, key: str, value: str, lease: int = 0) -> None:
        """Write any value (a key hbmon did not write, say), as another etcd client could."""
        self._put(key, value, lease, self._bump())
        self._notify(key)

    def lease_expires_at(self, lease: int) -> float | None:
        """When the store will expire ``lease`` (None: it does not exist)."""
        held = self.leases.get(lease)
        return None if held is None else held.expires_at

    def expire(self) -> list[int]:
        """Expire every lease whose time has come (deleting its keys); the ids expired."""
        now = self.clock.monotonic()
        gone = [lease for lease, held in self.leases.items() if held.expires_at <= now]
        for lease in gone:
            self._end_lease(lease)
        return gone

    # -- the Store interface ------------------------------------------------------------

    async def grant(self, ttl: float) -> int:
        await self._enter("grant")
        lease, self._next_lease = self._next_lease, self._next_lease + 1
        whole = float(math.ceil(ttl))
        self.leases[lease] = _Lease(whole, self.clock.monotonic() + whole)
        return lease

    async def keepalive(self, lease: int) -> float:
        await self._enter("keepalive")
        held = self._lease(lease)
        held.expires_at = self.clock.monotonic() + held.ttl
        return held.ttl

    async def revoke(self, lease: int) -> None:
        await self._enter("revoke")
        if lease in self.leases:
            self._end_lease(lease)

    async def time_left(self, lease: int) -> float | None:
        await self._enter("time_left")
        held = self.leases.get(lease)
        return None if held is None else held.expires_at - self.clock.monotonic()

    async def view(self) -> OwnerView:
        await self._enter("view")
        owners: dict[str, Owner] = {}
        terms: dict[str, int] = {}
        last_owner: dict[str, str] = {}
        sites: dict[str, int] = {}
        foreign: list[str] = []
        base = self.prefix.rstrip("/") + "/"
        for key, item in sorted(self.kv.items()):
            kind, _, name = key[len(base) :].partition("/")
            try:
                if kind == OWNER and name:
                    owners[name] = parse_owner(name, item.value, item.mod_revision)
                elif kind == TERM and name:
                    terms[name] = parse_term(name, item.value)
                    if (took := parse_term_site(name, item.value)) is not None:
                        last_owner[name] = took
                elif kind == SITE and name:
                    sites[name] = _parse_site(name, item.value)
                else:
                    foreign.append(key)
            except ArbiterUnavailable:
                foreign.append(key)
        return OwnerView(self.revision, owners, terms, sites, tuple(foreign), last_owner)

    async def register(self, site: str, lease: int) -> None:
        await self._enter("register")
        self._lease(lease)
        self._put(self.key(SITE, site), site_value(site, lease), lease, self._bump())

    async def claim(self, pair: str, site: str, lease: int, *, keep: bool = False) -> Owner:
        await self._enter("claim")
        self._lease(lease)
        key = self.key(OWNER, pair)
        held = self._owner(pair)
        if held is not None:
            if not (keep and held.site == site):
                raise OwnerTaken(pair, held.site, held.term)
            term = held.term
        else:
            term = self._term(pair) + 1
        revision = self._bump()
        if held is None:
            self._put(self.key(TERM, pair), term_value(term, site), 0, revision)
        self._put(key, owner_value(site, term, lease), lease, revision)
        self._notify(key)
        return Owner(pair, site, term, lease, revision)

    async def release(self, owner: Owner) -> None:
        await self._enter("release")
        key = self.key(OWNER, owner.pair)
        item = self.kv.get(key)
        if item is None:
            return  # already gone (expired, revoked): what release wanted
        if item.mod_revision != owner.revision:
            held = parse_owner(owner.pair, item.value, item.mod_revision)  # (or: foreign)
            raise OwnerTaken(owner.pair, held.site, held.term)
        self._bump()
        self._delete(key)
        self._notify(key)

    async def hand_over(self, owner: Owner, site: str) -> Owner:
        await self._enter("hand_over")
        key = self.key(OWNER, owner.pair)
        item = self.kv.get(key)
        if item is None or item.mod_revision != owner.revision:
            held = self._owner(owner.pair) if item is not None else None
            raise OwnerTaken(owner.pair, held.site if held else "nobody", None)
        registered = self.kv.get(self.key(SITE, site))
        if registered is None or registered.lease not in self.leases:
            raise LeaseLost(f"site {site!r} holds no lease at the arbiter (is its hbmon running?)")
        term = self._term(owner.pair) + 1
        revision = self._bump()
        self._put(self.key(TERM, owner.pair), term_value(term, site), 0, revision)
        self._put(key, owner_value(site, term, registered.lease), registered.lease, revision)
        self._notify(key)
        return Owner(owner.pair, site, term, registered.lease, revision)

    async def watch(self, revision: int) -> AsyncIterator[OwnerEvent]:
        await self._enter("watch")
        send, receive = anyio.create_memory_object_stream[OwnerEvent | ArbiterUnavailable](
            math.inf
        )
        backlog = [event for event in self.history if event.revision > revision]
        self._watchers.append(send)
        try:
            for event in backlog:
                yield event
            async with receive:
                async for item in receive:
                    if isinstance(item, ArbiterUnavailable):
                        raise item
                    yield item
        finally:
            if send in self._watchers:
                self._watchers.remove(send)
            send.close()

    async def aclose(self) -> None:
        self.break_watches("the memory store was closed")

    # -- inside ---------------------------------------------------------------------------

    async def _enter(self, name: str) -> None:
        """A call arrives: count it, take :attr:`delay`, wait out a pause, then expire what
        is due.  ArbiterUnavailable when unavailable or not answered by :attr:`deadline`."""
        self.calls[name] += 1
        start = self.clock.monotonic()
        self.sent.append((start, name))
        limit = start + self.deadline
        if self._unavailable:
            raise ArbiterUnavailable(f"memory store: unavailable ({name})")
        if self.delay > 0:
            await self.clock.sleep_until(min(start + self.delay, limit))
        while self._resumed is not None and self.clock.monotonic() < limit:
            await self.clock.sleep_until(limit, self._resumed)
        if self.clock.monotonic() >= limit and (
            self.delay >= self.deadline or self._resumed is not None
        ):
            raise ArbiterUnavailable(f"memory store: no answer to {name} in {self.deadline:g} s")
        if self._unavailable:
            raise ArbiterUnavailable(f"memory store: unavailable ({name})")
        self.expire()

    def _bump(self) -> int:
        self.revision += 1
        return self.revision

    def _lease(self, lease: int) -> _Lease:
        held = self.leases.get(lease)
        if held is None:
            raise LeaseLost(f"memory store: lease {lease:x} does not exist")
        return held

    def _owner(self, pair: str) -> Owner | None:
        item = self.kv.get(self.key(OWNER, pair))
        return None if item is None else parse_owner(pair, item.value, item.mod_revision)

    def _term(self, pair: str) -> int:
        item = self.kv.get(self.key(TERM, pair))
        return 0 if item is None else parse_term(pair, item.value)

    def _put(self, key: str, value: str, lease: int, revision: int) -> None:
        old = self.kv.get(key)
        if old is not None and old.lease in self.leases:
            self.leases[old.lease].keys.discard(key)
        if lease:
            self._lease(lease).keys.add(key)
        self.kv[key] = _Key(value, revision, lease)

    def _delete(self, key: str) -> None:
        old = self.kv.pop(key, None)
        if old is not None and old.lease in self.leases:
            self.leases[old.lease].keys.discard(key)

    def _end_lease(self, lease: int) -> None:
        held = self.leases.pop(lease)
        if held.keys:
            revision = self._bump()
            for key in sorted(held.keys):
                self._delete(key)
                self._notify(key, revision)

    def _notify(self, key: str, revision: int | None = None) -> None:
        """Tell the watches about a change of ``key`` (owner keys only)."""
        owner_base = self.key(OWNER, "")
        if not key.startswith(owner_base):
            return
        pair = key[len(owner_base) :]
        item = self.kv.get(key)
        if item is None:
            event = OwnerEvent(pair, None, revision if revision is not None else self.revision)
        else:
            try:
                owner = parse_owner(pair, item.value, item.mod_revision)
            except ArbiterUnavailable:  # a foreign value, told as EtcdStore's watch tells it
                event = OwnerEvent(pair, None, item.mod_revision, foreign=True)
            else:
                event = OwnerEvent(pair, owner, item.mod_revision)
        self.history.append(event)
        for stream in self._watchers:
            stream.send_nowait(event)


def _parse_site(site: str, value: str) -> int:
    try:
        doc = json.loads(value)
    except ValueError:
        raise ArbiterUnavailable(f"site key of {site!r} is not JSON") from None
    lease = doc.get("lease") if isinstance(doc, dict) else None
    if not isinstance(lease, int) or isinstance(lease, bool):
        raise ArbiterUnavailable(f"site key of {site!r}: 'lease' is {lease!r}")
    return lease
