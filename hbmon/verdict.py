"""The per-pair verdict, derived from the states of the pair's configured paths.

With both paths (the patent's FIG. 8, method ``both``) hbmon can tell a dead host from a
broken link: the storage link and the network are independent routes between the sites.

=====================  =====================  ======================
volume path            network path           verdict
=====================  =====================  ======================
fresh                  fresh                  ``alive``
stale                  stale                  ``host_down``
fresh                  stale                  ``network_partition``
stale                  fresh                  ``link_down``
fresh                  anything else          ``degraded``
anything else          fresh                  ``degraded``
neither fresh nor both stale                  ``unknown``
=====================  =====================  ======================

With an arbiter, "every path stale" is ``host_down`` only once the owner of the pair is
gone from the arbiter (its lease expired: etcd deleted its owner key).  While the
owner's lease is alive, or while this site cannot ask the arbiter, it is ``isolated``: a
cut between the sites, not a death, and never a reason to fail over.

``fresh`` is ``alive`` or ``late``.  A pair checked on one path only says ``alive`` or
``host_down`` from that path alone; :func:`single_path_note` says why that ``host_down``
may be a broken link instead.  Lifecycle verdicts come first: ``retired`` when any path
reads a retired record, ``stopped`` for a planned stop, ``awaiting`` before the first
beat of an installed pair.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Literal, get_args

#: The paths a heartbeat travels.
PathName = Literal["volume", "network"]
#: The state of one path of one pair (DESIGN.md principle 5).
PathState = Literal[
    "awaiting",
    "alive",
    "late",
    "stale",
    "invalid",
    "io_error",
    "io_hung",
    "stopped",
    "retired",
]
#: A pair's verdict, derived from the states of its configured paths.
Verdict = Literal[
    "alive",
    "host_down",
    "isolated",
    "network_partition",
    "link_down",
    "degraded",
    "unknown",
    "awaiting",
    "stopped",
    "retired",
]
PATHS: tuple[PathName, ...] = get_args(PathName)
STATES: tuple[PathState, ...] = get_args(PathState)
VERDICTS: tuple[Verdict, ...] = get_args(Verdict)

#: What the arbiter says of a pair's owner: its lease is alive, it is gone, or this site
#: cannot tell (the arbiter is not reachable, or its view is not current).
OwnerState = Literal["alive", "gone", "unknown"]

#: Path states that count as fresh.
FRESH: frozenset[PathState] = frozenset({"alive", "late"})


def verdict(
    states: Mapping[str, PathState],
    ahead: Collection[str] | None = None,
    owner: OwnerState | None = None,
) -> Verdict:
    """The verdict for a pair whose configured paths are in ``states`` (path -> state).

    ``owner`` is what the arbiter says of the pair's owner (None: no arbiter): every path
    stale is ``host_down`` only when the owner is ``gone`` (or there is no arbiter), else
    ``isolated``.

    ``ahead`` names the path whose newest beat is newer than the other's (the evidence
    that the host outlived the silent path).  When it is given, a partition or a broken
    link needs that evidence: when a host dies, the faster path goes quiet first while
    the slower one still shows the same last beat, and that must not read as a partition
    for the second in between (it reads ``degraded`` until both are stale).
    """
    values = set(states.values())
    if not values:
        return "unknown"
    if "retired" in values:
        return "retired"
    if "stopped" in values and not values & FRESH:
        return "stopped"
    if values == {"awaiting"}:
        return "awaiting"
    fresh = {path for path, state in states.items() if state in FRESH}
    stale = {path for path, state in states.items() if state == "stale"}
    if len(fresh) == len(states):
        return "alive"
    if len(stale) == len(states):
        return "host_down" if owner in (None, "gone") else "isolated"
    if len(states) == 2:
        if fresh == {"volume"} and stale == {"network"} and (ahead is None or "volume" in ahead):
            return "network_partition"
        if fresh == {"network"} and stale == {"volume"} and (ahead is None or "network" in ahead):
            return "link_down"
    if fresh:
        return "degraded"
    return "unknown"


_ONE_PATH = {
    "volume": "only the volume path is checked: a stopped remote copy looks like a dead host",
    "network": "only the network path is checked: a network partition looks like a dead host",
}


def single_path_note(method: str, result: Verdict) -> str:
    """Why a one-path ``host_down`` is weaker than it looks ("" when it is not)."""
    return _ONE_PATH.get(method, "") if result == "host_down" else ""
