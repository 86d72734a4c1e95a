"""Text rendering of the status table, for `hbmon status` and the demo's live view."""

from __future__ import annotations

import time
from typing import Any


def format_status(doc: dict[str, Any], limit: int | None = None) -> str:
    """The table of a ``/status.json`` document, worst rows first; ``limit`` rows at most."""
    headers = "PAIR PATH SERIAL WRITER_TIME IDENTIFIER AGE MISSED STATE VERDICT NOTES".split()
    headers = [h.replace("_", " ") for h in headers]
    rows = []
    shown = doc["rows"] if limit is None else doc["rows"][:limit]
    for r in shown:
        wt, age = r.get("writer_time"), r.get("age")
        notes = [r.get(k) for k in ("detail", "note", "timing_note", "verdict_note")]
        if r.get("owner") is not None:
            notes.insert(0, f"owner {r['owner']} term {r.get('term')}")
        rows.append(
            (
                r["pair"],
                r["path"],
                "-" if r.get("serial") is None else str(r["serial"]),
                "-" if wt is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wt)),
                r.get("incarnation") or "-",
                "-" if age is None else f"{age:.1f}s",
                str(r.get("missed", 0)),
                r["state"] + (f" ({r['reason']})" if r.get("reason") else ""),
                r.get("verdict", "-"),
                "; ".join(n for n in notes if n),
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    counts = ", ".join(f"{n} {s}" for s, n in sorted(doc.get("states", {}).items()))
    more = len(doc["rows"]) - len(rows)
    if more:
        lines.append(f"... {more} more row(s)")
    total = len(doc["rows"])
    lines.append(f"site {doc.get('site')}: {total} row(s): {counts or 'nothing watched'}")
    arbiter = doc.get("arbiter")
    if arbiter is not None:
        lines.append(format_arbiter(arbiter))
    return "\n".join(line.rstrip() for line in lines)


def format_arbiter(arbiter: dict[str, Any]) -> str:
    """One line on the site's standing with the arbiter."""
    up = "up" if arbiter.get("up") else "DOWN"
    owned = arbiter.get("owned") or []
    lease, left = arbiter.get("lease"), arbiter.get("lease_remaining")
    held = f"lease {lease}, {left:.1f} s left" if lease and left else "no lease"
    return f"arbiter {up}: {held}; owns {len(owned)} pair(s)"
