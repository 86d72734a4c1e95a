"""The arbiter: a third vote against split brain, from an existing consensus store.

Laid out as Patroni lays out its DCS: :mod:`.base` is the interface (owner snapshots,
the store's calls, the refusal codes), :mod:`.lease` the lease arithmetic on the
monotonic clock (no store in it), :mod:`.etcd` the one real store (etcd v3 through its
JSON gRPC gateway), :mod:`.memory` an in-memory store for unit tests only, and
:mod:`.keeper` the site's side: one lease, the owned pairs, demotes, takeovers.  The
guard asks the keeper; the arbiter never reaches into the poller or the status table.
"""

from __future__ import annotations

from hbmon.arbiter.base import (
    REFUSAL_CODES,
    Owner,
    OwnerEvent,
    OwnerView,
    Refusal,
    RefusalCode,
    Store,
)
from hbmon.arbiter.lease import MARGIN, LeaseClock, LeaseTiming

__all__ = [
    "MARGIN",
    "REFUSAL_CODES",
    "LeaseClock",
    "LeaseTiming",
    "Owner",
    "OwnerEvent",
    "OwnerView",
    "Refusal",
    "RefusalCode",
    "Store",
]
