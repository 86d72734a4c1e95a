"""etcd v3 as the arbiter, through its JSON gRPC gateway (POST /v3/...) over aiohttp.

The gateway (what Patroni uses) needs nothing but aiohttp and gives all hbmon needs: TLS,
leases, transactions with compares, watches, a deadline on every request.  Keys and values
travel in base64, int64 fields as JSON strings, zero fields not at all.

Every call asks the endpoint that answered last first, then the others in order, each
attempt under ``request_timeout`` and the call under ``2 x request_timeout``; then it raises
ArbiterUnavailable naming each endpoint and what went wrong there (a malformed answer is
that endpoint's failure).  What etcd answers (a failed compare, "lease not found") is final.

A watch has no deadline but must not trust a dead connection.  It asks for etcd's progress
notifications: an idle watch gets one every ``--experimental-watch-progress-notify-interval``
(10 min by default; after events, up to two intervals may pass), and the watch breaks when
nothing at all came for ``heartbeat`` seconds (default 21 min, to fit etcd's default; run
etcd with a shorter interval and pass a heartbeat above twice it to notice a frozen member
sooner).  TCP keepalive probes (after ``request_timeout`` idle, then every
``request_timeout``, 3 unanswered) notice a cut network within seconds.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import math
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import aiohttp
import anyio

from hbmon.arbiter import base
from hbmon.arbiter.base import OWNER, SITE, TERM, Owner, OwnerEvent, OwnerView, Store
from hbmon.config import ArbiterConfig, check_private
from hbmon.errors import ArbiterUnavailable, ConfigError, LeaseLost, OwnerTaken

log = logging.getLogger(__name__)
T = TypeVar("T")
Doc = dict[str, Any]
HEARTBEAT = 2 * 600.0 + 60.0  # seconds: two of etcd's default progress intervals + 1 min
CLAIM_BATCH = 32  # start claims a transaction: 64 reads, <= 64 compares and puts (etcd: 128)
TRIES = 3  # a transaction is tried again (read afresh) when only the term or site key moved
_RE_AUTH = ("invalid auth token", "auth store is old")  # etcd wants a new token
_WATCH, _AUTH = "/v3/watch", "/v3/auth/authenticate"


class _Failed(Exception):
    """What went wrong at one endpoint (the caller names the endpoint)."""


class _EtcdError(_Failed):
    """An error etcd itself answered."""


@dataclass(frozen=True, slots=True)
class _KV:
    key: str
    value: bytes
    mod: int  # mod_revision
    lease: int


Plan = Callable[[Owner | None, list[_KV | None]], Owner | tuple[Owner, list[Doc], list[Doc]]]


class EtcdStore(Store):
    """The arbiter on a real etcd (3.4 or later) cluster."""

    def __init__(
        self, endpoints: Sequence[str], prefix: str, request_timeout: float, *,
        ssl_context: ssl.SSLContext | None = None, user: str | None = None,
        password: str | None = None, heartbeat: float = HEARTBEAT,
    ) -> None:  # fmt: skip
        if not endpoints:
            raise ValueError("EtcdStore needs at least one endpoint")
        self.endpoints = tuple(e.rstrip("/") for e in endpoints)
        self.prefix = prefix.rstrip("/")
        self.request_timeout = request_timeout
        self.heartbeat = heartbeat
        self._ssl = ssl_context
        self._user, self._password = user, password
        self._token: str | None = None
        self._good = 0  # index of the endpoint that answered last
        self._http: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, cfg: ArbiterConfig) -> EtcdStore:
        context, password = None, None
        if cfg.ca_file is not None or cfg.cert_file is not None:
            path, key = cfg.ca_file, "arbiter.ca_file"
            try:
                context = ssl.create_default_context(cafile=path)
                if cfg.cert_file is not None and cfg.key_file is not None:
                    path, key = cfg.key_file, "arbiter.key_file"
                    check_private(path, key)
                    context.load_cert_chain(cfg.cert_file, path, password="")  # never prompt
            except (OSError, ssl.SSLError) as err:
                problem = f"cannot be loaded (an unencrypted PEM key is needed): {err}"
                raise ConfigError(str(path), key, problem) from None
        if cfg.password_file is not None:
            check_private(cfg.password_file, "arbiter.password_file")
            try:
                password = cfg.password_file.read_text().rstrip("\r\n")
            except OSError as err:
                where, problem = str(cfg.password_file), f"cannot be read: {err.strerror}"
                raise ConfigError(where, "arbiter.password_file", problem) from None
        timeout = cfg.timing.request_timeout
        return cls(cfg.endpoints, cfg.prefix, timeout, ssl_context=context, user=cfg.user,
                   password=password)  # fmt: skip

    # -- leases ------------------------------------------------------------------------

    async def grant(self, ttl: float) -> int:
        def parse(doc: Doc) -> int:
            if _get(doc, "TTL", int, 0) <= 0 or not _get(doc, "ID", int, 0):
                raise _Failed(f"no lease granted: {doc!r:.200}")
            return _get(doc, "ID", int)

        return await self._call("/v3/lease/grant", {"TTL": str(max(1, math.ceil(ttl)))}, parse)

    async def keepalive(self, lease: int) -> float:
        gone = f"lease {lease} no longer exists at etcd (expired or revoked)"
        ttl = await self._call("/v3/lease/keepalive", {"ID": str(lease)}, _ttl(lease), gone, True)
        if ttl <= 0:  # what etcd 3.4 answers for a lease that is gone
            raise LeaseLost(gone)
        return float(ttl)

    async def revoke(self, lease: int) -> None:
        with contextlib.suppress(LeaseLost):
            await self._call("/v3/lease/revoke", {"ID": str(lease)}, _revision, "gone")

    async def time_left(self, lease: int) -> float | None:
        ttl = await self._call("/v3/lease/timetolive", {"ID": str(lease)}, _ttl(lease))
        return None if ttl < 0 else float(ttl)

    # -- keys --------------------------------------------------------------------------

    async def view(self) -> OwnerView:
        start = self.prefix + "/"
        body = {"key": _b64(start), "range_end": _b64(_prefix_end(start)), "serializable": False}
        revision, kvs = await self._call("/v3/kv/range", body, lambda d: (_revision(d), _kvs(d)))
        owners: dict[str, Owner] = {}
        terms: dict[str, int] = {}
        last_owner: dict[str, str] = {}
        sites: dict[str, int] = {}
        foreign: list[str] = []
        for kv in kvs:
            kind, _, name = kv.key[len(start) :].partition("/")
            try:
                if kind == OWNER:
                    owners[name] = _owner(name, kv)
                elif kind == TERM:
                    terms[name] = _term(name, kv)
                    if (took := base.parse_term_site(name, kv.value)) is not None:
                        last_owner[name] = took
                elif kind == SITE and _site_lease(name, kv):
                    sites[name] = kv.lease
                else:
                    foreign.append(kv.key)
            except OwnerTaken:  # a value hbmon did not write
                foreign.append(kv.key)
        return OwnerView(revision, owners, terms, sites, tuple(foreign), last_owner)

    async def register(self, site: str, lease: int) -> None:
        put = _put(self.key(SITE, site), base.site_value(site, lease), lease)["request_put"]
        await self._call("/v3/kv/put", put, _revision, f"lease {lease} of {site!r} is gone")

    async def claim(self, pair: str, site: str, lease: int, *, keep: bool = False) -> Owner:
        keys = [self.key(OWNER, pair), self.key(TERM, pair)]
        gone = f"lease {lease} of site {site!r} no longer exists at etcd"
        return await self._commit(pair, keys, self._claim_plan(pair, site, lease, keep), gone)

    async def claim_many(
        self, pairs: Sequence[str], site: str, lease: int
    ) -> dict[str, Owner | OwnerTaken]:
        """The start claims, CLAIM_BATCH pairs a transaction: one read of their keys, then
        one transaction with every compare and put; when a compare fails (another writer
        moved a key meanwhile) the pairs of that batch are claimed one by one."""
        answers: dict[str, Owner | OwnerTaken] = {}
        for i in range(0, len(pairs), CLAIM_BATCH):
            answers |= await self._claim_batch(pairs[i : i + CLAIM_BATCH], site, lease)
        return answers

    async def _claim_batch(
        self, pairs: Sequence[str], site: str, lease: int
    ) -> dict[str, Owner | OwnerTaken]:
        keys = [key for pair in pairs for key in (self.key(OWNER, pair), self.key(TERM, pair))]
        kvs = await self._read(*keys)
        answers: dict[str, Owner | OwnerTaken] = {}
        compare: list[Doc] = []
        puts: list[Doc] = []
        planned: list[Owner] = []
        for n, pair in enumerate(pairs):
            held = kvs[2 * n : 2 * n + 2]
            try:
                holder = None if held[0] is None else _owner(pair, held[0])
                step = self._claim_plan(pair, site, lease, True)(holder, held)
            except OwnerTaken as err:
                answers[pair] = err
                continue
            if isinstance(step, Owner):
                answers[pair] = step  # held under this lease already
                continue
            mine, more, put = step
            compare += more
            puts += put
            planned.append(mine)
        if not planned:
            return answers
        gone = f"lease {lease} of site {site!r} no longer exists at etcd"
        ok, revision, _ = await self._txn(compare, puts, [], gone)
        for mine in planned:
            if ok:
                answers[mine.pair] = replace(mine, revision=revision)
                continue
            try:  # a key moved since the read: this pair on its own (read afresh)
                answers[mine.pair] = await self.claim(mine.pair, site, lease, keep=True)
            except OwnerTaken as err:
                answers[mine.pair] = err
        return answers

    def _claim_plan(self, pair: str, site: str, lease: int, keep: bool) -> Plan:
        okey, tkey = self.key(OWNER, pair), self.key(TERM, pair)

        def plan(holder: Owner | None, kvs: list[_KV | None]) -> Any:
            if holder is not None:
                if keep and holder.site == site and holder.lease == lease:
                    return holder
                if not keep or holder.site != site:
                    raise OwnerTaken(pair, holder.site, holder.term)
                mine = Owner(pair, site, holder.term, lease)  # moved to the new lease
                return mine, [_cmp(okey, "MOD", holder.revision)], [_put_owner(okey, mine)]
            mine = Owner(pair, site, _term(pair, kvs[1]) + 1, lease)
            compare = [_cmp(okey, "CREATE", 0), _cmp(tkey, "MOD", _mod(kvs[1]))]
            term = _put(tkey, base.term_value(mine.term, site))
            return mine, compare, [_put_owner(okey, mine), term]

        return plan

    async def release(self, owner: Owner) -> None:
        okey = self.key(OWNER, owner.pair)
        delete = {"request_delete_range": {"key": _b64(okey)}}
        ok, _, (kv,) = await self._txn([_cmp(okey, "MOD", owner.revision)], [delete], [okey])
        if not ok and kv is not None:  # an absent key is released already
            holder = _owner(owner.pair, kv)
            raise OwnerTaken(owner.pair, holder.site, holder.term)

    async def hand_over(self, owner: Owner, site: str) -> Owner:
        pair = owner.pair
        okey, tkey, skey = self.key(OWNER, pair), self.key(TERM, pair), self.key(SITE, site)

        def plan(holder: Owner | None, kvs: list[_KV | None]) -> Any:
            if holder is None:
                raise OwnerTaken(pair, "no one (its owner key is gone)", None)
            if holder.revision != owner.revision:
                raise OwnerTaken(pair, holder.site, holder.term)
            if not (target := _site_lease(site, kvs[2])):
                raise LeaseLost(f"site {site!r} holds no lease at the arbiter (no {skey})")
            mine = Owner(pair, site, max(owner.term, _term(pair, kvs[1])) + 1, target)
            compare = [_cmp(okey, "MOD", owner.revision), _cmp(tkey, "MOD", _mod(kvs[1])),
                       _cmp(skey, "MOD", _mod(kvs[2]))]  # fmt: skip
            term = _put(tkey, base.term_value(mine.term, site))
            return mine, compare, [_put_owner(okey, mine), term]

        gone = f"the lease of site {site!r} no longer exists at etcd"
        return await self._commit(pair, [okey, tkey, skey], plan, gone)

    async def watch(self, revision: int) -> AsyncIterator[OwnerEvent]:
        start = self.key(OWNER, "")
        end, since = _b64(_prefix_end(start)), str(revision + 1)
        create = {"key": _b64(start), "range_end": end, "start_revision": since,
                  "progress_notify": True}  # fmt: skip

        async def attempt(endpoint: str) -> tuple[str, aiohttp.ClientResponse, _Lines]:
            first, resp, lines = await self._open(endpoint, _WATCH, {"create_request": create})
            if first.get("created") and not first.get("canceled"):
                _keepalive(resp, self.request_timeout)
                return endpoint, resp, lines
            resp.close()
            _cancelled(first)
            raise _Failed(f"the watch was not created: {first!r:.200}")

        endpoint, resp, lines = await self._attempts("watch", attempt)
        try:
            while True:
                try:
                    events = _events(start, await lines.next())
                except _Failed as err:
                    raise ArbiterUnavailable(f"etcd watch at {endpoint} broke: {err}") from None
                for event in events:
                    yield event
        finally:
            resp.close()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()

    # -- requests ----------------------------------------------------------------------

    async def _commit(self, pair: str, keys: list[str], plan: Plan, gone: str) -> Owner:
        """Read ``keys`` (the owner key first); ``plan`` answers an Owner (done), raises,
        or gives the owner to write with its compares and puts.  Read again and retry when
        a compare failed but the plan still holds (only another key moved)."""
        kvs = await self._read(*keys)
        mine: Owner | None = None
        for attempt in range(TRIES + 1):
            holder = None if kvs[0] is None else _owner(pair, kvs[0])
            if holder is not None and replace(holder, revision=0) == mine:
                return holder  # an attempt that got no answer did commit
            step = plan(holder, kvs)
            if isinstance(step, Owner):
                return step
            if attempt == TRIES:
                break
            mine, compare, puts = step
            ok, revision, kvs = await self._txn(compare, puts, keys, gone)
            if ok:
                return replace(mine, revision=revision)
        raise OwnerTaken(pair, "another candidate (the keys kept changing)", None)

    async def _read(self, *keys: str) -> list[_KV | None]:
        return (await self._txn([], [], keys))[2]

    async def _txn(
        self, compare: list[Doc], success: list[Doc], keys: Sequence[str], gone: str | None = None
    ) -> tuple[bool, int, list[_KV | None]]:
        """Run ``success`` if every compare holds; read ``keys`` either way (in the same
        revision: after ``success``, or instead of it)."""
        reads = [{"request_range": {"key": _b64(k)}} for k in keys]

        def parse(doc: Doc) -> tuple[bool, int, list[_KV | None]]:
            ok = doc.get("succeeded", False) is True
            answers = _get(doc, "responses", list, [])[len(success) if ok else 0 :]
            if len(answers) != len(keys):
                raise _Failed(f"the txn answered {len(answers)} reads of {len(keys)}")
            found = [_kvs(_get(_dict(a), "response_range", dict)) for a in answers]
            return ok, _revision(doc), [kv[0] if kv else None for kv in found]

        body = {"compare": compare, "success": success + reads, "failure": reads}
        return await self._call("/v3/kv/txn", body, parse, gone)

    async def _call(
        self, path: str, body: Doc, parse: Callable[[Doc], T], gone: str | None = None,
        stream: bool = False,
    ) -> T:  # fmt: skip
        async def attempt(endpoint: str) -> T:
            return parse((await self._open(endpoint, path, body, stream))[0])

        return await self._attempts(path, attempt, gone)

    async def _attempts(
        self, what: str, attempt: Callable[[str], Awaitable[T]], gone: str | None = None
    ) -> T:
        """``attempt`` at one endpoint after the other; LeaseLost(``gone``) when etcd
        answers "lease not found"."""
        deadline = anyio.current_time() + 2 * self.request_timeout
        order = [self._good, *(i for i in range(len(self.endpoints)) if i != self._good)]
        problems: list[str] = []
        for i in order:
            endpoint = self.endpoints[i]
            left = min(self.request_timeout, deadline - anyio.current_time())
            if left <= 0:
                problems.append(f"{endpoint}: not tried ({2 * self.request_timeout:g} s spent)")
                continue
            try:
                with anyio.fail_after(left):
                    result = await attempt(endpoint)
            except TimeoutError:
                problems.append(f"{endpoint}: no answer within {left:.3g} s")
                continue
            except _Failed as err:
                if gone and isinstance(err, _EtcdError) and "lease not found" in str(err):
                    raise LeaseLost(gone) from None  # an answer, the same everywhere
                problems.append(f"{endpoint}: {err}")
                continue
            if problems:
                log.warning("etcd %s answered by %s after: %s", what, endpoint, "; ".join(problems))
            self._good = i
            return result
        raise ArbiterUnavailable(f"no etcd endpoint answered {what}: " + "; ".join(problems))

    async def _open(
        self, endpoint: str, path: str, body: Doc, stream: bool = True
    ) -> tuple[Doc, aiohttp.ClientResponse, _Lines]:
        """Send ``body``: the (first) answer, and the response a watch goes on reading."""
        watch = path == _WATCH
        timeout = aiohttp.ClientTimeout(total=None, sock_read=self.heartbeat if watch else None)
        for again in (False, True):
            headers = {} if path == _AUTH else await self._auth(endpoint, again)
            try:
                resp = await self._session().post(
                    endpoint + path, json=body, headers=headers, timeout=timeout
                )
            except (aiohttp.ClientError, OSError) as err:
                raise _transport(err) from None
            lines = _Lines(resp, self.heartbeat)
            try:
                first = await (lines.next() if watch else lines.whole(stream))
                if any(m in str(first.get("cancel_reason")) for m in _RE_AUTH):
                    raise _EtcdError(str(first["cancel_reason"]))  # a watch's auth error
                return first, resp, lines
            except _EtcdError as err:
                resp.close()
                if again or self._user is None or not any(m in str(err) for m in _RE_AUTH):
                    raise
            except BaseException:
                resp.close()
                raise
        raise AssertionError("unreachable")

    async def _auth(self, endpoint: str, fresh: bool) -> dict[str, str]:
        if self._user is None:
            return {}
        if self._token is None or fresh:
            self._token = None
            body = {"name": self._user, "password": self._password or ""}
            token = (await self._open(endpoint, _AUTH, body, False))[0].get("token")
            if not isinstance(token, str) or not token:
                raise _Failed("authenticate answered no token")
            self._token = token
        return {"Authorization": self._token}

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
            timeout = aiohttp.ClientTimeout(total=None)  # the deadlines are anyio's
            self._http = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self._http


class _Lines:
    """A gateway response: one JSON answer, or a stream of them (one a line)."""

    def __init__(self, resp: aiohttp.ClientResponse, heartbeat: float) -> None:
        self._resp, self._heartbeat, self._buffer = resp, heartbeat, bytearray()

    async def whole(self, stream: bool) -> Doc:
        try:
            raw = await self._resp.read()
        except (aiohttp.ClientError, OSError) as err:
            raise _transport(err) from None
        return _answer(raw.split(b"\n")[0] if stream else raw, self._resp.status, stream)

    async def next(self) -> Doc:
        if self._resp.status != 200:
            return await self.whole(True)  # raises
        while (end := self._buffer.find(b"\n")) < 0:
            try:
                chunk = await self._resp.content.readany()
            except aiohttp.ServerTimeoutError:
                raise _Failed(
                    f"nothing received for {self._heartbeat:g} s, not even a progress "
                    "notification (dead connection or frozen member)"
                ) from None
            except (aiohttp.ClientError, OSError) as err:
                raise _transport(err) from None
            if not chunk:
                raise _Failed("the stream ended")
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return _answer(line, 200, True)


def _transport(err: BaseException) -> _Failed:
    tls = "TLS: " if isinstance(err, aiohttp.ClientSSLError | ssl.SSLError) else ""
    return _Failed(f"{tls}{type(err).__name__}: {err}")


def _keepalive(resp: aiohttp.ClientResponse, every: float) -> None:
    """TCP keepalive probes on a watch's connection, so that a cut network ends it."""
    transport = resp.connection.transport if resp.connection is not None else None
    sock: Any = transport.get_extra_info("socket") if transport is not None else None
    seconds = max(1, round(every))
    options = [("TCP_KEEPIDLE", seconds), ("TCP_KEEPINTVL", seconds), ("TCP_KEEPCNT", 3)]
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in options:  # Linux
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


# -- what hbmon wrote, as etcd answers it ------------------------------------------------


def _owner(pair: str, kv: _KV) -> Owner:
    """The owner in an owner key; OwnerTaken(base.FOREIGN) for a key hbmon did not write."""
    try:
        owner = base.parse_owner(pair, kv.value, kv.mod)
    except ArbiterUnavailable:
        raise OwnerTaken(pair, base.FOREIGN, None) from None
    if owner.lease != kv.lease:  # an owner key must go with its lease
        raise OwnerTaken(pair, base.FOREIGN, None)
    return owner


def _term(pair: str, kv: _KV | None) -> int:
    try:
        return 0 if kv is None else base.parse_term(pair, kv.value)
    except ArbiterUnavailable:
        raise OwnerTaken(pair, base.FOREIGN, None) from None


def _site_lease(site: str, kv: _KV | None) -> int:
    """The lease of a site key hbmon wrote; 0 for none."""
    try:
        doc = json.loads(kv.value) if kv is not None else None
    except (ValueError, RecursionError):
        return 0
    if kv is None or not isinstance(doc, dict) or doc.get("site") != site:
        return 0
    return kv.lease if doc.get("lease") == kv.lease else 0


def _put_owner(key: str, owner: Owner) -> Doc:
    return _put(key, base.owner_value(owner.site, owner.term, owner.lease), owner.lease)


def _events(start: str, result: Doc) -> list[OwnerEvent]:
    _cancelled(result)
    events: list[OwnerEvent] = []
    for event in _get(result, "events", list, []):
        kv = _kv(_get(_dict(event), "kv", dict))
        pair = kv.key[len(start) :]
        try:
            owner = None if event.get("type") == "DELETE" else _owner(pair, kv)
        except OwnerTaken:
            log.warning("etcd watch: %s does not hold an owner hbmon wrote", kv.key)
            events.append(OwnerEvent(pair, None, kv.mod, foreign=True))
            continue
        events.append(OwnerEvent(pair, owner, kv.mod))
    return events


def _cancelled(result: Doc) -> None:
    if result.get("canceled"):
        if compacted := _get(result, "compact_revision", int, 0):
            raise _Failed(f"revision compacted (oldest left: {compacted}); read a new view")
        raise _Failed(f"etcd cancelled the watch: {result.get('cancel_reason') or '?'}")


# -- the gateway's JSON ----------------------------------------------------------------


def _answer(raw: bytes, status: int, stream: bool) -> Doc:
    """The message in a gateway answer; _EtcdError for an error etcd answered, _Failed
    for anything else that is not an etcd answer."""
    try:
        doc = _dict(json.loads(raw))
    except (ValueError, RecursionError):
        raise _Failed(f"HTTP {status}, not JSON: {raw[:120]!r}") from None
    except _Failed:
        raise _Failed(f"HTTP {status}, not a JSON object: {raw[:120]!r}") from None
    if (error := doc.get("error")) is not None or "code" in doc:
        message = error.get("message") if isinstance(error, dict) else doc.get("message", error)
        raise _EtcdError(f"HTTP {status}, etcd error: {message}")
    if status != 200:
        raise _Failed(f"HTTP {status}: {raw[:120]!r}")
    result = _get(doc, "result", dict) if stream else doc
    _get(result, "header", dict)
    return result


def _get(doc: Doc, name: str, kind: type[T], default: T | None = None) -> T:
    """``doc[name]`` as ``kind``: int64s come as strings, proto3 leaves zeros and empty
    lists out (``default``); _Failed for anything else."""
    value = doc.get(name, default)
    if kind is int and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = int(value)
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    raise _Failed(f"the answer's {name!r} is {value!r:.80}, not {kind.__name__}: {doc!r:.200}")


def _dict(value: Any) -> Doc:
    if not isinstance(value, dict):
        raise _Failed(f"{value!r:.80} is not a JSON object")
    return value


def _revision(doc: Doc) -> int:
    if (revision := _get(_get(doc, "header", dict), "revision", int)) <= 0:
        raise _Failed(f"the answer's header has revision {revision}")
    return revision


def _ttl(lease: int) -> Callable[[Doc], int]:
    def parse(doc: Doc) -> int:
        if _get(doc, "ID", int, 0) != lease:
            raise _Failed(f"the answer is about lease {doc.get('ID')!r}, not {lease}")
        return _get(doc, "TTL", int, 0)

    return parse


def _kv(doc: Doc) -> _KV:
    try:
        key = base64.b64decode(_get(doc, "key", str), validate=True).decode()
        value = base64.b64decode(_get(doc, "value", str, ""), validate=True)
    except (binascii.Error, UnicodeDecodeError) as err:
        raise _Failed(f"a key or value is not base64 UTF-8 ({err}): {doc!r:.200}") from None
    return _KV(key, value, _get(doc, "mod_revision", int), _get(doc, "lease", int, 0))


def _kvs(doc: Doc) -> list[_KV]:
    return [_kv(_dict(kv)) for kv in _get(doc, "kvs", list, [])]


def _mod(kv: _KV | None) -> int:
    return 0 if kv is None else kv.mod


def _cmp(key: str, target: str, value: int) -> Doc:
    field = {"CREATE": "create_revision", "MOD": "mod_revision"}[target]
    return {"key": _b64(key), "target": target, "result": "EQUAL", field: str(value)}


def _put(key: str, value: str, lease: int = 0) -> Doc:
    put = {"key": _b64(key), "value": _b64(value)}
    return {"request_put": {**put, "lease": str(lease)} if lease else put}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)
