"""The site's side of the arbiter: one lease, the pairs it owns, demotes, takeovers.

:meth:`Keeper.run` gets a lease (or reuses the one in ``state_file`` while the store still
has it: a restart within ``lease_ttl`` keeps ownership), claims the site's ``[[beat]]``
pairs once (absent: new term; already this site's: kept; another site's: not owned) and
renews every ``lease_ttl / 3``, counted from each renewal's send time
(:class:`~hbmon.arbiter.lease.LeaseClock`).  A watchdog gives the lease up at
``demote_at`` unless a renewal was confirmed before, whatever a request in flight is
doing; a watch on the owner keys demotes a pair at once when its key is deleted or taken.
Giving up demotes every owned pair concurrently (its ``demote`` command with
``HBMON_FENCING_TOKEN``, journaled as event ``demote`` and counted) and only then revokes
the lease, so the winner cannot start first.  Pairs are never claimed again by the keeper
itself: only at start, or by :meth:`Keeper.claim` for the operator.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import anyio
import anyio.abc
import anyio.to_thread

from hbmon.arbiter.base import OWNER, Owner, Refusal, Store
from hbmon.arbiter.lease import MARGIN, LeaseClock, LeaseTiming
from hbmon.arbiter.support import (
    ArbiterStatistics,
    DemoteResult,
    OwnerBook,
    aclose,
    claim_each,
    demote_env,
    key_deleted,
    on_clock,
    read_demoted,
    read_state,
    run_demote,
    write_state,
)
from hbmon.clock import Clock
from hbmon.config import BeatConfig
from hbmon.errors import ArbiterError, ArbiterUnavailable, LeaseLost, OwnerTaken
from hbmon.failover import Journal

__all__ = ["ArbiterStatistics", "Keeper", "OwnerState"]
log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
OwnerState = Literal["alive", "gone", "unknown"]
CLAIM_CHUNK = 32  # start claims a request (Store.claim_many; EtcdStore: one transaction)
CLAIMS_AT_ONCE = 4  # such requests in flight together
DEMOTES_AT_ONCE = 128  # demote commands running together


class Keeper:
    """See the module docstring."""

    def __init__(
        self,
        store: Store,
        site: str,
        beats: Sequence[BeatConfig],
        timing: LeaseTiming,
        clock: Clock,
        journal: Journal,
        *,
        state_file: Path | None,
        election_timeout: float = 1.0,
        demote_for: Callable[[str], tuple[str, ...]] | None = None,
    ) -> None:
        self.store, self.site, self.timing, self.clock = store, site, timing, clock
        self.journal, self.state_file, self.election_timeout = journal, state_file, election_timeout
        self.beats = {beat.id: beat for beat in beats}
        # The demote command of a pair this site does not beat (one it took over).
        self.demote_for = demote_for
        self.lease_clock = LeaseClock(timing, clock)
        self.lease: int | None = None
        self.requests = 0  # store calls made
        self.demotes: Counter[tuple[str, DemoteResult]] = Counter()
        self.journal_errors = 0
        self.working = 0  # demotes and file writes under way (virtual time waits for them)
        self._retry = min(0.5, timing.renew_every / 4)
        self._belt = 2 * timing.request_timeout + 1
        self._stored = read_state(state_file, site)  # a lease to try to reuse, once
        # pair -> term at which this site demoted it: a restart does not take it back.
        self._demoted = read_demoted(state_file, site)
        self._first_round = True  # the start claims also take back what this site last took
        self._registered = False
        self._pending = set(self.beats)  # start claims not answered yet
        self._owned: dict[str, Owner] = {}
        self._disowned: set[str] = set()  # demoted; the key may still be under our lease
        self.book = OwnerBook()  # kept current by the watch
        self._watching = False
        self._last_ok = -math.inf
        self._failing = False  # the last request got no answer
        self._alarm = anyio.Event()  # wakes the watchdog
        self._kick = anyio.Event()  # wakes the lease loop
        self._obtaining = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None
        # Told (pair, term) when the store hands this site a pair (a planned handover or
        # fail-back): the site runs that pair's failover command with the new term.
        self.on_gained: Callable[[str, int], None] | None = None
        self._claiming: set[str] = set()  # claims in flight (take_over, start claims)
        # Told the pair whose owner the view now shows differently (the verdict of a pair
        # whose every path is stale depends on it).
        self.on_change: Callable[[str], None] | None = None

    # -- what the others ask ------------------------------------------------------------

    def owned(self, pair: str, now: float | None = None) -> bool:
        """True while this site owns ``pair`` and can prove its lease (at ``now``, the
        beater's tick: 10,000 beats a second read the clock once a tick, not each); the
        first False after the lease ran out (a pause) starts the demote at once."""
        if pair not in self._owned:
            return False
        if self.lease_clock.valid(now):
            return True
        self._alarm.set()
        return False

    def owner_state(self, pair: str) -> OwnerState:
        """What the arbiter says of the owner that writes ``pair``'s beats: ``alive`` while
        another site holds it, ``gone`` when nobody does or this site took it over (the
        writer it watched is gone), ``unknown`` while the view is not current."""
        if not self._current() or pair in self.book.foreign:
            return "unknown"
        owner = self.book.owners.get(pair)
        return "alive" if owner is not None and owner.site != self.site else "gone"

    @property
    def takeover_wait(self) -> float:
        """How long a candidate waits for the owner key to go: lease_ttl + election
        timeout + margin (etcd's new leader may extend a lease by an election timeout)."""
        return self.timing.lease_ttl + self.election_timeout + MARGIN

    def statistics(self) -> ArbiterStatistics:
        return ArbiterStatistics(
            up=self._up(),
            lease_remaining=self.lease_clock.remaining(),
            owned=frozenset(self._owned) if self.lease_clock.valid() else frozenset(),
            terms=dict(self.book.terms),
            demotes=dict(self.demotes),
            requests=self.requests,
        )

    def status(self) -> dict[str, Any]:
        book = self.book
        pairs = {
            pair: {**book.describe(pair), "owned": self.owned(pair)}
            for pair in sorted(set(book.terms) | set(book.owners) | set(self.beats))
        }
        doc: dict[str, Any] = {
            "site": self.site,
            "up": self._up(),
            "view_current": self._current(),
            "lease": None if self.lease is None else f"{self.lease:x}",
            "lease_remaining": round(self.lease_clock.remaining(), 3),
            "pairs": pairs,
        }
        health = getattr(self.store, "health", None)
        if callable(health):  # (endpoint health, where the store keeps one)
            doc["endpoints"] = health()
        return doc

    # -- the lease ------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the lease until cancelled (as a kill: nothing is given up on the way out)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            due = await self._step()
            tg.start_soon(self._watcher)
            tg.start_soon(self._watchdog)
            tg.start_soon(self._renewer, due)
            await tg.start(self._claimer)  # ownership known (or the arbiter unavailable)
            task_status.started()

    async def _renewer(self, due: float) -> None:
        while True:
            await self.clock.sleep_until(due, self._kick)
            if self._kick.is_set():
                self._kick = anyio.Event()
            due = await self._step()

    async def _claimer(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """The start claims, beside the renewals: at 10,000 pairs (or a slow arbiter) they
        take longer than a renewal period, and a renewal waiting for them would let the
        lease run out.  Ready after the first attempt, claimed or not."""
        ready = False
        while self._pending or self._first_round:
            lease = self.lease
            try:
                if lease is not None:
                    await self._claim_pending()
            except LeaseLost as err:
                await self._give_up(lease, f"the arbiter says the lease is gone: {err}")
            except ArbiterUnavailable:
                pass
            if not ready:
                task_status.started()
                ready = True
            if self._pending or self._first_round:
                await self.clock.sleep_until(self.clock.monotonic() + self._retry)
        if not ready:
            task_status.started()

    async def _step(self) -> float:
        """One round: get a lease, or renew it when due; when the next is due."""
        lease = self.lease
        try:
            if lease is None:
                await self._ensure_lease()
            elif not self.lease_clock.valid():  # (paused past demote_at: never renew then)
                await self._give_up(lease, self._expired())
            elif self.clock.monotonic() >= self.lease_clock.renew_at:
                sent = self.lease_clock.send()
                granted = await self._ask(self.store.keepalive, lease)
                if lease != self.lease:
                    return self.clock.monotonic()  # given up while the renewal was out
                if granted <= 0:
                    raise LeaseLost(f"the arbiter renewed lease {lease:x} with TTL {granted}")
                self.lease_clock.confirm(sent, granted)
            if not self._registered and self.lease is not None:
                await self._ask(self.store.register, self.site, self.lease)
                self._registered = True
        except LeaseLost as err:
            lost = self.lease if lease is None else lease
            await self._give_up(lost, f"the arbiter says the lease is gone: {err}")
            return self.clock.monotonic()
        except ArbiterUnavailable:
            return self.clock.monotonic() + self._retry
        if self.lease is None:
            return self.clock.monotonic() + self._retry
        return self.lease_clock.renew_at

    async def _ensure_lease(self) -> int:
        """The lease held, else the stored one while the store has it, else a new one."""
        async with self._obtaining:
            if self.lease is None:
                self.lease, self._registered = await self._obtain(), False
                self._disowned.clear()
                self._alarm.set()
                await self._save()
                log.info("arbiter: site %s holds lease %x", self.site, self.lease)
            return self.lease

    async def _obtain(self) -> int:
        stored = self._stored
        if stored is not None:
            left = await self._ask(self.store.time_left, stored)
            self._stored = None  # (asked once the store answers)
            if left is not None and left > 0:
                sent = self.lease_clock.send()
                with contextlib.suppress(LeaseLost):
                    granted = await self._ask(self.store.keepalive, stored)
                    if granted > 0:
                        self.lease_clock.confirm(sent, granted)
                        return stored
        sent = self.lease_clock.send()
        lease = await self._ask(self.store.grant, self.timing.lease_ttl)
        self.lease_clock.confirm(sent, self.timing.lease_ttl)
        return lease

    async def _claim_pending(self) -> None:
        lease = self.lease
        if lease is None:
            return

        def got(owner: Owner) -> None:
            if lease == self.lease and owner.pair in self._pending:
                self._own(owner)

        async def claim(pairs: Sequence[str]) -> dict[str, Owner | OwnerTaken]:
            self._claiming.update(pairs)  # (the watch, beside, may see these claims first)
            try:
                answers = await self._ask(self.store.claim_many, pairs, self.site, lease)
                for answer in answers.values():
                    if isinstance(answer, Owner):
                        got(answer)  # (owned before the watch can take it for a handover)
                return answers
            finally:
                self._claiming.difference_update(pairs)

        view = await self._ask(self.store.view)  # (skip what is not this site's to claim)
        if self._first_round:  # a restart: what this site took last (a failover) is its own
            self._first_round = False
            self._pending |= {p for p, site in view.last_owner.items() if site == self.site}
        for pair in sorted(self._pending):
            held = view.owners.get(pair)
            took = view.last_owner.get(pair)
            if self._demoted.get(pair) == view.terms.get(pair, 0) and held is None:
                log.warning(
                    "arbiter: %s was demoted here at term %d: not taken back (to serve it "
                    "here again: hbmon arbiter handover at its owner, or claim it)",
                    pair,
                    self._demoted[pair],
                )
                self._pending.discard(pair)
            elif held is None and took is not None and took != self.site:
                log.warning(
                    "arbiter: %s was taken over by %s at term %d: this site does not take it "
                    "back by itself, even now that its key has expired (fail-back: hbmon "
                    "arbiter handover)",
                    pair,
                    took,
                    view.terms.get(pair, 0),
                )
                self._pending.discard(pair)
            elif self.store.key(OWNER, pair) in view.foreign:
                log.error(
                    "arbiter: the owner key of %s was not written by hbmon: not claimed; "
                    "its beats say standby (remove the key or change [arbiter] prefix)",
                    pair,
                )
                self._pending.discard(pair)
            elif held and held.site != self.site:
                log.warning(
                    "arbiter: %s is owned by %s at term %d: this site writes standby records "
                    "for it and does not take it back (fail-back: hbmon arbiter handover)",
                    pair,
                    held.site,
                    held.term,
                )
                self._pending.discard(pair)
        pending = sorted(self._pending)
        self._pending -= await claim_each(claim, pending, CLAIM_CHUNK, CLAIMS_AT_ONCE, got)
        if self._pending:
            raise ArbiterUnavailable(f"{len(self._pending)} pairs not claimed yet")

    def _own(self, owner: Owner) -> None:
        self._demoted.pop(owner.pair, None)
        self._owned[owner.pair] = owner
        self._disowned.discard(owner.pair)
        self.book.note(owner.pair, owner)

    # -- losing ---------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        while True:
            alarm = self._alarm
            if self.lease is not None:
                await self.clock.sleep_until(self.lease_clock.demote_at, alarm)
            else:
                await alarm.wait()
            if alarm.is_set():
                self._alarm = anyio.Event()
            if self.lease is not None and not self.lease_clock.valid():
                await self._give_up(self.lease, self._expired())

    def _expired(self) -> str:
        now = self.clock.monotonic()
        ago, left = now - (self.lease_clock.sent or now), self.lease_clock.remaining(now)
        paused = " (was this process paused?)" if left <= 0 else ""
        return (
            f"the lease could not be renewed in time (last renewal sent {ago:.1f} s ago, "
            f"{left:.1f} s left before the arbiter may expire it){paused}"
        )

    async def _give_up(self, lease: int | None, reason: str) -> None:
        """Demote every owned pair, then end ``lease`` (unless already given up)."""
        if lease is None or lease != self.lease:
            return
        self.lease, self._registered = None, False
        self.lease_clock.lose()
        owners, self._owned = self._owned, {}
        if owners:
            self._pending.clear()  # never claimed by the keeper itself after a demote
        log.warning("arbiter: giving up lease %x: %s", lease, reason)
        await self._demote_all(owners, reason)  # first: the winner must not start before
        await self._save()
        with contextlib.suppress(ArbiterError):
            await self._ask(self.store.revoke, lease)
        self._kick.set()

    async def _demote_all(self, owners: Mapping[str, Owner], reason: str) -> None:
        """Demote ``owners`` concurrently, all by ``demote_budget`` from now."""
        deadline = self.clock.monotonic() + self.timing.demote_budget
        limiter = anyio.CapacityLimiter(DEMOTES_AT_ONCE)
        self._disowned.update(owners)
        self._demoted.update({pair: owner.term for pair, owner in owners.items()})
        self.working += len(owners)

        async def one(owner: Owner) -> None:
            try:
                async with limiter:
                    await self._demote(owner, reason, deadline)
            finally:
                self.working -= 1

        async with anyio.create_task_group() as tg:
            for owner in owners.values():
                tg.start_soon(one, owner)

    async def _demote(self, owner: Owner, reason: str, deadline: float) -> None:
        """Run ``owner.pair``'s demote command by ``deadline``; journal and count it."""
        beat = self.beats.get(owner.pair)
        command = beat.demote if beat is not None else ()
        if not command and self.demote_for is not None:
            command = self.demote_for(owner.pair)
        env = demote_env(owner.pair, self.site, reason, owner.term)
        budget = self.timing.demote_budget
        with anyio.CancelScope(shield=True):  # (a shutdown waits for it: budget-bounded)
            result, entry = await run_demote(command, env, self.clock, deadline, budget)
            self.demotes[(owner.pair, result)] += 1
            try:
                await anyio.to_thread.run_sync(self.journal.append, entry)
            except OSError as err:
                self.journal_errors += 1
                log.error("demote of %s: %s, but not journaled: %s", owner.pair, result, err)
        log.warning("arbiter: demote of %s (term %d): %s", owner.pair, owner.term, result)

    def _lose(self, pair: str, reason: str) -> None:
        """``pair``'s key is no longer ours: demote it at once, in the background."""
        owner = self._owned.pop(pair, None)
        if owner is not None and self._tg is not None:
            self.working += 1  # (from now on: a test's run_for waits for it)
            self._tg.start_soon(self._demote_one, owner, reason)

    async def _demote_one(self, owner: Owner, reason: str) -> None:
        try:
            await self._demote_all({owner.pair: owner}, reason)
            await self._save()
        finally:
            self.working -= 1

    # -- the view ------------------------------------------------------------------------

    async def _watcher(self) -> None:
        book = self.book
        while True:
            try:
                view = await self._ask(self.store.view)
                book.reset(view, self.store.key(OWNER, ""))
                for pair in set(self._owned) | set(view.owners):
                    self._take(pair, view.owners.get(pair), view.revision, "a fresh read")
                self.requests += 1
                self._watching = True
                events = self.store.watch(view.revision)
                try:
                    async for event in events:
                        book.revision = max(book.revision, event.revision)
                        if event.foreign:  # a stranger's write: who owns it is unknown
                            book.foreign.add(event.pair)
                            continue  # (an owner goes on: no demote for it)
                        book.foreign.discard(event.pair)
                        self._take(event.pair, event.owner, event.revision, "the watch")
                finally:
                    await aclose(events)
            except ArbiterUnavailable as err:
                log.info("arbiter: the watch ended: %s", err)
            finally:
                self._watching = False
            await self.clock.sleep_until(self.clock.monotonic() + self._retry)

    def _take(self, pair: str, now: Owner | None, revision: int, source: str) -> None:
        """What the store says of ``pair`` at ``revision``: noted; an owned pair lost is
        demoted, a pair the store gave this site's lease (a handover) is owned."""
        mine = self._owned.get(pair)
        if mine is not None and revision <= mine.revision:
            return  # older than what this keeper itself did
        before = self.book.owners.get(pair)
        self.book.note(pair, now)
        if self.on_change is not None and before != now:
            self.on_change(pair)
        if now is not None and (now.site, now.lease) == (self.site, self.lease):
            if mine is None and pair in self._disowned:
                return  # demoted here: never taken back by the keeper itself
            self._own(now)
            # Not a handover: a claim of its own in flight, or a key this site held when it
            # started (a restart within its lease: the start claims keep it, as before the
            # watch's first read; told, the site would run the failover command again).
            starting = self._first_round or pair in self._pending
            if mine is None and pair not in self._claiming and not starting:
                log.warning("arbiter: %s was handed to this site (term %d)", pair, now.term)
                if self.on_gained is not None:
                    self.on_gained(pair, now.term)
        elif mine is not None:
            how = "deleted" if now is None else f"taken by {now.site} at term {now.term}"
            self._lose(pair, f"{source} shows the owner key {how}")
        else:
            self._disowned.discard(pair)

    def _current(self) -> bool:
        return self._watching and self._up()

    def _up(self) -> bool:
        limit = self.timing.renew_every + self.timing.request_timeout
        return self.clock.monotonic() - self._last_ok <= limit

    # -- the candidate, the operator -----------------------------------------------------

    async def take_over(self, pair: str, wait: float) -> int:
        """Own ``pair`` once the arbiter has deleted its owner key (waiting up to ``wait``
        on the clock); the new term, the fencing token.  Refusal otherwise."""
        mine = f"{pair} is already owned by this site"
        if self.owned(pair):
            raise Refusal("owner_taken", mine)
        deadline = self.clock.monotonic() + wait
        holder: Owner | None = None
        try:
            lease = await self._ensure_lease()
            while True:
                view = await self._ask(self.store.view)
                if self.store.key(OWNER, pair) in view.foreign:
                    why = f"the owner key of {pair} holds a value hbmon did not write"
                    raise Refusal("owner_taken", why)
                holder = view.owners.get(pair)
                if holder is not None and (holder.site, holder.lease) == (self.site, lease):
                    raise Refusal("owner_taken", mine)
                if holder is None or await self._deleted(holder, view.revision, deadline):
                    break
            self._claiming.add(pair)  # (its watch event is this claim, not a handover)
            try:
                owner = await self._claim_known(pair, lease)
            finally:
                self._claiming.discard(pair)
            if lease != self.lease:
                raise LeaseLost(f"lease {lease:x} was given up while {pair} was claimed")
        except OwnerTaken as err:
            raise Refusal("owner_taken", str(err)) from None
        except ArbiterError as err:
            raise Refusal("no_quorum", f"the arbiter could not be asked: {err}") from None
        except TimeoutError:
            who = f"{holder.site} at term {holder.term}" if holder else "its owner"
            raise Refusal("owner_alive", f"{pair} still held by {who} after {wait:g} s") from None
        self._own(owner)
        return owner.term

    async def _claim_known(self, pair: str, lease: int) -> Owner:
        """Claim ``pair`` (its key gone) under ``lease``, and know the outcome.  A claim
        whose answer was lost may have committed: this site then owns the pair, and a
        refusal would leave it owned with its failover never run.  So the outcome is read
        (the watch, or a view) until it is known; absent: claimed again.  Given up (no
        quorum) only once ``lease`` is: then nothing is owned here anyway."""
        while True:
            try:
                return await self._ask(self.store.claim, pair, self.site, lease)
            except ArbiterUnavailable:
                pass
            while True:
                mine = self._owned.get(pair)
                if mine is not None and mine.lease == lease:
                    return mine  # (the watch saw the claim commit)
                if lease != self.lease or not self.lease_clock.valid():
                    raise LeaseLost(f"lease {lease:x} ended before the claim of {pair} was known")
                try:
                    view = await self._ask(self.store.view)
                except ArbiterUnavailable:
                    await self.clock.sleep_until(self.clock.monotonic() + self._retry)
                    continue
                if self.store.key(OWNER, pair) in view.foreign:
                    raise OwnerTaken(pair, "a writer that is not hbmon", None)
                held = view.owners.get(pair)
                if held is None:
                    break  # it did not commit: claim again
                if (held.site, held.lease) == (self.site, lease):
                    return held
                raise OwnerTaken(pair, held.site, held.term)

    async def _deleted(self, holder: Owner, revision: int, deadline: float) -> bool:
        """Wait for ``holder``'s owner key to go: True once deleted; False when the watch
        broke (read again); TimeoutError at ``deadline``; OwnerTaken (see key_deleted)."""
        self.requests += 1
        try:
            return await on_clock(
                self.clock, deadline, lambda: key_deleted(self.store, holder, revision)
            )
        except ArbiterUnavailable:
            await self.clock.sleep_until(min(deadline, self.clock.monotonic() + self._retry))
            if self.clock.monotonic() >= deadline:
                raise TimeoutError from None
            return False

    async def claim(self, pair: str) -> int:
        """Claim ``pair`` for this site (the operator's fail-back); its term."""
        lease = await self._ensure_lease()
        owner = await self._ask(self.store.claim, pair, self.site, lease, keep=True)
        if lease != self.lease:
            raise LeaseLost(f"lease {lease:x} was given up while {pair} was claimed")
        self._own(owner)
        await self._save()  # (no longer "demoted here")
        return owner.term

    async def release(self, pair: str) -> None:
        """Demote ``pair`` here (journaled), then delete its owner key."""
        await self._ask(self.store.release, await self._drop(pair, "released by the operator"))

    async def abandon(self, pair: str) -> None:
        """The lab's dead host: ``pair``'s ownership ends as its own lease's expiry would
        end it (its key deleted, no demote: a dead host runs nothing), and it is never
        taken back by this keeper.  Only the demo's ``kill-host`` uses this."""
        owner = self._owned.pop(pair, None)
        if owner is None:
            return
        self._disowned.add(pair)
        log.warning("arbiter: %s abandoned (the lab killed its host): key deleted", pair)
        await self._ask(self.store.release, owner)

    async def hand_over(self, pair: str, site: str) -> int:
        """Demote ``pair`` here (journaled), then move it to ``site``; the new term."""
        owner = await self._drop(pair, f"handed over to {site} by the operator")
        return (await self._ask(self.store.hand_over, owner, site)).term

    async def _drop(self, pair: str, reason: str) -> Owner:
        owner = self._owned.pop(pair, None)
        if owner is not None:
            self.working += 1
            await self._demote_one(owner, reason)
            return owner
        held = self.book.owners.get(pair)
        if held is None or held.site != self.site:
            raise OwnerTaken(pair, held.site if held else "nobody", held.term if held else None)
        return held

    # -- plumbing -------------------------------------------------------------------------

    async def _ask(self, call: Callable[P, Awaitable[T]], *args: P.args, **kw: P.kwargs) -> T:
        """One store call, counted, under the belt deadline (real time)."""
        self.requests += 1
        try:
            with anyio.fail_after(self._belt):
                result = await call(*args, **kw)
        except (TimeoutError, ArbiterUnavailable) as err:
            if isinstance(err, TimeoutError):
                err = ArbiterUnavailable(f"no answer within {self._belt:g} s")
            if not self._failing:  # (once per outage, not every retry)
                log.warning("arbiter: unavailable: %s", err)
            self._failing = True
            raise err from None
        if self._failing:
            log.warning("arbiter: answering again")
        self._failing, self._last_ok = False, self.clock.monotonic()
        return result

    async def _save(self) -> None:
        """Note the lease in the state file (a restart reuses it); a failure is logged."""
        if self.state_file is not None:
            self.working += 1
            try:
                await anyio.to_thread.run_sync(
                    write_state, self.state_file, self.site, self.lease, dict(self._demoted)
                )
            except OSError as err:
                log.error("arbiter: cannot write %s: %s", self.state_file, err)
            finally:
                self.working -= 1

