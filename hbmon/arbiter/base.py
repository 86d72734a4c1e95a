"""What hbmon needs from a consensus store, whatever the store is.

The arbiter is the third vote against split brain (DESIGN.md, "Arbiter").  Its data, under
one ``prefix``:

====================  =========================================  ===============
key                   value (JSON)                               attached to
====================  =========================================  ===============
PREFIX/owner/PAIR     ``{"site": S, "term": N, "lease": L}``     the owner's lease
PREFIX/term/PAIR      ``{"term": N, "site": S}``: newest term    nothing (stays)
PREFIX/site/SITE      ``{"site": S, "lease": L}``                that site's lease
====================  =========================================  ===============

A site holds one lease for all of its pairs, so the cost of the arbiter does not grow
with the number of pairs.  The owner key disappears when the owner's lease expires or is
revoked; the term key does not, so a new owner's term is always higher than any before it.
That term is the fencing token.  The term key also names the site that took it, so a
site that comes back after another took its pair over knows not to take it back.

Every call either answers or raises: :class:`~hbmon.errors.ArbiterUnavailable` when the
store could not be asked (or answered something that is not an answer),
:class:`~hbmon.errors.LeaseLost` when a lease is gone, :class:`~hbmon.errors.OwnerTaken`
when a compare failed because someone else holds the key.  None returns False for
"could not ask".  Reads are linearizable.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard, get_args

from hbmon.errors import ArbiterUnavailable, OwnerTaken

#: Why the guard refused a failover on the arbiter's word (beside failover.Code).
RefusalCode = Literal["owner_alive", "no_quorum", "owner_taken", "no_arbiter"]
REFUSAL_CODES: tuple[RefusalCode, ...] = get_args(RefusalCode)

OWNER, TERM, SITE = "owner", "term", "site"
FOREIGN = "a key hbmon did not write"  # the holder OwnerTaken names for a foreign key


@dataclass(frozen=True, slots=True)
class Owner:
    """The holder of a pair's owner key, as the store last answered."""

    pair: str
    site: str
    term: int
    lease: int
    revision: int = 0  # the key's mod_revision: what a compare-and-set compares


@dataclass(frozen=True, slots=True)
class OwnerView:
    """A linearizable snapshot of who owns what, at store revision ``revision``."""

    revision: int
    owners: Mapping[str, Owner] = field(default_factory=dict)  # pair -> owner
    terms: Mapping[str, int] = field(default_factory=dict)  # pair -> newest term ever
    sites: Mapping[str, int] = field(default_factory=dict)  # site -> its lease id
    foreign: tuple[str, ...] = ()  # keys under the prefix that hbmon did not write
    last_owner: Mapping[str, str] = field(default_factory=dict)  # pair -> site of its term


@dataclass(frozen=True, slots=True)
class OwnerEvent:
    """A change of one owner key: ``owner`` is None when the key was deleted, or when
    ``foreign``: someone wrote a value hbmon did not write over it (the pair's owner is
    then unknown, never "gone")."""

    pair: str
    owner: Owner | None
    revision: int
    foreign: bool = False


class Store(ABC):
    """A consensus store holding leases and owner keys (etcd, or memory in unit tests)."""

    prefix: str

    def key(self, kind: str, name: str) -> str:
        return f"{self.prefix.rstrip('/')}/{kind}/{name}"

    @abstractmethod
    async def grant(self, ttl: float) -> int:
        """A new lease of ``ttl`` seconds (rounded up to whole seconds); its id."""

    @abstractmethod
    async def keepalive(self, lease: int) -> float:
        """Renew ``lease``; the TTL the store granted.  LeaseLost when it is gone."""

    @abstractmethod
    async def revoke(self, lease: int) -> None:
        """End ``lease`` now; every key attached to it is deleted.  A lease already gone
        is not an error."""

    @abstractmethod
    async def time_left(self, lease: int) -> float | None:
        """Seconds ``lease`` has left at the store, None when it no longer exists."""

    @abstractmethod
    async def view(self) -> OwnerView:
        """Who owns what under the prefix (a linearizable read)."""

    @abstractmethod
    async def register(self, site: str, lease: int) -> None:
        """Put PREFIX/site/SITE under ``lease`` (for ``hbmon arbiter status``)."""

    @abstractmethod
    async def claim(self, pair: str, site: str, lease: int, *, keep: bool = False) -> Owner:
        """Take ``pair`` for ``site`` under ``lease`` in one transaction.

        The owner key must be absent: then the term key is raised by one and the owner key
        created with that term, both only if neither changed since they were read.  With
        ``keep``, an owner key already held by ``site`` (under an older lease of the same
        site, say before a restart) is moved to ``lease`` with its term unchanged.
        Otherwise OwnerTaken names the holder."""

    async def claim_many(
        self, pairs: Sequence[str], site: str, lease: int
    ) -> dict[str, Owner | OwnerTaken]:
        """:meth:`claim` with ``keep`` of each of ``pairs`` (the start claims): each pair's
        owner, or the OwnerTaken naming its holder.  ArbiterUnavailable or LeaseLost as
        claim raises them (some pairs may have been claimed then: claiming again with
        ``keep`` is harmless).  This default claims one pair after the other; a store
        may take many in one transaction."""
        answers: dict[str, Owner | OwnerTaken] = {}
        for pair in pairs:
            try:
                answers[pair] = await self.claim(pair, site, lease, keep=True)
            except OwnerTaken as err:
                answers[pair] = err
        return answers

    @abstractmethod
    async def release(self, owner: Owner) -> None:
        """Delete ``owner``'s key if it is still exactly that (same revision); OwnerTaken
        when it changed.  The term key stays, so the next owner's term is higher."""

    @abstractmethod
    async def hand_over(self, owner: Owner, site: str) -> Owner:
        """Move ``owner``'s key to ``site`` (under that site's registered lease) with a
        new term, if it is still exactly ``owner`` and ``site`` is registered."""

    @abstractmethod
    def watch(self, revision: int) -> AsyncIterator[OwnerEvent]:
        """Changes of owner keys after ``revision``, as they happen.  The iteration
        raises ArbiterUnavailable when the stream breaks; the caller reads a new view and
        watches again from its revision."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close connections; the store is not used afterwards."""


def owner_value(site: str, term: int, lease: int) -> str:
    return json.dumps({"site": site, "term": term, "lease": lease}, sort_keys=True)


def parse_owner(pair: str, value: bytes | str, revision: int) -> Owner:
    """The owner in an owner key's value; ArbiterUnavailable for anything hbmon did not
    write (a foreign key is never read as "nobody owns it")."""
    doc = _json_object(value, f"owner key of {pair!r}")
    site, term, lease = doc.get("site"), doc.get("term"), doc.get("lease")
    if not isinstance(site, str) or not site:
        raise ArbiterUnavailable(f"owner key of {pair!r}: 'site' is {site!r}, not a site name")
    if not _whole(term) or term < 1:
        raise ArbiterUnavailable(f"owner key of {pair!r}: 'term' is {term!r}, not a term >= 1")
    if not _whole(lease):
        raise ArbiterUnavailable(f"owner key of {pair!r}: 'lease' is {lease!r}, not a lease id")
    return Owner(pair, site, int(term), int(lease), revision)


def term_value(term: int, site: str) -> str:
    return json.dumps({"term": term, "site": site}, sort_keys=True)


def parse_term(pair: str, value: bytes | str) -> int:
    term = _json_object(value, f"term key of {pair!r}").get("term")
    if not _whole(term) or term < 0:
        raise ArbiterUnavailable(f"term key of {pair!r}: 'term' is {term!r}, not a term")
    return int(term)


def parse_term_site(pair: str, value: bytes | str) -> str | None:
    """The site that took the newest term of ``pair`` (None in a key without one)."""
    site = _json_object(value, f"term key of {pair!r}").get("site")
    return site if isinstance(site, str) and site else None


def site_value(site: str, lease: int) -> str:
    return json.dumps({"site": site, "lease": lease}, sort_keys=True)


def _whole(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_object(value: bytes | str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(value)
    except (ValueError, RecursionError):
        raise ArbiterUnavailable(f"{what} is not JSON written by hbmon: {value!r:.80}") from None
    if not isinstance(doc, dict):
        raise ArbiterUnavailable(f"{what} is not a JSON object: {value!r:.80}")
    return doc


class Refusal(Exception):
    """The arbiter's answer to a candidate: no failover, and why (``code`` for programs,
    ``reason`` for people)."""

    def __init__(self, code: RefusalCode, reason: str) -> None:
        self.code: RefusalCode = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")
