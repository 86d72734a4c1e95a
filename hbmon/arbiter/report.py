"""``hbmon arbiter status``: who owns what at the arbiter, read straight from the store.

Read from etcd itself (one linearizable range and one time-to-live per site lease), so it
answers while a daemon is down, and tells the same thing whichever site asks.
"""

from __future__ import annotations

from typing import Any

from hbmon.arbiter.base import Store


async def describe(store: Store) -> dict[str, Any]:
    """Owners, terms, sites and their leases as plain data; raises ArbiterUnavailable."""
    view = await store.view()
    sites: dict[str, dict[str, Any]] = {}
    for site, lease in sorted(view.sites.items()):
        left = await store.time_left(lease)
        sites[site] = {"lease": lease, "lease_remaining": left}
    pairs: dict[str, dict[str, Any]] = {}
    for pair in sorted({*view.owners, *view.terms}):
        owner = view.owners.get(pair)
        pairs[pair] = {
            "owner": None if owner is None else owner.site,
            "term": owner.term if owner is not None else view.terms.get(pair),
            "lease": None if owner is None else owner.lease,
            "newest_term": view.terms.get(pair),
        }
    return {
        "prefix": store.prefix,
        "revision": view.revision,
        "sites": sites,
        "pairs": pairs,
        "foreign": list(view.foreign),
    }


def format_description(doc: dict[str, Any]) -> str:
    """The text of ``hbmon arbiter status``."""
    lines = [f"arbiter prefix {doc['prefix']} at revision {doc['revision']}"]
    lines.append("SITE  LEASE  LEFT")
    for site, info in doc["sites"].items():
        left = info["lease_remaining"]
        shown = "expired" if left is None else f"{left:.0f}s"
        lines.append(f"{site}  {info['lease']:x}  {shown}")
    if not doc["sites"]:
        lines.append("(no site holds a lease)")
    lines.append("PAIR  OWNER  TERM")
    for pair, info in doc["pairs"].items():
        owner = info["owner"] or "(none: the owner's lease expired or was released)"
        lines.append(f"{pair}  {owner}  {info['term']}")
    if not doc["pairs"]:
        lines.append("(no pair has ever been owned)")
    for key in doc["foreign"]:
        lines.append(f"warning: {key} was not written by hbmon (remove it or change prefix)")
    return "\n".join(lines)
