"""The lease as this process can prove it: arithmetic on the monotonic clock, no store.

A renewal confirmed by the store proves the lease lives until at least ``send time +
granted TTL``: the store counts the TTL from when it handled the request, which is after
it was sent, and etcd never expires a lease early (a new leader even extends it).  So the
lease is counted from each renewal's *send* time, never from the reply (Patroni's reading
of the wall clock after the reply would give the lease away late).

The owner must have stopped its service before the lease can expire at the store, so it
demotes ``demote_budget + MARGIN`` before that instant.  A renewal is sent every
``lease_ttl / 3``; one that fails is tried again on another endpoint.  The timing is safe
when a renewal that fails twice, each after ``request_timeout``, still leaves the whole
demote budget and the margin before expiry::

    lease_ttl / 3 + 2 x request_timeout + demote_budget + MARGIN <= lease_ttl

(shipped: 5 + 2 x 2 + 5 + 1 = 15 s).  ``MARGIN`` covers the rate error between this
host's monotonic clock and the store's (NTP slews at most 500 ppm: 7.5 ms over 15 s) and
the start of the demote command.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hbmon.clock import Clock

MARGIN = 1.0  # seconds; see the module docstring
MIN_TTL = 2.0
#: etcd's default --election-timeout: a leader lost while a lease runs out delays the
#: expiry by about this much (the new leader then counts the lease afresh).
ELECTION_TIMEOUT = 1.0


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """The four numbers of ``[arbiter]`` that decide whether a demote can be in time."""

    lease_ttl: float = 15.0
    request_timeout: float = 2.0
    demote_budget: float = 5.0

    @property
    def renew_every(self) -> float:
        return self.lease_ttl / 3

    @property
    def needed(self) -> float:
        """The least ``lease_ttl`` the other three numbers can be safe with."""
        return self.renew_every + 2 * self.request_timeout + self.demote_budget + MARGIN

    @property
    def takeover_wait(self) -> float:
        """How long a candidate waits for etcd to delete a live owner's key: a lease
        renewed just before the cut, plus an election, plus the margin."""
        return self.lease_ttl + ELECTION_TIMEOUT + MARGIN

    def problem(self) -> str | None:
        """Why this timing cannot be safe, naming the keys, or None."""
        if not math.isfinite(self.lease_ttl) or self.lease_ttl < MIN_TTL:
            return f"lease_ttl is {self.lease_ttl:g} s; it must be at least {MIN_TTL:g} s"
        if self.needed > self.lease_ttl + 1e-9:
            return (
                f"lease_ttl / 3 + 2 x request_timeout + demote_budget + {MARGIN:g} s margin = "
                f"{self.renew_every:g} + 2 x {self.request_timeout:g} + {self.demote_budget:g} "
                f"+ {MARGIN:g} = {self.needed:g} s exceeds lease_ttl ({self.lease_ttl:g} s): "
                "a site cut off right after a renewal could not finish its demote before the "
                "arbiter hands its pairs to another site; raise lease_ttl or lower "
                "request_timeout or demote_budget"
            )
        return None


class LeaseClock:
    """This site's lease, counted from the send time of the newest confirmed renewal."""

    def __init__(self, timing: LeaseTiming, clock: Clock) -> None:
        self.timing = timing
        self.clock = clock
        self.sent: float | None = None  # send time of the newest confirmed renewal
        self.granted = 0.0  # the TTL the store granted with it

    def send(self) -> float:
        """The instant a request is about to be sent: call it before sending."""
        return self.clock.monotonic()

    def confirm(self, sent: float, granted: float) -> None:
        """The store confirmed a grant or renewal sent at ``sent`` with TTL ``granted``."""
        if self.sent is None or sent >= self.sent:
            self.sent, self.granted = sent, granted

    def lose(self) -> None:
        """The lease is gone (expired, revoked, or given up)."""
        self.sent, self.granted = None, 0.0

    @property
    def held(self) -> bool:
        return self.sent is not None

    @property
    def expires_at(self) -> float:
        """The earliest instant the store may expire the lease (-inf when none is held)."""
        return -math.inf if self.sent is None else self.sent + self.granted

    @property
    def demote_at(self) -> float:
        """When owned pairs must be demoted if no renewal was confirmed before."""
        return self.expires_at - self.timing.demote_budget - MARGIN

    @property
    def renew_at(self) -> float:
        """When the next renewal is due."""
        return -math.inf if self.sent is None else self.sent + self.timing.renew_every

    def remaining(self, now: float | None = None) -> float:
        """Seconds left before the store may expire the lease (0 when none is held)."""
        now = self.clock.monotonic() if now is None else now
        return max(0.0, self.expires_at - now)

    def valid(self, now: float | None = None) -> bool:
        """True while pairs may still be served: before ``demote_at``."""
        now = self.clock.monotonic() if now is None else now
        return now < self.demote_at
