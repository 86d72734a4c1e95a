"""etcd v3 as the arbiter, through its JSON gRPC gateway (POST /v3/...) over aiohttp.

The gateway (what Patroni uses) needs nothing but aiohttp and gives everything hbmon
needs: TLS, leases, transactions with compares, watches, a deadline on every request.
Keys and values travel in base64, int64 fields as JSON strings, zero fields not at all.

Every call asks the endpoint that answered last first, then the others in their order,
each attempt under ``request_timeout`` and the whole call under ``2 x request_timeout``;
then it raises ArbiterUnavailable naming each endpoint and what went wrong there.  A
malformed answer counts as that endpoint's failure.  An answer etcd gives (a failed
compare, "lease not found") is final and not asked elsewhere.

A watch has no deadline, but must not trust a dead connection.  It asks for etcd's
progress notifications, which an idle watch gets every
``--experimental-watch-progress-notify-interval`` (10 min by default; a watch that just had
events may be silent for up to two intervals), and breaks when nothing at all arrived for
``heartbeat`` seconds: by default 21 min, to fit etcd's default; run etcd with a shorter
interval and pass a heartbeat above twice it to notice a frozen member sooner.  TCP
keepalive probes on the watch's connection (after ``request_timeout`` idle, then every
``request_timeout``, 3 unanswered) notice a cut network within seconds.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import anyio

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
    site_value,
    term_value,
)
from hbmon.config import ArbiterConfig, check_private
from hbmon.errors import ArbiterUnavailable, ConfigError, LeaseLost, OwnerTaken

log = logging.getLogger(__name__)
T = TypeVar("T")
Doc = dict[str, Any]
HEARTBEAT = 2 * 600.0 + 60.0  # seconds: two of etcd's default progress intervals + 1 min
TRIES = 3  # a transaction is tried again (read afresh) when only the term or site key moved
FOREIGN = "a key hbmon did not write"
_RE_AUTH = ("invalid auth token", "auth store is old")  # etcd wants a new token


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


class EtcdStore(Store):
    """The arbiter on a real etcd (3.4 or later) cluster."""

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str,
        request_timeout: float,
        *,
        ssl_context: ssl.SSLContext | None = None,
        user: str | None = None,
        password: str | None = None,
        heartbeat: float = HEARTBEAT,
    ) -> None:
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
        context = None
        if cfg.ca_file is not None or cfg.cert_file is not None:
            try:
                context = ssl.create_default_context(cafile=cfg.ca_file)
            except (OSError, ssl.SSLError) as err:
                raise ConfigError(str(cfg.ca_file), "arbiter.ca_file", str(err)) from None
            if cfg.cert_file is not None and cfg.key_file is not None:
                check_private(cfg.key_file, "arbiter.key_file")
                try:
                    context.load_cert_chain(cfg.cert_file, cfg.key_file)
                except (OSError, ssl.SSLError) as err:
                    problem = f"cannot be loaded with {cfg.cert_file}: {err}"
                    raise ConfigError(str(cfg.key_file), "arbiter.key_file", problem) from None
        password = None
        if cfg.password_file is not None:
            check_private(cfg.password_file, "arbiter.password_file")
            password = cfg.password_file.read_text().rstrip("\r\n")
        return cls(
            cfg.endpoints,
            cfg.prefix,
            cfg.timing.request_timeout,
            ssl_context=context,
            user=cfg.user,
            password=password,
        )

    # -- leases ------------------------------------------------------------------------

    async def grant(self, ttl: float) -> int:
        def parse(doc: Doc) -> int:
            if _int(doc, "ID") == 0 or _int(doc, "TTL") <= 0:
                raise _Failed(f"no lease granted: {doc!r:.200}")
            return _int(doc, "ID")

        return await self._call("/v3/lease/grant", {"TTL": str(max(1, math.ceil(ttl)))}, parse)

    async def keepalive(self, lease: int) -> float:
        gone = f"lease {lease} no longer exists at etcd (expired or revoked)"
        ttl = await self._call("/v3/lease/keepalive", _id(lease), _ttl(lease), gone, stream=True)
        if ttl <= 0:  # etcd 3.4 answers a renewal of a lease that is gone with TTL 0
            raise LeaseLost(gone)
        return float(ttl)

    async def revoke(self, lease: int) -> None:
        try:
            await self._call("/v3/lease/revoke", _id(lease), _revision, "gone")
        except LeaseLost:
            pass

    async def time_left(self, lease: int) -> float | None:
        ttl = await self._call("/v3/lease/timetolive", _id(lease), _ttl(lease))
        return None if ttl < 0 else float(ttl)

    # -- keys --------------------------------------------------------------------------

    async def view(self) -> OwnerView:
        start = self.prefix + "/"
        body = {"key": _b64(start), "range_end": _b64(_prefix_end(start)), "serializable": False}
        revision, kvs = await self._call("/v3/kv/range", body, lambda d: (_revision(d), _kvs(d)))
        owners: dict[str, Owner] = {}
        terms: dict[str, int] = {}
        sites: dict[str, int] = {}
        foreign: list[str] = []
        for kv in kvs:
            kind, _, name = kv.key[len(start) :].partition("/")
            if kind == OWNER and (owner := _owner(name, kv)) is not None:
                owners[name] = owner
            elif kind == TERM and (term := _term(name, kv)) is not None:
                terms[name] = term
            elif kind == SITE and (lease := _site_lease(name, kv)) is not None:
                sites[name] = lease
            else:
                foreign.append(kv.key)
        return OwnerView(revision, owners, terms, sites, tuple(foreign))

    async def register(self, site: str, lease: int) -> None:
        put = _put(self.key(SITE, site), site_value(site, lease), lease)["request_put"]
        await self._call("/v3/kv/put", put, _revision, f"lease {lease} of {site!r} is gone")

    async def claim(self, pair: str, site: str, lease: int, *, keep: bool = False) -> Owner:
        okey, tkey = self.key(OWNER, pair), self.key(TERM, pair)
        gone = f"lease {lease} of site {site!r} no longer exists at etcd"
        owner_kv, term_kv = await self._read(okey, tkey)
        tried = 0
        for attempt in range(TRIES + 1):
            holder, term = _holder(pair, owner_kv), _term_of(pair, term_kv)
            if holder is not None:
                if holder.site == site and holder.lease == lease and (keep or holder.term == tried):
                    return holder  # ours already (an attempt that timed out may have done it)
                if not keep or holder.site != site:
                    raise OwnerTaken(pair, holder.site, holder.term)
            if attempt == TRIES:
                break
            if holder is not None:  # ours under an older lease: move it, same term
                tried = holder.term
                compare = [_cmp(okey, "MOD", holder.revision)]
                puts = [_put(okey, owner_value(site, tried, lease), lease)]
            else:  # absent: raise the term, if neither key changed since they were read
                tried = term + 1
                compare = [_cmp(okey, "CREATE", 0), _cmp(tkey, "MOD", _mod(term_kv))]
                value = owner_value(site, tried, lease)
                puts = [_put(okey, value, lease), _put(tkey, term_value(tried))]
            ok, revision, (owner_kv, term_kv) = await self._txn(compare, puts, [okey, tkey], gone)
            if ok:
                return Owner(pair, site, tried, lease, revision)
        raise OwnerTaken(pair, "another candidate (the term key kept changing)", term)

    async def release(self, owner: Owner) -> None:
        okey = self.key(OWNER, owner.pair)
        delete = {"request_delete_range": {"key": _b64(okey)}}
        ok, _, (kv,) = await self._txn([_cmp(okey, "MOD", owner.revision)], [delete], [okey])
        holder = None if ok else _holder(owner.pair, kv)
        if holder is not None:  # an absent key is released already
            raise OwnerTaken(owner.pair, holder.site, holder.term)

    async def hand_over(self, owner: Owner, site: str) -> Owner:
        pair = owner.pair
        okey, tkey, skey = self.key(OWNER, pair), self.key(TERM, pair), self.key(SITE, site)
        owner_kv, term_kv, site_kv = await self._read(okey, tkey, skey)
        tried = 0
        for attempt in range(TRIES + 1):
            holder = _holder(pair, owner_kv)
            if holder is not None and holder.site == site and holder.term == tried:
                return holder  # an attempt that timed out did it
            if holder is None or holder.revision != owner.revision:
                who = "no one (its owner key is gone)" if holder is None else holder.site
                raise OwnerTaken(pair, who, None if holder is None else holder.term)
            target = None if site_kv is None else _site_lease(site, site_kv)
            if site_kv is None or target is None:
                raise LeaseLost(f"site {site!r} holds no lease at the arbiter (no {skey})")
            if attempt == TRIES:
                break
            tried = max(owner.term, _term_of(pair, term_kv)) + 1
            compare = [
                _cmp(okey, "MOD", owner.revision),
                _cmp(tkey, "MOD", _mod(term_kv)),
                _cmp(skey, "MOD", site_kv.mod),
            ]
            value = owner_value(site, tried, target)
            puts = [_put(okey, value, target), _put(tkey, term_value(tried))]
            gone = f"lease {target} of site {site!r} no longer exists at etcd"
            ok, revision, kvs = await self._txn(compare, puts, [okey, tkey, skey], gone)
            if ok:
                return Owner(pair, site, tried, target, revision)
            owner_kv, term_kv, site_kv = kvs
        raise OwnerTaken(pair, "another candidate (the term or site key kept changing)", None)

    async def watch(self, revision: int) -> AsyncIterator[OwnerEvent]:
        start = self.key(OWNER, "")
        body = {
            "create_request": {
                "key": _b64(start),
                "range_end": _b64(_prefix_end(start)),
                "start_revision": str(revision + 1),
                "progress_notify": True,
            }
        }

        async def attempt(endpoint: str) -> tuple[str, aiohttp.ClientResponse, _Lines]:
            first, resp, lines = await self._open(endpoint, "/v3/watch", body, True)
            try:
                _cancelled(first)
                if not first.get("created"):
                    raise _Failed(f"the watch was not created: {first!r:.200}")
            except BaseException:
                resp.close()
                raise
            _keepalive(resp, self.request_timeout)
            return endpoint, resp, lines

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

    async def _read(self, *keys: str) -> list[_KV | None]:
        return (await self._txn([], [], keys))[2]

    async def _txn(
        self, compare: list[Any], success: list[Any], keys: Sequence[str], gone: str | None = None
    ) -> tuple[bool, int, list[_KV | None]]:
        """Run ``success`` if every compare holds; read ``keys`` either way (in the same
        revision: after ``success``, or instead of it)."""
        reads = [{"request_range": {"key": _b64(k)}} for k in keys]

        def parse(doc: Doc) -> tuple[bool, int, list[_KV | None]]:
            ok = doc.get("succeeded", False) is True
            answers = _list(doc, "responses")[len(success) if ok else 0 :]
            if len(answers) != len(keys):
                raise _Failed(f"the txn answered {len(answers)} reads of {len(keys)}")
            found = [_kvs(_dict(a, "response_range")) for a in answers]
            return ok, _revision(doc), [kv[0] if kv else None for kv in found]

        body = {"compare": compare, "success": success + reads, "failure": reads}
        return await self._call("/v3/kv/txn", body, parse, gone)

    async def _call(
        self,
        path: str,
        body: Doc,
        parse: Callable[[Doc], T],
        gone: str | None = None,
        *,
        stream: bool = False,
    ) -> T:
        async def attempt(endpoint: str) -> T:
            return parse((await self._open(endpoint, path, body, stream))[0])

        try:
            return await self._attempts(path, attempt)
        except _EtcdError as err:  # "lease not found", an answer
            if gone is None:
                raise ArbiterUnavailable(f"etcd {path}: {err}") from None
            raise LeaseLost(gone) from None

    async def _attempts(self, what: str, attempt: Callable[[str], Awaitable[T]]) -> T:
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
                if isinstance(err, _EtcdError) and "lease not found" in str(err):
                    raise
                problems.append(f"{endpoint}: {err}")
                continue
            if problems:
                log.warning("etcd %s answered by %s after: %s", what, endpoint, "; ".join(problems))
            self._good = i
            return result
        raise ArbiterUnavailable(f"no etcd endpoint answered {what}: " + "; ".join(problems))

    async def _open(
        self, endpoint: str, path: str, body: Doc, stream: bool
    ) -> tuple[Doc, aiohttp.ClientResponse, _Lines]:
        """Send ``body``: the (first) answer, and the response to read a watch on from."""
        watch = path == "/v3/watch"
        timeout = aiohttp.ClientTimeout(total=None, sock_read=self.heartbeat if watch else None)
        for again in (False, True):
            headers = await self._auth(endpoint, again)
            try:
                resp = await self._session().post(
                    endpoint + path, json=body, headers=headers, timeout=timeout
                )
            except (aiohttp.ClientError, OSError) as err:
                raise _transport(err) from None
            lines = _Lines(resp, self.heartbeat, stream)
            try:
                first = await (lines.next() if watch else lines.last())
                if any(m in str(first.get("cancel_reason")) for m in _RE_AUTH):
                    raise _EtcdError(str(first["cancel_reason"]))
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
            try:
                async with self._session().post(endpoint + "/v3/auth/authenticate", json=body) as r:
                    doc = await _Lines(r, self.heartbeat, False).last()
            except (aiohttp.ClientError, OSError) as err:
                raise _transport(err) from None
            token = doc.get("token")
            if not isinstance(token, str) or not token:
                raise _Failed(f"authenticate answered no token: {doc!r:.200}")
            self._token = token
        return {"Authorization": self._token}

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
            self._http = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None)
            )
        return self._http


class _Lines:
    """The answers in a gateway response: one JSON document, or one a line (a stream)."""

    def __init__(self, resp: aiohttp.ClientResponse, heartbeat: float, stream: bool) -> None:
        self._resp, self._heartbeat, self._stream = resp, heartbeat, stream
        self._buffer = bytearray()

    async def last(self) -> Doc:
        """The whole body as one answer (a stream's first)."""
        try:
            raw = await self._resp.read()
        except (aiohttp.ClientError, OSError) as err:
            raise _transport(err) from None
        raw = raw.split(b"\n")[0] if self._stream else raw
        return _answer(raw, self._resp.status, self._stream)

    async def next(self) -> Doc:
        """The next answer of a stream."""
        if self._resp.status != 200:
            return await self.last()  # raises
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
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    seconds = max(1, round(every))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", seconds), ("TCP_KEEPINTVL", seconds), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


# -- what hbmon wrote, as etcd answers it ------------------------------------------------


def _owner(pair: str, kv: _KV) -> Owner | None:
    try:
        owner = parse_owner(pair, kv.value, kv.mod)
    except ArbiterUnavailable:
        return None
    return owner if owner.lease == kv.lease else None  # an owner key must expire with it


def _holder(pair: str, kv: _KV | None) -> Owner | None:
    owner = None if kv is None else _owner(pair, kv)
    if kv is not None and owner is None:
        raise OwnerTaken(pair, FOREIGN, None)
    return owner


def _term(pair: str, kv: _KV) -> int | None:
    try:
        return parse_term(pair, kv.value)
    except ArbiterUnavailable:
        return None


def _term_of(pair: str, kv: _KV | None) -> int:
    term = 0 if kv is None else _term(pair, kv)
    if term is None:
        raise OwnerTaken(pair, FOREIGN, None)
    return term


def _site_lease(site: str, kv: _KV) -> int | None:
    try:
        doc = json.loads(kv.value)
    except (ValueError, RecursionError):
        return None
    ok = isinstance(doc, dict) and doc.get("site") == site and doc.get("lease") == kv.lease
    return kv.lease if ok and kv.lease else None


def _events(start: str, result: Doc) -> list[OwnerEvent]:
    _cancelled(result)
    events: list[OwnerEvent] = []
    for event in _list(result, "events"):
        kv = _kv(_dict(event, "kv"))
        pair = kv.key[len(start) :]
        if event.get("type") == "DELETE":
            events.append(OwnerEvent(pair, None, kv.mod))
        elif (owner := _owner(pair, kv)) is not None:
            events.append(OwnerEvent(pair, owner, kv.mod))
        else:
            log.warning("etcd watch: %s does not hold an owner hbmon wrote; skipped", kv.key)
    return events


def _cancelled(result: Doc) -> None:
    if result.get("canceled"):
        compacted = _int(result, "compact_revision")
        if compacted:
            raise _Failed(f"revision compacted (oldest left: {compacted}); read a new view")
        raise _Failed(f"etcd cancelled the watch: {result.get('cancel_reason') or '?'}")


# -- the gateway's JSON ----------------------------------------------------------------


def _answer(raw: bytes, status: int, stream: bool) -> Doc:
    """The message in a gateway answer; _EtcdError for an error etcd answered, _Failed
    for anything else that is not an etcd answer."""
    try:
        loaded = json.loads(raw)
    except (ValueError, RecursionError):
        raise _Failed(f"HTTP {status}, not JSON: {raw[:120]!r}") from None
    if not isinstance(loaded, dict):
        raise _Failed(f"HTTP {status}, not a JSON object: {raw[:120]!r}")
    doc: Doc = loaded
    error = doc.get("error")
    if error is not None or "code" in doc:
        message = error.get("message") if isinstance(error, dict) else doc.get("message", error)
        raise _EtcdError(f"HTTP {status}, etcd error: {message}")
    if status != 200:
        raise _Failed(f"HTTP {status}: {raw[:120]!r}")
    if stream:
        doc = _dict(doc, "result")
    _dict(doc, "header")
    return doc


def _dict(doc: Doc, name: str) -> Doc:
    value = doc.get(name)
    if not isinstance(value, dict):
        raise _Failed(f"the answer has no {name!r} object: {doc!r:.200}")
    return value


def _list(doc: Doc, name: str) -> list[Doc]:
    value = doc.get(name, [])  # proto3 JSON leaves empty lists out
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _Failed(f"the answer's {name!r} is not a list of objects: {doc!r:.200}")
    return value


def _int(doc: Doc, name: str, required: bool = False) -> int:
    value = doc.get(name)
    if value is None and not required:
        return 0  # proto3 JSON leaves zeros out
    if isinstance(value, str | int) and not isinstance(value, bool):
        try:
            return int(value)
        except ValueError:
            pass
    raise _Failed(f"the answer's {name!r} is {value!r}, not an integer: {doc!r:.200}")


def _revision(doc: Doc) -> int:
    revision = _int(_dict(doc, "header"), "revision", required=True)
    if revision <= 0:
        raise _Failed(f"the answer's header has revision {revision}")
    return revision


def _ttl(lease: int) -> Callable[[Doc], int]:
    def parse(doc: Doc) -> int:
        if _int(doc, "ID") != lease:
            raise _Failed(f"the answer is about lease {doc.get('ID')!r}, not {lease}")
        return _int(doc, "TTL")

    return parse


def _kv(doc: Doc) -> _KV:
    try:
        key = base64.b64decode(doc.get("key", ""), validate=True).decode()
        value = base64.b64decode(doc.get("value", ""), validate=True)
    except (binascii.Error, UnicodeDecodeError, TypeError) as err:
        raise _Failed(f"a key or value is not base64 UTF-8 ({err}): {doc!r:.200}") from None
    if not key:
        raise _Failed(f"a key-value without a key: {doc!r:.200}")
    return _KV(key, value, _int(doc, "mod_revision", required=True), _int(doc, "lease"))


def _kvs(doc: Doc) -> list[_KV]:
    return [_kv(kv) for kv in _list(doc, "kvs")]


def _mod(kv: _KV | None) -> int:
    return 0 if kv is None else kv.mod


def _id(lease: int) -> Doc:
    return {"ID": str(lease)}


def _cmp(key: str, target: str, value: int) -> Doc:
    field = {"CREATE": "create_revision", "MOD": "mod_revision"}[target]
    return {"key": _b64(key), "target": target, "result": "EQUAL", field: str(value)}


def _put(key: str, value: str, lease: int = 0) -> Doc:
    put = {"key": _b64(key), "value": _b64(value)}
    return {"request_put": {**put, "lease": str(lease)} if lease else put}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    data = prefix.encode()
    return (data[:-1] + bytes([data[-1] + 1])).decode()
